"""Compressed 2:4 x dense matmul: decompress in registers, dense MMA.

    out_TxN = decompress_24(vals_4xTxG, meta_TxG) @ w_NxFᵀ        # G = F / 8

reads only the compressed activation (9/16 of the dense bf16 bytes). With the
compressed ReLU² activation and ``w = A_down`` this is the second half of the
ELAS FFN; ``y2s`` is never materialised dense in memory.

Forward: one program per (token block, output block), a loop over feature
blocks. Backward (``custom_vjp``; metadata gets no gradient): ``d_vals`` is
``g @ w`` gathered at the kept positions (per token and feature block: the
dense product lives only in registers), ``dw = gᵀ decompress(vals)`` per
(output block, feature block) with a loop over tokens.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from elas_kernels import common as cm
from elas_kernels import sparse24
from elas_kernels.common import PLANES
from elas_kernels.gpu import GpuSpec


def reference(vals_4xTxG: jax.Array, meta_TxG: jax.Array, w_NxF: jax.Array) -> jax.Array:
  """Pure jnp: ``decompress_24(vals, meta) @ wᵀ`` (fp32 accumulation)."""
  dense = sparse24.decompress_24(cm.from_planes(vals_4xTxG), meta_TxG)
  return jnp.einsum("tf,nf->tn", dense, w_NxF,
                    preferred_element_type=jnp.float32).astype(vals_4xTxG.dtype)


KERNELS = ("sparse24_matmul_fwd", "sparse24_matmul_dvals", "sparse24_matmul_dw")


def _fwd_kernel(vals_ref, meta_ref, w_ref, out_ref, *, gb: int, n_fblocks: int):
  rows = pl.ds(0, out_ref.shape[0])

  def body(fi, acc):
    gs = pl.ds(pl.multiple_of(fi * gb, gb), gb)
    d = cm.decompress_planes(vals_ref, meta_ref, rows, gs)
    for j in range(PLANES):
      acc = acc + cm.dot_nt(d[j], w_ref[j, :, gs])
    return acc

  acc = jax.lax.fori_loop(0, n_fblocks, body, jnp.zeros(out_ref.shape, jnp.float32))
  out_ref[...] = acc.astype(out_ref.dtype)


def _dvals_kernel(g_ref, w_ref, meta_ref, dv_ref, *, chunk: int):
  n = g_ref.shape[1]
  nibs = cm.unpack_meta(meta_ref[...])
  if chunk >= n:
    g = g_ref[...]
    prods = None
  else:  # the rank N reduced in chunks (8 planes at once)
    rows = pl.ds(0, g_ref.shape[0])
    prods = cm.plane_products(lambda ks: g_ref[rows, ks], lambda j, ks: w_ref[j, ks, :], n, chunk,
                              cm.dot_nn, (g_ref.shape[0], w_ref.shape[2]))
  for half, nib in enumerate(nibs):
    if prods is None:
      dense = [cm.dot_nn(g, w_ref[4 * half + j]).astype(dv_ref.dtype) for j in range(4)]
    else:
      dense = [prods[4 * half + j].astype(dv_ref.dtype) for j in range(4)]
    v0, v1, _ = cm.compress_group(dense, cm.kept_planes(nib))
    dv_ref[2 * half] = v0
    dv_ref[2 * half + 1] = v1


def _dw_kernel(g_ref, vals_ref, meta_ref, dw_ref, *, block_t: int, n_tblocks: int):
  nb, gb = dw_ref.shape[1], dw_ref.shape[2]
  ns = pl.ds(pl.program_id(0) * nb, nb)

  def products(t0):
    rows = pl.ds(t0, block_t)
    d = cm.decompress_planes(vals_ref, meta_ref, rows, pl.ds(0, gb))
    g = g_ref[rows, ns]
    return [[(g, d[j]) for j in range(PLANES)]]

  cm.accumulate_planes_over_tokens(dw_ref, block_t=block_t, n_tblocks=n_tblocks, products=products,
                                   first_block=pl.program_id(2) * n_tblocks)


def _operands(vals, meta, w, tiles: cm.Tiles):
  """Tokens and features padded to whole blocks (zero values decompress to
  zeros), the output size to :func:`cm.rank_size`, the weight in planes."""
  gb = tiles.f_multiple // PLANES
  v = cm.pad_to(cm.pad_to(vals, 1, tiles.t_multiple), 2, gb)
  m = cm.pad_to(cm.pad_to(meta, 0, tiles.t_multiple), 1, gb)
  return v, m, cm.out_weight_planes(cm.pad_rank(cm.pad_to(w, 1, tiles.f_multiple), 0))


def _forward(tiles, interpret, vals, meta, w):
  t, n = vals.shape[1], w.shape[0]
  v, m, w_p = _operands(vals, meta, w, tiles)
  blocks = tiles["sparse24_matmul_fwd"]
  tp, g, np_ = v.shape[1], v.shape[2], w_p.shape[1]
  bt, gb = blocks.block_t, blocks.block_f // PLANES
  bn = min(blocks.block_n, np_)
  out = pl.pallas_call(
      functools.partial(_fwd_kernel, gb=gb, n_fblocks=g // gb),
      out_shape=jax.ShapeDtypeStruct((tp, np_), vals.dtype), grid=(tp // bt, np_ // bn),
      in_specs=[pl.BlockSpec((4, bt, g), lambda i, c: (0, i, 0)),
                pl.BlockSpec((bt, g), lambda i, c: (i, 0)),
                pl.BlockSpec((PLANES, bn, g), lambda i, c: (0, c, 0))],
      out_specs=pl.BlockSpec((bt, bn), lambda i, c: (i, c)),
      interpret=interpret, compiler_params=blocks.params(interpret),
      name="sparse24_matmul_fwd")(v, m, w_p)
  return out[:t, :n]


def _bwd(tiles, interpret, res, g_out):
  vals, meta, w = res
  t, n = vals.shape[1], w.shape[0]
  v, m, w_p = _operands(vals, meta, w, tiles)
  tp, g, np_ = v.shape[1], v.shape[2], w_p.shape[1]
  gk = cm.pad_to(cm.pad_to(g_out.astype(vals.dtype), 0, tiles.t_multiple), 1, np_)
  blocks = tiles["sparse24_matmul_dvals"]
  bt, gb = blocks.block_t, blocks.block_f // PLANES
  d_vals = pl.pallas_call(
      functools.partial(_dvals_kernel, chunk=blocks.chunk(np_)),
      out_shape=jax.ShapeDtypeStruct((4, tp, g), vals.dtype), grid=(tp // bt, g // gb),
      in_specs=[pl.BlockSpec((bt, np_), lambda i, c: (i, 0)),
                pl.BlockSpec((PLANES, np_, gb), lambda i, c: (0, 0, c)),
                pl.BlockSpec((bt, gb), lambda i, c: (i, c))],
      out_specs=pl.BlockSpec((4, bt, gb), lambda i, c: (0, i, c)),
      interpret=interpret, compiler_params=blocks.params(interpret),
      name="sparse24_matmul_dvals")(gk, w_p, m)
  blocks = tiles["sparse24_matmul_dw"]
  bt, gb = blocks.block_t, blocks.block_f // PLANES
  bn = min(blocks.block_n, np_)
  splits = blocks.splits(tp // bt)
  dw = pl.pallas_call(
      functools.partial(_dw_kernel, block_t=bt, n_tblocks=tp // bt // splits),
      out_shape=jax.ShapeDtypeStruct((splits * PLANES, np_, g), jnp.float32),
      grid=(np_ // bn, g // gb, splits),
      in_specs=[pl.BlockSpec((tp, np_), lambda c, i, s: (0, 0)),
                pl.BlockSpec((4, tp, gb), lambda c, i, s: (0, 0, i)),
                pl.BlockSpec((tp, gb), lambda c, i, s: (0, i))],
      out_specs=pl.BlockSpec((PLANES, bn, gb), lambda c, i, s: (s, c, i)),
      interpret=interpret, compiler_params=blocks.params(interpret), name="sparse24_matmul_dw")(
          gk, v, m)
  if splits > 1:
    dw = jnp.sum(dw.reshape(splits, PLANES, np_, g), axis=0)
  d_w = cm.out_weight_unplanes(dw)[:n, : w.shape[1]].astype(w.dtype)
  return d_vals[:, :t, : vals.shape[2]], None, d_w


VARIANTS = {name: [{}] for name in KERNELS}  # one code path per kernel


def kernel_program(kernel: str, variant: dict, t: int, f: int, r: int, blocks: cm.Blocks,
                   dtype=jnp.bfloat16):
  """``(fn, abstract args)``: one kernel of :data:`KERNELS` alone, compiled for a GPU with
  ``blocks`` for every kernel, on operands padded as the op pads them (``T`` tokens,
  ``F`` features, output rank ``r``). What a compile-time tile search compiles."""
  del variant  # one code path per kernel
  S = jax.ShapeDtypeStruct
  tiles = cm.Tiles.uniform(KERNELS, blocks)
  tp, n = cm.padded(t, blocks.block_t * max(1, blocks.split_t)), cm.rank_size(r)
  fp = cm.padded(f - f % PLANES, blocks.block_f)
  v, m, w = S((4, tp, fp // PLANES), dtype), S((tp, fp // PLANES), jnp.uint8), S((n, fp), dtype)
  if kernel == "sparse24_matmul_fwd":
    return (lambda v, m, w: _forward(tiles, False, v, m, w)), (v, m, w)
  if kernel in ("sparse24_matmul_dvals", "sparse24_matmul_dw"):
    def fn(v, m, w, go):
      return _bwd(tiles, False, (v, m, w), go)[0 if kernel.endswith("dvals") else 2]
    return fn, (v, m, w, S((tp, n), dtype))
  raise ValueError(f"unknown kernel {kernel!r}; expected one of {KERNELS}")


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _core(tiles, interpret, vals, meta, w):
  return _forward(tiles, interpret, vals, meta, w)


_core.defvjp(lambda tiles, interpret, vals, meta, w:
             (_forward(tiles, interpret, vals, meta, w), (vals, meta, w)), _bwd)


def sparse24_matmul(
    vals_4xTxG: jax.Array,
    meta_TxG: jax.Array,
    w_NxF: jax.Array,
    *,
    block_t: int | None = None,
    block_f: int | None = None,
    block_n: int | None = None,
    interpret: bool | None = None,
    gpu: GpuSpec | None = None,
    tiles: dict | None = None,
) -> jax.Array:
  """``decompress_24(vals, meta) @ wᵀ`` from the compressed plane layout; ``[T, N]``.

  Differentiable in ``vals`` (gradient at the kept positions) and ``w``.
  ``interpret``, ``gpu`` and ``tiles`` (per kernel of :data:`KERNELS`) as in
  :class:`elas_kernels.ffn.triton.TritonFfn`.
  """
  if vals_4xTxG.ndim != 3 or vals_4xTxG.shape[0] != 4:
    raise ValueError(f"sparse24_matmul: vals must be [4, T, F/8], got {vals_4xTxG.shape}")
  _, t, g = vals_4xTxG.shape
  if meta_TxG.shape != (t, g) or meta_TxG.dtype != jnp.uint8:
    raise ValueError(f"sparse24_matmul: meta {meta_TxG.dtype}{list(meta_TxG.shape)} does not "
                     f"match vals {list(vals_4xTxG.shape)} (expected uint8[{t}, {g}])")
  if w_NxF.ndim != 2 or w_NxF.shape[1] != g * PLANES:
    raise ValueError(f"sparse24_matmul: w must be [N, {g * PLANES}], got {w_NxF.shape}")
  n = w_NxF.shape[0]
  tiles_, interpret = cm.resolve_tiles("sparse24_matmul", KERNELS, t, g * PLANES, n, n,
                                       block_t=block_t, block_f=block_f, block_n=block_n,
                                       interpret=interpret,
                                       target=None if gpu is None else gpu.name, tiles=tiles)
  return _core(tiles_, interpret, vals_4xTxG, meta_TxG, w_NxF.astype(vals_4xTxG.dtype))
