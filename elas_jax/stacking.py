"""Decoder-block parameters in two layouts: one entry per layer, or stacked for ``lax.scan``.

``model.scan_layers = True`` stores the blocks' parameters stacked on a
leading ``layers`` axis (logical axis ``layers``, never sharded) so that
:class:`elas_jax.model.Transformer` runs them with ``jax.lax.scan``.
:func:`stack_layers` / :func:`unstack_layers` convert parameters (and the
optimizer moments that mirror them) between the two layouts, for the
trainer and export; :func:`unstacked_layer` gives one block of the stacked
blocks as a module of its own. A leaf module: it knows parameters, not the model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def is_var(x) -> bool:
  return isinstance(x, nnx.Variable)


def _stack(values):
  if isinstance(values[0], jax.ShapeDtypeStruct):  # abstract (nnx.eval_shape) models
    return jax.ShapeDtypeStruct((len(values), *values[0].shape), values[0].dtype)
  return jnp.stack(values)


def _take(value, i: int):
  if isinstance(value, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(value.shape[1:], value.dtype)
  return value[i]


def stack_vars(*layers):
  """One stacked leaf from the same leaf of every layer; Variables gain a ``layers`` axis."""
  first = layers[0]
  if not is_var(first):
    return _stack(layers)
  value = _stack([v.get_value() for v in layers])
  axes = first.get_metadata().get("logical_axes")
  return first.replace(value, **({"logical_axes": ("layers", *axes)} if axes else {}))


def _unstack_var(x, i: int):
  if not is_var(x):
    return _take(x, i)
  axes = x.get_metadata().get("logical_axes")
  if axes and axes[0] == "layers":
    return x.replace(_take(x.get_value(), i), logical_axes=tuple(axes[1:]))
  return x.replace(_take(x.get_value(), i))


def _with_blocks(params, blocks):
  """``params`` (an nnx.State or a dict) with its ``blocks`` entry replaced."""
  out = {k: v for k, v in params.items()}
  out["blocks"] = blocks
  return nnx.State(out) if isinstance(params, nnx.State) else out


def stack_layers(params):
  """Parameters of an unscanned model -> the ``scan_layers = True`` layout.

  ``params`` is an ``nnx.State`` (or nested dict) with ``blocks`` keyed by
  layer index; the result keys ``blocks`` by module path with every leaf
  stacked on a new leading axis (logical axis ``layers``). Optimizer moments
  that mirror the parameters convert the same way.
  """
  blocks = params["blocks"]
  keys = list(blocks.keys())
  if not keys or not all(str(k).isdigit() for k in keys):
    raise ValueError(f"stack_layers: blocks are not keyed by layer index (got {keys[:4]}); "
                     "already stacked?")
  keys = sorted(keys, key=int)
  stacked = jax.tree.map(stack_vars, *[blocks[k] for k in keys], is_leaf=is_var)
  return _with_blocks(params, stacked)


def unstack_layers(params):
  """Inverse of :func:`stack_layers`: scanned parameters -> one entry per layer."""
  blocks = params["blocks"]
  leaves = jax.tree.leaves(blocks, is_leaf=is_var)
  if any(str(k).isdigit() for k in blocks.keys()):
    raise ValueError("unstack_layers: blocks are keyed by layer index; already unstacked?")
  n = (leaves[0].get_value() if is_var(leaves[0]) else leaves[0]).shape[0]
  per_layer = {i: jax.tree.map(lambda x, i=i: _unstack_var(x, i), blocks, is_leaf=is_var)
               for i in range(n)}
  return _with_blocks(params, nnx.State(per_layer) if isinstance(blocks, nnx.State) else per_layer)


def unstacked_layer(stacked_blocks: nnx.Module, i: int) -> nnx.Module:
  """Layer ``i`` of a scanned model's stacked blocks, as a module of its own."""
  graphdef, state = nnx.split(stacked_blocks)
  return nnx.merge(graphdef, jax.tree.map(lambda x: _unstack_var(x, i), state, is_leaf=is_var))
