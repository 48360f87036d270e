"""Hopper's 2:4 sparse tensor cores from Pallas: ``wgmma.mma_async.sp`` by inline PTX.

``acc [64, N] += A [64, K] · B [K, N]`` where ``A`` is 2:4 sparse along ``K`` and
given compressed: its kept values and their 2-bit indices. Mosaic GPU exposes
sparse MMA only on Blackwell (``tcgen05_mma(a_sparse_metadata=...)``); on Hopper
the instruction is reached through ``plgpu.inline_mgpu`` and LLVM inline
assembly, the route jax's own dense ``wgmma`` takes (``mosaic/gpu/wgmma.py``).

The instruction (PTX ISA >= 8.2, ``sm_90a``; ISA section 9.7.15.6; operand order
and constraints as in NVIDIA CUTLASS's ``GMMA_64xNx32_F32BF16BF16_RS``)::

    wgmma.mma_async.sp.sync.aligned.m64n{N}k32.f32.bf16.bf16   (or .f16.f16)
        {d ...}, {a0, a1, a2, a3}, b-desc, sp-meta, sp-sel, scale-d, 1, 1, trans-b;

One instruction covers ``K = 32`` (8 chunks of 4 columns per row of ``A``,
2 kept in each). For thread ``t`` of the warpgroup (warp ``w = t / 32``,
``g = lane / 4``, ``q = lane % 4``):

* ``a[r]`` (``r = 0..3``) holds the two kept values of row ``16w + g + 8(r & 1)``,
  chunk ``q + 4(r >> 1)``, the lower column's value in the low 16 bits: the
  dense ``m64k16`` register fragment applied to the compressed ``[64, 16]`` tile.
* ``sp-meta`` is read only from lanes ``q = 2·sel`` and ``2·sel + 1`` (``sel`` =
  ``sp-sel``, 0 or 1 for 16-bit types). The lane with ``h = q & 1`` gives, in bits
  ``[4j+3 : 4j]``, row ``16w + g``, chunk ``4h + j`` and in bits
  ``[16+4j+3 : 16+4j]`` row ``16w + g + 8``, the same chunk; in each 4-bit field
  bits ``[1:0]`` index (0-3) the first kept value, ``[3:2]`` the second. Equal
  indices (0b0000, 0b0101, 0b1010, 0b1111) are undefined.
* ``B`` is the dense ``[32, N]`` slab of shared memory the descriptor points at,
  laid out as for a dense wgmma (``trans-b``: ``N`` fastest).

The ISA draws the metadata layout in a figure; the mapping above is read from
the ISA's text, CUTLASS's ``ELayout_64x32`` and its sm90 compressor (2026-12-06),
and is **unverified on hardware** until ``tests/test_gpu.py``'s sparse-MMA check
has passed on an H100/H200.

Two paths, one program. :func:`pack_chunks` turns the kernel's plane arrays into
the per-thread operands (bf16 pairs, and the metadata gathered across each quad
of lanes by two butterfly shuffles) through a small ops interface: MLIR values
inside ``inline_mgpu`` when compiled (:class:`_MlirOps`), ``jnp`` arrays over the
128 threads when interpreted (:class:`JnpOps`), where :func:`decode_a` (the CPU
emulator, written from the ISA's description, not from :func:`pack_chunks`)
rebuilds the dense operand from those registers and the interpreter's dense
wgmma multiplies it.

Plane layout (``plan.py``): a sub-tile of ``8P`` features holds 8 planes
``[64, P]``; planes 0-3 and 4-7 at one column are two 2:4 groups (``a``, ``b``).
The kernel hands over the kept values ``a0 a1 b0 b1`` and the index nibbles
``nib_a nib_b`` (``i0 | i1 << 2``), each ``[64, P]`` in the wgmma register
layout, where thread ``q`` holds columns ``x = 8·jb + 2q + e``. Instruction
``kc = 2·jb + e`` takes chunk ``q`` from group ``a`` at column ``x`` and chunk
``4 + q`` from group ``b``: no data leaves its thread, and ``B``'s rows follow
:func:`k_order`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from elas_kernels.ffn.mosaic import compat as mc

M = 64  # rows of one instruction (a warpgroup's tile)
K = 32  # contraction of one instruction (16 compressed)
THREADS = 128
ARRAYS = ("a0", "a1", "b0", "b1", "nib_a", "nib_b")


# --------------------------------------------------------------------------
# The operand order of the plane layout.
# --------------------------------------------------------------------------


def k_order(p: int) -> np.ndarray:
  """``B``'s row order for a sub-tile of 8 planes of ``p`` columns: row
  ``32·kc + 4·G + i`` of the sparse operand is dense sub-tile column
  ``order[32·kc + 4·G + i]`` (plane-major, ``j·p + x``)."""
  if p % 8:
    raise ValueError(f"sparse MMA needs planes of a multiple of 8 columns (sub-tiles of a "
                     f"multiple of 64 features), got {p}")
  order = np.empty(8 * p, np.int64)
  for jb in range(p // 8):
    for e in range(2):
      kc = 2 * jb + e
      for chunk in range(8):
        x = 8 * jb + 2 * (chunk % 4) + e
        for i in range(4):
          plane = i + 4 * (chunk // 4)
          order[K * kc + 4 * chunk + i] = plane * p + x
  return order


# --------------------------------------------------------------------------
# Packing: the kernel's planes -> per-thread registers (one program for both paths).
# --------------------------------------------------------------------------


def pack_chunks(ops, get: Callable[[str, int, int, int], Any], p: int) -> list[tuple[list, Any]]:
  """Per instruction ``kc``: the 4 ``A`` registers and the ``sp-meta`` register of
  every thread (selector 0 or 1: lanes ``q`` and ``q + 2`` end up equal).

  ``get(name, jb, h, e)``: the thread's element of plane array ``name`` at row
  ``g + 8h`` (of its warp's 16), column ``8·jb + 2q + e``.
  """
  out = []
  for jb in range(p // 8):
    for e in range(2):
      regs = ([ops.pair(get("a0", jb, h, e), get("a1", jb, h, e)) for h in (0, 1)]
              + [ops.pair(get("b0", jb, h, e), get("b1", jb, h, e)) for h in (0, 1)])
      # Lane q's nibbles sit at chunk q (group a, bits 4q) and chunk 4 + q (group b, at
      # bits 4q of the odd lane's word); row g + 8 sixteen bits higher.
      part_a = ops.nibbles(get("nib_a", jb, 0, e), get("nib_a", jb, 1, e))
      part_b = ops.nibbles(get("nib_b", jb, 0, e), get("nib_b", jb, 1, e))
      # Even lanes collect the quad's group-a words, odd lanes group b's: first from the
      # neighbour (which sends the other group), then from the lane two away (same parity).
      mine = ops.or_(ops.select_odd(part_b, part_a), ops.shfl_xor(ops.select_odd(part_a, part_b), 1))
      meta = ops.or_(mine, ops.shfl_xor(mine, 2))
      out.append((regs, meta))
  return out


class JnpOps:
  """:func:`pack_chunks`'s operations on ``jnp`` arrays over the 128 threads. 16-bit
  values pack two to a ``uint32`` register as on the GPU; fp32 (the interpreter only: the
  instruction takes 16-bit operands) keeps each pair as ``[..., 2]``."""

  def __init__(self):
    # an iota, not a constant: Pallas kernels may not capture array constants
    self.q = jax.lax.iota(jnp.uint32, THREADS) % 4

  @staticmethod
  def pair(lo, hi):
    if jnp.dtype(lo.dtype).itemsize != 2:
      return jnp.stack([lo, hi], axis=-1)
    bits = lambda v: jax.lax.bitcast_convert_type(v, jnp.uint16).astype(jnp.uint32)
    return bits(lo) | (bits(hi) << 16)

  def nibbles(self, n_row, n_row8):
    s = 4 * self.q
    return (n_row.astype(jnp.uint32) << s) | (n_row8.astype(jnp.uint32) << (s + 16))

  def select_odd(self, odd, even):
    return jnp.where((self.q & 1) == 1, odd, even)

  @staticmethod
  def or_(a, b):
    return a | b

  @staticmethod
  def shfl_xor(x, m: int):
    """``x`` of lane ``t ^ m`` (``m`` a power of two below 32): blocks of ``m`` swapped."""
    return x.reshape(-1, 2, m)[:, ::-1, :].reshape(x.shape)


def threads(x_64xN: jax.Array) -> jax.Array:
  """The wgmma register layout of ``x [64, N]``: ``[128, N/8, 2, 2]``, thread ``t``'s
  element ``[jb, h, e]`` = ``x[16w + g + 8h, 8jb + 2q + e]``."""
  m, n = x_64xN.shape
  x = x_64xN.reshape(4, 2, 8, n // 8, 4, 2)  # w, h, g, jb, q, e
  return x.transpose(0, 2, 4, 3, 1, 5).reshape(THREADS, n // 8, 2, 2)


def pack_jnp(planes: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
  """:func:`pack_chunks` on whole ``[64, P]`` arrays: ``a_regs [chunks, 128, 4]``
  (uint32; fp32 values: ``[chunks, 128, 4, 2]``) and ``meta [chunks, 128]`` (uint32)."""
  p = planes["a0"].shape[1]
  views = {k: threads(planes[k]) for k in ARRAYS}
  chunks = pack_chunks(JnpOps(), lambda name, jb, h, e: views[name][:, jb, h, e], p)
  return (jnp.stack([jnp.stack(r, axis=1) for r, _ in chunks]),
          jnp.stack([m for _, m in chunks]))


# --------------------------------------------------------------------------
# The CPU emulator of the instruction (from the ISA's description).
# --------------------------------------------------------------------------


def decode_a(a_regs_Tx4: jax.Array, meta_T: jax.Array, sel: int = 0,
             dtype=jnp.bfloat16) -> jax.Array:
  """The dense ``A [64, 32]`` (fp32) one ``wgmma.mma_async.sp`` reads from the
  threads' registers: ``a_regs [128, 4]`` (uint32, two ``dtype`` values each; or
  ``[128, 4, 2]`` values, :class:`JnpOps`' fp32 pairs), ``meta [128]`` (uint32).
  Undefined metadata (equal indices) gives NaN in its row chunk."""
  if sel not in (0, 1):
    raise ValueError(f"the 16-bit sparsity selector is 0 or 1, got {sel}")
  if a_regs_Tx4.ndim == 3:
    lo, hi = (a_regs_Tx4[..., e].astype(jnp.float32).reshape(4, 8, 4, 4) for e in (0, 1))
  else:
    regs = a_regs_Tx4.reshape(4, 8, 4, 4)  # thread t = (w, g, q), register r
    lo, hi = (jax.lax.bitcast_convert_type(((regs >> (16 * e)) & 0xFFFF).astype(jnp.uint16),
                                           dtype).astype(jnp.float32) for e in (0, 1))
  meta = meta_T.reshape(4, 8, 4)
  q = jax.lax.broadcasted_iota(jnp.uint32, (4, 8, 4), 2)
  nibs = []
  for r in range(4):
    src = meta[:, :, 2 * sel + (r >> 1)][:, :, None]  # the lane of the quad with this chunk's indices
    nibs.append((src >> (4 * q + 16 * (r & 1))) & 0xF)
  nib = jnp.stack(nibs, axis=-1)  # [w, g, q, r]
  i0, i1 = nib & 3, nib >> 2
  bad = jnp.where(i0 == i1, jnp.nan, 0.0)
  dense = jnp.stack([jnp.where(i0 == i, lo, 0.0) + jnp.where(i1 == i, hi, 0.0) + bad
                     for i in range(4)], axis=-1)  # [w, g, q, r, i]
  # register r = (rhi, rlo), index i -> row 16w + 8rlo + g, column 16rhi + 4q + i
  d = dense.reshape(4, 8, 4, 2, 2, 4)  # w, g, q, rhi, rlo, i
  return d.transpose(0, 4, 1, 3, 2, 5).reshape(M, K)


def emulate(acc_MxN: jax.Array, a_regs_Tx4: jax.Array, meta_T: jax.Array, b_KxN: jax.Array,
            sel: int = 0) -> jax.Array:
  """``acc + A · B`` as one ``wgmma.mma_async.sp.…m64nNk32.f32.{bf16,f16}`` computes it
  (fp32 products of 16-bit operands, fp32 accumulation; ``B``'s dtype is the operands')."""
  a = decode_a(a_regs_Tx4, meta_T, sel, b_KxN.dtype)
  return acc_MxN + jnp.dot(a, b_KxN.astype(jnp.float32), precision="highest")


def emulated_operand(planes: dict[str, jax.Array], sel: int = 0) -> jax.Array:
  """The dense ``A [M, 8P]`` (fp32, :func:`k_order` columns) the sparse wgmmas of one
  sub-tile read: the planes packed per thread (:func:`pack_jnp`) and every instruction's
  registers decoded by the emulator, ``M / 64`` row blocks."""
  rows = []
  for mi in range(planes["a0"].shape[0] // M):
    a_regs, meta = pack_jnp({k: v[mi * M:(mi + 1) * M] for k, v in planes.items()})
    rows.append(jnp.concatenate([decode_a(a_regs[kc], meta[kc], sel, planes["a0"].dtype)
                                 for kc in range(a_regs.shape[0])], axis=1))
  return jnp.concatenate(rows, axis=0)


# --------------------------------------------------------------------------
# The kernel-side call.
# --------------------------------------------------------------------------


def sparse_wgmma(acc_ref, planes: dict[str, jax.Array], b_ref, stage_ref, interpret: bool,
                 sel: int = 0) -> None:
  """``acc += A · B`` for the 2:4 operand of one sub-tile given as its plane arrays
  (``a0 a1 b0 b1`` kept values, ``nib_a nib_b`` index nibbles, each ``[M, P]``, ``M`` a
  multiple of 64), ``B`` a shared-memory ``[8P, N]`` tile in :func:`k_order`.

  Compiled: ``M/64 · P/4`` sparse wgmmas by inline PTX, one commit group. Interpreted:
  the same packing on ``jnp`` arrays, decoded by the emulator into ``stage_ref``
  (``[M, 8P]`` shared memory, allocated only when interpreting) and multiplied by the
  interpreter's dense wgmma."""
  mg = mc.plgpu()
  if interpret:
    stage_ref[...] = emulated_operand(planes, sel).astype(stage_ref.dtype)
    mg.wgmma(acc_ref, stage_ref, b_ref)
    return
  cur = mg.wgmma_accumulator_load(acc_ref, wait_n=None)
  acc_ref[...] = _inline(cur, planes, b_ref, sel)


def _inline(acc, planes, b_ref, sel: int):
  mg = mc.plgpu()
  wg = mg.Layout.WGMMA
  n = acc.shape[1]
  transforms = mc.swizzle_transforms(b_ref.dtype, b_ref.shape[-1])  # as the tile was stored
  fn = mg.inline_mgpu(
      arg_types=(wg, *(wg for _ in ARRAYS), mg.RefType(transforms)),
      return_type=mg.ShapeDtypeStruct(acc.shape, jnp.float32, layout=wg),
  )(lambda ctx, acc_fa, *rest: _emit(acc_fa, dict(zip(ARRAYS, rest[:-1])), rest[-1], sel,
                                     transforms[1].swizzle))
  return fn(acc, *(planes[k] for k in ARRAYS), b_ref)


@dataclasses.dataclass
class _MlirOps:
  """:func:`pack_chunks`'s operations on one thread's MLIR values (``i32``)."""
  q: Any
  odd: Any

  @staticmethod
  def pair(lo, hi):
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith, vector
    from jax.experimental.mosaic.gpu import utils

    i32 = ir.IntegerType.get_signless(32)
    v = vector.from_elements(ir.VectorType.get((2,), lo.type), [lo, hi])
    return utils.bitcast(v, i32)

  def nibbles(self, n_row, n_row8):
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith
    from jax.experimental.mosaic.gpu import utils

    i32 = ir.IntegerType.get_signless(32)
    s = arith.shli(self.q, utils.c(2, i32))
    lo = arith.shli(n_row, s)
    hi = arith.shli(n_row8, arith.addi(s, utils.c(16, i32)))
    return arith.ori(lo, hi)

  def select_odd(self, odd, even):
    from jax._src.lib.mlir.dialects import arith
    return arith.select(self.odd, odd, even)

  @staticmethod
  def or_(a, b):
    from jax._src.lib.mlir.dialects import arith
    return arith.ori(a, b)

  @staticmethod
  def shfl_xor(x, m: int):
    from jax.experimental.mosaic.gpu import utils
    return utils.shfl_bfly(x, m)


def _emit(acc_fa, arrays: dict, b_ref, sel: int, swizzle: int):
  """The inline-PTX sparse wgmmas (inside ``inline_mgpu``; Mosaic GPU's lane-level API)."""
  import itertools

  from jax._src.lib.mlir import ir
  from jax._src.lib.mlir.dialects import arith, llvm, nvvm, vector
  from jax.experimental.mosaic.gpu import fragmented_array as fa
  from jax.experimental.mosaic.gpu import mma_utils, utils

  i32 = ir.IntegerType.get_signless(32)
  i64 = ir.IntegerType.get_signless(64)
  f32 = ir.F32Type.get()
  m, n = acc_fa.shape
  p = arrays["a0"].shape[1]
  regs_nd = arrays["a0"].registers.ndim
  ab = {ir.BF16Type.get(): "bf16", ir.F16Type.get(): "f16"}.get(arrays["a0"].mlir_dtype)
  if ab is None:
    raise NotImplementedError(f"sparse wgmma takes bf16 or f16 operands, got {arrays['a0'].mlir_dtype}")
  if m % M or n % 8 or n > 256:
    raise ValueError(f"sparse wgmma: accumulator [64·m, N <= 256, N % 8 == 0] expected, got "
                     f"{acc_fa.shape}")

  lane = arith.remui(utils.thread_idx(), utils.c(32, i32))
  q = arith.andi(lane, utils.c(3, i32))
  odd = arith.cmpi(arith.CmpIPredicate.ne, arith.andi(q, utils.c(1, i32)), utils.c(0, i32))

  def getter(mi):
    def get(name, jb, h, e):
      reg = arrays[name].registers[(mi, jb, 0, 0, h) + (0,) * (regs_nd - 5)]
      return vector.extract(reg, dynamic_position=[], static_position=ir.DenseI64ArrayAttr.get([e]))
    return get

  ops = _MlirOps(q=q, odd=odd)
  chunks = [pack_chunks(ops, getter(mi), p) for mi in range(m // M)]

  # B: [8P, N] (K rows, N fastest) in shared memory; one descriptor, advanced by K = 32 rows.
  (desc, k_stride), _, fastest = mma_utils.create_descriptor(
      b_ref, swizzle=swizzle, group_size=(K, n), logical_k_major=True, mma_bytewidth_k=64)
  k_stride_bytes = k_stride[1][0]
  trans_b = int(fastest != mma_utils.Dim.K)

  lc = lambda v: llvm.ConstantOp(i32, ir.IntegerAttr.get(i32, v)).result
  nvvm.wgmma_fence_aligned()  # the operands just computed in registers are complete
  new = np.empty(acc_fa.registers.shape, dtype=object)
  vec2 = ir.VectorType.get((2,), f32)
  for mi in range(m // M):  # one m64 row block at a time: its accumulator registers
    block = acc_fa.registers[mi]
    acc_regs = []
    for reg in block.flat:  # [jb, h] blocks of 2 fp32: d[4jb + 2h + e]
      for e in range(2):
        acc_regs.append(vector.extract(reg, dynamic_position=[],
                                       static_position=ir.DenseI64ArrayAttr.get([e])))
    nacc = len(acc_regs)
    assert nacc == n // 2
    count = itertools.count()
    take = lambda k: [f"${next(count)}" for _ in range(k)]
    d = take(nacc)
    take(nacc)  # the tied inputs
    a, (bdesc, meta, sel_r, use, sa, sb, tb) = take(4), take(7)
    ptx = (f"{{ .reg .pred p; setp.ne.b32 p, {use}, 0; "
           f"wgmma.mma_async.sp.sync.aligned.m64n{n}k32.f32.{ab}.{ab} "
           f"{{{','.join(d)}}}, {{{','.join(a)}}}, {bdesc}, {meta}, {sel_r}, p, {sa}, {sb}, {tb}; }}\n")
    constraints = ",".join(["=f"] * nacc + [str(i) for i in range(nacc)] + ["r"] * 4
                           + ["l", "r", "n", "n", "n", "n", "n"])
    for kc, (regs, meta_v) in enumerate(chunks[mi]):
      b = desc if kc == 0 else llvm.add(
          desc, llvm.ConstantOp(i64, ir.IntegerAttr.get(
              i64, mma_utils.encode_addr(kc * k_stride_bytes))).result,
          overflow_flags=llvm.IntegerOverflowFlags.none)
      out = llvm.inline_asm(
          llvm.StructType.get_literal([f32] * nacc),
          [*acc_regs, *regs, b, meta_v, lc(sel), lc(1), lc(1), lc(1), lc(trans_b)],
          ptx, constraints, asm_dialect=0, has_side_effects=True)
      acc_regs = [llvm.extractvalue(f32, out, [i]) for i in range(nacc)]
    for idx, (r0, r1) in zip(np.ndindex(block.shape), zip(acc_regs[0::2], acc_regs[1::2])):
      new[(mi, *idx)] = vector.from_elements(vec2, [r0, r1])
  nvvm.wgmma_commit_group_sync_aligned()
  return fa.FragmentedArray(_registers=new, _layout=acc_fa.layout, _is_signed=None)
