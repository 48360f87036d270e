"""elas_jax.deviceless without the CUDA plugin: the memory fit and the report's JSON
(the compiles themselves are in tests/test_gpu_compile_steps.py, marker gpu_compile)."""

import json

import numpy as np
import pytest

from elas_jax import deviceless
from elas_jax.targets import compile as tc


def test_linear_fit_and_the_largest_fitting_micro_batch():
  # Two exact points of 3 GB + 0.25 GB per sequence.
  fixed, per = deviceless.linear_fit({64: 3e9 + 64 * 0.25e9, 128: 3e9 + 128 * 0.25e9})
  np.testing.assert_allclose([fixed, per], np.polyfit([64, 128], [19e9, 35e9], 1)[::-1])
  # 141 GB: (141 - 3) / 0.25 = 552 sequences; a multiple of 8 (data x fsdp) below it.
  assert deviceless.max_fitting(fixed, per, 141e9) == 552
  assert deviceless.max_fitting(fixed, per, 141e9, multiple=10) == 550
  assert deviceless.max_fitting(fixed, per, 2e9) == 0  # the state alone does not fit
  assert deviceless.linear_fit({64: 5e9}) is None  # one point: no fit
  assert deviceless.linear_fit({64: 5e9, 128: 5e9}) is None  # no growth: no slope


def test_report_json_names_what_the_issue_asks_for():
  train = tc.CompileReport("h200", True, memory={"peak": 19_000_000_000})
  train.kernels = [tc.KernelInfo("elas_ffn_fwd", "pallas", grid=(256, 2, 1), threads=(256, 1, 1),
                                 shared_memory_bytes=16384, registers=151, spill_bytes=0),
                   tc.KernelInfo("kCustomCall", "custom"), tc.KernelInfo("loop_fusion", "xla")]
  broken = tc.CompileReport("h200", False, reason="RESOURCE_EXHAUSTED: Shared memory size limit exceeded")
  report = deviceless.StepsReport("h200", 8, (1, 8, 1), 64, {"train": train, "eval": broken},
                                  fit_points={64: 19_000_000_000, 128: 35_000_000_000},
                                  memory_bytes=141_000_000_000)
  out = json.loads(json.dumps(report.as_dict()))
  assert out["compiled"] is False and out["failures"] == [f"eval: {broken.reason}"]
  assert out["peak_bytes"] == 19_000_000_000
  assert out["max_micro_batch"] == 552  # (141 - 3) GB / 0.25 GB, a multiple of the 8 data x fsdp ways
  (k,) = out["kernels"]  # the custom kernels: not XLA's fusions, not unnamed library calls
  assert {key: k[key] for key in ("program", "name", "grid", "threads", "shared_memory_bytes", "registers",
                                  "spills")} == {"program": "train", "name": "elas_ffn_fwd",
                                                 "grid": [256, 2, 1], "threads": [256, 1, 1],
                                                 "shared_memory_bytes": 16384, "registers": 151,
                                                 "spills": False}


def test_micro_batch_must_divide_the_batch():
  from elas_jax import config_lib
  from tests.helpers import load_config

  cfg = load_config("configs/llama_60m.py", "elas")
  deviceless.check_micro_batch(cfg, 64)
  with pytest.raises(config_lib.ConfigError, match=r"^--micro-batch=48: must be a positive divisor of "
                                                   r"train.batch_size = 512"):
    deviceless.check_micro_batch(cfg, 48)
