"""The Mosaic GPU ELAS FFN (kernels/elas_ffn_mosaic.py) against the plain-jnp reference.

On CPU the kernels run in jax's Mosaic GPU interpreter (TMA copies, barriers,
wgmma and the pipelines interpreted), on the same code that compiles for an
H200. Outputs, statistics and ``jax.grad`` are compared with
``kernels.elas_ffn.reference`` (plain jnp, differentiated by jax itself) for
every backward mode, sparse on and off, ragged shapes (padded tokens,
features and ranks, the dense ``F % 4`` tail), the GPU's tile shapes (several
feature steps, sub-tiles, rank blocks, split token loops), the relu kernel
path, fp32 and bf16. The interpreter compiles slowly (5-15 s per forward +
backward on 2 cores), so shapes are tiny and each case checks everything at
once (the file: ~80 s). Skipped where the installed jax has no usable Mosaic
GPU interpreter (jax < 0.11).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.harness import rel_err
from elas_jax.ops import sparsity
from kernels import mosaic_compat as mc

REASON = mc.unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"Mosaic GPU unavailable: {REASON}")

if REASON is None:
  from kernels import elas_ffn_mosaic as em
  from kernels.elas_ffn import reference

# fp32: the kernels accumulate in fp32 in another order than XLA. bf16: a near-tie
# in the 2:4 selection can flip after one bf16 rounding of y1 (docs/kernels.md).
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}


def ffn_inputs(seed, t, f, k, n, dtype):
  ks = jax.random.split(jax.random.PRNGKey(seed), 4)
  h = jax.random.normal(ks[0], (t, k), jnp.float32)
  w_in = jax.random.normal(ks[1], (f, k), jnp.float32) / np.sqrt(k)
  w_out = jax.random.normal(ks[2], (n, f), jnp.float32) / np.sqrt(f)
  cot = jax.random.normal(ks[3], (t, n), jnp.float32)
  return h.astype(dtype), w_in.astype(dtype), w_out.astype(dtype), cot


def value_and_grads(fn, h, w_in, w_out, cot):
  def loss(h, w_in, w_out):
    out, stats = fn(h, w_in, w_out)
    return jnp.sum(out.astype(jnp.float32) * cot), (out, stats)

  (_, (out, stats)), grads = jax.jit(
      jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(h, w_in, w_out)
  return out, stats, grads


def check_ffn(mode, sparse_on, t, f, k, n, dtype, seed=0, interpret=True, **tiles):
  h, w_in, w_out, cot = ffn_inputs(seed, t, f, k, n, dtype)
  kern = lambda h, wi, wo: em.elas_ffn(h, wi, wo, sparse_on, mode=mode, interpret=interpret, **tiles)
  ref = lambda h, wi, wo: reference(h, wi, wo, sparse_on, mode=mode)
  out_k, st_k, g_k = value_and_grads(kern, h, w_in, w_out, cot)
  out_r, st_r, g_r = value_and_grads(ref, h, w_in, w_out, cot)
  tol = TOL[dtype]
  assert out_k.dtype == out_r.dtype and out_k.shape == out_r.shape
  assert rel_err(out_k, out_r) < tol, "forward"
  for name, a, b in zip(("dh", "dw_in", "dw_out"), g_k, g_r):
    assert a.dtype == b.dtype and a.shape == b.shape, name
    assert rel_err(a, b) < tol, name
  for key in ("zero_frac", "dropped_mass"):
    np.testing.assert_allclose(float(st_k[key]), float(st_r[key]),
                               rtol=1e-4 if dtype == jnp.float32 else 2e-2, atol=1e-6, err_msg=key)


# t, f, k, n, tiles. Ragged: 50 tokens (pad 128; split 512), 203 features (3 dense tail,
# 200 padded to 256), ranks 40 / 24 (pad 64), the interpreter's default tiles (one
# 128-token tile, one 256-feature step). Steps: the GPU's 64-token tiles, 2 feature steps
# of 2 sub-tiles (forward, dh) and 4 programs of 64 features (weight gradients), 2 rank
# blocks (only the first n-block's programs write statistics and the compressed
# activation) and the weight-gradient token loop split over 2 programs.
RAGGED = (50, 203, 40, 24, {})
GPU_TILES = dict(block_t=64, block_f=128, block_f_dw=64, sub_f=64, block_n=64, block_k=64,
                 dw_split=2)
STEPS = (128, 256, 128, 128, GPU_TILES)
SPLIT_STEPS = (300, 256, 128, 128, GPU_TILES)  # 512 tokens: 2 dw_out steps of 4 x 64 rows


@pytest.mark.parametrize("mode,shape", [("masked", RAGGED), ("split", SPLIT_STEPS),
                                        ("ste", STEPS)],
                         ids=["masked-ragged", "split-steps", "ste-steps"])
def test_fp32_matches_reference(mode, shape):
  t, f, k, n, tiles = shape
  check_ffn(mode, True, t, f, k, n, jnp.float32, seed=t + f, **tiles)


@pytest.mark.slow
@pytest.mark.parametrize("mode,shape", [("masked", STEPS), ("split", RAGGED), ("ste", RAGGED)],
                         ids=["masked-steps", "split-ragged", "ste-ragged"])
def test_fp32_matches_reference_more_shapes(mode, shape):
  t, f, k, n, tiles = shape
  check_ffn(mode, True, t, f, k, n, jnp.float32, seed=t + f + 1, **tiles)


@pytest.mark.parametrize("mode", ["split"])
def test_dense_warmup_matches_reference(mode):
  # sparse_on=False: the dense ReLU² FFN and its exact gradient (recomputed from h).
  check_ffn(mode, False, 37, 130, 12, 10, jnp.float32, seed=3)


def test_dense_warmup_through_the_relu_kernel():
  # The backward's relu(y1) written once by the relu kernel (what ranks > 256 use on a
  # GPU, where recomputing it inside dh / dw_in would not fit shared memory).
  check_ffn("ste", True, 40, 136, 20, 20, jnp.float32, seed=4, materialize_relu=True)
  check_ffn("masked", False, 40, 136, 20, 20, jnp.float32, seed=5, materialize_relu=True)


@pytest.mark.parametrize("mode", ["masked", "split"])
def test_bf16_within_documented_tolerance(mode):
  check_ffn(mode, True, 64, 256, 64, 64, jnp.bfloat16, seed=6, block_t=64, block_f=128,
            block_f_dw=128, sub_f=64)


def test_saved_activation_is_the_compressed_relu():
  # The residual backward reads (masked), checked in numpy against its documented layout
  # (kernels/elas_ffn_mosaic.py): per group of 4 features the first and last index the
  # reference's 2:4 mask keeps (ties, e.g. ReLU's many zeros, to the lower index) and
  # relu(y1) there.
  t, f, k, n = 64, 256, 64, 64
  h, w_in, w_out, _ = ffn_inputs(7, t, f, k, n, jnp.float32)
  tiles = em.Tiles(block_f=128, sub_f=64)
  plan_args = (t, f, k, n, h.dtype, "masked", tiles, True)
  _, res = jax.jit(lambda *a: em._fwd_rule("masked", 0.05, plan_args, *a))(
      h, w_in, w_out, jnp.asarray(True))
  vals, meta = np.asarray(res[4], np.float32), np.asarray(res[5])
  ft, p = 64, 8
  # meta: per (64-token tile, sub-tile of ft features) its [64, P] bytes, as rows of 16
  meta = meta.reshape(t // 64, f // ft, 64, p).transpose(0, 2, 1, 3).reshape(t, f // 8)
  r = np.maximum(np.asarray(h @ w_in.T), 0)
  keep = np.asarray(sparsity.mask_24(jnp.asarray(r * r))).reshape(t, f // 4, 4)
  first, last = np.argmax(keep, -1), 3 - np.argmax(keep[..., ::-1], -1)  # [t, groups]
  r_g = r.reshape(t, f // 4, 4)
  for s in range(f // ft):
    v = vals[:, s * ft // 2:(s + 1) * ft // 2].reshape(t, 4, p)  # planes a0 a1 b0 b1
    m = meta[:, s * p:(s + 1) * p].astype(np.int32)
    for grp in range(2):
      g = 2 * (s * p + np.arange(p)) + grp  # group index of position c
      nib = (m >> (4 * grp)) & 0xF
      np.testing.assert_array_equal(nib & 3, first[:, g])
      np.testing.assert_array_equal(nib >> 2, last[:, g])
      for w, idx in enumerate((first[:, g], last[:, g])):
        np.testing.assert_allclose(v[:, 2 * grp + w], np.take_along_axis(
            r_g[:, g], idx[..., None], -1)[..., 0], rtol=1e-5, atol=1e-6)


def kernel_launches(jaxpr) -> int:
  """Mosaic GPU kernels one evaluation of ``jaxpr`` launches (a ``cond``: its larger branch)."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ("mpmd_map", "pallas_call", "core_map"):
      total += 1
      continue
    subs = [kernel_launches(j) for j in _sub_jaxprs(eqn.params.values())]
    total += max(subs, default=0) if eqn.primitive.name == "cond" else sum(subs)
  return total


