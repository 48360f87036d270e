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
