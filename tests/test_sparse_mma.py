"""Hopper's sparse wgmma (``kernels/ffn/mosaic/sparse_mma.py``): the CPU emulator, the
kernel-side packing, a probe kernel interpreted on CPU and compiled for the H200.

- The emulator (``decode_a`` / ``emulate``) against operands built here in plain Python
  loops straight from the instruction's per-thread table (the module docstring; PTX ISA
  9.7.15.6 and CUTLASS's ``GMMA_64xNx32`` sparse layouts), on random data, and on worked
  single-register examples.
- The packing (``pack_jnp``: the same ``pack_chunks`` program the compiled kernel runs on
  MLIR values) from the kernel's plane arrays, decoded by the emulator, against the
  masked dense operand in ``k_order``.
- A probe kernel (ReLU² planes, 2:4 selection and compression as the forward does them,
  then ``acc += y2s · w_outᵀ`` by ``sparse_wgmma``): interpreted against the dense
  reference; compiled deviceless (``gpu_compile``): the PTX holds
  ``wgmma.mma_async.sp``, ptxas took it without spills or serialization; on a GPU
  (``gpu``): the compiled kernel against the reference, the check that verifies the
  metadata layout on hardware.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from elas_kernels import common as cm
from elas_kernels.ffn.mosaic import compat as mc
from elas_kernels.ffn.mosaic import sparse_mma as sp

BF16, F32 = jnp.bfloat16, jnp.float32


def _bits(x) -> int:
  return int(np.asarray(jnp.asarray(x, BF16)).view(np.uint16))


def isa_operands(a_32: np.ndarray, idx: np.ndarray, sel: int):
  """The registers of one ``m64nNk32`` sparse wgmma for ``A [64, 32]`` whose kept
  indices per (row, chunk) are ``idx [64, 8, 2]``, by the instruction's table, thread by
  thread (independent of ``sparse_mma``'s vectorized code)."""
  a_regs = np.zeros((128, 4), np.uint32)
  meta = np.zeros(128, np.uint32)
  for t in range(128):
    w, lane = divmod(t, 32)
    g, q = divmod(lane, 4)
    for r in range(4):
      row, chunk = 16 * w + g + 8 * (r & 1), q + 4 * (r >> 1)
      i0, i1 = idx[row, chunk]
      a_regs[t, r] = _bits(a_32[row, 4 * chunk + i0]) | (_bits(a_32[row, 4 * chunk + i1]) << 16)
    if q in (2 * sel, 2 * sel + 1):
      h = q & 1
      word = 0
      for j in range(4):
        for half, row in ((0, 16 * w + g), (1, 16 * w + g + 8)):
          i0, i1 = idx[row, 4 * h + j]
          word |= int(i0 | (i1 << 2)) << (16 * half + 4 * j)
      meta[t] = word
  return jnp.asarray(a_regs), jnp.asarray(meta)


def random_24(seed: int):
  """``A [64, 32]`` (small integers, none zero), its kept indices ``i0 < i1`` per chunk
  and the 2:4-masked dense ``A``."""
  rng = np.random.default_rng(seed)
  a = rng.integers(1, 8, (64, 32)) * rng.choice([-1, 1], (64, 32))
  pairs = np.array([(i, j) for i in range(4) for j in range(i + 1, 4)])
  idx = pairs[rng.integers(0, len(pairs), (64, 8))]
  mask = np.zeros((64, 8, 4), bool)
  np.put_along_axis(mask, idx, True, axis=2)
  return a.astype(np.float32), idx, a * mask.reshape(64, 32)


@pytest.mark.parametrize("sel", [0, 1])
def test_emulator_against_a_dense_matmul_of_the_decompressed_operand(sel):
  a, idx, a_masked = random_24(sel)
  b = np.random.default_rng(9).integers(-4, 5, (32, 48)).astype(np.float32)
  acc = np.random.default_rng(10).integers(-9, 10, (64, 48)).astype(np.float32)
  a_regs, meta = isa_operands(a, idx, sel)
  got = sp.emulate(jnp.asarray(acc), a_regs, meta, jnp.asarray(b, BF16), sel)
  np.testing.assert_array_equal(np.asarray(got), acc + a_masked @ b)


def test_emulator_worked_examples():
  # Single registers, read off the table by hand. Thread 0 (warp 0, g = 0, q = 0), a[0]:
  # row 0, chunk 0; lane 0's bits [3:0] hold its indices: 0b1110 -> columns 2 and 3.
  a_regs = jnp.zeros((128, 4), jnp.uint32).at[0, 0].set(_bits(1.0) | (_bits(2.0) << 16))
  meta = jnp.full((128,), 0x4444_4444, jnp.uint32)  # every chunk (0, 1) unless set
  a = np.asarray(sp.decode_a(a_regs, meta.at[0].set(0x4444_444E)))
  np.testing.assert_array_equal(a[0, :4], [0, 0, 1, 2])
  assert np.count_nonzero(a) == 2
  # a[2] of thread 0 is row 0, chunk 4 (columns 16-19), indexed by lane 1's bits [3:0];
  # a[1] is row 8, chunk 0, indexed by lane 0's bits [19:16].
  a_regs = (jnp.zeros((128, 4), jnp.uint32).at[0, 2].set(_bits(3.0) | (_bits(4.0) << 16))
            .at[0, 1].set(_bits(5.0) | (_bits(6.0) << 16)))
  meta = meta.at[1].set(0x4444_4449).at[0].set(0x4448_4444)  # (1, 2) and (0, 2)
  a = np.asarray(sp.decode_a(a_regs, meta))
  np.testing.assert_array_equal(a[0, 16:20], [0, 3, 4, 0])
  np.testing.assert_array_equal(a[8, 0:4], [5, 0, 6, 0])
  assert np.count_nonzero(a) == 4
  # Selector 1 reads lanes 2 and 3: lane 0's word no longer matters, lane 2's does.
  a_regs = jnp.zeros((128, 4), jnp.uint32).at[0, 0].set(_bits(1.0) | (_bits(2.0) << 16))
  meta1 = meta.at[0].set(0).at[2].set(0x4444_444D)  # (1, 3)
  a = np.asarray(sp.decode_a(a_regs, meta1, sel=1))
  np.testing.assert_array_equal(a[0, :4], [0, 1, 0, 2])
  # Equal indices are undefined: the emulator says so with NaN.
  assert np.isnan(np.asarray(sp.decode_a(a_regs, meta.at[0].set(0x4444_4440)))[0, :4]).all()
  with pytest.raises(ValueError, match="selector"):
    sp.decode_a(a_regs, meta, sel=2)


def test_k_order_is_a_permutation_and_refuses_narrow_planes():
  order = sp.k_order(16)
  assert sorted(order.tolist()) == list(range(128))
  # instruction 0, chunk 0 (lane 0's group a at column 0) = planes 0-3 at column 0
  assert order[:4].tolist() == [0, 16, 32, 48]
  # chunk 4 (lane 0's group b at column 0) = planes 4-7 at column 0
  assert order[16:20].tolist() == [64, 80, 96, 112]
  with pytest.raises(ValueError, match="multiple of 8 columns"):
    sp.k_order(4)


def _plane_operands(seed: int, p: int, dense: bool = False):
  """Kernel-style plane arrays of one sub-tile ``r [64, 8p]`` (plane-major, as
  ``bodies._planes`` slices it): the squares' kept values and nibbles, and the masked
  dense ``y2s`` sub-tile."""
  r = jax.random.randint(jax.random.key(seed), (64, 8 * p), 0, 6).astype(BF16)
  planes = [r[:, j * p:(j + 1) * p] for j in range(8)]
  y2 = [x * x for x in planes]
  if dense:  # the warm-up through sparse MMAs: two passes of fixed indices (0, 1), (2, 3)
    ops = [dict(a0=y2[o], a1=y2[o + 1], b0=y2[4 + o], b1=y2[5 + o],
                nib_a=jnp.full((64, p), nib, jnp.int32), nib_b=jnp.full((64, p), nib, jnp.int32))
           for o, nib in ((0, 0b0100), (2, 0b1110))]
    return ops, jnp.concatenate(y2, axis=1)
  keep = cm.keep_24(y2[:4]) + cm.keep_24(y2[4:])
  a0, a1, nib_a = cm.compress_group(y2[:4], keep[:4])
  b0, b1, nib_b = cm.compress_group(y2[4:], keep[4:])
  y2s = jnp.concatenate([jnp.where(k, y, 0) for k, y in zip(keep, y2)], axis=1)
  return [dict(a0=a0, a1=a1, b0=b0, b1=b1, nib_a=nib_a, nib_b=nib_b)], y2s


@pytest.mark.parametrize("p,dense", [(8, False), (16, False), (8, True)])
def test_packing_of_the_kernel_planes_decodes_to_the_masked_operand(p, dense):
  ops, y2s = _plane_operands(p, p, dense)
  got = sum(sp.emulated_operand(o) for o in ops)
  want = y2s.astype(F32)[:, sp.k_order(p)]
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


# --------------------------------------------------------------------------
# The probe kernel.
# --------------------------------------------------------------------------

REASON = mc.unavailable_reason()
needs_mosaic = pytest.mark.skipif(REASON is not None, reason=f"Mosaic GPU unavailable: {REASON}")
PR = dict(T=128, FT=128, N=64)  # 2 programs, one sub-tile of 128 features (4 sparse wgmmas)


def probe(interpret: bool, *, races: bool = True):
  """One sub-tile of the forward's output product: ``relu(y1)`` planes from ``r``
  (``[T, 8P]``, plane-major), ReLU² 2:4 selection and compression (``bodies`` /
  ``common`` helpers), then ``out = y2s · w_outᵀ`` by ``sparse_wgmma`` with
  ``w_outᵀ`` in ``k_order``."""
  from jax.experimental import pallas as pl

  from elas_kernels.ffn.mosaic import bodies

  mg = mc.plgpu()
  t, ft, n = PR["T"], PR["FT"], PR["N"]
  p = ft // 8

  def body(r_g, w_g, o_g, r_s, w_s, o_s, bar, *stage):
    rows = pl.ds(lax.axis_index("t") * 64, 64)
    mg.copy_gmem_to_smem(w_g, w_s, bar.at[1])
    bodies._copy_in(r_g.at[rows], r_s, bar.at[0])
    mg.barrier_wait(bar.at[1])
    r = bodies._planes(r_s[...], p)
    y2 = [x * x for x in r]
    keep = bodies._keep_24(y2[:4]) + bodies._keep_24(y2[4:])
    a0, a1, nib_a = cm.compress_group(r[:4], keep[:4])
    b0, b1, nib_b = cm.compress_group(r[4:], keep[4:])
    planes = dict(a0=a0 * a0, a1=a1 * a1, b0=b0 * b0, b1=b1 * b1, nib_a=nib_a, nib_b=nib_b)

    def run(acc):
      sp.sparse_wgmma(acc, planes, w_s, stage[0] if stage else None, interpret)
      return acc[...]

    o_s[...] = pl.run_scoped(run, mg.ACC((64, n), F32)).astype(BF16)
    mg.commit_smem()
    mg.copy_smem_to_gmem(o_s, o_g.at[rows])
    mg.wait_smem_to_gmem(0)

  scratch = [mc.smem((64, ft), BF16), mc.smem((ft, n), BF16), mc.smem((64, n), BF16),
             mg.Barrier(num_barriers=2)]
  if interpret:  # the emulator's dense operand for the interpreter's wgmma
    scratch.append(mc.smem((64, ft), BF16))
  return mc.kernel(body, out_shape=jax.ShapeDtypeStruct((t, n), BF16), scratch=scratch,
                   grid=(t // 64,), grid_names=("t",),
                   compiler_params=mg.CompilerParams(lowering_semantics=mg.LoweringSemantics.Warpgroup),
                   interpret=interpret, detect_races=races)


def probe_inputs():
  # small integers: r² <= 25 exact in bf16, every product and sum exact in fp32 and in bf16
  # after the final rounding (|out| < 2^8 · ...: compared after the same bf16 rounding)
  r = jax.random.randint(jax.random.key(0), (PR["T"], PR["FT"]), 0, 6).astype(BF16)
  w = jax.random.randint(jax.random.key(1), (PR["FT"], PR["N"]), -3, 4).astype(BF16)
  return r, w


def probe_reference(r, w):
  p = PR["FT"] // 8
  y2 = [x * x for x in (r[:, j * p:(j + 1) * p] for j in range(8))]
  keep = cm.keep_24(y2[:4]) + cm.keep_24(y2[4:])
  y2s = jnp.concatenate([jnp.where(k, y, 0) for k, y in zip(keep, y2)], axis=1)
  return jnp.dot(y2s.astype(F32), w.astype(F32), precision="highest").astype(BF16)


@needs_mosaic
def test_sparse_wgmma_in_an_interpreted_kernel():
  r, w = probe_inputs()
  got = probe(True)(r, w[sp.k_order(PR["FT"] // 8)])
  np.testing.assert_array_equal(np.asarray(got, F32), np.asarray(probe_reference(r, w), F32))


@pytest.mark.gpu_compile
@needs_mosaic
def test_sparse_wgmma_compiles_for_the_h200():
  from tests.helpers import require_deviceless
  from tests.test_mosaic_constructs import _compile

  require_deviceless()
  k = _compile(probe(False), *probe_inputs())
  sparse = re.findall(r"wgmma\.mma_async\.sp\.sync\.aligned\.m64n(\d+)k32\.f32\.bf16\.bf16", k.ptx)
  assert sparse == ["64"] * (PR["FT"] // 32), sparse  # one per 32 features of the sub-tile
  assert not re.search(r"wgmma\.mma_async\.sync", k.ptx)  # no dense wgmma left
  assert k.spill_bytes == 0, k
  assert "serialized" not in k.ptxas, k.ptxas


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (compiled, not interpreted)")
@needs_mosaic
def test_sparse_wgmma_on_a_gpu():
  # The check that verifies the metadata layout (read from the ISA's text and CUTLASS, the
  # ISA's figure being an image) on hardware: mosaic_sparse stays opt-in until it passes.
  r, w = probe_inputs()
  got = probe(False)(r, w[sp.k_order(PR["FT"] // 8)])
  np.testing.assert_array_equal(np.asarray(got, F32), np.asarray(probe_reference(r, w), F32))