def _sub_jaxprs(params):
  for v in params:
    if hasattr(v, "eqns") or hasattr(getattr(v, "jaxpr", None), "eqns"):
      yield v
    elif isinstance(v, (tuple, list)):
      yield from _sub_jaxprs(v)


@pytest.mark.parametrize("mode,launches", [("masked", 4), ("split", 4), ("ste", 4)])
def test_each_kernel_launches_once_per_call(mode, launches):
  # Forward: the one fused kernel. Forward + backward: that and dh, dw_in, dw_out
  # (the warm-up switch is a cond: one branch runs).
  h, w_in, w_out, cot = ffn_inputs(0, 40, 130, 16, 16, jnp.float32)
  fwd = lambda h, wi, wo: em.elas_ffn(h, wi, wo, True, mode=mode, interpret=True)[0]
  assert kernel_launches(jax.make_jaxpr(fwd)(h, w_in, w_out)) == 1
  vg = jax.value_and_grad(lambda h, wi, wo: jnp.sum(fwd(h, wi, wo) * cot), argnums=(0, 1, 2))
  assert kernel_launches(jax.make_jaxpr(vg)(h, w_in, w_out)) == launches


def test_unservable_inputs_raise_not_implemented():
  # What a dispatcher must be able to fall through from: fp32 compiled for a GPU, ranks
  # beyond shared memory.
  h, w_in, w_out, _ = ffn_inputs(0, 16, 64, 16, 16, jnp.float32)
  with pytest.raises(NotImplementedError, match="16-bit"):
    em.elas_ffn(h, w_in, w_out, True, interpret=False)
  # rank 1024 in bf16: the tiles exceed shared memory; refused at the call, before tracing
  h, w_in, w_out, _ = ffn_inputs(0, 16, 64, 1024, 1024, jnp.bfloat16)
  with pytest.raises(NotImplementedError, match="shared memory"):
    em.elas_ffn(h, w_in, w_out, True, interpret=False)


