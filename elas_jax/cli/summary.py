"""Prints a model's parameters per module and activation memory per token.

    python -m elas_jax.summary --config configs/llama_60m.py:elas [--config.<field>=...]

The last line printed is one JSON object (:func:`elas_jax.model_summary.summarize`).
"""

from __future__ import annotations

import json

from absl import flags

from elas_jax import model_summary
from elas_jax.cli import common


def main(argv) -> None:
  del argv
  print(json.dumps(model_summary.summarize(flags.FLAGS.config)))


def run() -> None:
  """Console-script entry point (``elas-summary``)."""
  common.define_config_flag()
  common.run(main)


if __name__ == "__main__":
  run()
