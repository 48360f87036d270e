"""The GPU compile gate for the Mosaic GPU kernels: every paper shape, compiled for the H200.

``pytest -m gpu_compile`` in a venv with ``jax[cuda12]`` (no GPU needed; run
with ``JAX_PLATFORMS=cpu JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1``). Per paper size,
one program holds the ``mosaic`` FFN core's forward (evaluation)
and ``jax.value_and_grad`` in the masked, ste and split modes, each with its
dense warm-up branch, at the per-GPU micro-batch of the paper (16384 tokens),
with the default GPU tiles. XLA and Mosaic GPU compile it for sm_90a (Mosaic
runs ptxas on its own PTX; its lowering refuses more shared memory than the
H200's 232448 bytes). Asserted per Mosaic kernel (``MOSAIC_GPU_DUMP_PTXAS``):
found and compiled, no register spill, no wgmma serialized by ptxas (C7512),
shared memory within the limit, a grid of at least one wave, and the wgmma
FLOPs the PTX executes (its loops read by ``elas_kernels.perf_model``) equal
to the plan's. Skipped, with the reason, where the CUDA plugin or
a usable Mosaic GPU is absent. About 2-3 minutes per size on 2 cores.
"""

import jax
import jax.numpy as jnp
import pytest

from elas_jax import targets
from elas_kernels.ffn.mosaic import compat as mc
from tests.helpers import require_deviceless

pytestmark = pytest.mark.gpu_compile

TOKENS = 16384


@pytest.fixture(scope="module", autouse=True)
def deviceless():
  if mc.unavailable_reason():
    pytest.skip(f"Mosaic GPU unavailable: {mc.unavailable_reason()}")
  require_deviceless()


@pytest.mark.parametrize("size", ["60m", "130m", "350m", "1b"])
def test_every_mosaic_kernel_fits_the_h200(size):
  from benchmarks import mosaic_static as ms

  f, r = ms.SIZES[size]
  target = targets.get("h200")
  report, resources = ms.compile_size(f, r, TOKENS, target)
  assert report.compiled, report.reason
  rows = ms.kernel_rows(f, r, TOKENS, target, resources)
  bad = []
  for row in rows:
    name = row["kernel"]
    if row["registers"] is None:
      bad.append(f"{name}: not found among Mosaic's compiled kernels {sorted(resources)}")
      continue
    if row["spill_bytes"]:
      bad.append(f"{name}: {row['spill_bytes']} bytes of register spills")
    if row["smem_bytes"] > target.smem_per_block:
      bad.append(f"{name}: {row['smem_bytes']} bytes of shared memory > {target.smem_per_block}")
    if row["waves"] < 1:
      bad.append(f"{name}: {row['programs']} programs make {row['waves']:.2f} waves")
    # the instructions the plan counts are the ones Mosaic emitted, and as many of them
    # run (the PTX's loops and trip counts, read by elas_kernels.perf_model)
    if set(row["wgmma"]) - set(row["ptx_wgmma"]):
      bad.append(f"{name}: planned {sorted(row['wgmma'])}, PTX has {row['ptx_wgmma']}")
    if row["ptx_gflop"] is None or abs(row["ptx_gflop"] / row["gflop"] - 1) > 1e-9:
      bad.append(f"{name}: the PTX executes {row['ptx_gflop']} GFLOP of wgmma, the plan {row['gflop']}")
    if row["wgmma_serialized"]:  # ptxas C7512: too few registers, each wgmma waits for the last
      bad.append(f"{name}: ptxas serialized its wgmma (C7512)")
  assert not bad, f"{size}: " + "; ".join(sorted(set(bad)))
  # Executed wgmma FLOPs (the plan's, checked against the PTX above) never fall below the
  # core's minimum counted by hand in elas_kernels.roofline.ffn_core; ste recomputes more.
  ratios = ms.flops_ratios(rows, f, r, TOKENS)
  assert all(x >= 1 - 1e-9 for m in ratios.values() for x in m.values()), ratios
  assert ratios["ste"]["fwd_bwd"] > ratios["masked"]["fwd_bwd"], ratios


def test_the_warp_specialized_forward_compiles_as_planned():
  """``mosaic_ws`` at 60M (rank 128; the ranks it serves): its forward kernels have the
  planned structure in the PTX (two consumer warpgroups under ``setmaxnreg.inc``, one
  producer under ``.dec``), two pipeline stages, no spill, no serialized wgmma, and the
  PTX's wgmma FLOPs equal the plan's; one weight step fetched per 128 tokens (the TMA
  bytes read from the PTX, against the single-warpgroup forward's per 64). Above rank
  128 it refuses with the reason."""
  from benchmarks import mosaic_static as ms
  from elas_kernels.ffn import base
  from elas_kernels.ffn.mosaic import MosaicWsFfn

  f, r = ms.SIZES["60m"]
  target = targets.get("h200")
  tiles = ms.IMPLS["mosaic_ws"]
  report, resources = ms.compile_size(f, r, TOKENS, target, modes=("masked",), tiles=tiles)
  assert report.compiled, report.reason
  rows = {w["kernel"]: w for w in ms.kernel_rows(f, r, TOKENS, target, resources, modes=("masked",),
                                                    tiles=tiles)}
  ws = [w for name, w in rows.items() if "_ws" in name]
  assert {w["kernel"] for w in ws} == {"elas_mgpu_fwd_ws_store"}, sorted(rows)  # masked training
  assert {"elas_mgpu_fwd_ws", "elas_mgpu_fwd_ws_store"} <= set(resources)  # + the evaluation forward
  for w in ws:
    assert w["planned_warpgroups"] == 3 and w["warpgroups"] == (2, 1), w
    assert w["stages"] >= 2 and w["spill_bytes"] == 0 and not w["wgmma_serialized"], w
    assert abs(w["ptx_gflop"] / w["gflop"] - 1) < 1e-9, w
    assert w["terms_us"]["l2"] > 0
  # Weight bytes through L2 (TMA, read from the PTX), forward with the activation store:
  # the single-warpgroup kernel fetches every weight step per 64 tokens, this one per 128.
  from elas_kernels import perf_model as pm

  single, single_res = ms.compile_size(f, r, TOKENS, target, modes=("masked",))
  assert single.compiled, single.reason

  def l2_bytes(res, name, programs):
    p = pm.profile_ptx(res[name]["ptx"])
    return programs * (p.consumers * p.consumer.tma_bytes + p.producers * p.producer.tma_bytes)

  ws_bytes = l2_bytes(resources, "elas_mgpu_fwd_ws_store", rows["elas_mgpu_fwd_ws_store"]["programs"])
  one_bytes = l2_bytes(single_res, "elas_mgpu_fwd_store", TOKENS // 64)
  assert 0.4 < ws_bytes / one_bytes < 0.6, (ws_bytes, one_bytes)
  S, bf16 = jax.ShapeDtypeStruct, jnp.bfloat16
  f2, r2 = ms.SIZES["130m"]
  op = MosaicWsFfn(interpret=False, gpu=target.gpu_spec())
  with pytest.raises(NotImplementedError, match="ranks up to 128"):
    op.check_servable(base.check_args(op.what, S((TOKENS, r2), bf16), S((f2, r2), bf16),
                                      S((r2, f2), bf16), "masked", 0.05))