def test_bad_arguments_fail_clearly():
  h, w_in, w_out, _ = ffn_inputs(0, 16, 64, 16, 16, jnp.float32)
  with pytest.raises(ValueError, match="do not chain"):
    em.elas_ffn(h, w_in[:, :8], w_out, True)
  with pytest.raises(ValueError, match="unknown 2:4 backward mode"):
    em.elas_ffn(h, w_in, w_out, True, mode="mvue")
  with pytest.raises(ValueError, match="sub_f=32 must be"):
    em.elas_ffn(h, w_in, w_out, True, sub_f=32)
  with pytest.raises(ValueError, match="block_f=192 must be a multiple of sub_f=256"):
    em.elas_ffn(h, w_in, w_out, True, block_f=192)
  with pytest.raises(ValueError, match="block_t=32 must be 64 or 128"):
    em.elas_ffn(h, w_in, w_out, True, block_t=32)
  with pytest.raises(ValueError, match="dw_split=3 does not divide"):
    em.elas_ffn(h, w_in, w_out, True, dw_split=3)


@pytest.mark.parametrize("f,r", [(2064, 128), (3072, 256), (4104, 256), (8191, 512)])
def test_gpu_plans_fit_shared_memory_at_paper_shapes(f, r):
  # The tile plan for the H200 (no compile): every kernel of every mode within the 227 KiB a
  # block may opt into, with its pipelines double-buffered where that fits. The compiled
  # truth (Mosaic's own allocation, registers, spills) is tests/test_gpu_compile_mosaic.py.
  for mode in ("masked", "ste", "split"):
    for phase, specs in em.kernel_specs(16384, f, r, r, mode=mode).items():
      for s in specs:
        assert s.smem_bytes <= em.SMEM_LIMIT - em.SMEM_MARGIN, (mode, phase, s.name)
        assert s.programs >= 132, (mode, phase, s.name, s.grid)  # at least one wave's worth


