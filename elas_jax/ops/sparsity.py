"""2:4 activation sparsity: selection, compression and the differentiable FFN op.

Semantics (brief section 3): along the last axis, every group of 4 consecutive
features keeps its 2 entries of largest magnitude; ties go to the lowest index.
When the width is not a multiple of 4 (the 1B config has f = 8191), the
trailing ``f % 4`` features form no group and stay dense.

The FFN op ``relu2_sparse_ffn(h, w_in, w_out, sparse_on)`` computes
``sparsify_24(relu(h @ w_inᵀ)²) @ w_outᵀ`` with a ``jax.custom_vjp`` that
controls what is kept for backward. It spans both matmuls around the
activation so that autodiff never keeps the dense ``[T, f]`` activation: with
the default ``masked`` mode only the compressed 2:4 activation (9/16 of the
dense bytes) plus ``h`` (which the preceding matmul keeps anyway) are saved.
It is also the pure-JAX reference for the Pallas kernels.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

GROUP = 4
# checkpoint_name of the compressed activation in the op's residuals: a remat
# policy that saves this name keeps it instead of re-running the op's forward
# (names inside a custom_vjp's fwd rule are seen by jax.checkpoint policies).
SAVED_24_NAME = "elas_24_activation"
BACKWARD_MODES = ("masked", "ste", "split")
BackwardMode = Literal["masked", "ste", "split"]


# --------------------------------------------------------------------------
# Selection and compression.
# --------------------------------------------------------------------------


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


def _compress_masked(y: jax.Array, keep: jax.Array) -> tuple[jax.Array, jax.Array]:
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
  """2:4-compress the last axis (a multiple of 4).

  Returns:
    values: ``[..., f/2]`` kept entries in ``y.dtype``, in feature order.
    meta: ``[..., ceil(f/8)]`` uint8; byte ``k`` holds group ``2k`` in its low
      nibble and group ``2k+1`` in its high nibble; a nibble is
      ``idx0 | idx1 << 2`` with ``idx0 < idx1`` the in-group kept positions.
  """
  return _compress_masked(y, mask_24(y))


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
  """Bytes of the compressed form of an array of ``shape``/``dtype``."""
  *lead, f = shape
  rows = int(np.prod(lead)) if lead else 1
  groups = f // GROUP
  tail = f % GROUP
  itemsize = jnp.dtype(dtype).itemsize
  return rows * ((2 * groups + tail) * itemsize + -(-groups // 2))


# --------------------------------------------------------------------------
# The FFN-side op: relu(h @ w_inᵀ)² -> 2:4 -> @ w_outᵀ, with custom backward.
# --------------------------------------------------------------------------


def matmul_t(a: jax.Array, b: jax.Array) -> jax.Array:
  """``a @ bᵀ`` accumulated in fp32, returned in ``a``'s dtype."""
  return jnp.einsum("tk,fk->tf", a, b, preferred_element_type=jnp.float32).astype(a.dtype)


def _split_tail(y: jax.Array) -> tuple[jax.Array, jax.Array]:
  full = y.shape[-1] - y.shape[-1] % GROUP
  return y[..., :full], y[..., full:]


def _stats(y2: jax.Array, keep24: jax.Array) -> dict[str, jax.Array]:
  """Sparsity statistics of one FFN activation (no gradient flows through)."""
  y2 = jax.lax.stop_gradient(y2).astype(jnp.float32)
  total = jnp.sum(y2)
  dropped = jnp.sum(jnp.where(keep24, 0.0, y2))
  return {
      # fraction of ReLU² outputs that are exactly zero
      "zero_frac": jnp.mean((y2 == 0).astype(jnp.float32)),
      # fraction of the activation mass that 2:4 drops (or would drop in warm-up)
      "dropped_mass": dropped / jnp.maximum(total, jnp.finfo(jnp.float32).tiny),
  }


