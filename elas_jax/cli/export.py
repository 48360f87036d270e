"""Exports a checkpoint to a Hugging Face Llama directory, or imports one.

    python -m elas_jax.export --workdir DIR [--step N] --out OUT [--dtype bfloat16|float32]
    python -m elas_jax.export import --hf HF_DIR --workdir OUT [--config configs/tiny.py:full]

What is written and the mapping: :mod:`elas_jax.hf`.
"""

from __future__ import annotations

import json

from absl import flags

from elas_jax import hf
from elas_jax.cli import common
from elas_jax.errors import UserError


def _define_flags() -> None:
  # Defined when run as a program only: the other commands define --workdir /
  # --config too, and tests import all of them.
  flags.DEFINE_string("workdir", None, "Export: the training run to export. Import: the workdir to create.")
  flags.DEFINE_integer("step", None, "Export: checkpoint step; default: the latest.")
  flags.DEFINE_string("out", None, "Export: the Hugging Face directory to write.")
  flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Export: dtype of the saved weights.")
  flags.DEFINE_string("hf", None, "Import: a Hugging Face Llama directory.")
  common.define_config_flag(f"{common.DEFAULT_CONFIG}:full")


def main(argv) -> None:
  f = flags.FLAGS
  command = argv[1:]
  if command == ["import"]:
    if not f.hf or not f.workdir:
      raise UserError("import needs --hf=HF_DIR and --workdir=NEW_WORKDIR")
    print(json.dumps(hf.import_hf(f.hf, f.workdir, f.config)))
    return
  if command:
    raise UserError(f"unknown command {' '.join(command)!r}: use no command (export) or 'import'")
  if not f.workdir or not f.out:
    raise UserError("export needs --workdir=TRAINING_RUN and --out=HF_DIR")
  print(json.dumps(hf.export_checkpoint(f.workdir, f.out, f.step, f.dtype)))


def run() -> None:
  """Console-script entry point (``elas-export``)."""
  _define_flags()
  common.run(main)


if __name__ == "__main__":
  run()
