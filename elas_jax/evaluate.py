"""``python -m elas_jax.evaluate``: Evaluates a checkpoint; the program is :mod:`elas_jax.cli.evaluate`."""

from elas_jax.cli.evaluate import run

if __name__ == "__main__":
  run()
