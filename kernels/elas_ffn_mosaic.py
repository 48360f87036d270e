"""The ELAS FFN core in Pallas Mosaic GPU (Hopper: TMA, wgmma), forward and backward.

Same op, arguments, results and gradients as ``kernels.elas_ffn.elas_ffn``
(the Triton version) and ``elas_jax.ops.sparsity.relu2_sparse_ffn`` (XLA):

    out_TxN = sparsify_24(relu(h_TxK @ w_inᵀ)²) @ w_outᵀ       w_in [F, K], w_out [N, F]

with ``h`` the rank-r code of a low-rank FFN (``K``, ``N`` are ranks). The
plain-jnp reference the tests compare with is the shared
``kernels.elas_ffn.reference`` (imported here, not copied).

Feature layout. Every program works on 64-token tiles (one warpgroup, wgmma
``M = 64``) and walks the features in *steps* of ``block_f`` (one TMA tile of
each weight per step), each made of *sub-tiles* of ``sub_f = 8·P`` features
(one wgmma ``N = sub_f >= 64``). The wrapper reorders the small weights (XLA,
outside the kernels) so that sub-tile column ``j·P + c`` is feature ``8c + j``
of the sub-tile: one wgmma gives ``y1 [64, 8P]`` whose column slices
``[:, jP:(j+1)P]`` are 8 *planes* with the same register layout, and the two
2:4 groups of features ``8c .. 8c+7`` are planes 0-3 and 4-7 at one position.
Selection, compression and decompression are element-wise across planes (no
shuffles), and the selected ``y2s`` tile, planes side by side, is the register
A operand of ``y2s @ w_outᵀ`` as FlashAttention-3 uses its P tile.

Compressed activation (what ``masked`` / ``split`` keep for backward, 9/16 of
the dense bytes): ``vals [T, F/2]`` (per sub-tile 4 value planes: first and
second kept value of group a, then of group b; ``relu(y1)`` at the kept
positions, so backward rebuilds ``y2s = v·v`` exactly) and ``meta`` uint8, one
byte per position (group a's index pair ``i0 | i1 << 2`` in the low nibble,
b's in the high: ``elas_jax.ops.sparsity.compress_24``'s byte), stored as
``[token tiles, sub-tiles · 64P/16, 16]``: each (token tile, sub-tile)'s
``[64, P]`` bytes as rows of 16, so every TMA row is 16 bytes and a kernel
can fetch any run of sub-tiles (``meta_TxG`` converts).

Kernels (each a ``plgpu.kernel``; tiles in shared memory by TMA, the weight /
activation streams through ``plgpu.emit_pipeline`` with ``stages`` buffers,
fp32 accumulation in wgmma accumulators):

- forward, per 64 tokens x ``block_n`` outputs: per sub-tile ``y1`` by wgmma,
  ReLU², 2:4 select + compress, ``acc += y2s @ w_outᵀ`` with ``y2s`` in
  registers; per-row statistics. ``y1`` and the dense ``y2`` never reach HBM.
- ``dh``, per 64 tokens x ``block_k`` columns: ``dy2 = g @ w_out`` by wgmma,
  ``relu(y1)`` decompressed (``masked``, ``split``) or recomputed
  (``ste``, dense warm-up), ``dy1 = dy2 · 2 relu(y1)`` in registers as the A
  operand of ``dh += dy1 @ w_in``.
- ``dw_in`` per feature step x ``block_k``, ``dw_out`` per feature step x
  ``block_n``, looping over tokens: ``dy1`` / the activation ``w_out``'s
  gradient sees are written to shared memory and read transposed by wgmma
  (``dw_in += dy1ᵀ h``, ``dw_out += gᵀ y2``); the token loop is split over
  ``dw_split`` programs so the grid fills the GPU. ``split`` loads 4 row planes
  of 64 tokens per step and applies token-wise 2:4 across them element-wise.
- ``relu`` (only where a recompute would not fit shared memory: ranks above
  256 in ``ste`` / the dense warm-up): ``relu(y1)`` written once for the three
  backward kernels to read.

Shapes that don't divide: tokens, features and ranks are zero-padded (zeros
flow through exactly) and the ``F % 4`` tail is dense in XLA, as in the
Triton wrapper. Ranks above 256 are split over programs (``block_n`` /
``block_k`` <= 256: a wgmma's N and the register budget), which recomputes
``y1`` (forward) or ``dy2`` (``dh``, ``dw_in``) once per extra block.

GPU: bf16 or fp16 inputs (wgmma's register A operand is 16-bit). fp32 runs in
the interpreter only (``interpret=True``); compiled it raises
``NotImplementedError`` so a dispatcher can fall back. Needs jax >= 0.11
(``kernels/mosaic_compat.py`` lists the API differences it covers).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import pallas as pl

from elas_jax.ops import sparsity
from kernels import common as cm
from kernels import mosaic_compat as mc
from kernels.elas_ffn import reference  # noqa: F401  (the shared plain-jnp reference)

__all__ = ["KernelSpec", "Tiles", "default_tiles", "elas_ffn", "kernel_specs", "meta_TxG",
           "reference"]

GROUP = 4
TOKENS = 64  # token rows of one wgmma tile (M)
PLANES = 8  # features per metadata byte: two 2:4 groups
RANK_ALIGN = 64  # ranks pad to multiples of 64: a 128-byte swizzle K group of bf16
H100_SMS = 132  # SMs of an H100 SXM / H200: the grid the weight-gradient kernels aim to fill
SMEM_LIMIT = 232448  # H100/H200 opt-in shared memory per block (Mosaic refuses more)
SMEM_MARGIN = 4096  # barriers, alignment and Mosaic's 2 KiB cross-warp reduction scratch
GPU_DTYPES = (jnp.bfloat16, jnp.float16)


# --------------------------------------------------------------------------
# Tiles and the static plan of one call.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Tiles:
  """Tile sizes (see the module docstring).

  ``block_t`` tokens per forward / ``dh`` program and per weight-gradient
  pipeline step (64, or 128: twice the registers; the interpreter's default,
  fewer steps to interpret); ``block_f`` features per pipeline step of the
  forward and ``dh`` kernels, ``block_f_dw`` per program of the weight-gradient
  kernels (their accumulator is ``[block_f_dw, block_k]``), both multiples of
  ``sub_f`` (8 planes of ``sub_f / 8``; one wgmma N); ``block_n`` / ``block_k``
  output columns per program (multiples of 64, at most 256), ``block_n_dw``
  split mode's ``dw_out`` columns; ``dw_split`` programs sharing one weight-
  gradient token loop (partial sums added in XLA); ``stages`` pipeline buffers
  (fewer where shared memory is short); ``materialize_relu``: the recomputing
  backward reads ``relu(y1)`` from the ``relu`` kernel instead of recomputing
  it in ``dh`` / ``dw_in`` / ``dw_out``.
  """

  block_t: int = TOKENS
  block_f: int = 128
  block_f_dw: int = 64
  sub_f: int = 64
  block_n: int = 256
  block_k: int = 256
  block_n_dw: int | None = None  # split mode's dw_out columns (None: block_n)
  dw_split: int | None = None  # weight-gradient token splits (None: by grid size)
  stages: int = 2
  materialize_relu: bool | None = None  # ste / warm-up backward: relu kernel (None: by rank)

  def check(self) -> None:
    if self.block_t not in (TOKENS, 2 * TOKENS):
      raise ValueError(f"elas_ffn_mosaic: block_t={self.block_t} must be {TOKENS} or "
                       f"{2 * TOKENS} (one warpgroup's wgmma rows)")
    if self.sub_f not in (64, 128, 256):
      raise ValueError(f"elas_ffn_mosaic: sub_f={self.sub_f} must be 64, 128 or 256")
    for name in ("block_f", "block_f_dw"):
      v = getattr(self, name)
      if v % self.sub_f or v > 256:
        raise ValueError(f"elas_ffn_mosaic: {name}={v} must be a multiple of "
                         f"sub_f={self.sub_f} and at most 256")
    for name in ("block_n", "block_k", "block_n_dw"):
      v = getattr(self, name)
      if v is None and name == "block_n_dw":
        continue
      if v % RANK_ALIGN or not 0 < v <= 256:
        raise ValueError(f"elas_ffn_mosaic: {name}={v} must be a multiple of 64, at most 256")
    if self.stages < 1:
      raise ValueError(f"elas_ffn_mosaic: stages={self.stages} must be >= 1")


def _rank_blocks(size: int, block: int) -> tuple[int, int]:
  """(padded size, block): fewest blocks of at most ``block``, each a multiple of 64."""
  size = cm.padded(size, RANK_ALIGN)
  n_blocks = -(-size // block)
  blk = cm.padded(-(-size // n_blocks), RANK_ALIGN)
  return blk * n_blocks, blk


class _Plan:
  """Static facts of one call: padded sizes, tiles, feature permutation, split order."""

  def __init__(self, t: int, f: int, k: int, n: int, dtype, mode: str, tiles: Tiles,
               interpret: bool):
    self.t, self.f, self.k, self.n = t, f, k, n
    self.dtype, self.mode, self.tiles, self.interpret = jnp.dtype(dtype), mode, tiles, interpret
    self.bt, self.fs, self.ft = tiles.block_t, tiles.block_f, tiles.sub_f
    self.p = self.ft // PLANES
    self.meta_sub = self.bt * self.p // 16  # one sub-tile's [bt, P] metadata bytes, 16 a row
    self.rp = 4 if mode == "split" else 1  # row planes per weight-gradient step (split: token 2:4)
    self.f_main = f - f % 4  # the f % 4 tail forms no 2:4 group: dense, in XLA
    self.t_pad = cm.padded(t, self.bt * self.rp)
    self.f_pad = cm.padded(self.f_main, math.lcm(tiles.block_f, tiles.block_f_dw))
    self.k_pad, self.kb = _rank_blocks(k, tiles.block_k)
    self.n_pad, self.nb = _rank_blocks(n, tiles.block_n)
    self.nt = self.t_pad // self.bt
    self.n_sub = self.f_pad // self.ft
    # Kernel feature order: sub-tile column j·P + c holds feature 8c + j of the sub-tile.
    q = np.arange(self.f_pad)
    s, j, c = q // self.ft, (q % self.ft) // self.p, q % self.p
    self.perm = s * self.ft + PLANES * c + j
    split = tiles.dw_split
    if split is not None:
      for steps in {self.nt, self.t_pad // (self.bt * self.rp)}:
        if steps % split:
          raise ValueError(f"elas_ffn_mosaic: dw_split={split} does not divide the {steps} "
                           f"token steps of a weight-gradient kernel ({t} tokens, block_t={self.bt})")
    self.order = self.tok_dense = None
    if mode == "split":
      self.order, self.tok_dense = _split_order(t, self.t_pad, self.bt)

  @property
  def n_steps(self) -> int:
    """Feature steps of ``fs`` (the forward's and dh's, or a weight-gradient kernel's)."""
    return self.f_pad // self.fs

  @property
  def n_sub_step(self) -> int:
    return self.fs // self.ft

  def replace(self, **attrs) -> "_Plan":
    c = object.__new__(_Plan)
    c.__dict__.update(self.__dict__, **attrs)
    return c

  def for_dw(self) -> "_Plan":
    return self.replace(fs=self.tiles.block_f_dw)

  def rows_in(self, x: jax.Array) -> jax.Array:
    """Pad the tokens and (split) put them in kernel order."""
    x = cm.pad_to(x, 0, self.t_pad)
    return x if self.order is None else x[self.order]

  def rows_out(self, x: jax.Array) -> jax.Array:
    if self.order is not None:
      x = x[np.argsort(self.order)]
    return x[: self.t]

  def features_in(self, x: jax.Array, axis: int) -> jax.Array:
    """Main features zero-padded to whole steps, in kernel order, along ``axis``."""
    x = lax.slice_in_dim(x, 0, self.f_main, axis=axis)
    return jnp.take(cm.pad_to(x, axis, self.f_pad), self.perm, axis=axis)

  def features_out(self, x: jax.Array, axis: int) -> jax.Array:
    x = jnp.take(x, np.argsort(self.perm), axis=axis)
    return lax.slice_in_dim(x, 0, self.f_main, axis=axis)


def _split_order(t: int, t_pad: int, bt: int):
  """Kernel token order for split mode, and which rows keep all tokens.

  The reference groups tokens ``perm[4m .. 4m+3]`` (``perm`` =
  ``sparsity.split_token_order(t)``); the ``dw_out`` kernel takes 4 row
  planes of ``bt`` tokens per step and groups rows ``i, i + bt, i + 2bt,
  i + 3bt``, so sequence position ``4m + j`` goes to row ``b·4bt + j·bt + i``
  with ``m = b·bt + i``. The ``t % 4`` tokens of an incomplete group stay
  dense, as in the reference.
  """
  seq = np.concatenate([sparsity.split_token_order(t), np.arange(t, t_pad)])
  dense_seq = np.zeros(t_pad, np.int32)
  dense_seq[t - t % 4:] = 1
  pos = np.arange(t_pad)
  m, j = pos // 4, pos % 4
  row = (m // bt) * 4 * bt + j * bt + m % bt
  order = np.empty(t_pad, np.int64)
  order[row] = seq
  tok_dense = np.empty(t_pad, np.int32)
  tok_dense[row] = dense_seq
  return order, tok_dense


# --------------------------------------------------------------------------
# In-register pieces (element-wise across planes).
# --------------------------------------------------------------------------


def _keep_24(a: list[jax.Array]) -> list[jax.Array]:
  """Keep-masks of the 2 largest of 4 same-shape arrays; ties go to the lower index
  (``elas_jax.ops.sparsity.mask_24``'s rule). ``i`` is kept iff it beats at least 2 of the
  other 3 (``i`` beats ``j`` iff ``a_i >= a_j`` for ``i < j``, ``a_i > a_j`` for ``i > j``):
  a majority of comparisons, no counting (fewer live registers than ranks by sums) and
  no boolean ``not`` (Mosaic GPU lowers it through a 2-bit register conversion)."""
  keep = []
  for i in range(GROUP):
    w = [(a[i] >= a[j]) if i < j else (a[i] > a[j]) for j in range(GROUP) if j != i]
    keep.append((w[0] & w[1]) | (w[2] & (w[0] | w[1])))
  return keep


def _count(b: jax.Array, dtype=jnp.int32) -> jax.Array:
  """1 where ``b``, else 0, by a select: Mosaic GPU cannot convert a 2-element
  register vector of bools (2 bits) to a wider type."""
  return jnp.where(b, jnp.ones((), dtype), jnp.zeros((), dtype))


def _planes(x: jax.Array, p: int) -> list[jax.Array]:
  """The 8 plane slices ``[:, jp:(j+1)p]`` of a sub-tile (register views)."""
  return [x[:, j * p:(j + 1) * p] for j in range(PLANES)]


def _relu(y1: jax.Array, dtype) -> jax.Array:
  """``relu(y1)`` rounded to the compute dtype first, as the XLA op rounds ``y1``."""
  return jnp.maximum(y1.astype(dtype), jnp.zeros((), dtype))


def _decompress(vals: jax.Array, meta: jax.Array, p: int) -> list[jax.Array]:
  """8 dense planes of ``relu(y1)`` (zeros where 2:4 dropped) from one sub-tile's
  values ``[bt, 4p]`` and metadata ``[bt, p]``."""
  v = [vals[:, i * p:(i + 1) * p] for i in range(4)]
  nib_a, nib_b = cm.unpack_meta(meta)
  return cm.decompress_group(v[0], v[1], nib_a) + cm.decompress_group(v[2], v[3], nib_b)


def _wgmma_k(acc, a_ref, b_ref, chunk: int = 128) -> None:
  """``acc += a @ b`` for shared-memory ``a [M, K]``, ``b [K, N]``, issued ``chunk``
  of K at a time in a loop: one unrolled wgmma per 16 of K for the whole rank
  keeps every operand descriptor live (measured: 400 bytes of spills at K = 512)."""
  mg = mc.plgpu()
  k = a_ref.shape[1]
  if k <= chunk:
    mg.wgmma(acc, a_ref, b_ref)
    return

  def body(i, carry):
    ks = pl.ds(pl.multiple_of(i * chunk, chunk), chunk)
    mg.wgmma(acc, a_ref.at[:, ks], b_ref.at[ks])
    return carry

  lax.fori_loop(0, k // chunk, body, 0)


def _dot_acc(shape, fn):
  """Run ``fn(acc_ref)`` (issuing wgmmas into a fresh fp32 accumulator) and read it."""
  mg = mc.plgpu()

  def scope(acc_ref):
    fn(acc_ref)
    return acc_ref[...]

  return pl.run_scoped(scope, mg.ACC(shape, jnp.float32))


def _copy_in(src, dst, barrier):
  """TMA one block into shared memory and wait for it."""
  mg = mc.plgpu()
  mg.copy_gmem_to_smem(src, dst, barrier)
  mg.barrier_wait(barrier)


def _store_out(acc: jax.Array, out_ref, out_s, row0, col0) -> None:
  """Write an fp32 ``[M, C]`` register tile to ``out_ref[row0:, col0:]`` in chunks
  through a double-buffered shared-memory tile ``out_s [2, cm, cc]`` (64x64 on a
  GPU, to spare shared memory; the whole tile when interpreting: fewer copies)."""
  mg = mc.plgpu()
  m, c = acc.shape
  cm, cc = out_s.shape[1:]
  chunk = 0
  for mi in range(m // cm):
    for ci in range(c // cc):
      slot = chunk % 2
      mg.wait_smem_to_gmem(1, wait_read_only=True)  # the copy that last used this slot
      out_s[slot] = acc[mi * cm:(mi + 1) * cm, ci * cc:(ci + 1) * cc]
      mg.commit_smem()
      mg.copy_smem_to_gmem(out_s.at[slot], out_ref.at[pl.ds(row0 + mi * cm, cm),
                                                      pl.ds(col0 + ci * cc, cc)])
      chunk += 1


# --------------------------------------------------------------------------
# Kernels.
# --------------------------------------------------------------------------


def _spec(shape, index_map, dtype, swizzle_minor=None):
  """A pipelined input: a shared-memory block TMA fills, swizzled for wgmma."""
  mg = mc.plgpu()
  if swizzle_minor is None:
    return mg.BlockSpec(shape, index_map)
  return mg.BlockSpec(shape, index_map, transforms=mc.swizzle_transforms(dtype, swizzle_minor))


def _fwd_kernel(flag_ref, h_ref, winT_ref, woutT_ref, out_ref, stats_ref, *store_refs,
                pl_: _Plan, store: bool, **scr):
  """``out[rows, n-block] = Σ_steps y2s @ w_outᵀ``; per-row statistics and (``store``)
  the compressed activation come from the first n-block's programs."""
  mg = mc.plgpu()
  c = pl_
  dt, bt, fs, ft, p = c.dtype, c.bt, c.fs, c.ft, c.p
  ti, nb = lax.axis_index("t"), lax.axis_index("n")
  rows = pl.ds(ti * bt, bt)
  first_nb = nb == 0
  dense = flag_ref[0] == 0  # the dense warm-up: keep everything
  _copy_in(h_ref.at[rows], scr["h_s"], scr["bar"].at[0])
  zero = jnp.zeros((), dt)

  def step(idx, winT_s, woutT_s, carry):
    (fi,) = idx
    zeros, total, kept = carry
    slot = lax.rem(fi, 2)
    if store:
      mg.wait_smem_to_gmem(1, wait_read_only=True)  # the copies that last used this slot
    for s in range(fs // ft):
      y1 = _dot_acc((bt, ft), lambda acc: _wgmma_k(acc, scr["h_s"], winT_s.at[:, pl.ds(s * ft, ft)]))
      r = _planes(_relu(y1, dt), p)
      y2 = [x * x for x in r]
      keep = _keep_24(y2[:4]) + _keep_24(y2[4:])
      # Statistics: zeros and mass of y2, mass kept by 2:4 (from the 4 compressed value
      # planes, half the work of selecting the dropped 8); dropped = total - kept per row.
      a0, a1, nib_a = cm.compress_group(r[:4], keep[:4])
      b0, b1, nib_b = cm.compress_group(r[4:], keep[4:])
      if store:
        scr["vals_s"].at[slot][:, s * ft // 2:(s + 1) * ft // 2] = jnp.concatenate(
            [a0, a1, b0, b1], axis=1)
        mc.store_as(scr["meta_s"].at[slot, pl.ds(s * c.meta_sub, c.meta_sub)],
                    cm.pack_meta(nib_a, nib_b), c.interpret)
      kept += jnp.sum(sum((v * v).astype(jnp.float32) for v in (a0, a1, b0, b1)), axis=1)
      y2s = [jnp.where(keep[j] | dense, y2[j], zero) for j in range(PLANES)]
      mc.wgmma_a(scr["acc"], jnp.concatenate(y2s, axis=1), woutT_s.at[pl.ds(s * ft, ft)],
                 scr.get("stage_s"), c.interpret)
      zeros += jnp.sum(sum(_count(x == zero, jnp.float32) for x in y2), axis=1)
      total += jnp.sum(sum(x.astype(jnp.float32) for x in y2), axis=1)
    if store:
      mg.commit_smem()

      @pl.when(first_nb)
      def _():
        mg.copy_smem_to_gmem(scr["vals_s"].at[slot],
                             store_refs[0].at[rows, pl.ds(fi * (fs // 2), fs // 2)],
                             commit_group=False)
        mrows = c.n_sub_step * c.meta_sub
        mg.copy_smem_to_gmem(scr["meta_s"].at[slot], store_refs[1].at[ti, pl.ds(fi * mrows, mrows)],
                             commit_group=False)
        mg.commit_smem_to_gmem_group()
    mg.wgmma_wait(0)  # the w_out slot is refilled after this step
    return zeros, total, kept

  def run(acc_ref):
    scr["acc"] = acc_ref
    z = mc.zeros((bt,), jnp.float32, mg.Layout.WGMMA.reduce(1))
    carry = mg.emit_pipeline(
        step, grid=(c.n_steps,), max_concurrent_steps=min(c.tiles.stages, c.n_steps),
        in_specs=[_spec((c.k_pad, fs), lambda f: (0, f), dt, fs),
                  _spec((fs, c.nb), lambda f: (f, nb), dt, c.nb)],
        init_carry=(z, z, z))(winT_ref, woutT_ref)
    return acc_ref[...], carry

  acc, (zeros, total, kept) = pl.run_scoped(run, mg.ACC((bt, c.nb), jnp.float32))
  stats = (zeros, total, total - kept)
  _store_out(acc, out_ref, scr["out_s"], ti * bt, nb * c.nb)

  @pl.when(first_nb)
  def _():
    for i in range(3):
      scr["stats_s"][i] = stats[i]
    mg.commit_smem()
    mg.copy_smem_to_gmem(scr["stats_s"], stats_ref.at[:, rows])

  mg.wait_smem_to_gmem(0)


def _relu_kernel(h_ref, winT_ref, r_ref, *, pl_: _Plan, **scr):
  """``relu(y1)`` of 64 tokens, every feature, written in kernel feature order."""
  mg = mc.plgpu()
  c = pl_
  bt, fs, ft = c.bt, c.fs, c.ft
  ti = lax.axis_index("t")
  rows = pl.ds(ti * bt, bt)
  _copy_in(h_ref.at[rows], scr["h_s"], scr["bar"].at[0])

  def step(idx, winT_s):
    (fi,) = idx
    slot = lax.rem(fi, 2)
    mg.wait_smem_to_gmem(1, wait_read_only=True)
    for s in range(fs // ft):
      y1 = _dot_acc((bt, ft), lambda acc: _wgmma_k(acc, scr["h_s"], winT_s.at[:, pl.ds(s * ft, ft)]))
      scr["r_s"].at[slot][:, s * ft:(s + 1) * ft] = _relu(y1, c.dtype)
    mg.commit_smem()
    mg.copy_smem_to_gmem(scr["r_s"].at[slot], r_ref.at[rows, pl.ds(fi * fs, fs)])

  mg.emit_pipeline(step, grid=(c.n_steps,), max_concurrent_steps=min(c.tiles.stages, c.n_steps),
                   in_specs=[_spec((c.k_pad, fs), lambda f: (0, f), c.dtype, fs)])(winT_ref)
  mg.wait_smem_to_gmem(0)


class _Relu:
  """Where a backward kernel's ``relu(y1)`` planes come from: ``compressed`` (the
  forward's vals + meta), ``recompute`` (wgmma of ``h`` and ``w_inᵀ``) or ``dense``
  (the ``relu`` kernel's output)."""

  def __init__(self, source: str, c: _Plan):
    self.source, self.c = source, c

  def specs(self, rows_idx, fi_of, step_rows: int):
    """Pipelined inputs for ``step_rows`` tokens at token-block ``rows_idx(step)``."""
    c = self.c
    if self.source == "compressed":
      rp = step_rows // c.bt
      return [_spec((step_rows, c.fs // 2), lambda *i: (rows_idx(*i), fi_of(*i)), c.dtype,
                    c.ft // 2),
              _spec((rp, c.n_sub_step * c.meta_sub, 16),
                    lambda *i: (rows_idx(*i), fi_of(*i), 0), jnp.uint8)]
    if self.source == "dense":
      return [_spec((step_rows, c.fs), lambda *i: (rows_idx(*i), fi_of(*i)), c.dtype, c.ft)]
    return []  # recompute: h and w_inᵀ are passed separately

  def planes(self, refs, q: int, s: int, h_rows=None, winT_s=None) -> list[jax.Array]:
    """The 8 ``relu(y1)`` planes of row plane ``q``, sub-tile ``s`` of a step, loaded (or
    recomputed) just for it: a step's other tiles stay in shared memory, not registers."""
    c = self.c
    ft, p, rows = c.ft, c.p, pl.ds(q * c.bt, c.bt)
    if self.source == "compressed":
      vals_s, meta_s = refs
      vals = mc.load(vals_s.at[rows, pl.ds(s * ft // 2, ft // 2)])
      meta = mc.load_as(meta_s.at[q, pl.ds(s * c.meta_sub, c.meta_sub)], (c.bt, p), c.interpret)
      return _decompress(vals, meta, p)
    if self.source == "dense":
      return _planes(mc.load(refs[0].at[rows, pl.ds(s * ft, ft)]), p)
    y1 = _dot_acc((c.bt, ft), lambda acc: _wgmma_k(acc, h_rows, winT_s.at[:, pl.ds(s * ft, ft)]))
    return _planes(_relu(y1, c.dtype), p)


def _dy1_planes(dy2: jax.Array, r: list[jax.Array], c: _Plan) -> jax.Array:
  """``dy1 = dy2 · 2 relu(y1)`` (zero where 2:4 dropped, when ``r`` is decompressed),
  rounded to the compute dtype as the XLA op rounds it; planes side by side."""
  d = _planes(dy2, c.p)
  return jnp.concatenate([(d[j] * (2 * r[j]).astype(jnp.float32)).astype(c.dtype)
                          for j in range(PLANES)], axis=1)


def _dh_kernel(g_ref, wout_ref, win_ref, *refs, pl_: _Plan, relu: _Relu, **scr):
  """``dh[rows, k-block] = Σ_steps dy1 @ w_in``."""
  mg = mc.plgpu()
  c = pl_
  bt, fs, ft = c.bt, c.fs, c.ft
  ins, dh_ref = refs[:-1], refs[-1]
  if relu.source == "recompute":
    h_ref, winT_ref, src_refs = ins[0], ins[1], ()
  else:
    h_ref = winT_ref = None
    src_refs = ins
  ti, kb = lax.axis_index("t"), lax.axis_index("k")
  rows = pl.ds(ti * bt, bt)
  _copy_in(g_ref.at[rows], scr["g_s"], scr["bar"].at[0])
  if h_ref is not None:
    _copy_in(h_ref.at[rows], scr["h_s"], scr["bar"].at[1])

  def step(idx, wout_s, win_s, *rest):
    winT_s = rest[0] if relu.source == "recompute" else None
    src = rest if relu.source != "recompute" else ()
    for s in range(fs // ft):
      # relu(y1) first: a recomputed y1's accumulator is free again before dy2's is taken
      r = relu.planes(src, 0, s, scr.get("h_s"), winT_s)
      dy2 = _dot_acc((bt, ft), lambda acc: _wgmma_k(acc, scr["g_s"], wout_s.at[:, pl.ds(s * ft, ft)]))
      mc.wgmma_a(scr["acc"], _dy1_planes(dy2, r, c), win_s.at[pl.ds(s * ft, ft)],
                 scr.get("stage_s"), c.interpret)
    mg.wgmma_wait(0)

  def run(acc_ref):
    scr["acc"] = acc_ref
    specs = [_spec((c.n_pad, fs), lambda f: (0, f), c.dtype, fs),
             _spec((fs, c.kb), lambda f: (f, kb), c.dtype, c.kb)]
    args = [wout_ref, win_ref]
    if relu.source == "recompute":
      specs.append(_spec((c.k_pad, fs), lambda f: (0, f), c.dtype, fs))
      args.append(winT_ref)
    specs += relu.specs(lambda f: ti, lambda f: f, bt)
    args += list(src_refs)
    mg.emit_pipeline(step, grid=(c.n_steps,), in_specs=specs,
                     max_concurrent_steps=min(c.tiles.stages, c.n_steps))(*args)
    return acc_ref[...]

  acc = pl.run_scoped(run, mg.ACC((bt, c.kb), jnp.float32))
  _store_out(acc, dh_ref, scr["out_s"], ti * bt, kb * c.kb)
  mg.wait_smem_to_gmem(0)


def _dwin_kernel(g_ref, h_ref, wout_ref, *refs, pl_: _Plan, relu: _Relu, **scr):
  """``dw_in[f-step, k-block] = Σ_token tiles dy1ᵀ h`` (rows in kernel feature order)."""
  mg = mc.plgpu()
  c = pl_
  bt, fs, ft = c.bt, c.fs, c.ft
  ins, dwin_ref = refs[:-1], refs[-1]
  winT_ref = ins[0] if relu.source == "recompute" else None
  src_refs = () if relu.source == "recompute" else ins
  fi, kb, si = lax.axis_index("f"), lax.axis_index("k"), lax.axis_index("s")
  t0 = si * c.dw_steps  # this program's share of the token tiles (split-K over tokens)
  _copy_in(wout_ref.at[:, pl.ds(fi * fs, fs)], scr["wout_s"], scr["bar"].at[0])
  if winT_ref is not None:
    _copy_in(winT_ref.at[:, pl.ds(fi * fs, fs)], scr["winT_s"], scr["bar"].at[1])
  recompute = relu.source == "recompute"

  def step(idx, g_s, h_s, *src):
    for s in range(fs // ft):
      r = relu.planes(src, 0, s, h_s, scr.get("winT_s"))  # before dy2, as in dh
      dy2 = _dot_acc((bt, ft), lambda acc: _wgmma_k(acc, g_s, scr["wout_s"].at[:, pl.ds(s * ft, ft)]))
      scr["dy1_s"][:, s * ft:(s + 1) * ft] = _dy1_planes(dy2, r, c)
    mg.commit_smem()  # dy1 in shared memory before wgmma reads it
    h_k = h_s.at[:, pl.ds(kb * c.kb, c.kb)] if recompute else h_s
    mg.wgmma(scr["acc"], scr["dy1_s"].T, h_k)
    mg.wgmma_wait(0)

  def run(acc_ref):
    scr["acc"] = acc_ref
    h_spec = (_spec((bt, c.k_pad), lambda t: (t0 + t, 0), c.dtype, c.k_pad) if recompute
              else _spec((bt, c.kb), lambda t: (t0 + t, kb), c.dtype, c.kb))
    specs = [_spec((bt, c.n_pad), lambda t: (t0 + t, 0), c.dtype, c.n_pad), h_spec]
    specs += relu.specs(lambda t: t0 + t, lambda t: fi, bt)
    mg.emit_pipeline(step, grid=(c.dw_steps,), in_specs=specs,
                     max_concurrent_steps=min(c.tiles.stages, c.dw_steps))(g_ref, h_ref, *src_refs)
    return acc_ref[...]

  acc = pl.run_scoped(run, mg.ACC((fs, c.kb), jnp.float32))
  _store_out(acc, dwin_ref.at[si], scr["out_s"], fi * fs, kb * c.kb)
  mg.wait_smem_to_gmem(0)


def _dwout_kernel(g_ref, *refs, pl_: _Plan, relu: _Relu, dw_mask: str, **scr):
  """``dw_out[n-block, f-step] = Σ_token steps gᵀ y2``; ``y2`` as the backward mode
  defines it: ``none`` (as rebuilt), ``ste`` (2:4 of the recomputed ``y2``) or
  ``tokens`` (split: token-wise 2:4 across the 4 row planes of a step, except
  the dense features and the rows of an incomplete token group)."""
  mg = mc.plgpu()
  c = pl_
  bt, fs, ft, p = c.bt, c.fs, c.ft, c.p
  rp = c.rp if dw_mask == "tokens" else 1
  sr = bt * rp  # tokens per pipeline step
  refs = list(refs)
  dwout_ref = refs.pop()
  h_ref = winT_ref = densef_ref = tokd_ref = None
  if relu.source == "recompute":
    h_ref, winT_ref = refs.pop(0), refs.pop(0)
  if dw_mask == "tokens":
    densef_ref, tokd_ref = refs.pop(0), refs.pop(0)
  src_refs = refs
  fi, nb, si = lax.axis_index("f"), lax.axis_index("n"), lax.axis_index("s")
  t0 = si * c.dw_steps  # this program's share of the token steps (split-K over tokens)
  if winT_ref is not None:
    _copy_in(winT_ref.at[:, pl.ds(fi * fs, fs)], scr["winT_s"], scr["bar"].at[0])
  if densef_ref is not None:
    _copy_in(densef_ref.at[pl.ds(fi * fs, fs)], scr["densef_s"], scr["bar"].at[1])
  zero = jnp.zeros((), c.dtype)

  def step(idx, g_s, *rest):
    rest = list(rest)
    h_s = rest.pop(0) if h_ref is not None else None
    tokd_s = rest.pop(0) if tokd_ref is not None else None
    src = rest
    tok_dense = [None] * rp
    if tokd_s is not None:
      tok_dense = [mc.load(tokd_s.at[pl.ds(q * bt, bt)], mg.Layout.WGMMA.reduce(1)) != 0
                   for q in range(rp)]
    for s in range(fs // ft):
      y2 = []
      for q in range(rp):
        h_q = h_s.at[pl.ds(q * bt, bt)] if h_s is not None else None
        y2q = [x * x for x in relu.planes(src, q, s, h_q, scr.get("winT_s"))]
        if dw_mask == "ste":  # straight-through: w_out sees the 2:4 forward activation
          keep = _keep_24(y2q[:4]) + _keep_24(y2q[4:])
          y2q = [jnp.where(keep[j], y2q[j], zero) for j in range(PLANES)]
        y2.append(y2q)
      if dw_mask == "tokens":
        for j in range(PLANES):
          dense_f = mc.load(scr["densef_s"].at[pl.ds(s * ft + j * p, p)],
                            mg.Layout.WGMMA.reduce(0)) != 0
          keep = _keep_24([y2[q][j] for q in range(rp)])  # along tokens
          for q in range(rp):
            keep_qj = (keep[q] | lax.broadcast_in_dim(dense_f, (bt, p), [1])
                       | lax.broadcast_in_dim(tok_dense[q], (bt, p), [0]))
            y2[q][j] = jnp.where(keep_qj, y2[q][j], zero)
      for q in range(rp):
        scr["y2_s"][q * bt:(q + 1) * bt, s * ft:(s + 1) * ft] = jnp.concatenate(y2[q], axis=1)
    mg.commit_smem()
    mg.wgmma(scr["acc"], g_s.T, scr["y2_s"])
    mg.wgmma_wait(0)

  def run(acc_ref):
    scr["acc"] = acc_ref
    specs = [_spec((sr, c.nb), lambda t: (t0 + t, nb), c.dtype, c.nb)]
    args = [g_ref]
    if h_ref is not None:
      specs.append(_spec((sr, c.k_pad), lambda t: (t0 + t, 0), c.dtype, c.k_pad))
      args.append(h_ref)
    if tokd_ref is not None:
      specs.append(_spec((sr,), lambda t: (t0 + t,), jnp.int32))
      args.append(tokd_ref)
    specs += relu.specs(lambda t: t0 + t, lambda t: fi, sr)
    args += src_refs
    mg.emit_pipeline(step, grid=(c.dw_steps,), in_specs=specs,
                     max_concurrent_steps=min(c.tiles.stages, c.dw_steps))(*args)
    return acc_ref[...]

  acc = pl.run_scoped(run, mg.ACC((c.nb, fs), jnp.float32))
  _store_out(acc, dwout_ref.at[si], scr["out_s"], nb * c.nb, fi * fs)
  mg.wait_smem_to_gmem(0)


# --------------------------------------------------------------------------
# Kernel builders: grids, scratch, shared-memory budgets.
# --------------------------------------------------------------------------


def _nbytes(shape, dtype) -> int:
  return math.prod(shape) * jnp.dtype(dtype).itemsize


class _Scratch:
  """Scratch buffers of one kernel by name, with their bytes; pipeline buffers are
  added to the budget with :meth:`pipelined` (``stages`` copies each)."""

  def __init__(self):
    self.buffers, self.pipeline_bytes = {}, 0

  def add(self, name, shape, dtype, swizzle_minor=None):
    mg = mc.plgpu()
    tr = () if swizzle_minor is None else mc.swizzle_transforms(dtype, swizzle_minor)
    self.buffers[name] = mg.SMEM(tuple(shape), dtype, transforms=tr)
    return self

  def pipelined(self, *blocks):
    self.pipeline_bytes += sum(_nbytes(s, d) for s, d in blocks)
    return self

  def bytes(self, stages: int) -> int:
    own = sum(_nbytes(b.shape, b.dtype) for b in self.buffers.values())
    return own + stages * self.pipeline_bytes

  def build(self, n_barriers: int):
    mg = mc.plgpu()
    return dict(self.buffers, bar=mg.Barrier(num_barriers=n_barriers))


def _fit_stages(what: str, scratch: _Scratch, c: _Plan, steps: int) -> int:
  """Most pipeline stages (<= ``tiles.stages`` and the step count) that fit shared memory;
  ``NotImplementedError`` when even one does not (interpret mode has no limit)."""
  want = max(1, min(c.tiles.stages, steps))
  if c.interpret:
    return want
  for stages in range(want, 0, -1):
    if scratch.bytes(stages) <= SMEM_LIMIT - SMEM_MARGIN:
      return stages
  raise NotImplementedError(
      f"elas_ffn_mosaic {what}: {scratch.bytes(1)} bytes of shared memory with one pipeline "
      f"stage exceed the {SMEM_LIMIT} an H100/H200 block has (K={c.k_pad}, N={c.n_pad}, "
      f"block_f={c.fs}); use kernel=triton or xla for these ranks")


def _with_stages(c: _Plan, stages: int) -> _Plan:
  return c.replace(tiles=dataclasses.replace(c.tiles, stages=stages))


def _out_chunks(s: _Scratch, c: _Plan, acc_shape) -> _Scratch:
  """The output staging of :func:`_store_out`."""
  return s.add("out_s", (2, *(acc_shape if c.interpret else (64, 64))), jnp.float32)


@dataclasses.dataclass
class KernelSpec:
  """One kernel launch as built for a call: what the static report reads.

  ``wgmma``: instruction shape -> count per program (``m64nNk16``, each
  ``2·64·N·16`` FLOPs); ``flops``: the launch's tensor-core FLOPs (recomputes
  included); ``hbm_bytes``: the HBM traffic it cannot avoid (activations and
  outputs once, weights once: they stay in the 50 MB L2); ``smem_bytes``: the
  scratch this module allocates (Mosaic adds barriers and 2 KiB for reductions).
  """

  name: str
  grid: tuple[int, ...]
  grid_names: tuple[str, ...]
  stages: int
  smem_bytes: int
  wgmma: dict[str, int]
  hbm_bytes: int
  out_shape: object = dataclasses.field(repr=False)
  scratch: object = dataclasses.field(repr=False)
  body: object = dataclasses.field(repr=False)
  c: object = dataclasses.field(repr=False)

  @property
  def programs(self) -> int:
    return math.prod(self.grid)

  @property
  def flops(self) -> int:
    return self.programs * sum(2 * 64 * int(k.split("n")[1].split("k")[0]) * 16 * v
                               for k, v in self.wgmma.items())

  def __call__(self, *args):
    return mc.kernel(_named(self.body, self.name), out_shape=self.out_shape,
                     scratch=self.scratch, grid=self.grid, grid_names=self.grid_names,
                     interpret=self.c.interpret)(*args)


def _mma(counts: dict[str, int], n: int, k: int, times: int = 1) -> None:
  """Add the m64 wgmma instructions of one ``[64, k] x [k, n]`` product (``times`` of them)."""
  key = f"m64n{n}k16"
  counts[key] = counts.get(key, 0) + times * k // 16


def _spec_of(name, c: _Plan, s: _Scratch, steps: int, grid, grid_names, out_shape, body,
             wgmma, hbm_bytes) -> KernelSpec:
  c = _with_stages(c, _fit_stages(name, s, c, steps))
  return KernelSpec(name=name, grid=grid, grid_names=grid_names, stages=c.tiles.stages,
                    smem_bytes=s.bytes(c.tiles.stages), wgmma=wgmma, hbm_bytes=int(hbm_bytes),
                    out_shape=out_shape, scratch=s.build(2),
                    body=functools.partial(body, pl_=c) if body else None, c=c)


def _fwd_spec(c: _Plan, store: bool) -> KernelSpec:
  """Outputs: [out fp32 [T, N], stats [3, T]] + [vals, meta] if ``store``."""
  dt, it = c.dtype, c.dtype.itemsize
  s = _Scratch().add("h_s", (c.bt, c.k_pad), dt, c.k_pad)
  _out_chunks(s, c, (c.bt, c.nb)).add("stats_s", (3, c.bt), jnp.float32)
  s.pipelined(((c.k_pad, c.fs), dt), ((c.fs, c.nb), dt))
  if store:
    s.add("vals_s", (2, c.bt, c.fs // 2), dt, c.ft // 2)
    s.add("meta_s", (2, c.n_sub_step * c.meta_sub, 16), jnp.uint8)
  if c.interpret:
    s.add("stage_s", (c.bt, c.ft), dt, c.ft)
  out_shape = [jax.ShapeDtypeStruct((c.t_pad, c.n_pad), jnp.float32),
               jax.ShapeDtypeStruct((3, c.t_pad), jnp.float32)]
  if store:
    out_shape += [jax.ShapeDtypeStruct((c.t_pad, c.f_pad // 2), dt),
                  jax.ShapeDtypeStruct((c.nt, c.n_sub * c.meta_sub, 16), jnp.uint8)]
  mma = {}
  _mma(mma, c.ft, c.k_pad, c.n_sub)
  _mma(mma, c.nb, c.ft, c.n_sub)
  hbm = (c.t_pad * c.k_pad * it + c.t_pad * c.n_pad * 4 + 12 * c.t_pad
         + c.f_pad * (c.k_pad + c.n_pad) * it
         + (c.t_pad * c.f_pad // 2 * it + c.t_pad * c.f_pad // 8 if store else 0))
  return _spec_of("elas_mgpu_fwd" + ("_store" if store else ""), c, s, c.n_steps,
                  (c.nt, c.n_pad // c.nb), ("t", "n"), out_shape,
                  functools.partial(_fwd_kernel, store=store), mma, hbm)


def _relu_spec(c: _Plan) -> KernelSpec:
  dt, it = c.dtype, c.dtype.itemsize
  s = _Scratch().add("h_s", (c.bt, c.k_pad), dt, c.k_pad).add("r_s", (2, c.bt, c.fs), dt, c.ft)
  s.pipelined(((c.k_pad, c.fs), dt))
  mma = {}
  _mma(mma, c.ft, c.k_pad, c.n_sub)
  hbm = c.t_pad * c.k_pad * it + c.f_pad * c.k_pad * it + c.t_pad * c.f_pad * it
  return _spec_of("elas_mgpu_relu", c, s, c.n_steps, (c.nt,), ("t",),
                  jax.ShapeDtypeStruct((c.t_pad, c.f_pad), dt), _relu_kernel, mma, hbm)


def _src_blocks(source: str, c: _Plan, rows: int):
  if source == "compressed":
    return [((rows, c.fs // 2), c.dtype), ((rows // c.bt, c.n_sub_step * c.meta_sub, 16), jnp.uint8)]
  if source == "dense":
    return [((rows, c.fs), c.dtype)]
  return []


def _src_bytes(source: str, c: _Plan) -> int:
  """HBM bytes of the backward's relu(y1) source: compressed (9/16 of dense), dense, or h."""
  it = c.dtype.itemsize
  return {"compressed": c.t_pad * c.f_pad // 2 * it + c.t_pad * c.f_pad // 8,
          "dense": c.t_pad * c.f_pad * it, "recompute": c.t_pad * c.k_pad * it}[source]


def _dh_spec(c: _Plan, source: str) -> KernelSpec:
  dt, it = c.dtype, c.dtype.itemsize
  s = _out_chunks(_Scratch().add("g_s", (c.bt, c.n_pad), dt, c.n_pad), c, (c.bt, c.kb))
  s.pipelined(((c.n_pad, c.fs), dt), ((c.fs, c.kb), dt), *_src_blocks(source, c, c.bt))
  if source == "recompute":
    s.add("h_s", (c.bt, c.k_pad), dt, c.k_pad).pipelined(((c.k_pad, c.fs), dt))
  if c.interpret:
    s.add("stage_s", (c.bt, c.ft), dt, c.ft)
  mma = {}
  _mma(mma, c.ft, c.n_pad, c.n_sub)
  if source == "recompute":
    _mma(mma, c.ft, c.k_pad, c.n_sub)
  _mma(mma, c.kb, c.ft, c.n_sub)
  hbm = (c.t_pad * c.n_pad * it + _src_bytes(source, c) + c.t_pad * c.k_pad * 4
         + c.f_pad * (c.k_pad + c.n_pad) * it)
  return _spec_of(f"elas_mgpu_dh_{source}", c, s, c.n_steps, (c.nt, c.k_pad // c.kb), ("t", "k"),
                  jax.ShapeDtypeStruct((c.t_pad, c.k_pad), jnp.float32),
                  functools.partial(_dh_kernel, relu=_Relu(source, c)), mma, hbm)


def _dwin_spec(c: _Plan, source: str) -> KernelSpec:
  c = c.for_dw()
  dt, it = c.dtype, c.dtype.itemsize
  s = _out_chunks(_Scratch().add("wout_s", (c.n_pad, c.fs), dt, c.fs), c, (c.fs, c.kb))
  s.add("dy1_s", (c.bt, c.fs), dt, c.ft)
  h_cols = c.k_pad if source == "recompute" else c.kb
  s.pipelined(((c.bt, c.n_pad), dt), ((c.bt, h_cols), dt), *_src_blocks(source, c, c.bt))
  if source == "recompute":
    s.add("winT_s", (c.k_pad, c.fs), dt, c.fs)
  mma = {}
  c = _with_dw_split(c, c.nt, c.n_steps * (c.k_pad // c.kb))
  _mma(mma, c.ft, c.n_pad, c.dw_steps * c.n_sub_step)
  if source == "recompute":
    _mma(mma, c.ft, c.k_pad, c.dw_steps * c.n_sub_step)
  _mma(mma, c.kb, c.bt, c.dw_steps * c.fs // 64)  # [fs, bt] x [bt, kb]: fs/64 m64 rows per tile
  hbm = (c.t_pad * (c.n_pad + c.k_pad) * it + _src_bytes(source, c) * (source != "recompute")
         + c.f_pad * (c.k_pad + c.n_pad) * it + c.dw_split * c.f_pad * c.k_pad * 4)
  return _spec_of(f"elas_mgpu_dw_in_{source}", c, s, c.dw_steps,
                  (c.n_steps, c.k_pad // c.kb, c.dw_split), ("f", "k", "s"),
                  jax.ShapeDtypeStruct((c.dw_split, c.f_pad, c.k_pad), jnp.float32),
                  functools.partial(_dwin_kernel, relu=_Relu(source, c)), mma, hbm)


def _dwout_spec(c: _Plan, source: str, dw_mask: str) -> KernelSpec:
  c = c.for_dw()
  if dw_mask == "tokens" and c.tiles.block_n_dw:
    c = c.replace(nb=min(c.tiles.block_n_dw, c.nb))
  dt, it = c.dtype, c.dtype.itemsize
  rp = c.rp if dw_mask == "tokens" else 1
  sr = c.bt * rp
  s = _out_chunks(_Scratch(), c, (c.nb, c.fs)).add("y2_s", (sr, c.fs), dt, c.ft)
  s.pipelined(((sr, c.nb), dt), *_src_blocks(source, c, sr))
  if source == "recompute":
    s.add("winT_s", (c.k_pad, c.fs), dt, c.fs).pipelined(((sr, c.k_pad), dt))
  if dw_mask == "tokens":
    s.add("densef_s", (c.fs,), jnp.int32).pipelined(((sr,), jnp.int32))
  c = _with_dw_split(c, c.t_pad // sr, c.n_steps * (c.n_pad // c.nb))
  mma = {}
  if source == "recompute":
    _mma(mma, c.ft, c.k_pad, c.dw_steps * rp * c.n_sub_step)
  _mma(mma, c.fs, sr, c.dw_steps * c.nb // 64)  # [nb, sr] x [sr, fs]
  hbm = (c.t_pad * c.n_pad * it + _src_bytes(source, c) + c.f_pad * c.k_pad * it
         + c.dw_split * c.n_pad * c.f_pad * 4)
  return _spec_of(f"elas_mgpu_dw_out_{source}_{dw_mask}", c, s, c.dw_steps,
                  (c.n_steps, c.n_pad // c.nb, c.dw_split), ("f", "n", "s"),
                  jax.ShapeDtypeStruct((c.dw_split, c.n_pad, c.f_pad), jnp.float32),
                  functools.partial(_dwout_kernel, relu=_Relu(source, c), dw_mask=dw_mask),
                  mma, hbm)


def _with_dw_split(c: _Plan, steps: int, programs: int) -> _Plan:
  """Split a weight-gradient kernel's token loop over ``dw_split`` programs (partial sums
  added in XLA): the feature x rank grid alone is ~33 programs at 60M shapes for 132
  SMs. Auto (``Tiles.dw_split=None``): the fewest splits, dividing ``steps``, that
  give two programs per SM of an H100/H200 (one when interpreting)."""
  split = c.tiles.dw_split
  if split is None:
    split = 1
    if not c.interpret:
      while split < steps and (programs * split < 2 * H100_SMS or steps % split):
        split += 1
  if steps % split:
    raise ValueError(f"elas_ffn_mosaic: dw_split={split} does not divide the {steps} token steps")
  return c.replace(dw_split=split, dw_steps=steps // split)


def _fwd_call(flag, h, winT, woutT, c: _Plan, store: bool):
  return _fwd_spec(c, store)(flag, h, winT, woutT)


def _relu_call(h, winT, c: _Plan):
  return _relu_spec(c)(h, winT)


def _dh_call(g, h, wout, win, winT, src, source: str, c: _Plan):
  args = [g, wout, win] + ([h, winT] if source == "recompute" else []) + list(src)
  return _dh_spec(c, source)(*args)


def _dwin_call(g, h, wout, winT, src, source: str, c: _Plan):
  args = [g, h, wout] + ([winT] if source == "recompute" else []) + list(src)
  return jnp.sum(_dwin_spec(c, source)(*args), axis=0)


def _dwout_call(g, h, winT, src, dense_f, tok_dense, source: str, dw_mask: str, c: _Plan):
  args = ([g] + ([h, winT] if source == "recompute" else [])
          + ([dense_f, tok_dense] if dw_mask == "tokens" else []) + list(src))
  return jnp.sum(_dwout_spec(c, source, dw_mask)(*args), axis=0)


def _named(fn, name: str):
  """Give a kernel body a name (Mosaic GPU names the compiled kernel after it)."""

  @functools.wraps(fn)
  def body(*args, **kwargs):
    return fn(*args, **kwargs)

  body.__name__ = body.__qualname__ = name
  return body


# --------------------------------------------------------------------------
# custom_vjp op.
# --------------------------------------------------------------------------


def _prep_weights(w_in, w_out, c: _Plan):
  """Kernel operands of the weights: padded, in kernel feature order, both orientations."""
  win = cm.pad_to(c.features_in(w_in, 0), 1, c.k_pad)  # [F, K]
  wout = cm.pad_to(c.features_in(w_out, 1), 0, c.n_pad)  # [N, F]
  return win, wout


def _pad_cols(x, size):
  return cm.pad_to(x, 1, size)


def _forward(mode, plan_args, h, w_in, w_out, sparse_on, store=False):
  """Output, statistics and what backward needs; ``store``: write the compressed activation."""
  c = _Plan(*plan_args)
  t, f, n = c.t, c.f, c.n
  hk = _pad_cols(c.rows_in(h), c.k_pad)
  win, wout = _prep_weights(w_in, w_out, c)
  flag = jnp.asarray(sparse_on, jnp.int32).reshape(1)
  outs = _fwd_call(flag, hk, win.T, wout.T, c, store)
  out_k, stats_rows = outs[:2]
  vals, meta = outs[2:4] if store else (None, None)
  out = c.rows_out(out_k)[:, :n]
  stats_rows = c.rows_out(stats_rows.T)  # [t, 3], padded tokens dropped
  zeros = jnp.sum(stats_rows[:, 0]) - t * (c.f_pad - c.f_main)  # padded features are zeros
  total = jnp.sum(stats_rows[:, 1])
  dropped = jnp.sum(stats_rows[:, 2])
  r_tail = None
  if c.f_main != f:  # dense tail features: y2 = relu(h w_tailᵀ)², never dropped
    y1_tail = jnp.einsum("tk,fk->tf", h, w_in[c.f_main:], preferred_element_type=jnp.float32)
    r_tail = jnp.maximum(y1_tail.astype(h.dtype), 0)
    y2_tail = r_tail * r_tail
    out = out + jnp.einsum("tf,nf->tn", y2_tail, w_out[:, c.f_main:],
                           preferred_element_type=jnp.float32)
    y2t = y2_tail.astype(jnp.float32)
    zeros = zeros + jnp.sum((y2t == 0).astype(jnp.float32))
    total = total + jnp.sum(y2t)
  stats = {"zero_frac": zeros / (t * f),
           "dropped_mass": dropped / jnp.maximum(total, jnp.finfo(jnp.float32).tiny)}
  return out.astype(h.dtype), stats, (vals, meta, r_tail)


def meta_TxG(meta: jax.Array, c: _Plan) -> jax.Array:
  """The kernels' metadata ``[token tiles, sub-tiles · bt·P/16, 16]`` -> ``[T, F/8]`` uint8
  (column = sub-tile·P + c: ``elas_jax.ops.sparsity.compress_24``'s byte of groups 2g, 2g+1)."""
  m = meta.reshape(c.nt, c.n_sub, c.bt, c.p)
  return m.transpose(0, 2, 1, 3).reshape(c.t_pad, c.n_sub * c.p)


def _nnz_per_feature(vals: jax.Array, meta: jax.Array, c: _Plan) -> jax.Array:
  """Split mode: per-feature non-zeros of ``y2s`` (original order, main features),
  counted in XLA from the compressed activation (reads it once more)."""
  n_sub = c.f_pad // c.ft
  v = vals.reshape(c.t_pad, n_sub, 4, c.p)
  nz = (v * v != 0).astype(jnp.int32)  # y2s = v·v in the compute dtype, as the reference counts
  m = meta_TxG(meta, c).reshape(c.t_pad, n_sub, c.p).astype(jnp.int32)
  counts = []
  for grp in range(2):
    nib = (m >> (4 * grp)) & 0xF
    pos = (nib & 3, nib >> 2)  # in-group index of the first and second kept value
    cnt = sum(jnp.sum(nz[:, :, 2 * grp + w, :, None]
                      * (pos[w][..., None] == jnp.arange(4)), axis=0) for w in range(2))
    counts.append(cnt)  # [n_sub, P, 4]
  nnz = jnp.concatenate(counts, axis=-1).reshape(-1)  # feature s·FT + 8c + 4·grp + idx
  return nnz[: c.f_main]


def _fwd_rule(mode, dense_fraction, plan_args, h, w_in, w_out, sparse_on):
  # ste recomputes relu(y1) in backward: it stores (and keeps) nothing f-wide.
  out, stats, (vals, meta, r_tail) = _forward(mode, plan_args, h, w_in, w_out, sparse_on,
                                              store=mode != "ste")
  # Named so that a remat policy saving sparsity.SAVED_24_NAME keeps them (remat = lowrank).
  vals, meta, r_tail = (None if x is None else checkpoint_name(x, sparsity.SAVED_24_NAME)
                        for x in (vals, meta, r_tail))
  return (out, stats), (h, w_in, w_out, sparse_on, vals, meta, r_tail)


def _recompute_source(c: _Plan) -> str:
  """``recompute`` where its kernels fit shared memory (ranks <= 256), else ``dense``
  (``relu(y1)`` written once by the relu kernel); ``Tiles.materialize_relu`` overrides."""
  materialize = c.tiles.materialize_relu
  if materialize is None:
    materialize = max(c.k_pad, c.n_pad) > 256
  return "dense" if materialize else "recompute"


def _bwd_rule(mode, dense_fraction, plan_args, res, cot):
  h, w_in, w_out, sparse_on, vals, meta, r_tail = res
  c = _Plan(*plan_args)
  g_out = cot[0].astype(h.dtype)
  k, n = c.k, c.n
  hk = _pad_cols(c.rows_in(h), c.k_pad)
  gk = _pad_cols(c.rows_in(g_out), c.n_pad)
  win, wout = _prep_weights(w_in, w_out, c)
  winT = win.T
  no_dense_f = jnp.zeros((c.f_pad,), jnp.int32)
  no_tok_dense = jnp.zeros((c.t_pad,), jnp.int32)

  # Split mode: the dense_fraction features with the most non-zeros keep all
  # tokens, and the rows of an incomplete token group too.
  dense_f, tok_dense, dense_all = no_dense_f, no_tok_dense, None
  if mode == "split":
    nnz_f = _nnz_per_feature(vals, meta, c)
    if r_tail is not None:
      nnz_f = jnp.concatenate([nnz_f, jnp.sum(r_tail * r_tail != 0, axis=0, dtype=jnp.int32)])
    dense_all = sparsity.densest_features(nnz_f, dense_fraction)
    dense_f = c.features_in(dense_all.astype(jnp.int32), 0)
    tok_dense = jnp.asarray(c.tok_dense)

  def grads(source, dw_mask, dense_f, tok_dense):
    src = (vals, meta) if source == "compressed" else ()
    if source == "dense":
      src = (_relu_call(hk, winT, c),)
    dh = _dh_call(gk, hk, wout, win, winT, src, source, c)
    dwin = _dwin_call(gk, hk, wout, winT, src, source, c)
    dwout = _dwout_call(gk, hk, winT, src, dense_f, tok_dense, source, dw_mask, c)
    return dh, dwin, dwout

  recompute = _recompute_source(c)
  sparse_source = recompute if mode == "ste" else "compressed"
  sparse_grads = functools.partial(grads, sparse_source,
                                   {"masked": "none", "ste": "ste", "split": "tokens"}[mode],
                                   dense_f, tok_dense)
  # dense warm-up: the exact gradient of the dense FFN, recomputed from h
  dense_grads = functools.partial(grads, recompute, "none", no_dense_f, no_tok_dense)
  dh, dwin_k, dwout_k = jax.lax.cond(sparse_on, sparse_grads, dense_grads)
  d_h = c.rows_out(dh)[:, :k]
  d_w_in = c.features_out(dwin_k, 0)[:, :k]
  d_w_out = c.features_out(dwout_k, 1)[:n]
  if r_tail is not None:  # the dense tail, in XLA with the XLA op's backward
    y2_tail = r_tail * r_tail
    if mode == "split":
      keep = sparsity.token_keep_24(y2_tail, dense_all[c.f_main:])
      y2_tail = jax.lax.select(sparse_on, jnp.where(keep, y2_tail, 0), y2_tail)
    dh_tail, dwin_tail, dwout_tail = sparsity.ffn_grads(
        g_out, h, w_in[c.f_main:], w_out[:, c.f_main:], 2 * r_tail, y2_tail)
    d_h = d_h + dh_tail
    d_w_in = jnp.concatenate([d_w_in, dwin_tail], axis=0)
    d_w_out = jnp.concatenate([d_w_out, dwout_tail], axis=1)
  return d_h.astype(h.dtype), d_w_in.astype(w_in.dtype), d_w_out.astype(w_out.dtype), None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _ffn_core(mode, dense_fraction, plan_args, h, w_in, w_out, sparse_on):
  out, stats, _ = _forward(mode, plan_args, h, w_in, w_out, sparse_on)
  return out, stats


_ffn_core.defvjp(_fwd_rule, _bwd_rule)


def _check_servable(dtype, interpret: bool) -> None:
  """``NotImplementedError`` for what these kernels cannot serve (a dispatcher falls through)."""
  mc.require()
  if interpret:
    return
  if jnp.dtype(dtype) not in [jnp.dtype(d) for d in GPU_DTYPES]:
    raise NotImplementedError(
        f"elas_ffn_mosaic: {jnp.dtype(dtype).name} inputs on a GPU: wgmma's register A operand "
        "(the y2s / dy1 tiles) must be 16-bit (bf16, f16); use kernel=triton or xla")
  devices = [d for d in jax.devices() if d.platform == "gpu"] if jax.default_backend() == "gpu" else []
  for d in devices[:1]:
    cc = getattr(d, "compute_capability", None)
    if cc is not None and not str(cc).startswith("9"):
      raise NotImplementedError(f"elas_ffn_mosaic: needs a Hopper GPU (sm_90); this is {d.device_kind} "
                                f"(compute capability {cc})")


def default_tiles(k: int, n: int, *, interpret: bool) -> Tiles:
  """Tiles by rank: 128 features per step up to rank 128, else 64 (shared memory:
  a step holds a ``[block_f, K]`` and a ``[block_f, block_n]`` weight tile per stage)."""
  if interpret:  # few, large tiles: the interpreter's time goes by steps and kernel body size
    return Tiles(block_t=2 * TOKENS, block_f=256, block_f_dw=256, sub_f=256)
  # split's dw_out holds 4 row planes of y2: 64 output columns keep it within registers
  return Tiles(block_f=128 if max(k, n) <= 128 else 64, block_f_dw=64, sub_f=64, block_n_dw=64)


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
    block_f_dw: int | None = None,
    sub_f: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    block_n_dw: int | None = None,
    dw_split: int | None = None,
    stages: int | None = None,
    materialize_relu: bool | None = None,
    interpret: bool | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mosaic GPU version of ``relu2_sparse_ffn``: same arguments, results and gradients.

  Args:
    h, w_in_FxK, w_out_NxF, sparse_on, mode, dense_fraction: as in
      ``elas_jax.ops.sparsity.relu2_sparse_ffn``.
    block_t, block_f, block_f_dw, sub_f, block_n, block_k, block_n_dw, dw_split, stages,
      materialize_relu: tiles and
      options (see :class:`Tiles`); default by rank.
    interpret: run in jax's Mosaic GPU interpreter (CPU); default: True unless
      the default backend is a GPU.

  Raises:
    NotImplementedError: what these kernels cannot serve (jax < 0.11, fp32 on a
      GPU, a non-Hopper GPU, ranks whose tiles exceed shared memory), with the reason.
    ValueError: bad shapes, options or tiles.
  """
  sparsity.check_ffn_options(mode, dense_fraction)
  if h.ndim < 1 or w_in_FxK.ndim != 2 or w_out_NxF.ndim != 2:
    raise ValueError(f"elas_ffn_mosaic: expected h [..., K], w_in [F, K], w_out [N, F]; got "
                     f"{h.shape}, {w_in_FxK.shape}, {w_out_NxF.shape}")
  k = h.shape[-1]
  f = w_in_FxK.shape[0]
  n = w_out_NxF.shape[0]
  if w_in_FxK.shape[1] != k or w_out_NxF.shape[1] != f:
    raise ValueError(f"elas_ffn_mosaic: shapes do not chain: h {h.shape}, w_in {w_in_FxK.shape}, "
                     f"w_out {w_out_NxF.shape}")
  if f < 4:
    raise ValueError(f"elas_ffn_mosaic: {f} features form no 2:4 group")
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  interpret = bool(interpret)
  _check_servable(h.dtype, interpret)
  d = default_tiles(k, n, interpret=interpret)
  given = dict(block_t=block_t, block_f=block_f, block_f_dw=block_f_dw, sub_f=sub_f,
               block_n=block_n, block_k=block_k, block_n_dw=block_n_dw, dw_split=dw_split,
               stages=stages, materialize_relu=materialize_relu)
  tiles = dataclasses.replace(d, **{k_: v for k_, v in given.items() if v is not None})
  tiles.check()
  lead = h.shape[:-1]
  h_TxK = h.reshape(-1, k)
  plan_args = (h_TxK.shape[0], f, k, n, h.dtype, mode, tiles, interpret)
  # Bad tiles (ValueError) and shapes whose kernels exceed shared memory
  # (NotImplementedError) fail here, forward and backward, before anything is traced.
  _all_specs(_Plan(*plan_args), train=True)
  sparse_on = jnp.asarray(sparse_on, dtype=bool)
  out, stats = _ffn_core(mode, float(dense_fraction), plan_args, h_TxK, w_in_FxK, w_out_NxF,
                         sparse_on)
  return out.reshape(*lead, -1), stats


def kernel_specs(t: int, f: int, k: int, n: int, *, mode: str = "masked", dtype=jnp.bfloat16,
                 train: bool = True, interpret: bool = False, **tile_kw) -> dict[str, list[KernelSpec]]:
  """The kernels one call launches, by phase (``forward``; with ``train`` the
  ``backward`` of the 2:4 phase and the ``dense warm-up`` backward), as built
  for the GPU (default tiles unless given): grids, stages, shared memory,
  wgmma instructions per program, FLOPs and HBM bytes (the static report's input)."""
  d = default_tiles(k, n, interpret=interpret)
  tiles = dataclasses.replace(d, **tile_kw)
  tiles.check()
  return _all_specs(_Plan(t, f, k, n, dtype, mode, tiles, interpret), train=train)


def _all_specs(c: _Plan, train: bool) -> dict[str, list[KernelSpec]]:
  mode = c.mode
  out = {"forward": [_fwd_spec(c, store=train and mode != "ste")]}
  if train:
    recompute = _recompute_source(c)

    def bwd(source, dw_mask):
      first = [_relu_spec(c)] if source == "dense" else []
      return first + [_dh_spec(c, source), _dwin_spec(c, source), _dwout_spec(c, source, dw_mask)]

    out["backward"] = bwd(recompute if mode == "ste" else "compressed",
                          {"masked": "none", "ste": "ste", "split": "tokens"}[mode])
    out["dense warm-up"] = bwd(recompute, "none")
  return out
