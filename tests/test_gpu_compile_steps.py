"""The GPU compile gate for whole steps: the 60M and 1B (2 blocks) train, eval and
decode steps of the ELAS configs, compiled for the H200 with no GPU present
(``elas_jax.deviceless``, what ``python -m elas_jax.aot`` runs).

Marker ``gpu_compile``: run where the jax CUDA plugin is installed, with
``JAX_PLATFORMS=cpu JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1`` (CI's GPU-compile stage);
skipped with the reason elsewhere. The steps are the paper's: batch 512 x 256
tokens in micro-batches of 64 (one H200's share of the paper batch on 8), the
config's defaults otherwise. What is checked is what a process on an H200
would compile: the kernels the dispatch names, for the GPU (not interpreted),
cuDNN attention, fitting one H200.
"""

import subprocess
import sys

import pytest

from elas_jax import config_lib, targets
from tests.helpers import ROOT, load_config, require_deviceless

pytestmark = pytest.mark.gpu_compile

TRITON = {"elas_ffn_fwd", "elas_ffn_dh", "elas_ffn_dw_in", "elas_ffn_dw_out"}


@pytest.fixture(scope="module", autouse=True)
def deviceless():
  require_deviceless()


def _config(size: str, **changes):
  cfg = load_config(f"configs/llama_{size}.py", "elas")
  config_lib.override(cfg, {"model.n_layers": 2, **changes})
  config_lib.validate(cfg)
  return cfg


@pytest.mark.parametrize("size", ["60m", "1b"])
def test_train_eval_and_decode_steps_compile_for_the_h200(size):
  from elas_jax import deviceless

  report = deviceless.compile_steps(_config(size, **{"model.kernel": "triton"}), "h200", micro_batch=64,
                                    fit=False)
  assert set(report.programs) == {"train", "eval", "prefill", "decode"}
  assert report.compiled, report.failures
  h200 = targets.get("h200")
  for name, r in report.programs.items():
    assert 0 < r.peak_bytes < h200.memory_bytes, name
    pallas = {k.name.split("__")[0] for k in r.kernels if k.kind == "pallas"}
    # The Triton kernels, compiled for the GPU (interpreted, they would be XLA loops).
    assert pallas == (TRITON if name == "train" else {"elas_ffn_fwd"}), (name, pallas)
    for k in r.kernels:
      if k.kind == "pallas":
        assert k.spill_bytes == 0 and k.shared_memory_bytes <= h200.smem_per_block, (name, k)
  # attention = auto picks cuDNN's flash attention for a bf16 model on an H200.
  assert any(k.name == "kCuDnn" for k in report.programs["train"].kernels)


# The forward (storing the compressed activation) and the three backward kernels (from
# the stored activation, and the warm-up's: relu(y1) written once, dh writing dy1 for
# dw_in); at 1B the forward covers the first output block and packed_mm / dense_mm the
# others from the stored activation (dh likewise, from its stored dy1); mosaic_ws's
# forward and dh are its warp-specialized ones, at rank 256 covering 128 columns (packed_mm
# the rest) with the warm-up's forward mosaic's (one 256-column block); its 2:4 phase's
# weight gradients one kernel with a consumer each at rank 128, a kernel each (consumers on
# two feature steps) at 256.
MOSAIC_STEP_KERNELS = {
    ("60m", "mosaic"): ("elas_mgpu_fwd_store", "elas_mgpu_relu", "elas_mgpu_dh_compressed",
                        "elas_mgpu_dh_dense", "elas_mgpu_dw_in_dy1", "elas_mgpu_dw_out_"),
    ("1b", "mosaic"): ("elas_mgpu_fwd_first_store", "elas_mgpu_fwd_first_store_relu",
                       "elas_mgpu_packed_mm_y2", "elas_mgpu_packed_mm_dy1", "elas_mgpu_dense_mm_y2",
                       "elas_mgpu_dense_mm_dy1", "elas_mgpu_relu", "elas_mgpu_dh_",
                       "elas_mgpu_dw_in_dy1", "elas_mgpu_dw_out_"),
    ("60m", "mosaic_ws"): ("elas_mgpu_fwd_ws_store", "elas_mgpu_dh_ws_compressed", "elas_mgpu_dh_ws_dense",
                           "elas_mgpu_dw_ws_compressed", "elas_mgpu_dw_in_", "elas_mgpu_dw_out_"),
    ("130m", "mosaic_ws"): ("elas_mgpu_fwd_ws_first_store", "elas_mgpu_packed_mm_y2",
                            "elas_mgpu_fwd_store", "elas_mgpu_dh_ws_compressed",
                            "elas_mgpu_packed_mm_dy1", "elas_mgpu_dh_ws_dense",
                            "elas_mgpu_dw_ws_in", "elas_mgpu_dw_ws_out_compressed",
                            "elas_mgpu_dw_in_", "elas_mgpu_dw_out_"),
    # the 2:4 phase's products on sparse tensor cores (rank 512: mosaic's kernels)
    ("1b", "mosaic_sparse"): ("elas_mgpu_fwd_first_store_sp", "elas_mgpu_packed_mm_y2_sp",
                              "elas_mgpu_dh_compressed_sp", "elas_mgpu_packed_mm_dy1_sp",
                              "elas_mgpu_fwd_first_store_relu", "elas_mgpu_dh_dense",
                              "elas_mgpu_dw_in_dy1", "elas_mgpu_dw_out_"),
}


