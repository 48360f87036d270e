"""``python -m elas_jax.lm_eval``: lm-evaluation-harness on ELAS-JAX checkpoints; the
program is :mod:`elas_jax.cli.lm_eval`, the model :mod:`elas_jax.downstream`."""

from elas_jax.cli.lm_eval import run

if __name__ == "__main__":
  run()
