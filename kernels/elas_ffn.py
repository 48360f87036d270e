"""The whole 2:4-sparse squared-ReLU FFN core as Pallas kernels, forward and backward.

Computes what ``elas_jax.ops.sparsity.relu2_sparse_ffn`` computes (its reference):

    out_TxN = sparsify_24(relu(h_TxK @ w_inᵀ)²) @ w_outᵀ       w_in [F, K], w_out [N, F]

For a low-rank FFN ``h`` is the rank-r code ``x A_upᵀ``, ``w_in = B_up``,
``w_out = A_down`` (so ``K`` and ``N`` are ranks and the dense ``[T, F]``
activation is the only big tensor).

Forward (one program per ``block_t`` tokens, a loop over ``block_f`` features):
per feature block, 8 plane dots ``h @ w_inᵀ`` give ``y1`` in registers, ReLU²,
2:4 select across planes, the compressed ``relu(y1)`` values + metadata go to
memory (9/16 of the dense bf16 bytes), and ``y2s @ w_outᵀ`` accumulates the
``[block_t, N]`` output on chip. ``y1`` and the dense ``y2`` never reach memory.

Backward, two kernels (like flash attention's): ``dh`` (per token block, loop
over features) and ``dw_in``/``dw_out`` (per feature block, loop over tokens).
Each rebuilds ``relu(y1)`` from the compressed values (``masked``, ``split``)
or recomputes it from ``h`` (``ste``, and the dense warm-up), forms
``dy1 = (g @ w_out) · 2 relu(y1)`` in registers and never stores it.
``split`` runs the tokens in a fixed permutation and applies token-wise 2:4 to
``w_out``'s gradient inside the ``dw`` kernel (4 row planes per token block).

Shapes need not divide the blocks: tokens and features are zero-padded (zeros
flow through exactly) and the ``F % 4`` features that form no 2:4 group stay
dense, handled in XLA as in the reference. See ``kernels/common.py`` for the
plane layout.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import pallas as pl

from elas_jax.ops import sparsity
from kernels import common as cm
from kernels.common import PLANES


def reference(h: jax.Array, w_in_FxK: jax.Array, w_out_NxF: jax.Array, sparse_on, *,
              mode: str = "masked", dense_fraction: float = 0.05
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Plain jnp, no ``custom_vjp``: what ``relu2_sparse_ffn`` computes, differentiated
  by ``jax.grad`` itself, so the tests' gradients do not share the code under test.

  Each backward mode is written as the forward whose autodiff is that mode:
  ``masked`` is autodiff of the 2:4-masked forward; ``ste`` adds the mask as a
  constant (``y2 + stop_gradient(y2s - y2)``: the value is ``y2s``, the gradient
  passes the mask); ``split`` feeds ``w_out`` a zero-valued term whose
  gradient is the token-wise 2:4 activation. Only the selection rules
  (``mask_24``, ``token_keep_24``, ``densest_features``) come from
  ``elas_jax.ops.sparsity``; they are plain jnp and tested there against numpy.
  """
  lead = h.shape[:-1]
  h_TxK = h.reshape(-1, h.shape[-1])
  sparse_on = jnp.asarray(sparse_on, bool)
  y1 = jnp.einsum("tk,fk->tf", h_TxK, w_in_FxK, preferred_element_type=jnp.float32)
  r = jnp.maximum(y1.astype(h.dtype), 0)
  y2 = r * r
  keep24 = sparsity.mask_24(y2)
  y2s = jnp.where(keep24 | ~sparse_on, y2, jnp.zeros((), y2.dtype))
  if mode == "ste":
    y2s = y2 + jax.lax.stop_gradient(y2s - y2)
  if mode != "split":
    out = jnp.einsum("tf,nf->tn", y2s, w_out_NxF, preferred_element_type=jnp.float32)
  else:  # w_out's gradient from a zero-valued term: gᵀ y2_dw
    y2c = jax.lax.stop_gradient(y2s)
    dense_F = sparsity.densest_features(jnp.sum(y2c != 0, axis=0), dense_fraction)
    y2_dw = jnp.where(sparsity.token_keep_24(y2c, dense_F) | ~sparse_on, y2c, 0)
    w_const = jax.lax.stop_gradient(w_out_NxF)
    out = (jnp.einsum("tf,nf->tn", y2s, w_const, preferred_element_type=jnp.float32)
           + jnp.einsum("tf,nf->tn", y2_dw, w_out_NxF - w_const, preferred_element_type=jnp.float32))
  y2f = jax.lax.stop_gradient(y2).astype(jnp.float32)
  total = jnp.sum(y2f)
  stats = {"zero_frac": jnp.mean((y2f == 0).astype(jnp.float32)),
           "dropped_mass": jnp.sum(jnp.where(keep24, 0.0, y2f))
           / jnp.maximum(total, jnp.finfo(jnp.float32).tiny)}
  return out.astype(h.dtype).reshape(*lead, -1), stats


