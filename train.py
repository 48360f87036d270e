"""Pre-trains an ELAS-JAX model.

    python train.py --config configs/<size>.py:<variant> --workdir DIR [--config.train.steps=N ...]

Without flags it trains the embedded default (configs/tiny.py:elas on the
offline sample corpus) in runs/tiny-elas. Same as the ``elas-train`` command
of the installed package; the work is in :mod:`elas_jax.cli.train` and
:mod:`elas_jax.trainer`.
"""

from elas_jax.cli import train

if __name__ == "__main__":
  train.run()
