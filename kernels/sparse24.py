"""2:4 structured sparsity along the last axis: selection, compression, token-wise groups.

Semantics (the ELAS paper's, and every kernel's): along the last axis, every
group of 4 consecutive features keeps its 2 entries of largest magnitude; ties
go to the lowest index, deterministically. When the width is not a multiple of
4 (the 1B config has F = 8191), the trailing ``F % 4`` features form no group
and stay dense.

Compressed form (:func:`compress_24`): the kept values ``[..., F/2]`` in the
input's dtype, in feature order, plus uint8 metadata ``[..., ceil(F/8)]``: byte
``k`` holds group ``2k`` in its low nibble and group ``2k+1`` in its high
nibble, a nibble being ``i0 | i1 << 2`` with ``i0 < i1`` the kept in-group
positions. 9/16 of the dense bf16 bytes.

Split backward mode (Haziza et al.) also needs 2:4 *along tokens*, in a fixed
token order (:func:`split_token_order`), for all but the densest features
(:func:`densest_features`): :func:`token_keep_24`.

Plain jnp and numpy; the XLA FFN op and every Pallas kernel use these rules.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

GROUP = 4


def _group_mask(y_GxF: jax.Array) -> jax.Array:
  """Keep-mask for an array whose last axis is a multiple of 4."""
  g = y_GxF.reshape(*y_GxF.shape[:-1], -1, GROUP)
  a = jnp.abs(g)
  a_i = a[..., :, None]  # the entry being ranked
  a_j = a[..., None, :]  # its competitors
  earlier = jnp.tril(jnp.ones((GROUP, GROUP), dtype=bool), k=-1)  # [i, j]: j < i
  beats = (a_j > a_i) | ((a_j == a_i) & earlier)
  # Ranks within a group are a permutation of 0..3, so exactly 2 are kept.
  keep = jnp.sum(beats, axis=-1) < 2
  return keep.reshape(y_GxF.shape)


def mask_24(y: jax.Array) -> jax.Array:
  """Boolean mask of the entries kept by 2:4 selection along the last axis."""
  f = y.shape[-1]
  full = f - f % GROUP
  if full == f:
    return _group_mask(y)
  tail = jnp.ones((*y.shape[:-1], f - full), dtype=bool)
  return jnp.concatenate([_group_mask(y[..., :full]), tail], axis=-1)


def sparsify_24(y: jax.Array) -> jax.Array:
  """Zero the 2 smallest-magnitude entries of every 4 along the last axis."""
  return jnp.where(mask_24(y), y, jnp.zeros((), y.dtype))


def _check_width(f: int, what: str) -> None:
  if f % GROUP:
    raise ValueError(
        f"{what}: last axis has {f} features, not a multiple of {GROUP}; "
        "split off the f % 4 tail (it stays dense) before compressing")


def compress_masked(y: jax.Array, keep: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Compress ``y`` with a given 2-of-4 keep mask (exactly 2 per group)."""
  _check_width(y.shape[-1], "compress_24")
  lead = y.shape[:-1]
  y_g = y.reshape(*lead, -1, GROUP)
  k_g = keep.reshape(*lead, -1, GROUP)
  idx0 = jnp.argmax(k_g, axis=-1)  # first kept position
  idx1 = GROUP - 1 - jnp.argmax(k_g[..., ::-1], axis=-1)  # last kept position
  idx = jnp.stack([idx0, idx1], axis=-1)
  values = jnp.take_along_axis(y_g, idx, axis=-1).reshape(*lead, -1)
  # One nibble per group (two 2-bit indices), two groups per byte.
  nib = (idx0 | (idx1 << 2)).astype(jnp.uint8)
  n_groups = nib.shape[-1]
  if n_groups % 2:
    nib = jnp.concatenate([nib, jnp.zeros((*lead, 1), jnp.uint8)], axis=-1)
  nib = nib.reshape(*lead, -1, 2)
  meta = nib[..., 0] | (nib[..., 1] << 4)
  return values, meta