# --------------------------------------------------------------------------
# Kernels.
# --------------------------------------------------------------------------


def _fwd_kernel(flag_ref, h_ref, win_ref, wout_ref, out_ref, stats_ref, *more_refs, store: bool,
                want_nnz: bool, block_f: int, n_fblocks: int):
  """``stats_ref`` rows: per token, the zeros, the sum and the 2:4-dropped sum of y2.
  ``more_refs``: the compressed activation (vals, meta) when ``store`` (training with
  masked / split), then the per-feature non-zero counts when ``want_nnz`` (split)."""
  vals_ref, meta_ref = more_refs[:2] if store else (None, None)
  nnz_ref = more_refs[-1] if want_nnz else None
  gb = block_f // PLANES
  sparse = flag_ref[0] != 0
  h = h_ref[...]
  dtype = h.dtype
  bt = h.shape[0]

  def body(fi, carry):
    acc, zeros, total, dropped = carry
    gs = pl.ds(pl.multiple_of(fi * gb, gb), gb)
    r = cm.relu_planes(h, win_ref, gs, dtype)
    y2 = [x * x for x in r]
    keep = cm.keep_planes(y2)
    zero = jnp.zeros((), dtype)
    for j in range(PLANES):
      y2s = jnp.where(keep[j] | ~sparse, y2[j], zero)
      acc = acc + cm.dot_nt(y2s, wout_ref[j, :, gs])
      y2f = y2[j].astype(jnp.float32)
      zeros = zeros + jnp.sum((y2f == 0).astype(jnp.float32), axis=1)
      total = total + jnp.sum(y2f, axis=1)
      dropped = dropped + jnp.sum(jnp.where(keep[j], 0.0, y2f), axis=1)
      if want_nnz:  # split mode: per-feature non-zeros of y2s for the dense 5%
        nnz_ref[0, j, gs] = jnp.sum((y2s != 0).astype(jnp.int32), axis=0)
    if store:
      # Store relu(y1) (not y2) at the kept positions: backward rebuilds y2s = v·v
      # bit-exactly and uses 2v as d(y2)/d(y1), like the reference.
      vals, meta = cm.compress_planes(r, keep)
      for p, v in enumerate(vals):
        vals_ref[p, :, gs] = v
      meta_ref[:, gs] = meta
    return acc, zeros, total, dropped

  n = out_ref.shape[1]
  z = jnp.zeros((bt,), jnp.float32)
  acc, zeros, total, dropped = jax.lax.fori_loop(
      0, n_fblocks, body, (jnp.zeros((bt, n), jnp.float32), z, z, z))
  out_ref[...] = acc
  stats_ref[0, :] = zeros
  stats_ref[1, :] = total
  stats_ref[2, :] = dropped


def _relu_from(source, h, win_ref, vals_ref, meta_ref, rows, gs, dtype):
  """relu(y1) planes of one tile: decompressed (kept entries only) or recomputed."""
  if source == "recompute":
    return cm.relu_planes(h, win_ref, gs, dtype)
  return cm.decompress_planes(vals_ref, meta_ref, rows, gs)


