"""The GPU compile gate: every Pallas kernel, compiled for the H200 with no GPU present.

``pytest -m gpu_compile`` (CI runs it in a venv with ``jax[cuda12]`` and
``JAX_PLATFORMS=cpu JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1``). For each paper size
one program holds ``elas_ffn``'s forward (evaluation: no stored activation)
and ``jax.value_and_grad`` of it in the masked, ste and split modes (each with
its dense warm-up branch: ``sparse_on`` is an input), and ``relu2_sparsify`` +
``sparse24_matmul`` forward and backward, at the per-GPU micro-batch of the
paper (16384 tokens: 64 sequences of 256, the 512-sequence batch on 8 GPUs),
with the kernels' default tiles for the H200. Asserted per Pallas kernel:
compiled by XLA's GPU pipeline (Triton, ptxas for sm_90a) with XLA's own spill
gate on, shared memory within the opt-in limit, no register spill (ptxas -v),
and a grid of at least one wave (programs >= SMs x programs per SM).
Skipped, with the reason, where the CUDA plugin is absent.
"""

import pytest

from benchmarks.kernel_tiles import SIZES, check_gate, gate_program
from elas_jax import targets

pytestmark = pytest.mark.gpu_compile

TOKENS = 16384


@pytest.fixture(scope="module", autouse=True)
def deviceless():
  if not targets.plugin_available():
    pytest.skip(f"needs the jax CUDA plugin: {targets.install_hint()}")
  try:
    targets.check_environment()
  except targets.MissingCudaPlugin as e:
    pytest.skip(str(e))


@pytest.mark.parametrize("size", list(SIZES))
def test_every_kernel_fits_the_h200(size):
  f, r = SIZES[size]
  target = targets.get("h200")
  program, args = gate_program(f, r, TOKENS, "h200")
  report = targets.compile_for_target(program, *args, target=target, fail_on_spill=True)
  bad = check_gate(report, target)
  assert not bad, f"{size}: " + "; ".join(bad) + "\n" + report.table()


def test_the_gate_refuses_an_oversized_tile():
  # 256 tokens x 256 features, 3 stages per forward program: far above 227 KiB of shared memory.
  from kernels.common import Blocks

  f, r = SIZES["130m"]
  target = targets.get("h200")
  big = {"elas_ffn_fwd": Blocks(block_t=256, block_f=256, block_n=256, num_stages=3)}
  program, args = gate_program(f, r, TOKENS, "h200", tiles=big)
  report = targets.compile_for_target(program, *args, target=target, fail_on_spill=True)
  bad = check_gate(report, target)
  assert bad and ("Shared memory" in bad[0] or "spill" in " ".join(bad)), bad