def _forward(h, w_in, w_out, sparse_on):
  y1 = matmul_t(h, w_in)
  r = jnp.maximum(y1, 0)
  y2 = r * r
  keep24 = mask_24(y2)
  keep = keep24 | jnp.logical_not(sparse_on)
  y2s = jnp.where(keep, y2, jnp.zeros((), y2.dtype))
  out = matmul_t(y2s, w_out)
  return out, _stats(y2, keep24), r, keep24


def split_token_order(t: int) -> np.ndarray:
  """Split mode's fixed token order: groups of 4 for token-wise 2:4 are
  consecutive in it, so a group does not hold neighbouring, correlated tokens.
  A trace-time constant per token count (the Pallas kernels use the same one)."""
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
  """Token-wise 2:4 keep-mask in :func:`split_token_order`; ``dense_F`` columns keep all."""
  perm = split_token_order(y_TxF.shape[0])
  tok_keep = mask_24(y_TxF[perm].T).T[np.argsort(perm)]
  return tok_keep | dense_F[None, :]


def _token_mask_24(y_TxF: jax.Array, dense_fraction: float) -> jax.Array:
  """Split mode: token-wise 2:4 mask for the weight gradient (Haziza et al.),
  all tokens kept for the ``dense_fraction`` features with the most non-zeros."""
  return token_keep_24(y_TxF, densest_features(jnp.sum(y_TxF != 0, axis=0), dense_fraction))


def _ffn_fwd(mode, dense_fraction, h, w_in, w_out, sparse_on):
  out, stats, r, keep24 = _forward(h, w_in, w_out, sparse_on)
  if mode == "ste":
    # STE needs the dense relu(y1): recompute it from h rather than store it.
    res = (h, w_in, w_out, sparse_on, None, None, None)
  else:
    # Store relu(y1) (not y2) at the kept positions: backward then rebuilds
    # y2s = v·v bit-exactly and uses 2v as d(y2)/d(y1); same bytes as y2s.
    r_main, r_tail = _split_tail(r)
    vals, meta = _compress_masked(r_main, _split_tail(keep24)[0])
    vals, meta, r_tail = (checkpoint_name(x, SAVED_24_NAME) for x in (vals, meta, r_tail))
    res = (h, w_in, w_out, sparse_on, vals, meta, r_tail)
  return (out, stats), res


def _ffn_bwd(mode, dense_fraction, res, g):
  h, w_in, w_out, sparse_on, vals, meta, r_tail = res
  g_out, _ = g  # statistics carry no gradient
  g_out = g_out.astype(h.dtype)

  def recompute():
    r = jnp.maximum(matmul_t(h, w_in), 0)
    return r, mask_24(r * r)

  if mode == "ste":
    r, keep = recompute()
    keep = keep | jnp.logical_not(sparse_on)
    y2s = jnp.where(keep, r * r, jnp.zeros((), r.dtype))
    d_r_factor = 2 * r  # straight-through: the mask passes gradient unchanged
  else:
    def sparse_branch():
      r = jnp.concatenate([decompress_24(vals, meta), r_tail], axis=-1)
      return r

    def dense_branch():  # dense warm-up: exact gradient of the dense FFN
      return recompute()[0]

    r = jax.lax.cond(sparse_on, sparse_branch, dense_branch)
    y2s = r * r
    d_r_factor = 2 * r  # zero at dropped entries: the exact masked gradient

  y2_for_dw = y2s
  if mode == "split":
    tok_keep = _token_mask_24(y2s, dense_fraction)
    y2_tok = jnp.where(tok_keep, y2s, jnp.zeros((), y2s.dtype))
    y2_for_dw = jax.lax.select(sparse_on, y2_tok, y2s)

  d_h, d_w_in, d_w_out = ffn_grads(g_out, h, w_in, w_out, d_r_factor, y2_for_dw)
  return (d_h.astype(h.dtype), d_w_in.astype(w_in.dtype), d_w_out.astype(w_out.dtype), None)


