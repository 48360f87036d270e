"""The 2:4-sparse squared-ReLU FFN core as Pallas Triton kernels, forward and backward.

The ``triton`` implementation of :mod:`elas_kernels.ffn.base`'s contract (its reference:
``base.reference``):

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

from elas_kernels import common as cm
from elas_kernels import sparse24
from elas_kernels.common import PLANES
from elas_kernels.ffn import base
from elas_kernels.gpu import GpuSpec

reference = base.reference  # the op's plain-jnp definition, which the tests compare with


# --------------------------------------------------------------------------
# Kernels.
# --------------------------------------------------------------------------


KERNELS = ("elas_ffn_fwd", "elas_ffn_dh", "elas_ffn_dw_in", "elas_ffn_dw_out")


def _fwd_kernel(flag_ref, h_ref, win_ref, wout_ref, out_ref, stats_ref, *more_refs, store: bool,
                want_nnz: bool, block_f: int, n_fblocks: int, chunk: int):
  """One (token block, output tile) program. ``stats_ref`` rows: per token, the
  zeros, the sum and the 2:4-dropped sum of y2. ``more_refs``: the compressed
  activation (vals, meta) when ``store`` (training with masked / split), then
  the per-feature non-zero counts when ``want_nnz`` (split). With several
  output tiles (grid axis 1) every program recomputes y1 for its tokens; the
  first one writes the activation, the counts and the statistics."""
  vals_ref, meta_ref = more_refs[:2] if store else (None, None)
  nnz_ref = more_refs[-1] if want_nnz else None
  gb = block_f // PLANES
  sparse = flag_ref[0] != 0
  bt, k = h_ref.shape
  dtype = h_ref.dtype
  h = h_ref[...] if chunk >= k else None
  rows = pl.ds(0, bt)
  first = pl.program_id(1) == 0

  def body(fi, carry):
    acc, zeros, total, dropped = carry
    gs = pl.ds(pl.multiple_of(fi * gb, gb), gb)
    r = cm.relu_planes(h, win_ref, gs, dtype, x_ref=h_ref, rows=rows, chunk=chunk)
    y2 = [x * x for x in r]
    keep = cm.keep_planes(y2)
    if store:  # first, so that r is dead before the output dots (registers)
      @pl.when(first)
      def _():
        # Store relu(y1) (not y2) at the kept positions: backward rebuilds y2s = v·v
        # bit-exactly and uses 2v as d(y2)/d(y1), like the reference.
        vals, meta = cm.compress_planes(r, keep)
        for p, v in enumerate(vals):
          vals_ref[p, :, gs] = v
        meta_ref[:, gs] = meta

    zero = jnp.zeros((), dtype)
    for j in range(PLANES):
      y2s = jnp.where(keep[j] | ~sparse, y2[j], zero)
      acc = acc + cm.dot_nt(y2s, wout_ref[j, :, gs])
      y2f = y2[j].astype(jnp.float32)
      zeros = zeros + jnp.sum((y2f == 0).astype(jnp.float32), axis=1)
      total = total + jnp.sum(y2f, axis=1)
      dropped = dropped + jnp.sum(jnp.where(keep[j], 0.0, y2f), axis=1)
      if want_nnz:  # split mode: per-feature non-zeros of y2s for the dense 5%
        @pl.when(first)
        def _(j=j, y2s=y2s):
          nnz_ref[0, j, gs] = jnp.sum((y2s != 0).astype(jnp.int32), axis=0)
    return acc, zeros, total, dropped

  n = out_ref.shape[1]
  z = jnp.zeros((bt,), jnp.float32)
  acc, zeros, total, dropped = jax.lax.fori_loop(
      0, n_fblocks, body, (jnp.zeros((bt, n), jnp.float32), z, z, z))
  out_ref[...] = acc

  @pl.when(first)
  def _():
    stats_ref[0, :] = zeros
    stats_ref[1, :] = total
    stats_ref[2, :] = dropped


def _relu_from(source, h, win_ref, vals_ref, meta_ref, rows, gs, dtype, chunk=None, h_ref=None):
  """relu(y1) planes of one tile: decompressed (kept entries only) or recomputed
  (``h`` [rows, K], or chunks of ``h_ref[rows]`` when ``chunk`` < K)."""
  if source == "recompute":
    return cm.relu_planes(h, win_ref, gs, dtype, x_ref=h_ref, rows=rows, chunk=chunk)
  return cm.decompress_planes(vals_ref, meta_ref, rows, gs)


def _dy2_planes(g_ref, rows, wout_ref, gs, chunk):
  """``g @ w_out`` for the 8 planes of one tile (fp32), the rank N reduced in chunks."""
  n = g_ref.shape[1]
  g_all = (lambda ks: g_ref[rows, :] if ks is None else g_ref[rows, ks])
  w = (lambda j, ks: wout_ref[j, :, gs] if ks is None else wout_ref[j, ks, gs])
  return cm.plane_products(g_all, w, n, min(chunk, n), cm.dot_nn, (rows.size, gs.size))


def _dh_kernel(h_ref, g_ref, win_ref, wout_ref, vals_ref, meta_ref, dh_ref, *,
               source: str, block_f: int, n_fblocks: int, chunk: int):
  """One (token block, rank tile of dh) program: a loop over feature blocks."""
  gb = block_f // PLANES
  bt, k = h_ref.shape
  dtype = h_ref.dtype
  kb = dh_ref.shape[1]
  ks = pl.ds(pl.program_id(1) * kb, kb)  # this program's columns of dh
  h = h_ref[...] if source == "recompute" and chunk >= k else None
  rows = pl.ds(0, bt)
  n = g_ref.shape[1]
  g = g_ref[...] if chunk >= n else None

  def body(fi, acc):
    gs = pl.ds(pl.multiple_of(fi * gb, gb), gb)
    r = _relu_from(source, h, win_ref, vals_ref, meta_ref, rows, gs, dtype, chunk, h_ref)
    if g is not None:  # the whole rank N at once (the interpret-mode path, unchanged)
      dy2 = [cm.dot_nn(g, wout_ref[j, :, gs]) for j in range(PLANES)]
    else:
      dy2 = _dy2_planes(g_ref, rows, wout_ref, gs, chunk)
    for j in range(PLANES):
      dy1 = (dy2[j] * (2 * r[j]).astype(jnp.float32)).astype(dtype)
      acc = acc + cm.dot_nn(dy1, win_ref[j, gs, ks])
    return acc

  dh_ref[...] = jax.lax.fori_loop(0, n_fblocks, body, jnp.zeros(dh_ref.shape, jnp.float32))


def _dwin_kernel(h_ref, g_ref, win_ref, wout_ref, vals_ref, meta_ref, dwin_ref, *,
                 source: str, block_t: int, n_tblocks: int, chunk: int):
  """dw_in planes of one (feature block, rank block, token split): Σ_t dy1ᵀ h,
  dy1 rebuilt per token block."""
  gb, kb = dwin_ref.shape[1], dwin_ref.shape[2]
  dtype = h_ref.dtype
  all_g = pl.ds(0, gb)
  ks = pl.ds(pl.program_id(1) * kb, kb)  # this program's rank block of h
  k, n = h_ref.shape[1], g_ref.shape[1]

  def products(t0):
    rows = pl.ds(t0, block_t)
    h = h_ref[rows, :] if source == "recompute" and chunk >= k else None  # all ranks
    r = _relu_from(source, h, win_ref, vals_ref, meta_ref, rows, all_g, dtype, chunk, h_ref)
    h_k = h_ref[rows, ks]
    if chunk >= n:
      g = g_ref[rows, :]
      dy2 = [cm.dot_nn(g, wout_ref[j]) for j in range(PLANES)]
    else:
      dy2 = _dy2_planes(g_ref, rows, wout_ref, all_g, chunk)
    dy1 = [(dy2[j] * (2 * r[j]).astype(jnp.float32)).astype(dtype) for j in range(PLANES)]
    return [[(dy1[j], h_k) for j in range(PLANES)]]

  cm.accumulate_planes_over_tokens(dwin_ref, block_t=block_t, n_tblocks=n_tblocks,
                                   products=products, first_block=pl.program_id(2) * n_tblocks)


def _dwout_kernel(h_ref, g_ref, win_ref, vals_ref, meta_ref, densef_ref, tokdense_ref, dwout_ref,
                  *, source: str, dw_mask: str, block_t: int, n_tblocks: int, chunk: int):
  """dw_out planes of one (rank block, feature block, token split): Σ_t gᵀ y2s.

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
  k = h_ref.shape[1]

  def products(t0):
    gs, y2s = [], []
    for p in range(n_rp):
      rows = pl.ds(t0 + p * rb, rb)
      h = h_ref[rows, :] if source == "recompute" and chunk >= k else None
      r = _relu_from(source, h, win_ref, vals_ref, meta_ref, rows, all_g, dtype, chunk, h_ref)
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
                                   products=products, first_block=pl.program_id(2) * n_tblocks)