def _dh_kernel(h_ref, g_ref, win_ref, wout_ref, vals_ref, meta_ref, dh_ref, *,
               source: str, block_f: int, n_fblocks: int):
  gb = block_f // PLANES
  h = h_ref[...]
  g = g_ref[...]
  dtype = h.dtype
  rows = pl.ds(0, h.shape[0])

  def body(fi, acc):
    gs = pl.ds(pl.multiple_of(fi * gb, gb), gb)
    r = _relu_from(source, h, win_ref, vals_ref, meta_ref, rows, gs, dtype)
    for j in range(PLANES):
      dy2 = cm.dot_nn(g, wout_ref[j, :, gs])
      dy1 = (dy2 * (2 * r[j]).astype(jnp.float32)).astype(dtype)
      acc = acc + cm.dot_nn(dy1, win_ref[j, gs, :])
    return acc

  dh_ref[...] = jax.lax.fori_loop(0, n_fblocks, body, jnp.zeros(dh_ref.shape, jnp.float32))


def _dwin_kernel(h_ref, g_ref, win_ref, wout_ref, vals_ref, meta_ref, dwin_ref, *,
                 source: str, block_t: int, n_tblocks: int):
  """dw_in planes of one (feature block, rank block): Σ_t dy1ᵀ h, dy1 rebuilt per token block."""
  gb, kb = dwin_ref.shape[1], dwin_ref.shape[2]
  dtype = h_ref.dtype
  all_g = pl.ds(0, gb)
  ks = pl.ds(pl.program_id(1) * kb, kb)  # this program's rank block of h

  def products(t0):
    rows = pl.ds(t0, block_t)
    g = g_ref[rows, :]
    h = h_ref[rows, :] if source == "recompute" else None  # all ranks, to recompute y1
    r = _relu_from(source, h, win_ref, vals_ref, meta_ref, rows, all_g, dtype)
    h_k = h_ref[rows, ks]
    dy1 = [(cm.dot_nn(g, wout_ref[j]) * (2 * r[j]).astype(jnp.float32)).astype(dtype)
           for j in range(PLANES)]
    return [[(dy1[j], h_k) for j in range(PLANES)]]

  cm.accumulate_planes_over_tokens(dwin_ref, block_t=block_t, n_tblocks=n_tblocks,
                                   products=products)


def _dwout_kernel(h_ref, g_ref, win_ref, vals_ref, meta_ref, densef_ref, tokdense_ref, dwout_ref,
                  *, source: str, dw_mask: str, block_t: int, n_tblocks: int):
  """dw_out planes of one (rank block, feature block): Σ_t gᵀ y2s.

  ``dw_mask``: ``none`` (y2s as rebuilt), ``ste`` (2:4 of the recomputed y2)
  or ``tokens`` (split: token-wise 2:4 across the 4 row planes of a token
  block, except the dense features and the rows of an incomplete group).
  """
  nb, gb = dwout_ref.shape[1], dwout_ref.shape[2]
  dtype = h_ref.dtype
  all_g = pl.ds(0, gb)
  n_rp = 4 if dw_mask == "tokens" else 1  # token groups: rows i, i+bt/4, i+bt/2, i+3bt/4
  rb = block_t // n_rp
  n0 = pl.program_id(0) * nb

  def products(t0):
    gs, y2s = [], []
    for p in range(n_rp):
      rows = pl.ds(t0 + p * rb, rb)
      h = h_ref[rows, :] if source == "recompute" else None
      r = _relu_from(source, h, win_ref, vals_ref, meta_ref, rows, all_g, dtype)
      y2 = [x * x for x in r]
      if dw_mask == "ste":  # straight-through: w_out sees the 2:4 forward activation
        keep = cm.keep_planes(y2)
        y2 = [jnp.where(keep[j], y2[j], jnp.zeros((), dtype)) for j in range(PLANES)]
      gs.append(g_ref[rows, pl.ds(n0, nb)])
      y2s.append(y2)
    if dw_mask == "tokens":
      zero = jnp.zeros((), dtype)
      tok_dense = [tokdense_ref[pl.ds(t0 + p * rb, rb)] != 0 for p in range(4)]
      for j in range(PLANES):
        dense_f = densef_ref[j, :] != 0
        keep = cm.keep_24([y2s[p][j] for p in range(4)])  # along tokens
        for p in range(4):
          keep_pj = keep[p] | dense_f[None, :] | tok_dense[p][:, None]
          y2s[p][j] = jnp.where(keep_pj, y2s[p][j], zero)
    return [[(gs[p], y2s[p][j]) for j in range(PLANES)] for p in range(n_rp)]

  cm.accumulate_planes_over_tokens(dwout_ref, block_t=block_t, n_tblocks=n_tblocks,
                                   products=products)