def ffn_grads(g_TxN: jax.Array, h_TxK: jax.Array, w_in_FxK: jax.Array, w_out_NxF: jax.Array,
              dy2_dy1_TxF: jax.Array, y2_dw_TxF: jax.Array
              ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """fp32 gradients ``(d_h, d_w_in, d_w_out)`` of ``out = y2 @ w_outᵀ``, ``y1 = h @ w_inᵀ``.

  ``dy2_dy1`` is ``d(y2)/d(y1)`` as the backward mode defines it (``2 relu(y1)``,
  zero where 2:4 dropped for the exact masked gradient) and ``y2_dw`` the
  activation ``w_out``'s gradient sees. ``dy1`` is rounded to ``h``'s dtype,
  as the forward rounds ``y1``. Shared by this op's backward and the dense
  ``F % 4`` tail of the Pallas kernel's.
  """
  dy2 = jnp.einsum("tn,nf->tf", g_TxN, w_out_NxF, preferred_element_type=jnp.float32)
  dy1 = (dy2 * dy2_dy1_TxF.astype(jnp.float32)).astype(h_TxK.dtype)
  d_w_out = jnp.einsum("tn,tf->nf", g_TxN, y2_dw_TxF, preferred_element_type=jnp.float32)
  d_w_in = jnp.einsum("tf,tk->fk", dy1, h_TxK, preferred_element_type=jnp.float32)
  d_h = jnp.einsum("tf,fk->tk", dy1, w_in_FxK, preferred_element_type=jnp.float32)
  return d_h, d_w_in, d_w_out


_ffn_core = jax.custom_vjp(
    lambda mode, dense_fraction, h, w_in, w_out, sparse_on: _forward(h, w_in, w_out, sparse_on)[:2],
    nondiff_argnums=(0, 1))
_ffn_core.defvjp(_ffn_fwd, _ffn_bwd)


def check_ffn_options(mode: str, dense_fraction: float) -> None:
  """The backward-mode options of the 2:4 FFN op (XLA and Pallas alike)."""
  if mode not in BACKWARD_MODES:
    raise ValueError(f"unknown 2:4 backward mode {mode!r}; expected one of {BACKWARD_MODES}")
  if not 0.0 <= dense_fraction < 1.0:
    raise ValueError(f"dense_fraction must be in [0, 1), got {dense_fraction}")


def relu2_sparse_ffn(
    h: jax.Array,
    w_in_FxK: jax.Array,
    w_out_NxF: jax.Array,
    sparse_on: jax.Array | bool,
    *,
    mode: BackwardMode = "masked",
    dense_fraction: float = 0.05,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """``sparsify_24(relu(h @ w_inᵀ)²) @ w_outᵀ`` with ELAS's backward modes.

  Args:
    h: ``[..., K]`` input of the matmul that produces the activation (``x``
      for full-rank layers, the rank-r code ``x Aᵀ`` for low-rank ones).
    w_in_FxK: weight producing the ``F`` activation features.
    w_out_NxF: weight consuming them.
    sparse_on: scalar bool, may be traced. False = dense ReLU² (warm-up), True
      = 2:4. Being data, flipping it never recompiles.
    mode: ``masked`` (exact gradient of the sparse forward; keeps only the
      compressed activation), ``ste`` (straight-through: the mask passes
      gradient; recomputes ``h @ w_inᵀ`` in backward) or ``split`` (masked
      input gradient; ``w_out``'s gradient uses token-wise 2:4 on all but the
      ``dense_fraction`` densest features, in a fixed token order).
    dense_fraction: split mode only.

  Returns:
    ``([..., N] output, {"zero_frac", "dropped_mass"} fp32 scalars)``.
  """
  check_ffn_options(mode, dense_fraction)
  lead = h.shape[:-1]
  h_TxK = h.reshape(-1, h.shape[-1])
  sparse_on = jnp.asarray(sparse_on, dtype=bool)
  out_TxN, stats = _ffn_core(mode, float(dense_fraction), h_TxK, w_in_FxK, w_out_NxF, sparse_on)
  return out_TxN.reshape(*lead, -1), stats


# --------------------------------------------------------------------------
# When 2:4 is on: after the dense warm-up.
# --------------------------------------------------------------------------


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
