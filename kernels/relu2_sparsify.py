"""Fused ``z @ wᵀ -> ReLU² -> 2:4 select -> compress`` (y1 never reaches memory).

    vals_4xTxG, meta_TxG = relu2_sparsify(z_TxK, w_FxK)     # G = F / 8

returns the 2:4-compressed ``sparsify_24(relu(z wᵀ)²)`` in the plane layout of
``kernels/common.py`` (the bytes of ``sparse24.compress_24``, values
plane-major). With ``z`` the rank-r code and ``w = B_up`` this is the first
half of the ELAS FFN; its cost is reading ``z`` and writing 9/16 of the dense
activation, so it should run near copy bandwidth.

Forward: one program per (token block, feature block), no loop. Backward
(``custom_vjp``; the metadata gets no gradient): ``dy1 = unpack(d_vals) ·
2 relu(y1)`` with ``y1`` recomputed per tile (only ``z`` and ``w`` are kept),
then ``dz`` (per token block, loop over features) and ``dw`` (per feature
block and rank block, loop over tokens).
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


def reference(z_TxK: jax.Array, w_FxK: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Pure jnp: ``compress_24(sparsify_24(relu(z wᵀ)²))`` in the plane layout."""
  y1 = jnp.einsum("tk,fk->tf", z_TxK, w_FxK, preferred_element_type=jnp.float32).astype(z_TxK.dtype)
  r = jnp.maximum(y1, 0)
  values, meta = sparse24.compress_24(r * r)
  return cm.to_planes(values), meta


KERNELS = ("relu2_sparsify_fwd", "relu2_sparsify_dz", "relu2_sparsify_dw")


def _fwd_kernel(z_ref, w_ref, vals_ref, meta_ref, *, chunk: int):
  gb = meta_ref.shape[1]
  bt, k = z_ref.shape
  z = z_ref[...] if chunk >= k else None
  y2 = [x * x for x in cm.relu_planes(z, w_ref, pl.ds(0, gb), z_ref.dtype, x_ref=z_ref,
                                       rows=pl.ds(0, bt), chunk=chunk)]
  vals, meta = cm.compress_planes(y2, cm.keep_planes(y2))
  for p, v in enumerate(vals):
    vals_ref[p] = v
  meta_ref[...] = meta


def _dy1(z, w_ref, dv_ref, rows, gs, dtype, z_ref=None, chunk=None):
  """dy1 planes of one tile from the compressed cotangent (zero where 2:4 dropped);
  ``z`` [rows, K], or chunks of ``z_ref[rows]`` when ``chunk`` < K."""
  r = cm.relu_planes(z, w_ref, gs, dtype, x_ref=z_ref, rows=rows, chunk=chunk)
  y2 = [x * x for x in r]
  d = []
  for half in (0, 1):
    planes = slice(4 * half, 4 * half + 4)
    _, _, nib = cm.compress_group(y2[planes], cm.keep_24(y2[planes]))
    d += cm.decompress_group(dv_ref[2 * half, rows, gs], dv_ref[2 * half + 1, rows, gs], nib)
  return [(d[j].astype(jnp.float32) * (2 * r[j]).astype(jnp.float32)).astype(dtype)
          for j in range(PLANES)]


def _dz_kernel(z_ref, w_ref, dv_ref, dz_ref, *, gb: int, n_fblocks: int, chunk: int):
  """One (token block, rank tile of dz) program: a loop over feature blocks."""
  bt, k = z_ref.shape
  z = z_ref[...] if chunk >= k else None
  rows = pl.ds(0, bt)
  kb = dz_ref.shape[1]
  ks = pl.ds(pl.program_id(1) * kb, kb)

  def body(fi, acc):
    gs = pl.ds(pl.multiple_of(fi * gb, gb), gb)
    dy1 = _dy1(z, w_ref, dv_ref, rows, gs, z_ref.dtype, z_ref, chunk)
    for j in range(PLANES):
      acc = acc + cm.dot_nn(dy1[j], w_ref[j, gs, ks])
    return acc

  dz_ref[...] = jax.lax.fori_loop(0, n_fblocks, body, jnp.zeros(dz_ref.shape, jnp.float32))