# --------------------------------------------------------------------------
# pallas_call builders (padded, planed operands).
# --------------------------------------------------------------------------


def _full(shape):
  return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))


def _wide_params(interpret: bool, width: int):
  """8 warps when a program's fp32 accumulator row is wide (rank >= 256): spreads
  the [block_t, width] accumulator over more registers. Untuned guess (no GPU yet)."""
  return cm.compiler_params(interpret, num_warps=8 if width >= 256 else 4)


def _fwd_call(flag, h, win_p, wout_p, blocks: cm.Blocks, interpret: bool, store: bool,
              want_nnz: bool):
  """[out fp32 [T, N], per-row stats [3, T]] + [vals, meta] if store + [nnz] if want_nnz."""
  t, k = h.shape
  _, g, _ = win_p.shape
  n = wout_p.shape[1]
  bt, bf = blocks.block_t, blocks.block_f
  cm.check_divides(t, bt, "elas_ffn forward", "tokens")
  cm.check_divides(g * PLANES, bf, "elas_ffn forward", "features")
  nt = t // bt
  out_shape = [jax.ShapeDtypeStruct((t, n), jnp.float32), jax.ShapeDtypeStruct((3, t), jnp.float32)]
  out_specs = [pl.BlockSpec((bt, n), lambda i: (i, 0)), pl.BlockSpec((3, bt), lambda i: (0, i))]
  if store:
    out_shape += [jax.ShapeDtypeStruct((4, t, g), h.dtype), jax.ShapeDtypeStruct((t, g), jnp.uint8)]
    out_specs += [pl.BlockSpec((4, bt, g), lambda i: (0, i, 0)), pl.BlockSpec((bt, g), lambda i: (i, 0))]
  if want_nnz:
    out_shape.append(jax.ShapeDtypeStruct((nt, PLANES, g), jnp.int32))
    out_specs.append(pl.BlockSpec((1, PLANES, g), lambda i: (i, 0, 0)))
  kernel = functools.partial(_fwd_kernel, store=store, want_nnz=want_nnz, block_f=bf,
                             n_fblocks=g * PLANES // bf)
  return pl.pallas_call(
      kernel, out_shape=out_shape, grid=(nt,),
      in_specs=[_full((1,)), pl.BlockSpec((bt, k), lambda i: (i, 0)), _full(win_p.shape),
                _full(wout_p.shape)],
      out_specs=out_specs, interpret=interpret, compiler_params=_wide_params(interpret, n),
      name="elas_ffn_fwd")(flag, h, win_p, wout_p)


def _dh_call(h, g_out, win_p, wout_p, vals, meta, source, blocks, interpret):
  t, k = h.shape
  n = g_out.shape[1]
  g = win_p.shape[1]
  bt, bf = blocks.block_t, blocks.block_f
  kernel = functools.partial(_dh_kernel, source=source, block_f=bf, n_fblocks=g * PLANES // bf)
  return pl.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct((t, k), jnp.float32), grid=(t // bt,),
      in_specs=[pl.BlockSpec((bt, k), lambda i: (i, 0)), pl.BlockSpec((bt, n), lambda i: (i, 0)),
                _full(win_p.shape), _full(wout_p.shape),
                pl.BlockSpec((4, bt, g), lambda i: (0, i, 0)), pl.BlockSpec((bt, g), lambda i: (i, 0))],
      out_specs=pl.BlockSpec((bt, k), lambda i: (i, 0)), interpret=interpret,
      compiler_params=_wide_params(interpret, k), name="elas_ffn_dh")(
          h, g_out, win_p, wout_p, vals, meta)


def _dw_call(h, g_out, win_p, wout_p, vals, meta, dense_f, tok_dense, source, dw_mask, blocks,
             interpret):
  """(dw_in planes [8, G, K], dw_out planes [8, N, G]) in fp32."""
  t, k = h.shape
  n = g_out.shape[1]
  g = win_p.shape[1]
  bt, bf = blocks.block_t, blocks.block_f
  gb = bf // PLANES
  bk, bn = min(blocks.block_k, k), min(blocks.block_n, n)
  cm.check_divides(k, bk, "elas_ffn backward", "rank K")
  cm.check_divides(n, bn, "elas_ffn backward", "rank N")
  if dw_mask == "tokens" and bt % 4:
    raise ValueError(f"elas_ffn split backward: block_t={bt} must be a multiple of 4")
  params = cm.compiler_params(interpret)
  dwin = pl.pallas_call(
      functools.partial(_dwin_kernel, source=source, block_t=bt, n_tblocks=t // bt),
      out_shape=jax.ShapeDtypeStruct((PLANES, g, k), jnp.float32),
      grid=(g // gb, k // bk),
      in_specs=[_full(h.shape), _full(g_out.shape),
                pl.BlockSpec((PLANES, gb, k), lambda i, c: (0, i, 0)),
                pl.BlockSpec((PLANES, n, gb), lambda i, c: (0, 0, i)),
                pl.BlockSpec((4, t, gb), lambda i, c: (0, 0, i)),
                pl.BlockSpec((t, gb), lambda i, c: (0, i))],
      out_specs=pl.BlockSpec((PLANES, gb, bk), lambda i, c: (0, i, c)),
      interpret=interpret, compiler_params=params, name="elas_ffn_dw_in")(
          h, g_out, win_p, wout_p, vals, meta)
  dwout = pl.pallas_call(
      functools.partial(_dwout_kernel, source=source, dw_mask=dw_mask, block_t=bt,
                        n_tblocks=t // bt),
      out_shape=jax.ShapeDtypeStruct((PLANES, n, g), jnp.float32),
      grid=(n // bn, g // gb),
      in_specs=[_full(h.shape), _full(g_out.shape),
                pl.BlockSpec((PLANES, gb, k), lambda c, i: (0, i, 0)),
                pl.BlockSpec((4, t, gb), lambda c, i: (0, 0, i)),
                pl.BlockSpec((t, gb), lambda c, i: (0, i)),
                pl.BlockSpec((PLANES, gb), lambda c, i: (0, i)), _full(tok_dense.shape)],
      out_specs=pl.BlockSpec((PLANES, bn, gb), lambda c, i: (0, c, i)),
      interpret=interpret, compiler_params=params, name="elas_ffn_dw_out")(
          h, g_out, win_p, vals, meta, dense_f, tok_dense)
  return dwin, dwout


# --------------------------------------------------------------------------
# Layout of one call: padding, planes, the dense tail, the split token order.
# --------------------------------------------------------------------------


class _Layout:
  """Static facts of one call (Python ints / numpy, fixed at trace time)."""

  def __init__(self, t: int, f: int, blocks: cm.Blocks, mode: str):
    self.t, self.blocks = t, blocks
    self.f_main = f - f % 4  # the f % 4 tail forms no 2:4 group: dense, in XLA
    self.t_pad = cm.padded(t, blocks.block_t)
    self.f_pad = cm.padded(self.f_main, blocks.block_f)
    self.order = self.tok_dense = None
    if mode == "split":
      self.order, self.tok_dense = _split_order(t, self.t_pad, blocks.block_t)

  def rows_in(self, x: jax.Array) -> jax.Array:
    """Pad the tokens to whole blocks and (split) put them in kernel order."""
    x = cm.pad_to(x, 0, self.blocks.block_t)
    return x if self.order is None else x[self.order]

  def rows_out(self, x: jax.Array) -> jax.Array:
    if self.order is not None:
      x = x[np.argsort(self.order)]
    return x[: self.t]


def _split_order(t: int, t_pad: int, bt: int):
  """Kernel token order for split mode, and which rows keep all tokens.

  The reference groups tokens ``perm[4m .. 4m+3]`` (``perm`` =
  ``sparsity.split_token_order(t)``); the dw kernel groups the
  rows ``i, i + bt/4, i + bt/2, i + 3bt/4`` of each token block, so sequence
  position ``4m + j`` goes to row ``b·bt + j·bt/4 + i`` with ``m = b·bt/4 + i``.
  The ``t % 4`` tokens of an incomplete group stay dense, as in the reference.
  """
  seq = np.concatenate([sparsity.split_token_order(t), np.arange(t, t_pad)])
  full = t - t % 4
  dense_seq = np.zeros(t_pad, np.int32)
  dense_seq[full:] = 1
  pos = np.arange(t_pad)
  m, j = pos // 4, pos % 4
  b, i = m // (bt // 4), m % (bt // 4)
  row = b * bt + j * (bt // 4) + i
  order = np.empty(t_pad, np.int64)
  order[row] = seq
  tok_dense = np.empty(t_pad, np.int32)
  tok_dense[row] = dense_seq
  return order, tok_dense


# --------------------------------------------------------------------------
# custom_vjp op.
# --------------------------------------------------------------------------


def _prep(h, w_in, w_out, lay: _Layout):
  """Kernel operands: padded tokens, features and ranks (powers of two), weights in planes."""
  hk = cm.pad_rank(lay.rows_in(h), 1)
  win = cm.pad_rank(cm.pad_to(w_in[: lay.f_main], 0, lay.blocks.block_f), 1)
  wout = cm.pad_rank(cm.pad_to(w_out[:, : lay.f_main], 1, lay.blocks.block_f), 0)
  return hk, cm.weight_planes(win), cm.out_weight_planes(wout)


def _forward(mode, blocks, interpret, h, w_in, w_out, sparse_on, store=False):
  """Output, statistics and what backward needs; ``store``: write the compressed activation."""
  t = h.shape[0]
  f, n = w_in.shape[0], w_out.shape[0]
  lay = _Layout(t, f, blocks, mode)
  hk, win_p, wout_p = _prep(h, w_in, w_out, lay)
  flag = jnp.asarray(sparse_on, jnp.int32).reshape(1)
  want_nnz = store and mode == "split"
  outs = _fwd_call(flag, hk, win_p, wout_p, blocks, interpret, store, want_nnz)
  out_k, stats_rows = outs[:2]
  vals, meta = outs[2:4] if store else (None, None)
  out = lay.rows_out(out_k)[:, :n]
  stats_rows = lay.rows_out(stats_rows.T)  # [t, 3], padded tokens dropped
  zeros = jnp.sum(stats_rows[:, 0]) - t * (lay.f_pad - lay.f_main)  # padded features are zeros
  total = jnp.sum(stats_rows[:, 1])
  dropped = jnp.sum(stats_rows[:, 2])
  r_tail = None
  if lay.f_main != f:  # dense tail features: y2 = relu(h w_tailᵀ)², never dropped
    r_tail = jnp.maximum(sparsity.matmul_t(h, w_in[lay.f_main:]), 0)
    y2_tail = r_tail * r_tail
    out = out + jnp.einsum("tf,nf->tn", y2_tail, w_out[:, lay.f_main:],
                           preferred_element_type=jnp.float32)
    y2t = y2_tail.astype(jnp.float32)
    zeros = zeros + jnp.sum((y2t == 0).astype(jnp.float32))
    total = total + jnp.sum(y2t)
  stats = {"zero_frac": zeros / (t * f),
           "dropped_mass": dropped / jnp.maximum(total, jnp.finfo(jnp.float32).tiny)}
  # split: per-feature non-zero counts, reduced now so the residual is [8, G] (not per token)
  nnz = jnp.sum(outs[-1], axis=0) if want_nnz else None
  return out.astype(h.dtype), stats, (lay, vals, meta, r_tail, nnz)


def _ffn_fwd(mode, dense_fraction, blocks, interpret, h, w_in, w_out, sparse_on):
  # ste recomputes relu(y1) from h in backward: it stores (and keeps) nothing f-wide.
  out, stats, (_, vals, meta, r_tail, nnz) = _forward(
      mode, blocks, interpret, h, w_in, w_out, sparse_on, store=mode != "ste")
  # Named so that a remat policy saving sparsity.SAVED_24_NAME keeps them (remat = lowrank).
  vals, meta, r_tail, nnz = (None if x is None else checkpoint_name(x, sparsity.SAVED_24_NAME)
                             for x in (vals, meta, r_tail, nnz))
  return (out, stats), (h, w_in, w_out, sparse_on, vals, meta, r_tail, nnz)


def _ffn_bwd(mode, dense_fraction, blocks, interpret, res, cot):
  h, w_in, w_out, sparse_on, vals, meta, r_tail, nnz = res
  g_out = cot[0].astype(h.dtype)
  t, k = h.shape
  f, n = w_in.shape[0], w_out.shape[0]
  lay = _Layout(t, f, blocks, mode)
  hk, win_p, wout_p = _prep(h, w_in, w_out, lay)
  gk = cm.pad_rank(lay.rows_in(g_out), 1)
  g_pl = win_p.shape[1]
  tk = hk.shape[0]
  if vals is None:  # ste: the kernels recompute; give them correctly shaped placeholders
    vals = jnp.zeros((4, tk, g_pl), h.dtype)
    meta = jnp.zeros((tk, g_pl), jnp.uint8)
  no_dense_f = jnp.zeros((PLANES, g_pl), jnp.int32)
  no_tok_dense = jnp.zeros((tk,), jnp.int32)

  # Split mode: the dense_fraction features with the most non-zeros keep all
  # tokens, and the rows of an incomplete token group too.
  dense_f, tok_dense, dense_all = no_dense_f, no_tok_dense, None
  if mode == "split":
    nnz_f = cm.weight_unplanes(nnz[..., None])[: lay.f_main, 0]
    if r_tail is not None:
      nnz_f = jnp.concatenate([nnz_f, jnp.sum(r_tail * r_tail != 0, axis=0, dtype=jnp.int32)])
    dense_all = sparsity.densest_features(nnz_f, dense_fraction)
    dense_main = cm.pad_to(dense_all[: lay.f_main], 0, blocks.block_f).astype(jnp.int32)
    dense_f = cm.weight_planes(dense_main[:, None])[..., 0]
    tok_dense = jnp.asarray(lay.tok_dense)

  def grads(source, dw_mask, dense_f, tok_dense):
    dh = _dh_call(hk, gk, win_p, wout_p, vals, meta, source, blocks, interpret)
    dwin, dwout = _dw_call(hk, gk, win_p, wout_p, vals, meta, dense_f, tok_dense, source, dw_mask,
                           blocks, interpret)
    return dh, dwin, dwout

  sparse_grads = functools.partial(grads, "recompute" if mode == "ste" else "compressed",
                                   {"masked": "none", "ste": "ste", "split": "tokens"}[mode],
                                   dense_f, tok_dense)
  # dense warm-up: the exact gradient of the dense FFN, recomputed from h
  dense_grads = functools.partial(grads, "recompute", "none", no_dense_f, no_tok_dense)
  dh, dwin_p, dwout_p = jax.lax.cond(sparse_on, sparse_grads, dense_grads)
  d_h = lay.rows_out(dh)[:, :k]
  d_w_in = cm.weight_unplanes(dwin_p)[: lay.f_main, :k]
  d_w_out = cm.out_weight_unplanes(dwout_p)[:n, : lay.f_main]
  if r_tail is not None:  # the dense tail, in XLA with the XLA op's backward
    y2_tail = r_tail * r_tail
    if mode == "split":
      keep = sparsity.token_keep_24(y2_tail, dense_all[lay.f_main:])
      y2_tail = jax.lax.select(sparse_on, jnp.where(keep, y2_tail, 0), y2_tail)
    dh_tail, dwin_tail, dwout_tail = sparsity.ffn_grads(
        g_out, h, w_in[lay.f_main:], w_out[:, lay.f_main:], 2 * r_tail, y2_tail)
    d_h = d_h + dh_tail
    d_w_in = jnp.concatenate([d_w_in, dwin_tail], axis=0)
    d_w_out = jnp.concatenate([d_w_out, dwout_tail], axis=1)
  return d_h.astype(h.dtype), d_w_in.astype(w_in.dtype), d_w_out.astype(w_out.dtype), None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _ffn_core(mode, dense_fraction, blocks, interpret, h, w_in, w_out, sparse_on):
  out, stats, _ = _forward(mode, blocks, interpret, h, w_in, w_out, sparse_on)
  return out, stats


_ffn_core.defvjp(_ffn_fwd, _ffn_bwd)


def elas_ffn(
    h: jax.Array,
    w_in_FxK: jax.Array,
    w_out_NxF: jax.Array,
    sparse_on: jax.Array | bool,
    *,
    mode: str = "masked",
    dense_fraction: float = 0.05,
    block_t: int | None = None,
    block_f: int | None = None,
    interpret: bool | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Pallas version of ``relu2_sparse_ffn``: same arguments, results and gradients.

  Args:
    h, w_in_FxK, w_out_NxF, sparse_on, mode, dense_fraction: as in
      ``elas_jax.ops.sparsity.relu2_sparse_ffn``.
    block_t, block_f: tile sizes (powers of two; ``block_f >= 8``); default by shape.
    interpret: run the kernels in the Pallas interpreter (CPU); default: True
      unless the default backend is a GPU.
  """
  sparsity.check_ffn_options(mode, dense_fraction)
  if h.ndim < 1 or w_in_FxK.ndim != 2 or w_out_NxF.ndim != 2:
    raise ValueError(f"elas_ffn: expected h [..., K], w_in [F, K], w_out [N, F]; got "
                     f"{h.shape}, {w_in_FxK.shape}, {w_out_NxF.shape}")
  k = h.shape[-1]
  f = w_in_FxK.shape[0]
  if w_in_FxK.shape[1] != k or w_out_NxF.shape[1] != f:
    raise ValueError(f"elas_ffn: shapes do not chain: h {h.shape}, w_in {w_in_FxK.shape}, "
                     f"w_out {w_out_NxF.shape}")
  if f < 4:
    raise ValueError(f"elas_ffn: {f} features form no 2:4 group")
  lead = h.shape[:-1]
  h_TxK = h.reshape(-1, k)
  blocks, interpret = cm.resolve_blocks(
      "elas_ffn", h_TxK.shape[0], f, k, w_out_NxF.shape[0], block_t=block_t, block_f=block_f,
      interpret=interpret, split=mode == "split")
  sparse_on = jnp.asarray(sparse_on, dtype=bool)
  out, stats = _ffn_core(mode, float(dense_fraction), blocks, interpret, h_TxK, w_in_FxK,
                         w_out_NxF, sparse_on)
  return out.reshape(*lead, -1), stats
