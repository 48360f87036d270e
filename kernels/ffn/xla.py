"""The FFN core in plain XLA ops, with a ``custom_vjp`` that controls what backward keeps.

The op spans both matmuls around the activation so that autodiff never keeps
the dense ``[T, F]`` activation: with ``masked`` (and ``split``) only the
compressed 2:4 ``relu(y1)`` (9/16 of the dense bytes) plus ``h`` (which the
preceding matmul keeps anyway) are saved; ``ste`` saves nothing F-wide and
recomputes ``y1`` in backward, as the dense warm-up's backward does in every
mode. XLA partitions it like any other ops (no ``shard_map`` needed). It is
the CPU default and the fastest path off GPUs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from elas_kernels import sparse24
from elas_kernels.ffn import base


def _split_tail(y: jax.Array) -> tuple[jax.Array, jax.Array]:
  full = y.shape[-1] - y.shape[-1] % sparse24.GROUP
  return y[..., :full], y[..., full:]


def _stats(y2: jax.Array, keep24: jax.Array) -> base.Stats:
  y2 = jax.lax.stop_gradient(y2).astype(jnp.float32)
  return base.statistics(jnp.sum((y2 == 0).astype(jnp.float32)), jnp.sum(y2),
                         jnp.sum(jnp.where(keep24, 0.0, y2)), y2.size)


def _forward(h, w_in, w_out, sparse_on):
  y1 = base.matmul_t(h, w_in)
  r = jnp.maximum(y1, 0)
  y2 = r * r
  keep24 = sparse24.mask_24(y2)
  keep = keep24 | jnp.logical_not(sparse_on)
  y2s = jnp.where(keep, y2, jnp.zeros((), y2.dtype))
  out = base.matmul_t(y2s, w_out)
  return out, _stats(y2, keep24), r, keep24


def _ffn_fwd(mode, dense_fraction, h, w_in, w_out, sparse_on):
  out, stats, r, keep24 = _forward(h, w_in, w_out, sparse_on)
  if mode == "ste":
    # STE needs the dense relu(y1): recompute it from h rather than store it.
    res = (h, w_in, w_out, sparse_on, None, None, None)
  else:
    # Store relu(y1) (not y2) at the kept positions: backward then rebuilds
    # y2s = v·v bit-exactly and uses 2v as d(y2)/d(y1); same bytes as y2s.
    r_main, r_tail = _split_tail(r)
    vals, meta = sparse24.compress_masked(r_main, _split_tail(keep24)[0])
    vals, meta, r_tail = (checkpoint_name(x, base.SAVED_24_NAME) for x in (vals, meta, r_tail))
    res = (h, w_in, w_out, sparse_on, vals, meta, r_tail)
  return (out, stats), res


def _ffn_bwd(mode, dense_fraction, res, g):
  h, w_in, w_out, sparse_on, vals, meta, r_tail = res
  g_out, _ = g  # statistics carry no gradient
  g_out = g_out.astype(h.dtype)

  def recompute():
    r = jnp.maximum(base.matmul_t(h, w_in), 0)
    return r, sparse24.mask_24(r * r)

  if mode == "ste":
    r, keep = recompute()
    keep = keep | jnp.logical_not(sparse_on)
    y2s = jnp.where(keep, r * r, jnp.zeros((), r.dtype))
    d_r_factor = 2 * r  # straight-through: the mask passes gradient unchanged
  else:
    def sparse_branch():
      return jnp.concatenate([sparse24.decompress_24(vals, meta), r_tail], axis=-1)

    def dense_branch():  # dense warm-up: exact gradient of the dense FFN
      return recompute()[0]

    r = jax.lax.cond(sparse_on, sparse_branch, dense_branch)
    y2s = r * r
    d_r_factor = 2 * r  # zero at dropped entries: the exact masked gradient

  y2_for_dw = y2s
  if mode == "split":
    tok_keep = sparse24.token_mask_24(y2s, dense_fraction)
    y2_tok = jnp.where(tok_keep, y2s, jnp.zeros((), y2s.dtype))
    y2_for_dw = jax.lax.select(sparse_on, y2_tok, y2s)

  d_h, d_w_in, d_w_out = base.ffn_grads(g_out, h, w_in, w_out, d_r_factor, y2_for_dw)
  return (d_h.astype(h.dtype), d_w_in.astype(w_in.dtype), d_w_out.astype(w_out.dtype), None)


_ffn_core = jax.custom_vjp(
    lambda mode, dense_fraction, h, w_in, w_out, sparse_on: _forward(h, w_in, w_out, sparse_on)[:2],
    nondiff_argnums=(0, 1))
_ffn_core.defvjp(_ffn_fwd, _ffn_bwd)


class XlaFfn(base.FfnCore):
  """The FFN core in XLA ops (any backend, any dtype and shape)."""

  name = "xla"
  per_device = False

  def _core(self, call, h_TxK, w_in_FxK, w_out_NxF, sparse_on):
    return _ffn_core(call.mode, call.dense_fraction, h_TxK, w_in_FxK, w_out_NxF, sparse_on)

  def saved_activation(self, h, w_in_FxK, w_out_NxF, *, mode="masked"):
    call = base.check_args(self.what, h, w_in_FxK, w_out_NxF, mode, 0.05)
    _, res = _ffn_fwd(mode, 0.05, h.reshape(call.t, call.k), w_in_FxK, w_out_NxF,
                      jnp.asarray(True))
    if res[4] is None:
      raise NotImplementedError(f"{self.what}: mode {mode!r} keeps no compressed activation")
    return res[4], res[5]
