"""Weights & Biases logging of a training run (``config.wandb``; optional: ``pip install -e .[wandb]``).

Process 0 opens one W&B run per workdir and logs to it every record that
``metrics.jsonl`` gets (same keys, same values, at the same step) and the
resolved config (``train.micro_batch = auto`` already replaced by its choice).
The run id is kept in ``<workdir>/wandb_run_id``: a resumed training run
continues the same W&B run (``resume="allow"`` with that id). W&B's own files
go to ``<workdir>/wandb/``. W&B's environment variables apply as usual:
``WANDB_MODE=offline`` logs locally only (``wandb sync <workdir>/wandb/offline-run-*``
uploads later; each resumed start is one more directory of the same run id),
``WANDB_API_KEY``, ``WANDB_DIR``, ...

After a crash, training resumes from the last checkpoint and logs the steps
after it again; W&B keeps the step numbers it already has (it accepts only
increasing steps), so those records are not sent twice. Their values are the
same anyway: a resumed run repeats the lost steps bit for bit.
"""

from __future__ import annotations

import importlib.util
import os
import secrets
import string
from typing import Any

import jax

from elas_jax.errors import ConfigError

RUN_ID_FILE = "wandb_run_id"


def check_available(cfg) -> None:
  """A one-line error, before anything compiles, when W&B logging is on and wandb is missing."""
  if cfg.wandb.enabled and importlib.util.find_spec("wandb") is None:
    raise ConfigError("config.wandb.enabled = True but wandb is not installed: "
                      "pip install -r requirements-wandb.txt (or pip install -e .[wandb])")


def run_id(workdir: str) -> str:
  """The W&B run id of ``workdir``: read from ``wandb_run_id``, or made and written there."""
  path = os.path.join(workdir, RUN_ID_FILE)
  if os.path.exists(path):
    with open(path) as f:
      found = f.read().strip()
    if found:
      return found
  # W&B's own form of id (8 of [a-z0-9]), made here so that it is on disk before the run starts.
  new = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(new + "\n")
  os.replace(tmp, path)  # a half-written id never stands in the workdir
  return new


class WandbWriter:
  """The W&B half of the metric writers: ``write(step, metrics)`` and ``close()``."""

  def __init__(self, cfg, workdir: str):
    import wandb

    w = cfg.wandb
    self._run = wandb.init(
        project=w.project, entity=w.entity or None,
        name=w.name or os.path.basename(os.path.abspath(workdir)),
        id=run_id(workdir), resume="allow", dir=workdir, config=cfg.to_dict())
    # A resumed online run continues after the steps W&B already holds.
    self._first_new_step = int(getattr(self._run, "starting_step", 0) or 0)

  @property
  def id(self) -> str:
    return self._run.id

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    if step < self._first_new_step:
      return
    self._run.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

  def close(self) -> None:
    self._run.finish()


class Writers:
  """Several metric writers as one (``write`` and ``close`` go to each, in order)."""

  def __init__(self, *writers):
    self.writers = writers

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    for w in self.writers:
      w.write(step, metrics)

  def close(self) -> None:
    try:
      self.writers[0].close()
    finally:
      if len(self.writers) > 1:
        Writers(*self.writers[1:]).close()


def with_wandb(writer, cfg, workdir: str):
  """``writer`` plus a :class:`WandbWriter` on process 0 when ``cfg.wandb.enabled``;
  ``writer`` itself otherwise."""
  if not cfg.wandb.enabled or jax.process_index() != 0:
    return writer
  return Writers(writer, WandbWriter(cfg, workdir))