def compress_24(y: jax.Array) -> tuple[jax.Array, jax.Array]:
  """2:4-compress the last axis (a multiple of 4): ``(values [..., F/2], meta uint8
  [..., ceil(F/8)])`` in the layout of the module docstring."""
  return compress_masked(y, mask_24(y))


def decompress_24(values: jax.Array, meta: jax.Array) -> jax.Array:
  """Inverse of :func:`compress_24`: ``decompress_24(*compress_24(y)) == sparsify_24(y)``."""
  lead = values.shape[:-1]
  if values.shape[-1] % 2:
    raise ValueError(f"decompress_24: values width {values.shape[-1]} is odd")
  n_groups = values.shape[-1] // 2
  if meta.shape != (*lead, -(-n_groups // 2)) or meta.dtype != jnp.uint8:
    raise ValueError(
        f"decompress_24: meta {meta.dtype}{list(meta.shape)} does not match "
        f"values {list(values.shape)} (expected uint8{[*lead, -(-n_groups // 2)]})")
  nib = jnp.stack([meta & 0xF, meta >> 4], axis=-1).reshape(*lead, -1)[..., :n_groups]
  idx0 = (nib & 0x3).astype(jnp.int32)[..., None]
  idx1 = (nib >> 2).astype(jnp.int32)[..., None]
  v = values.reshape(*lead, n_groups, 2)
  pos = jnp.arange(GROUP, dtype=jnp.int32)
  zero = jnp.zeros((), values.dtype)
  dense = jnp.where(pos == idx0, v[..., :1], jnp.where(pos == idx1, v[..., 1:], zero))
  return dense.reshape(*lead, n_groups * GROUP)


def compressed_bytes(shape: tuple[int, ...], dtype) -> int:
  """Bytes of the compressed form of an array of ``shape``/``dtype`` (the dense tail included)."""
  *lead, f = shape
  rows = int(np.prod(lead)) if lead else 1
  groups = f // GROUP
  tail = f % GROUP
  itemsize = jnp.dtype(dtype).itemsize
  return rows * ((2 * groups + tail) * itemsize + -(-groups // 2))


# --------------------------------------------------------------------------
# Token-wise 2:4 (split backward mode).
# --------------------------------------------------------------------------


def split_token_order(t: int) -> np.ndarray:
  """Split mode's fixed token order: groups of 4 for token-wise 2:4 are
  consecutive in it, so a group does not hold neighbouring, correlated tokens.
  A trace-time constant per token count (every implementation uses this one)."""
  return np.random.RandomState(0).permutation(t)


def densest_features(nnz_F: jax.Array, dense_fraction: float) -> jax.Array:
  """Bool ``[F]``: the ``ceil(dense_fraction · F)`` features with most non-zeros
  (ties to the lower index), which split mode keeps dense."""
  f = nnz_F.shape[0]
  dense_F = jnp.zeros((f,), bool)
  n_dense = int(np.ceil(dense_fraction * f))
  if n_dense == 0:
    return dense_F
  return dense_F.at[jax.lax.top_k(nnz_F, n_dense)[1]].set(True)


def token_keep_24(y_TxF: jax.Array, dense_F: jax.Array) -> jax.Array:
  """Token-wise 2:4 keep-mask in :func:`split_token_order`; ``dense_F`` columns keep all
  (and the ``T % 4`` tokens of an incomplete group, as :func:`mask_24`'s tail)."""
  perm = split_token_order(y_TxF.shape[0])
  tok_keep = mask_24(y_TxF[perm].T).T[np.argsort(perm)]
  return tok_keep | dense_F[None, :]


def token_mask_24(y_TxF: jax.Array, dense_fraction: float) -> jax.Array:
  """Split mode's weight-gradient mask: token-wise 2:4, all tokens kept for the
  ``dense_fraction`` features with the most non-zeros."""
  return token_keep_24(y_TxF, densest_features(jnp.sum(y_TxF != 0, axis=0), dense_fraction))
