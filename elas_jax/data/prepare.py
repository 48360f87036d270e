"""``python -m elas_jax.data.prepare``: pre-tokenises a corpus; the program is
:mod:`elas_jax.cli.prepare`, the work :mod:`elas_jax.data.pretokenize`."""

from elas_jax.cli.prepare import run

if __name__ == "__main__":
  run()
