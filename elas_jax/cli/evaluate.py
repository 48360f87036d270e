"""Evaluates a checkpoint on the fixed validation stream.

    python -m elas_jax.evaluate --workdir DIR [--step N] [--mesh d,f,t]

Restores the latest (or the given) orbax checkpoint of a training run, with
the config saved in it, and prints one JSON line with ``step``, ``eval_loss``,
``eval_ppl`` (exp of the mean per-token loss over unmasked targets) and
``eval_tokens`` (:func:`elas_jax.trainer.evaluate_checkpoint`). Runs on any
number of devices: the checkpoint is restored onto this machine's mesh.
"""

from __future__ import annotations

import json

from absl import flags

from elas_jax import sharding
from elas_jax.cli import common, distributed

_WORKDIR = flags.DEFINE_string("workdir", None, "Training run directory.", required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step; default: the latest.")
_MESH = flags.DEFINE_string("mesh", None, "Override the saved mesh as data,fsdp,tensor (e.g. -1,1,1).")


def main(argv) -> None:
  del argv
  distributed.initialize_from_flags()
  from elas_jax import trainer  # after jax.distributed.initialize

  print(json.dumps(trainer.evaluate_checkpoint(_WORKDIR.value, _STEP.value,
                                               sharding.parse_mesh(_MESH.value))))


def run() -> None:
  """Console-script entry point (``elas-eval``)."""
  distributed.define_flags()
  common.run(main)


if __name__ == "__main__":
  run()
