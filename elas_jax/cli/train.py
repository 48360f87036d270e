"""Pre-trains an ELAS-JAX model (``python train.py`` / ``elas-train``).

    python train.py --config configs/<size>.py:<variant> --workdir DIR [--config.train.steps=N ...]

Without flags it trains the embedded default (configs/tiny.py:elas on the
offline sample corpus) in runs/tiny-elas. Running the same command again
resumes from the latest checkpoint. Thin entry point: the work is in
:mod:`elas_jax.trainer`.
"""

from __future__ import annotations

import json
import sys

from absl import flags

from elas_jax.cli import common, distributed

_CONFIG = common.define_config_flag()
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints and metrics; default runs/<size>-<variant>.")
distributed.define_flags()


def main(argv) -> None:
  del argv
  distributed.initialize_from_flags()
  from elas_jax import trainer  # after jax.distributed.initialize

  cfg = _CONFIG.value
  workdir = _WORKDIR.value or f"runs/{cfg.size}-{cfg.variant}"
  final = trainer.train_and_evaluate(cfg, workdir)
  if "eval_ppl" in final:
    print(f"final validation perplexity {final['eval_ppl']:.2f} on {final['eval_tokens']:,} tokens "
          f"at step {final['step']} ({workdir})", file=sys.stderr)
  print(json.dumps({"workdir": workdir, **final}))


def run() -> None:
  """Console-script entry point (``elas-train``)."""
  common.run(main)
