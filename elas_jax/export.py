"""``python -m elas_jax.export``: Hugging Face export and import; the program is :mod:`elas_jax.cli.export`."""

from elas_jax.cli.export import run

if __name__ == "__main__":
  run()
