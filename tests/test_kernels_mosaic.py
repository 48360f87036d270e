"""What is particular to the Mosaic GPU kernels (kernels/ffn/mosaic/), interpreted on CPU.

The FFN core's contract (forward, statistics and gradients in every mode,
ragged shapes, the GPU's tile shapes, dtypes, the saved activation) is
tests/test_ffn_core.py, run against this backend with the others. Here: the
backward through the ``relu`` kernel, how many kernels a call launches, what
the kernels refuse (and the dispatcher falls through on), tile checks, the
H200 plans at the paper shapes and the benchmark's Mosaic rows. On CPU the
kernels run in jax's Mosaic GPU interpreter (TMA copies, barriers, wgmma and
the pipelines interpreted), on the same code that compiles for an H200; it
compiles slowly (5-15 s per forward + backward on 2 cores), so shapes are
tiny. Skipped where the installed jax has no usable Mosaic GPU interpreter
(jax < 0.11).
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import pytest

from benchmarks.harness import rel_err
from elas_kernels.ffn import base
from elas_kernels.ffn.mosaic import MosaicFfn, compat as mc, kernel_specs
from elas_kernels.gpu import H200
from tests.helpers import ffn_inputs, ffn_value_and_grads, kernel_launches

REASON = mc.unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"Mosaic GPU unavailable: {REASON}")

@pytest.mark.parametrize("mode,sparse_on", [("ste", True), ("masked", False)])
def test_backward_that_recomputes_y1(mode, sparse_on):
  # materialize_relu=False: ste's and the warm-up's backward form y1 again in dh, dw_in
  # and dw_out (no [T, F] temporaries) instead of reading the relu kernel's relu(y1) and
  # dh's dy1 (the default, which the shared suite covers).
  h, w_in, w_out, cot = ffn_inputs(4, 40, 136, 20, 20, jnp.float32)
  op = MosaicFfn(interpret=True, materialize_relu=False)
  got = ffn_value_and_grads(lambda *a: op(*a, sparse_on, mode=mode), h, w_in, w_out, cot)
  want = ffn_value_and_grads(lambda *a: base.reference(*a, sparse_on, mode=mode), h, w_in, w_out, cot)
  assert rel_err(got[0], want[0]) < 2e-5
  for g, w in zip(got[2], want[2]):  # d_h, d_w_in, d_w_out
    assert rel_err(g, w) < 2e-5
  launched = kernel_launches(jax.make_jaxpr(jax.grad(
      lambda h: jnp.sum(op(h, w_in, w_out, sparse_on, mode=mode)[0])))(h))
  assert launched == 4  # forward, dh, dw_in, dw_out


@pytest.mark.parametrize("mode,kernel,t", [("ste", "elas_mgpu_relu", 64),
                                           ("split", "elas_mgpu_tokmask", 256)])
def test_kernels_split_over_feature_chunks(mode, kernel, t):
  # The relu kernel (ste, the warm-up) and split's tokmask take feature chunks when token
  # blocks alone leave SMs idle (60M on the H200: 3 and 11 chunks). A GPU of 2 SMs makes
  # one token block (64 tokens; split: 4 row planes of 64) take 2 chunks of 2 steps, so a
  # chunk's offset and its pipeline's later steps both count.
  tiny_gpu = dataclasses.replace(H200, name="tiny", sm_count=2, smem_per_block=4096)
  tiles = dict(block_t=64, block_f=64, sub_f=64)
  h, w_in, w_out, cot = ffn_inputs(5, t, 256, 32, 32, jnp.float32)
  specs = kernel_specs(t, 256, 32, 32, mode=mode, dtype=jnp.float32, interpret=True,
                       gpu=tiny_gpu, **tiles)["backward"]
  assert [s.grid for s in specs if s.name == kernel] == [(1, 2)], [(s.name, s.grid) for s in specs]
  op = MosaicFfn(interpret=True, gpu=tiny_gpu, **tiles)
  got = ffn_value_and_grads(lambda *a: op(*a, True, mode=mode), h, w_in, w_out, cot)
  want = ffn_value_and_grads(lambda *a: base.reference(*a, True, mode=mode), h, w_in, w_out, cot)
  for g, w in zip(got[2], want[2]):  # d_h, d_w_in, d_w_out
    assert rel_err(g, w) < 2e-5


@pytest.mark.parametrize("mode", ["masked", "split", "ste"])
def test_each_kernel_launches_once_per_call(mode):
  # Forward: the one fused kernel. Forward + backward: that and, in the branch that
  # launches most (the warm-up switch is a cond: one branch runs; ste's 2:4 phase
  # alike), relu, dh (which writes dy1), dw_in (which reads it) and dw_out.
  h, w_in, w_out, cot = ffn_inputs(0, 40, 130, 16, 16, jnp.float32)
  fwd = lambda h, wi, wo: MosaicFfn(interpret=True)(h, wi, wo, True, mode=mode)[0]
  assert kernel_launches(jax.make_jaxpr(fwd)(h, w_in, w_out)) == 1
  vg = jax.value_and_grad(lambda h, wi, wo: jnp.sum(fwd(h, wi, wo) * cot), argnums=(0, 1, 2))
  assert kernel_launches(jax.make_jaxpr(vg)(h, w_in, w_out)) == 5


def test_unservable_inputs_raise_not_implemented():
  # What a dispatcher must be able to fall through from: fp32 compiled for a GPU, ranks
  # beyond shared memory, a GPU that is not Hopper (its facts given, not read from devices).
  h, w_in, w_out, _ = ffn_inputs(0, 16, 64, 16, 16, jnp.float32)
  with pytest.raises(NotImplementedError, match="16-bit"):
    MosaicFfn(interpret=False)(h, w_in, w_out, True)
  hb, wib, wob = (x.astype(jnp.bfloat16) for x in (h, w_in, w_out))
  a100 = dataclasses.replace(H200, name="a100", compute_capability=(8, 0), sm_count=108,
                             smem_per_block=166912)
  with pytest.raises(NotImplementedError, match=r"need a Hopper GPU \(sm_90\); the a100 is sm_80"):
    MosaicFfn(gpu=a100)(hb, wib, wob, True)
  # rank 1024 in bf16: the tiles exceed shared memory; refused at the call, before tracing
  h, w_in, w_out, _ = ffn_inputs(0, 16, 64, 1024, 1024, jnp.bfloat16)
  with pytest.raises(NotImplementedError, match="shared memory"):
    MosaicFfn(interpret=False)(h, w_in, w_out, True)


def test_bad_tiles_fail_clearly():
  h, w_in, w_out, _ = ffn_inputs(0, 16, 64, 16, 16, jnp.float32)
  op = lambda **tiles: MosaicFfn(interpret=True, **tiles)
  with pytest.raises(ValueError, match="sub_f=32 must be"):
    op(sub_f=32)(h, w_in, w_out, True)
  with pytest.raises(ValueError, match="block_f=192 must be a multiple of sub_f=256"):
    op(block_f=192)(h, w_in, w_out, True)
  with pytest.raises(ValueError, match="block_t=32 must be 64 or 128"):
    op(block_t=32)(h, w_in, w_out, True)
  with pytest.raises(ValueError, match="dw_split=3 does not divide"):
    op(dw_split=3)(h, w_in, w_out, True)
  with pytest.raises(ValueError, match=r"unknown tile option\(s\) \['block_x'\]"):
    MosaicFfn(block_x=64)


@pytest.mark.parametrize("f,r", [(2064, 128), (3072, 256), (4104, 256), (8191, 512)])
def test_gpu_plans_fit_shared_memory_at_paper_shapes(f, r):
  # The tile plan for the H200 (no compile): every kernel of every mode within the 227 KiB a
  # block may opt into, with its pipelines double-buffered where that fits. The compiled
  # truth (Mosaic's own allocation, registers, spills) is tests/test_gpu_compile_mosaic.py.
  for mode in ("masked", "ste", "split"):
    for phase, specs in kernel_specs(16384, f, r, r, mode=mode, gpu=H200).items():
      for s in specs:
        assert s.smem_bytes <= 232448 - 4096, (mode, phase, s.name)  # the H200's, less the margin
        assert s.programs >= 132, (mode, phase, s.name, s.grid)  # at least one wave's worth
  if f == 2064:  # planned for a GPU with less shared memory, the forward takes fewer stages
    (big,) = kernel_specs(16384, f, r, r, gpu=H200, train=False)["forward"]
    (small,) = kernel_specs(16384, f, r, r, gpu=dataclasses.replace(H200, smem_per_block=100_000),
                            train=False)["forward"]
    assert (big.stages, small.stages) == (2, 1) and small.smem_bytes <= 100_000 - 4096


def test_ranks_beyond_shared_memory_raise_not_implemented():
  # rank 1024: one [64, 1024] bf16 token tile and one weight tile per step exceed the block's
  # shared memory; the dispatcher must be told so before anything compiles.
  with pytest.raises(NotImplementedError, match="shared memory"):
    kernel_specs(16384, 4096, 1024, 1024, mode="masked")


@pytest.mark.slow
def test_kernel_benchmark_times_the_mosaic_kernels_beside_xla(tmp_path):
  # benchmarks/ffn_kernels.py --impls triton,mosaic (what a GPU run does by default): the
  # Mosaic rows sit beside XLA's and the Triton kernels', each checked against the
  # XLA op it is timed with.
  import json
  import subprocess
  import sys

  from tests.helpers import ROOT

  p = subprocess.run([sys.executable, "-m", "benchmarks.ffn_kernels", "--preset", "cpu", "--modes", "masked",
                      "--repeats", "1", "--impls", "triton,mosaic", "--out", str(tmp_path)], cwd=ROOT,
                     capture_output=True, text=True, timeout=900)
  assert p.returncode == 0, p.stderr[-3000:]
  rows = json.load(open(tmp_path / "results.json"))["rows"]
  mosaic = {(r["op"], r["pass_"]): r for r in rows if r["impl"] == "mosaic"}
  assert sorted(mosaic) == [("mosaic elas_ffn/masked", "fwd"), ("mosaic elas_ffn/masked", "fwd+bwd")]
  for r in mosaic.values():
    assert r["status"] == "ok" and r["max_rel_err"] is not None and r["max_rel_err"] < 2e-2, r
  assert {r["impl"] for r in rows if r["op"].endswith("ffn/masked") or r["op"] == "xla dense ffn"} == {
      "xla_dense", "xla_sparse", "triton", "mosaic"}


def _kernel_layout(vals_TxF2, meta_TxF8, c):
  """compress_24's values / metadata (original feature order) in the Mosaic kernels' layout:
  the inverse of ``plan.vals_TxF2`` / ``plan.meta_TxG`` (sub-tiles of 4 value planes; per
  token tile and sub-tile ``[bt, P]`` metadata bytes, 16 a row)."""
  v = vals_TxF2.reshape(c.t_pad, c.n_sub, c.p, 4).transpose(0, 1, 3, 2).reshape(c.t_pad, -1)
  m = meta_TxF8.reshape(c.nt, c.bt, c.n_sub, c.p).transpose(0, 2, 1, 3)
  return v, m.reshape(c.nt, c.n_sub * c.meta_sub, 16)


@pytest.mark.parametrize("k,f,act", [(256, 192, "dense"), (256, 256, "compressed"),
                                     (128, 192, "compressed")])
def test_warp_specialized_weight_gradients(k, f, act):
  """``dw_ws`` on its own, against ``dy1ᵀ h`` and ``(act²)ᵀ g`` in jnp from the dense
  operands: at rank 256 a kernel per gradient with consumers on two feature steps (3
  steps at F=192: the last program's second consumer has none and must store nothing), at
  rank 128 one kernel with a consumer per gradient; the activation compressed (masked) or
  dense (split's ``tokmask`` output). The whole op's rows in the shared suite reach these
  kernels only where the interpreted warp-specialized forward does not hang (rank 256
  with several programs does, docs/kernels.md)."""
  from elas_kernels import sparse24
  from elas_kernels.ffn.mosaic import plan, vjp

  tiles = plan.Tiles(block_t=64, block_f=64, block_f_dw=64, sub_f=64, dw_split=2,
                     warp_specialized=True)
  c = plan.Plan(256, f, k, k, jnp.float32, "masked", tiles, True)
  ks = jax.random.split(jax.random.PRNGKey(k + f), 4)
  t_, f_ = c.t_pad, c.f_pad
  h = jax.random.normal(ks[0], (t_, k))
  g = jax.random.normal(ks[1], (t_, k))
  dy1_v, meta = sparse24.compress_24(jax.random.normal(ks[2], (t_, f_)))
  act_dense = jax.random.normal(ks[3], (t_, f_))
  act_v = jax.random.normal(jax.random.fold_in(ks[3], 1), dy1_v.shape)
  dy1_dense = sparse24.decompress_24(dy1_v, meta)
  y = act_dense if act == "dense" else sparse24.decompress_24(act_v, meta)
  want_in = dy1_dense.T @ h
  want_out_t = (y * y).T @ g
  dy1_k, meta_k = _kernel_layout(dy1_v, meta, c)
  act_k = (jnp.take(act_dense, c.perm, axis=1) if act == "dense"
           else _kernel_layout(act_v, meta, c)[0])
  assert len(plan.dw_ws_specs(c, act)) == (2 if k > 128 else 1)
  got_in, got_out_t = vjp._dw_ws_call(h, g, dy1_k, meta_k, act_k, act, c)
  back = jnp.argsort(c.perm)  # kernel feature order -> original
  assert rel_err(got_in[back], want_in) < 1e-5
  assert rel_err(got_out_t[back], want_out_t) < 1e-5


@pytest.mark.parametrize("interpret", [False, True])
@pytest.mark.parametrize("f,r", [(2064, 128), (3072, 256), (4104, 256)])
def test_warp_specialized_staging_stays_inside_its_consumers_tile(f, r, interpret):
  # The WS forward and dh stage each consumer's output where that consumer's token tile
  # was (a RefUnion of [consumers, ...] buffers laid from one base). Consumer k's staging
  # must lie inside consumer k's tile: the other consumer may still be reading its own
  # tile. Byte ranges from the planned buffers' shapes, per union and consumer. (With the
  # staging halved to bf16 at rank 256, consumer 1's staging sat on consumer 0's tile;
  # fp32 staging at rank 128 did the same. The interpreter's race detector flags any
  # cross-thread use of a union's two members, so it cannot tell these apart.)
  mg = mc.plgpu()
  mode = "masked"
  specs = kernel_specs(16384 if not interpret else 256, f, r, r, mode=mode, gpu=H200,
                       interpret=interpret, warp_specialized=True)
  unions = 0
  for phase, ss in specs.items():
    for s in ss:
      if s.warpgroups == 1:
        continue
      for key, buf in s.scratch.items():
        if not isinstance(buf, mg.RefUnion):
          continue
        unions += 1
        ranges = []
        for ref in buf.refs:
          n = ref.shape[0]  # the consumer axis
          per = math.prod(ref.shape[1:]) * jnp.dtype(ref.dtype).itemsize
          ranges.append([(k * per, (k + 1) * per) for k in range(n)])
        tile, staging = ranges
        for k, ((t0, t1), (s0, s1)) in enumerate(zip(tile, staging)):
          # the staging's first two chunks (the ones store_out writes)
          used = s0 + 2 * (s1 - s0) // buf.refs[1].shape[1]
          assert t0 <= s0 and used <= t1, (phase, s.name, key, k, (t0, t1), (s0, used))
  assert unions >= 2
