"""Multi-process (multi-host) start-up through ``jax.distributed.initialize``.

* ``--distributed``: auto-detect the cluster (SLURM, Open MPI, Kubernetes
  indexed jobs, ... as jax supports) and join it.
* ``--coordinator_address=host:port --num_processes=N --process_id=i``: join
  explicitly (e.g. several processes on one machine over 127.0.0.1).

Under SLURM the supported layout is one task per node holding all of the
node's GPUs (``--ntasks-per-node=1 --gpus-per-node=8``): one process per host
runs one data pipeline and one tokenizer for all its GPUs. jax's own SLURM
detection assumes one task per GPU and restricts each process to GPU
``SLURM_LOCALID`` (GPU 0 alone for one task per node), so
:func:`slurm_local_device_ids` passes the node's GPUs explicitly.

On CPU, cross-process collectives use gloo. Must run before anything asks jax
for its devices.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import jax
from absl import flags

_FLAGS = {}

# What jax's SLURM detection requires (jax/_src/clusters/slurm_cluster.py).
_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


def define_flags() -> None:
  _FLAGS["distributed"] = flags.DEFINE_bool(
      "distributed", False, "Join a multi-process job, auto-detecting SLURM / MPI / Kubernetes.")
  _FLAGS["coordinator_address"] = flags.DEFINE_string(
      "coordinator_address", None, "host:port of process 0 (explicit multi-process start-up).")
  _FLAGS["num_processes"] = flags.DEFINE_integer("num_processes", None, "Number of processes.")
  _FLAGS["process_id"] = flags.DEFINE_integer("process_id", None, "This process's index.")


def _expand_counts(text: str) -> list[int]:
  """SLURM's compressed per-node counts: ``"2(x3),1"`` -> ``[2, 2, 2, 1]``."""
  out = []
  for part in text.split(","):
    m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
    if m is None:
      raise ValueError(text)
    out += [int(m.group(1))] * int(m.group(2) or 1)
  return out


def _tasks_on_this_node(env: Mapping[str, str]) -> int | None:
  text = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
  if text is None or "SLURM_NODEID" not in env:
    return None
  try:
    return _expand_counts(text)[int(env["SLURM_NODEID"])]
  except (ValueError, IndexError):
    return None


def _gpus_visible(env: Mapping[str, str]) -> int | None:
  """GPUs this task may use: CUDA_VISIBLE_DEVICES (set by SLURM's GPU plugin; jax's
  device ids count within it), else SLURM_GPUS_ON_NODE."""
  visible = env.get("CUDA_VISIBLE_DEVICES")
  if visible is not None:
    ids = [x for x in visible.split(",") if x.strip()]
    return len(ids) if ids and visible != "NoDevFiles" else None
  count = env.get("SLURM_GPUS_ON_NODE", "")
  return int(count) if count.isdigit() and int(count) > 0 else None


def slurm_local_device_ids(env: Mapping[str, str] | None = None) -> list[int] | None:
  """The ``local_device_ids`` to pass to ``jax.distributed.initialize`` under SLURM.

  All of the node's GPUs (``[0, ..., n-1]``) when this task is the only one on
  its node; None, i.e. jax's default, otherwise: not under SLURM, several tasks
  per node (jax gives each GPU ``SLURM_LOCALID``), ``JAX_LOCAL_DEVICE_IDS`` set
  by the user, or no GPU count to be found.
  """
  env = os.environ if env is None else env
  if not all(v in env for v in _SLURM_VARS) or "JAX_LOCAL_DEVICE_IDS" in env:
    return None
  gpus = _gpus_visible(env)
  if _tasks_on_this_node(env) != 1 or gpus is None:
    return None
  return list(range(gpus))


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
  # CPU processes need a collectives backend to form one mesh; GPUs ignore this.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id, local_device_ids=slurm_local_device_ids())


def initialize_from_flags() -> None:
  if not _FLAGS:
    return
  explicit = _FLAGS["coordinator_address"].value
  if explicit or _FLAGS["distributed"].value:
    initialize(explicit, _FLAGS["num_processes"].value, _FLAGS["process_id"].value)