def _dw_kernel(z_ref, w_ref, dv_ref, dw_ref, *, block_t: int, n_tblocks: int, chunk: int):
  """dw planes of one (feature block, rank block, token split): Σ_t dy1ᵀ z, dy1
  rebuilt per token block, accumulated as (zᵀ dy1)ᵀ: dy1 is selected by the 2:4
  mask of the recomputed y1, and as a transposed left dot operand Triton aborts
  on it (``cm.accumulate_planes_over_tokens``, ``transposed``)."""
  gb, kb = dw_ref.shape[1], dw_ref.shape[2]
  ks = pl.ds(pl.program_id(1) * kb, kb)
  k = z_ref.shape[1]

  def products(t0):
    rows = pl.ds(t0, block_t)
    z = z_ref[rows, :] if chunk >= k else None
    dy1 = _dy1(z, w_ref, dv_ref, rows, pl.ds(0, gb), z_ref.dtype, z_ref, chunk)
    z_k = z_ref[rows, ks]
    return [[(dy1[j], z_k) for j in range(PLANES)]]

  cm.accumulate_planes_over_tokens(dw_ref, block_t=block_t, n_tblocks=n_tblocks, products=products,
                                   first_block=pl.program_id(2) * n_tblocks, transposed=True)


def _operands(z, w, tiles: cm.Tiles):
  """Tokens and features padded to whole blocks, the rank to :func:`cm.rank_size`,
  the weight in planes (zero rows: zero activations, trimmed from the outputs)."""
  zk = cm.pad_rank(cm.pad_to(z, 0, tiles.t_multiple), 1)
  return zk, cm.weight_planes(cm.pad_rank(cm.pad_to(w, 0, tiles.f_multiple), 1))


