"""When the model runs its 2:4 FFN: after the dense warm-up.

The 2:4 op itself (selection, compression, the FFN core and its
implementations) lives in the kernels package, :mod:`elas_kernels.sparse24`
and :mod:`elas_kernels.ffn`; the model calls it through
:func:`elas_jax.ops.ffn.sparse_ffn`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sparsity_active(step: jax.Array | int, dense_warmup_steps: jax.Array | int) -> jax.Array:
  """Whether optimizer step ``step`` (0-based) runs the 2:4 FFN.

  Both arguments may be traced, so neither the step nor the warm-up length
  is baked into a compiled function.
  """
  return jnp.asarray(step) >= jnp.asarray(dense_warmup_steps)


def sparse_phase(model_cfg, step: jax.Array | int) -> jax.Array:
  """Whether the model runs its 2:4 FFN at optimizer step ``step``: training and
  evaluation both use this, so an evaluation follows the training phase."""
  return sparsity_active(step, model_cfg.sparsity.dense_warmup_steps) & bool(model_cfg.sparsity.enabled)
