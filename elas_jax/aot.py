"""``python -m elas_jax.aot``: compiles a config's steps for a GPU without one; the program
is :mod:`elas_jax.cli.aot`, the work :mod:`elas_jax.deviceless`."""

from elas_jax.cli.aot import run

if __name__ == "__main__":
  run()