@pytest.mark.parametrize("size,kernel", sorted(MOSAIC_STEP_KERNELS))
def test_train_step_with_the_mosaic_kernels_compiles_for_the_h200(size, kernel):
  from elas_jax import deviceless
  from elas_kernels.ffn.mosaic import compat as mosaic_compat

  if mosaic_compat.unavailable_reason():
    pytest.skip(mosaic_compat.unavailable_reason())
  report = deviceless.compile_steps(_config(size, **{"model.kernel": kernel}), "h200", micro_batch=64,
                                    programs=("train",), fit=False)
  assert report.compiled, report.failures
  train = report.programs["train"]
  mosaic = [k for k in train.kernels if k.kind == "mosaic"]
  names = {k.name for k in mosaic}
  for prefix in MOSAIC_STEP_KERNELS[size, kernel]:
    assert any(n.startswith(prefix) for n in names), (prefix, names)
  assert not any(k.kind == "pallas" for k in train.kernels)  # no Triton kernel slipped in
  h200 = targets.get("h200")
  for k in mosaic:
    assert k.registers is not None and k.spill_bytes == 0, k
    assert 0 < k.shared_memory_bytes <= h200.smem_per_block, k


def test_auto_takes_mosaic_for_bf16_and_falls_back_to_triton_for_fp32():
  from elas_jax import deviceless
  from elas_kernels.ffn.mosaic import compat as mosaic_compat

  if mosaic_compat.unavailable_reason():
    pytest.skip(mosaic_compat.unavailable_reason())
  kinds = {}
  for dtype in ("bfloat16", "float32"):  # Mosaic's wgmma operands must be 16-bit
    cfg = _config("60m", **{"model.kernel": "auto", "model.dtype": dtype, "model.n_layers": 1})
    r = deviceless.compile_steps(cfg, "h200", micro_batch=64, programs=("eval",), fit=False)
    assert r.compiled, r.failures
    kinds[dtype] = {k.kind for k in r.programs["eval"].kernels} & {"mosaic", "pallas"}
  assert kinds == {"bfloat16": {"mosaic"}, "float32": {"pallas"}}


def test_aot_cli_reports_a_step_that_does_not_compile_in_one_line():
  # Rank 1024 needs more shared memory than the Mosaic kernels' tiles allow: an
  # explicit kernel=mosaic does not fall through, the step does not compile.
  p = subprocess.run([sys.executable, "-m", "elas_jax.aot", "--config", "configs/llama_1b.py:elas",
                      "--target", "h200", "--config.model.n_layers=1", "--config.model.rank=1024",
                      "--config.model.kernel=mosaic", "--no-fit"], cwd=ROOT, env=targets.deviceless_env(),
                     capture_output=True, text=True, timeout=1800)
  assert p.returncode == 1, p.stderr[-2000:]
  errors = [l for l in p.stderr.splitlines() if l.startswith("error: ")]
  assert len(errors) == 1 and errors[0].startswith("error: does not compile for h200: train: "), p.stderr[-2000:]
  assert "Traceback" not in p.stderr


def test_a_train_step_sharded_over_two_hosts_of_eight_h200s_compiles():
  # 16 GPUs (topology 1x2x8), FSDP over all of them: the step compiles with its
  # collectives, cuDNN attention included (its partitioner wants q, k and v in one
  # layout), and each GPU holds about a sixteenth of the parameters.
  from elas_jax import deviceless

  cfg = _config("60m")
  one = deviceless.compile_steps(cfg, "h200", micro_batch=64, programs=("eval",), fit=False)
  r = deviceless.compile_steps(cfg, "h200", hosts=2, gpus_per_host=8, mesh=(1, -1, 1), micro_batch=64,
                               programs=("train", "eval"), fit=False)
  assert one.compiled and r.compiled, (one.failures, r.failures)
  hlo = r.programs["train"].compiled_object.as_text()
  assert "all-gather" in hlo and "reduce-scatter" in hlo
  assert any(k.name == "kCuDnn" for k in r.programs["train"].kernels)
  # eval's arguments are the parameters and one batch
  assert r.programs["eval"].memory["argument"] < one.programs["eval"].memory["argument"] / 8