def test_ranks_beyond_shared_memory_raise_not_implemented():
  # rank 1024: one [64, 1024] bf16 token tile and one weight tile per step exceed the block's
  # shared memory; the dispatcher must be told so before anything compiles.
  with pytest.raises(NotImplementedError, match="shared memory"):
    em.kernel_specs(16384, 4096, 1024, 1024, mode="masked")


@pytest.mark.slow
def test_kernel_benchmark_times_the_mosaic_kernels_beside_xla(tmp_path):
  # benchmarks/ffn_kernels.py --mosaic true (what a GPU run does by default): the
  # Mosaic rows sit beside XLA's and the Triton kernels', each checked against the
  # XLA op it is timed with.
  import json
  import subprocess
  import sys

  from tests.helpers import ROOT

  p = subprocess.run([sys.executable, "-m", "benchmarks.ffn_kernels", "--preset", "cpu", "--modes", "masked",
                      "--repeats", "1", "--mosaic", "true", "--out", str(tmp_path)], cwd=ROOT,
                     capture_output=True, text=True, timeout=900)
  assert p.returncode == 0, p.stderr[-3000:]
  rows = json.load(open(tmp_path / "results.json"))["rows"]
  mosaic = {(r["op"], r["pass_"]): r for r in rows if r["impl"] == "mosaic"}
  assert sorted(mosaic) == [("mosaic elas_ffn/masked", "fwd"), ("mosaic elas_ffn/masked", "fwd+bwd")]
  for r in mosaic.values():
    assert r["status"] == "ok" and r["max_rel_err"] is not None and r["max_rel_err"] < 2e-2, r
  assert {r["impl"] for r in rows if r["op"].endswith("ffn/masked") or r["op"] == "xla dense ffn"} == {
      "xla_dense", "xla_sparse", "pallas", "mosaic"}


ON_HOPPER = jax.default_backend() == "gpu" and any(
    name in jax.devices()[0].device_kind.upper() for name in ("H100", "H200"))


@pytest.mark.gpu
@pytest.mark.skipif(not ON_HOPPER, reason="needs a Hopper GPU (H100 / H200): the kernels compile for sm_90a")
@pytest.mark.parametrize("mode", ["masked", "ste", "split"])
def test_mosaic_ffn_on_the_gpu_matches_the_reference(mode):
  # Compiled (not interpreted), the 60M shapes at 1,000 tokens (ragged: 8 pad rows),
  # sparse and the dense warm-up, against the same jnp reference as on CPU.
  for sparse_on in (True, False):
    check_ffn(mode, sparse_on, 1000, 2064, 128, 128, jnp.bfloat16, seed=7, interpret=False)
