"""``python -m elas_jax.generate``: Generates text with a checkpoint; the program is :mod:`elas_jax.cli.generate`."""

from elas_jax.cli.generate import run

if __name__ == "__main__":
  run()
