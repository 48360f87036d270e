"""Evaluates a checkpoint on the fixed validation stream.

    python -m elas_jax.evaluate --workdir DIR [--step N]

Restores the latest (or the given) orbax checkpoint of a training run, with
the config saved in it, and prints one JSON line with ``step``, ``eval_loss``,
``eval_ppl`` (exp of the mean per-token loss over unmasked targets) and
``eval_tokens``. Runs on any number of devices: the checkpoint is restored
onto this machine's mesh.
"""

from __future__ import annotations

import json
import os

import ml_collections
import orbax.checkpoint as ocp
from absl import flags

from elas_jax import cli, distributed
from elas_jax.errors import UserError

_WORKDIR = flags.DEFINE_string("workdir", None, "Training run directory.", required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step; default: the latest.")
_MESH = flags.DEFINE_string("mesh", None, "Override the saved mesh as data,fsdp,tensor (e.g. -1,1,1).")


def load_checkpoint_config(workdir: str, step: int | None = None) -> tuple[ml_collections.ConfigDict, int]:
  from elas_jax import trainer

  ckpt_dir = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(ckpt_dir):
    raise UserError(f"{workdir}: no checkpoints directory (is this a training --workdir?)")
  cfg_probe = ml_collections.ConfigDict({"train": {"keep_checkpoints": 1}})
  mngr = trainer.checkpoint_manager(workdir, cfg_probe)
  try:
    steps = mngr.all_steps()
    if not steps:
      raise UserError(f"{ckpt_dir}: no checkpoint found")
    if step is None:
      step = max(steps)
    elif step not in steps:
      raise UserError(f"{ckpt_dir}: no checkpoint for step {step} (have {sorted(steps)})")
    saved = mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
  finally:
    mngr.close()
  return ml_collections.ConfigDict(saved), step


def evaluate_checkpoint(workdir: str, step: int | None = None, mesh: tuple[int, int, int] | None = None,
                        devices=None) -> dict:
  import jax

  from elas_jax import sharding, trainer

  cfg, step = load_checkpoint_config(workdir, step)
  if mesh is not None:
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = mesh
  run = trainer.build(cfg, devices)
  mngr = trainer.checkpoint_manager(workdir, cfg)
  try:
    state = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(run.abstract_state)))["state"]
  finally:
    mngr.close()
  eval_step = jax.jit(trainer.make_eval_step(run.graphdef, cfg),
                      in_shardings=(run.state_shardings["params"], sharding.replicated(run.mesh),
                                    run.batch_sharding))
  batches, _ = run.eval_batches()
  result = run.evaluate(eval_step, state["params"], state["step"], batches)
  return {"step": int(state["step"]), **result}


def main(argv) -> None:
  del argv
  distributed.initialize_from_flags()
  mesh = None
  if _MESH.value:
    try:
      mesh = tuple(int(x) for x in _MESH.value.split(","))
      assert len(mesh) == 3
    except (ValueError, AssertionError):
      raise UserError(f"--mesh={_MESH.value!r}: expected three integers data,fsdp,tensor") from None
  print(json.dumps(evaluate_checkpoint(_WORKDIR.value, _STEP.value, mesh)))


if __name__ == "__main__":
  distributed.define_flags()
  cli.run(main)
