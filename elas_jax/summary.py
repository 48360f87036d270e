"""``python -m elas_jax.summary``: Model summary; the program is :mod:`elas_jax.cli.summary`."""

from elas_jax.cli.summary import run

if __name__ == "__main__":
  run()
