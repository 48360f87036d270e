"""Pre-trains an ELAS-JAX model.

    python train.py --config configs/<size>.py:<variant> --workdir DIR

Thin entry point: flags and config here, the work in ``elas_jax``.
"""

from absl import flags

from elas_jax import cli

_CONFIG = cli.define_config_flag()
_WORKDIR = flags.DEFINE_string("workdir", "workdir/default", "Directory for checkpoints and metrics.")


def main(argv) -> None:
  del argv
  from elas_jax import summary  # the training loop lands with the training-system issue

  summary.summarize(_CONFIG.value)
  cli.fail("training is not implemented yet: this build validates the config and builds the "
           "model only (see README, 'Status')", status=3)


if __name__ == "__main__":
  cli.run(main)