# --------------------------------------------------------------------------
# pallas_call builders (padded, planed operands).
# --------------------------------------------------------------------------


def _full(shape):
  return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))


def _wide_params(blocks: cm.Blocks, interpret: bool, width: int):
  """Default: 8 warps when a program's fp32 accumulator row is wide (rank >= 256).
  The tile tables (kernels/tiles_<target>.json) set num_warps explicitly."""
  return blocks.params(interpret, num_warps=8 if width >= 256 else 4)


def _fwd_call(flag, h, win_p, wout_p, blocks: cm.Blocks, interpret: bool, store: bool,
              want_nnz: bool):
  """[out fp32 [T, N], per-row stats [3, T]] + [vals, meta] if store + [nnz] if want_nnz.

  ``blocks.block_n``: output columns per program (None: all of N)."""
  t, k = h.shape
  _, g, _ = win_p.shape
  n = wout_p.shape[1]
  bt, bf = blocks.block_t, blocks.block_f
  bn = n if blocks.block_n is None else min(blocks.block_n, n)
  cm.check_divides(t, bt, "elas_ffn forward", "tokens")
  cm.check_divides(g * PLANES, bf, "elas_ffn forward", "features")
  cm.check_divides(n, bn, "elas_ffn forward", "rank N")
  nt = t // bt
  out_shape = [jax.ShapeDtypeStruct((t, n), jnp.float32), jax.ShapeDtypeStruct((3, t), jnp.float32)]
  out_specs = [pl.BlockSpec((bt, bn), lambda i, c: (i, c)), pl.BlockSpec((3, bt), lambda i, c: (0, i))]
  if store:
    out_shape += [jax.ShapeDtypeStruct((4, t, g), h.dtype), jax.ShapeDtypeStruct((t, g), jnp.uint8)]
    out_specs += [pl.BlockSpec((4, bt, g), lambda i, c: (0, i, 0)),
                  pl.BlockSpec((bt, g), lambda i, c: (i, 0))]
  if want_nnz:
    out_shape.append(jax.ShapeDtypeStruct((nt, PLANES, g), jnp.int32))
    out_specs.append(pl.BlockSpec((1, PLANES, g), lambda i, c: (i, 0, 0)))
  kernel = functools.partial(_fwd_kernel, store=store, want_nnz=want_nnz, block_f=bf,
                             n_fblocks=g * PLANES // bf, chunk=blocks.chunk(k))
  return pl.pallas_call(
      kernel, out_shape=out_shape, grid=(nt, n // bn),
      in_specs=[_full((1,)), pl.BlockSpec((bt, k), lambda i, c: (i, 0)), _full(win_p.shape),
                pl.BlockSpec((PLANES, bn, g), lambda i, c: (0, c, 0))],
      out_specs=out_specs, interpret=interpret, compiler_params=_wide_params(blocks, interpret, bn),
      name="elas_ffn_fwd")(flag, h, win_p, wout_p)


def _dh_call(h, g_out, win_p, wout_p, vals, meta, source, blocks, interpret):
  """dh [T, K] fp32; ``blocks.block_k``: its columns per program (None: all of K)."""
  t, k = h.shape
  n = g_out.shape[1]
  g = win_p.shape[1]
  bt, bf = blocks.block_t, blocks.block_f
  bk = k if blocks.block_k is None else min(blocks.block_k, k)
  cm.check_divides(k, bk, "elas_ffn backward (dh)", "rank K")
  kernel = functools.partial(_dh_kernel, source=source, block_f=bf, n_fblocks=g * PLANES // bf,
                             chunk=blocks.chunk(max(k, n)))
  return pl.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct((t, k), jnp.float32), grid=(t // bt, k // bk),
      in_specs=[pl.BlockSpec((bt, k), lambda i, c: (i, 0)), pl.BlockSpec((bt, n), lambda i, c: (i, 0)),
                _full(win_p.shape), _full(wout_p.shape),
                pl.BlockSpec((4, bt, g), lambda i, c: (0, i, 0)),
                pl.BlockSpec((bt, g), lambda i, c: (i, 0))],
      out_specs=pl.BlockSpec((bt, bk), lambda i, c: (i, c)), interpret=interpret,
      compiler_params=_wide_params(blocks, interpret, bk), name="elas_ffn_dh")(
          h, g_out, win_p, wout_p, vals, meta)


def _dw_in_call(h, g_out, win_p, wout_p, vals, meta, source, blocks, interpret):
  """dw_in planes [8, G, K] in fp32 (token splits summed here)."""
  t, k = h.shape
  n = g_out.shape[1]
  g = win_p.shape[1]
  bt, gb = blocks.block_t, blocks.block_f // PLANES
  bk = min(blocks.block_k, k)
  cm.check_divides(k, bk, "elas_ffn backward", "rank K")
  cm.check_divides(t, bt, "elas_ffn backward", "tokens")
  splits = blocks.splits(t // bt)
  per = t // bt // splits
  dwin = pl.pallas_call(
      functools.partial(_dwin_kernel, source=source, block_t=bt, n_tblocks=per,
                        chunk=blocks.chunk(max(k, n))),
      out_shape=jax.ShapeDtypeStruct((splits * PLANES, g, k), jnp.float32),
      grid=(g // gb, k // bk, splits),
      in_specs=[_full(h.shape), _full(g_out.shape),
                pl.BlockSpec((PLANES, gb, k), lambda i, c, s: (0, i, 0)),
                pl.BlockSpec((PLANES, n, gb), lambda i, c, s: (0, 0, i)),
                pl.BlockSpec((4, t, gb), lambda i, c, s: (0, 0, i)),
                pl.BlockSpec((t, gb), lambda i, c, s: (0, i))],
      out_specs=pl.BlockSpec((PLANES, gb, bk), lambda i, c, s: (s, i, c)),
      interpret=interpret, compiler_params=blocks.params(interpret), name="elas_ffn_dw_in")(
          h, g_out, win_p, wout_p, vals, meta)
  return dwin if splits == 1 else jnp.sum(dwin.reshape(splits, PLANES, g, k), axis=0)


def _dw_out_call(h, g_out, win_p, vals, meta, dense_f, tok_dense, source, dw_mask, blocks,
                 interpret):
  """dw_out planes [8, N, G] in fp32 (token splits summed here)."""
  t, k = h.shape
  n = g_out.shape[1]
  g = win_p.shape[1]
  bt, gb = blocks.block_t, blocks.block_f // PLANES
  bn = min(blocks.block_n, n)
  cm.check_divides(n, bn, "elas_ffn backward", "rank N")
  cm.check_divides(t, bt, "elas_ffn backward", "tokens")
  if dw_mask == "tokens" and bt % 4:
    raise ValueError(f"elas_ffn split backward: block_t={bt} must be a multiple of 4")
  splits = blocks.splits(t // bt)
  per = t // bt // splits
  dwout = pl.pallas_call(
      functools.partial(_dwout_kernel, source=source, dw_mask=dw_mask, block_t=bt,
                        n_tblocks=per, chunk=blocks.chunk(k)),
      out_shape=jax.ShapeDtypeStruct((splits * PLANES, n, g), jnp.float32),
      grid=(n // bn, g // gb, splits),
      in_specs=[_full(h.shape), _full(g_out.shape),
                pl.BlockSpec((PLANES, gb, k), lambda c, i, s: (0, i, 0)),
                pl.BlockSpec((4, t, gb), lambda c, i, s: (0, 0, i)),
                pl.BlockSpec((t, gb), lambda c, i, s: (0, i)),
                pl.BlockSpec((PLANES, gb), lambda c, i, s: (0, i)), _full(tok_dense.shape)],
      out_specs=pl.BlockSpec((PLANES, bn, gb), lambda c, i, s: (s, c, i)),
      interpret=interpret, compiler_params=blocks.params(interpret), name="elas_ffn_dw_out")(
          h, g_out, win_p, vals, meta, dense_f, tok_dense)
  return dwout if splits == 1 else jnp.sum(dwout.reshape(splits, PLANES, n, g), axis=0)


def _dw_call(h, g_out, win_p, wout_p, vals, meta, dense_f, tok_dense, source, dw_mask, blocks,
             interpret):
  """(dw_in planes [8, G, K], dw_out planes [8, N, G]) in fp32; ``blocks``: one
  :class:`cm.Blocks` for both, or a :class:`cm.Tiles`."""
  b_in, b_out = ((blocks["elas_ffn_dw_in"], blocks["elas_ffn_dw_out"])
                 if isinstance(blocks, cm.Tiles) else (blocks, blocks))
  return (_dw_in_call(h, g_out, win_p, wout_p, vals, meta, source, b_in, interpret),
          _dw_out_call(h, g_out, win_p, vals, meta, dense_f, tok_dense, source, dw_mask, b_out,
                       interpret))


# The code paths one tile must serve, per kernel (what a tile search compiles): the
# backward kernels run on the compressed activation (masked / split) or recompute it
# (ste, the dense warm-up); dw_out masks by ste or, in split mode, by tokens (its own
# tile-table entry, "elas_ffn_dw_out/split").
VARIANTS = {
    "elas_ffn_fwd": [dict(store=True, want_nnz=True), dict(store=False, want_nnz=False)],
    "elas_ffn_dh": [dict(source="compressed"), dict(source="recompute")],
    "elas_ffn_dw_in": [dict(source="compressed"), dict(source="recompute")],
    "elas_ffn_dw_out": [dict(source="compressed", dw_mask="none"),
                        dict(source="recompute", dw_mask="ste")],
    "elas_ffn_dw_out/split": [dict(source="compressed", dw_mask="tokens")],
}


def kernel_program(kernel: str, variant: dict, t: int, f: int, r: int, blocks: cm.Blocks,
                   dtype=jnp.bfloat16):
  """``(fn, abstract args)``: one kernel of :data:`VARIANTS` alone, compiled for a GPU
  with ``blocks``, on operands padded and planed as the op pads them (``T`` tokens,
  ``F`` features, ranks ``K = N = r``). What a compile-time tile search compiles."""
  S = jax.ShapeDtypeStruct
  k = n = cm.rank_size(r)
  fp = cm.padded(f - f % 4, blocks.block_f)
  tp = cm.padded(t, blocks.block_t * max(1, blocks.split_t))
  g = fp // PLANES
  h, go, wi, wo = S((tp, k), dtype), S((tp, n), dtype), S((PLANES, g, k), dtype), S((PLANES, n, g), dtype)
  vals, meta = S((4, tp, g), dtype), S((tp, g), jnp.uint8)
  name = kernel.split("/")[0]
  if name == "elas_ffn_fwd":
    return (lambda flag, h, wi, wo: _fwd_call(flag, h, wi, wo, blocks, False, **variant),
            (S((1,), jnp.int32), h, wi, wo))
  if name == "elas_ffn_dh":
    return (lambda *a: _dh_call(*a, variant["source"], blocks, False), (h, go, wi, wo, vals, meta))
  if name == "elas_ffn_dw_in":
    return (lambda *a: _dw_in_call(*a, variant["source"], blocks, False),
            (h, go, wi, wo, vals, meta))
  if name == "elas_ffn_dw_out":
    return (lambda *a: _dw_out_call(*a, variant["source"], variant["dw_mask"], blocks, False),
            (h, go, wi, vals, meta, S((PLANES, g), jnp.int32), S((tp,), jnp.int32)))
  raise ValueError(f"unknown kernel {kernel!r}; expected one of {list(VARIANTS)}")


# --------------------------------------------------------------------------
# Layout of one call: padding, planes, the dense tail, the split token order.
# --------------------------------------------------------------------------


class _Layout:
  """Static facts of one call (Python ints / numpy, fixed at trace time)."""

  def __init__(self, t: int, f: int, tiles: cm.Tiles, mode: str):
    self.t, self.tiles = t, tiles
    self.f_main = f - f % 4  # the f % 4 tail forms no 2:4 group: dense, in XLA
    self.t_pad = cm.padded(t, tiles.t_multiple)
    self.f_pad = cm.padded(self.f_main, tiles.f_multiple)
    self.order = self.tok_dense = None
    if mode == "split":  # token groups follow the kernel that applies them: dw_out
      self.order, self.tok_dense = _split_order(t, self.t_pad, tiles["elas_ffn_dw_out"].block_t)

  def rows_in(self, x: jax.Array) -> jax.Array:
    """Pad the tokens to whole blocks and (split) put them in kernel order."""
    x = cm.pad_to(x, 0, self.tiles.t_multiple)
    return x if self.order is None else x[self.order]

  def rows_out(self, x: jax.Array) -> jax.Array:
    if self.order is not None:
      x = x[np.argsort(self.order)]
    return x[: self.t]


def _split_order(t: int, t_pad: int, bt: int):
  """Kernel token order for split mode, and which rows keep all tokens.

  The reference groups tokens ``perm[4m .. 4m+3]`` (``perm`` =
  ``sparse24.split_token_order(t)``); the dw kernel groups the
  rows ``i, i + bt/4, i + bt/2, i + 3bt/4`` of each token block, so sequence
  position ``4m + j`` goes to row ``b·bt + j·bt/4 + i`` with ``m = b·bt/4 + i``.
  The ``t % 4`` tokens of an incomplete group stay dense, as in the reference.
  """
  seq = np.concatenate([sparse24.split_token_order(t), np.arange(t, t_pad)])
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
  win = cm.pad_rank(cm.pad_to(w_in[: lay.f_main], 0, lay.tiles.f_multiple), 1)
  wout = cm.pad_rank(cm.pad_to(w_out[:, : lay.f_main], 1, lay.tiles.f_multiple), 0)
  return hk, cm.weight_planes(win), cm.out_weight_planes(wout)


def _forward(mode, tiles, interpret, h, w_in, w_out, sparse_on, store=False):
  """Output, statistics and what backward needs; ``store``: write the compressed activation."""
  t = h.shape[0]
  f, n = w_in.shape[0], w_out.shape[0]
  lay = _Layout(t, f, tiles, mode)
  hk, win_p, wout_p = _prep(h, w_in, w_out, lay)
  flag = jnp.asarray(sparse_on, jnp.int32).reshape(1)
  want_nnz = store and mode == "split"
  outs = _fwd_call(flag, hk, win_p, wout_p, tiles["elas_ffn_fwd"], interpret, store, want_nnz)
  out_k, stats_rows = outs[:2]
  vals, meta = outs[2:4] if store else (None, None)
  out, stats, r_tail = base.finish_forward(lay.rows_out(out_k)[:, :n], lay.rows_out(stats_rows.T),
                                           h, w_in, w_out, lay.f_pad)
  # split: per-feature non-zero counts, reduced now so the residual is [8, G] (not per token)
  nnz = jnp.sum(outs[-1], axis=0) if want_nnz else None
  return out, stats, (lay, vals, meta, r_tail, nnz)


def _ffn_fwd(mode, dense_fraction, tiles, interpret, h, w_in, w_out, sparse_on):
  # ste recomputes relu(y1) from h in backward: it stores (and keeps) nothing f-wide.
  out, stats, (_, vals, meta, r_tail, nnz) = _forward(
      mode, tiles, interpret, h, w_in, w_out, sparse_on, store=mode != "ste")
  # Named so that a remat policy saving base.SAVED_24_NAME keeps them (remat = lowrank).
  vals, meta, r_tail, nnz = (None if x is None else checkpoint_name(x, base.SAVED_24_NAME)
                             for x in (vals, meta, r_tail, nnz))
  return (out, stats), (h, w_in, w_out, sparse_on, vals, meta, r_tail, nnz)


def _ffn_bwd(mode, dense_fraction, tiles, interpret, res, cot):
  h, w_in, w_out, sparse_on, vals, meta, r_tail, nnz = res
  g_out = cot[0].astype(h.dtype)
  t, k = h.shape
  f, n = w_in.shape[0], w_out.shape[0]
  lay = _Layout(t, f, tiles, mode)
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
    dense_all = sparse24.densest_features(nnz_f, dense_fraction)
    dense_main = cm.pad_to(dense_all[: lay.f_main], 0, tiles.f_multiple).astype(jnp.int32)
    dense_f = cm.weight_planes(dense_main[:, None])[..., 0]
    tok_dense = jnp.asarray(lay.tok_dense)

  def grads(source, dw_mask, dense_f, tok_dense):
    dh = _dh_call(hk, gk, win_p, wout_p, vals, meta, source, tiles["elas_ffn_dh"], interpret)
    dwin, dwout = _dw_call(hk, gk, win_p, wout_p, vals, meta, dense_f, tok_dense, source, dw_mask,
                           tiles, interpret)
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
  if r_tail is not None:  # the dense tail, in XLA
    dh_tail, dwin_tail, dwout_tail = base.tail_grads(g_out, h, w_in, w_out, lay.f_main, r_tail,
                                                     mode, dense_all, sparse_on)
    d_h = d_h + dh_tail
    d_w_in = jnp.concatenate([d_w_in, dwin_tail], axis=0)
    d_w_out = jnp.concatenate([d_w_out, dwout_tail], axis=1)
  return d_h.astype(h.dtype), d_w_in.astype(w_in.dtype), d_w_out.astype(w_out.dtype), None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _ffn_core(mode, dense_fraction, tiles, interpret, h, w_in, w_out, sparse_on):
  out, stats, _ = _forward(mode, tiles, interpret, h, w_in, w_out, sparse_on)
  return out, stats


_ffn_core.defvjp(_ffn_fwd, _ffn_bwd)


class TritonFfn(base.FfnCore):
  """The FFN core as Pallas Triton kernels (NVIDIA GPUs; interpreted on CPU).

  Args:
    interpret, gpu: as :class:`~elas_kernels.ffn.base.FfnCore`; ``gpu.name``
      picks the tile table (``kernels/tiles_<name>.json``; none: the H200's).
      Naming a GPU builds for it (``interpret`` then defaults to False).
    block_t, block_f: tile sizes of every kernel (powers of two; ``block_f >= 8``).
    tiles: per-kernel tiles, ``{kernel name: common.Blocks or its fields}`` for any
      of :data:`KERNELS` (the rest default).
  """

  name = "triton"

  def __init__(self, *, interpret: bool | None = None, gpu: GpuSpec | None = None,
               block_t: int | None = None, block_f: int | None = None,
               tiles: dict | None = None):
    super().__init__(interpret=interpret, gpu=gpu)
    self.block_t, self.block_f, self.tiles = block_t, block_f, tiles

  def resolve(self, call: base.Call) -> cm.Tiles:
    """The per-kernel tiles of ``call`` (checked: bad tiles raise ``ValueError``)."""
    tiles, _ = cm.resolve_tiles(
        self.what, KERNELS, call.t, call.f, call.k, call.n, block_t=self.block_t,
        block_f=self.block_f, interpret=self.interpret, split=call.mode == "split",
        target=None if self.gpu is None else self.gpu.name, tiles=self.tiles,
        whole_out={"elas_ffn_fwd": "block_n", "elas_ffn_dh": "block_k"})
    return tiles

  def check_servable(self, call):
    self.resolve(call)  # bad tiles fail here, before anything is traced

  def _core(self, call, h_TxK, w_in_FxK, w_out_NxF, sparse_on):
    return _ffn_core(call.mode, call.dense_fraction, self.resolve(call), self.interpret, h_TxK,
                     w_in_FxK, w_out_NxF, sparse_on)

  def saved_activation(self, h, w_in_FxK, w_out_NxF, *, mode="masked"):
    call = base.check_args(self.what, h, w_in_FxK, w_out_NxF, mode, 0.05)
    if mode == "ste":
      raise NotImplementedError(f"{self.what}: mode 'ste' keeps no compressed activation")
    _, _, (lay, vals, meta, _, _) = _forward(mode, self.resolve(call), self.interpret,
                                             h.reshape(call.t, call.k), w_in_FxK, w_out_NxF,
                                             jnp.asarray(True), store=True)
    groups = call.f_main // 4
    return (lay.rows_out(cm.from_planes(vals))[:, : 2 * groups],
            lay.rows_out(meta)[:, : -(-groups // 2)])