def _forward(tiles, interpret, z, w):
  t = z.shape[0]
  f = w.shape[0]
  zk, w_p = _operands(z, w, tiles)
  blocks = tiles["relu2_sparsify_fwd"]
  tp, kp = zk.shape
  g, gb = w_p.shape[1], blocks.block_f // PLANES
  vals, meta = pl.pallas_call(
      functools.partial(_fwd_kernel, chunk=blocks.chunk(kp)),
      out_shape=[jax.ShapeDtypeStruct((4, tp, g), z.dtype), jax.ShapeDtypeStruct((tp, g), jnp.uint8)],
      grid=(tp // blocks.block_t, g // gb),
      in_specs=[pl.BlockSpec((blocks.block_t, kp), lambda i, c: (i, 0)),
                pl.BlockSpec((PLANES, gb, kp), lambda i, c: (0, c, 0))],
      out_specs=[pl.BlockSpec((4, blocks.block_t, gb), lambda i, c: (0, i, c)),
                 pl.BlockSpec((blocks.block_t, gb), lambda i, c: (i, c))],
      interpret=interpret, compiler_params=blocks.params(interpret),
      name="relu2_sparsify_fwd")(zk, w_p)
  return vals[:, :t, : f // PLANES], meta[:t, : f // PLANES]


def _bwd(tiles, interpret, res, cot):
  z, w = res
  d_vals = cot[0].astype(z.dtype)
  t, k = z.shape
  f = w.shape[0]
  zk, w_p = _operands(z, w, tiles)
  tp, kp = zk.shape
  dv = cm.pad_to(cm.pad_to(d_vals, 1, tiles.t_multiple), 2, tiles.f_multiple // PLANES)
  g = w_p.shape[1]
  b = tiles["relu2_sparsify_dz"]
  bt, gb = b.block_t, b.block_f // PLANES
  bkz = kp if b.block_k is None else min(b.block_k, kp)
  dz = pl.pallas_call(
      functools.partial(_dz_kernel, gb=gb, n_fblocks=g // gb, chunk=b.chunk(kp)),
      out_shape=jax.ShapeDtypeStruct((tp, kp), jnp.float32), grid=(tp // bt, kp // bkz),
      in_specs=[pl.BlockSpec((bt, kp), lambda i, c: (i, 0)),
                pl.BlockSpec((PLANES, g, kp), lambda i, c: (0, 0, 0)),
                pl.BlockSpec((4, bt, g), lambda i, c: (0, i, 0))],
      out_specs=pl.BlockSpec((bt, bkz), lambda i, c: (i, c)),
      interpret=interpret, compiler_params=b.params(interpret), name="relu2_sparsify_dz")(
          zk, w_p, dv)
  b = tiles["relu2_sparsify_dw"]
  bt, gb = b.block_t, b.block_f // PLANES
  bk = min(b.block_k, kp)
  splits = b.splits(tp // bt)
  dw = pl.pallas_call(
      functools.partial(_dw_kernel, block_t=bt, n_tblocks=tp // bt // splits, chunk=b.chunk(kp)),
      out_shape=jax.ShapeDtypeStruct((splits * PLANES, g, kp), jnp.float32),
      grid=(g // gb, kp // bk, splits),
      in_specs=[pl.BlockSpec((tp, kp), lambda c, q, s: (0, 0)),
                pl.BlockSpec((PLANES, gb, kp), lambda c, q, s: (0, c, 0)),
                pl.BlockSpec((4, tp, gb), lambda c, q, s: (0, 0, c))],
      out_specs=pl.BlockSpec((PLANES, gb, bk), lambda c, q, s: (s, c, q)),
      interpret=interpret, compiler_params=b.params(interpret), name="relu2_sparsify_dw")(
          zk, w_p, dv)
  if splits > 1:
    dw = jnp.sum(dw.reshape(splits, PLANES, g, kp), axis=0)
  d_w = cm.weight_unplanes(dw)[:f, :k]
  return dz[:t, :k].astype(z.dtype), d_w.astype(w.dtype)


VARIANTS = {name: [{}] for name in KERNELS}  # one code path per kernel


def kernel_program(kernel: str, variant: dict, t: int, f: int, r: int, blocks: cm.Blocks,
                   dtype=jnp.bfloat16):
  """``(fn, abstract args)``: one kernel of :data:`KERNELS` alone, compiled for a GPU with
  ``blocks`` for every kernel, on operands padded as the op pads them (``T`` tokens,
  ``F`` features, rank ``r``). What a compile-time tile search compiles."""
  del variant  # one code path per kernel
  S = jax.ShapeDtypeStruct
  tiles = cm.Tiles.uniform(KERNELS, blocks)
  tp, kp = cm.padded(t, blocks.block_t * max(1, blocks.split_t)), cm.rank_size(r)
  fp = cm.padded(f - f % PLANES, blocks.block_f)
  z, w = S((tp, kp), dtype), S((fp, kp), dtype)
  if kernel == "relu2_sparsify_fwd":
    return (lambda z, w: _forward(tiles, False, z, w)), (z, w)
  if kernel in ("relu2_sparsify_dz", "relu2_sparsify_dw"):
    def fn(z, w, dv):
      return _bwd(tiles, False, (z, w), (dv, None))[0 if kernel.endswith("dz") else 1]
    return fn, (z, w, S((4, tp, fp // PLANES), dtype))
  raise ValueError(f"unknown kernel {kernel!r}; expected one of {KERNELS}")


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _core(tiles, interpret, z, w):
  return _forward(tiles, interpret, z, w)


_core.defvjp(lambda tiles, interpret, z, w: (_forward(tiles, interpret, z, w), (z, w)), _bwd)


def relu2_sparsify(
    z_TxK: jax.Array,
    w_FxK: jax.Array,
    *,
    block_t: int | None = None,
    block_f: int | None = None,
    interpret: bool | None = None,
    gpu: GpuSpec | None = None,
    tiles: dict | None = None,
) -> tuple[jax.Array, jax.Array]:
  """2:4-compressed ``relu(z wᵀ)²``: values ``[4, T, F/8]`` and uint8 metadata ``[T, F/8]``.

  ``F`` must be a multiple of 8 (two 2:4 groups per metadata byte); ``T``
  and ``F`` need not divide the blocks (padded). ``interpret``, ``gpu``
  and ``tiles`` (per kernel of :data:`KERNELS`) as in :class:`elas_kernels.ffn.triton.TritonFfn`.
  """
  if z_TxK.ndim != 2 or w_FxK.ndim != 2 or z_TxK.shape[1] != w_FxK.shape[1]:
    raise ValueError(f"relu2_sparsify: expected z [T, K] and w [F, K]; got {z_TxK.shape}, "
                     f"{w_FxK.shape}")
  t, k = z_TxK.shape
  f = w_FxK.shape[0]
  if f % PLANES:
    raise ValueError(f"relu2_sparsify: F={f} is not a multiple of 8 (two 2:4 groups per "
                     "metadata byte); split off the tail and handle it densely")
  tiles_, interpret = cm.resolve_tiles("relu2_sparsify", KERNELS, t, f, k, k, block_t=block_t,
                                       block_f=block_f, interpret=interpret,
                                       target=None if gpu is None else gpu.name, tiles=tiles,
                                       whole_out={"relu2_sparsify_dz": "block_k"})
  return _core(tiles_, interpret, z_TxK, w_FxK.astype(z_TxK.dtype))
