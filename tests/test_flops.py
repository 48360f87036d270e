"""Throughput accounting (elas_jax/flops.py) and step profiling (elas_jax/profiling.py)."""

import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from elas_jax import config_lib, flops, profiling
from tests.helpers import load_config

# Hand counts for configs/tiny.py (d 128, 4 layers, rank 32, vocab 4096, seq 128;
# SwiGLU width 344, ReLU² width 516), in forward MACs per token:
# attention scores QKᵀ + PV = 4 layers · 2 · 128 · 128 = 131072 MACs; lm_head 128 · 4096 = 524288.
TINY_ATTN_MACS = 4 * 2 * 128 * 128
TINY_HEAD_MACS = 128 * 4096
TINY_LINEAR_MACS = {
    # per layer: q, k, v, o + FFN linears; then 4 layers + lm_head
    "full": 4 * (4 * 128 * 128 + 3 * 128 * 344) + TINY_HEAD_MACS,
    "loro": 4 * (4 * 32 * (128 + 128) + 3 * 32 * (128 + 344)) + TINY_HEAD_MACS,
    "cola": 4 * (4 * 32 * (128 + 128) + 3 * 32 * (128 + 344)) + TINY_HEAD_MACS,
    "loro_relu2": 4 * (4 * 32 * (128 + 128) + 2 * 32 * (128 + 516)) + TINY_HEAD_MACS,
    "elas": 4 * (4 * 32 * (128 + 128) + 2 * 32 * (128 + 516)) + TINY_HEAD_MACS,  # 2:4 counted dense
}

# The same counts multiplied out by hand (6 FLOPs per MAC), e.g. loro: 4 layers x
# (4 x 32 x 256 + 3 x 32 x 472) + 524288 = 836608 linear MACs, + 131072 attention = 967680.
TINY_TOTAL_FLOPS = {"full": 8_675_328, "loro": 5_806_080, "cola": 5_806_080,
                    "loro_relu2": 5_707_776, "elas": 5_707_776}


@pytest.mark.parametrize("variant", list(TINY_LINEAR_MACS))
def test_flops_per_token_tiny_by_hand(variant):
  c = load_config("configs/tiny.py", variant)
  got = flops.flops_per_token(c.model, 128)
  assert got["linear"] == 6 * TINY_LINEAR_MACS[variant]
  assert got["attention"] == 6 * TINY_ATTN_MACS
  assert got["total"] == 6 * (TINY_LINEAR_MACS[variant] + TINY_ATTN_MACS) == 3 * got["forward"]
  assert got["total"] == TINY_TOTAL_FLOPS[variant]


@pytest.mark.parametrize("variant", ["full", "loro", "cola", "elas"])
def test_linear_macs_equal_the_models_matmul_parameters(variant):
  # Each matmul weight element is one MAC per token: the 2-D parameters of the
  # built model, less the embedding table (a gather), must equal the linear MACs.
  from flax import nnx
  from elas_jax import model as model_lib
  c = load_config("configs/tiny.py", variant)
  c.model.n_layers = 1
  params = nnx.state(model_lib.build_model(c.model), nnx.Param)
  n = sum(x.size for x in jax.tree.leaves(params) if x.ndim == 2) - c.model.vocab_size * c.model.d_model
  assert flops.flops_per_token(c.model, 7)["linear"] == 6 * n


def test_device_peak_table():
  assert flops.device_peak_tflops("bfloat16", "NVIDIA H200") == 989.0
  assert flops.device_peak_tflops("bfloat16", "NVIDIA H100 80GB HBM3") == 989.0
  assert flops.device_peak_tflops("bfloat16", "NVIDIA H100 PCIe") == 756.0
  assert flops.device_peak_tflops("bfloat16", "NVIDIA A100-SXM4-40GB") == 312.0
  assert flops.device_peak_tflops("float32", "NVIDIA A100 80GB PCIe") == 156.0
  assert flops.device_peak_tflops("bfloat16", "TPU v5 lite") == 197.0
  assert flops.device_peak_tflops("bfloat16", "TPU v5") == 459.0
  assert flops.device_peak_tflops("float32", "TPU v4") is None
  assert flops.device_peak_tflops("float32", "cpu") is None


# The GPUs people rent, by the device_kind jax reports for them: (dense bf16, dense TF32)
# TFLOP/s from each vendor datasheet (flops.DEVICE_PEAK_TFLOPS cites them).
RENTED_GPUS = {
    "NVIDIA GH200 480GB": (989.0, 495.0),
    "NVIDIA L40S": (362.05, 183.0),
    "NVIDIA RTX A6000": (154.8, 77.4),
    "NVIDIA GeForce RTX 4090": (165.2, 82.6),
    "NVIDIA A10G": (70.0, 35.0),
    "NVIDIA H20": (148.0, 74.0),
    "NVIDIA B200": (2250.0, 1100.0),
    "NVIDIA GB200": (2500.0, 1250.0),
    "NVIDIA H200": (989.0, 495.0),  # contains "H20": the longer key wins
}


@pytest.mark.parametrize("kind", list(RENTED_GPUS))
def test_device_peak_table_covers_rented_gpus(kind):
  bf16, tf32 = RENTED_GPUS[kind]
  assert flops.device_peak_tflops("bfloat16", kind) == bf16
  assert flops.device_peak_tflops("float32", kind) == tf32
  assert flops.device_peak_tflops("bfloat16", kind.upper()) == bf16  # case-insensitive


def test_peak_tflops_override_and_mfu():
  c = load_config("configs/tiny.py", "elas")
  if jax.devices()[0].platform == "cpu":
    assert flops.peak_tflops(c) is None
    assert flops.mfu(1e6, 6e6, flops.peak_tflops(c)) is None
  # The peak follows the devices the run is compiled for (a mesh of 4 H200s, as a
  # deviceless topology gives them), not this process's.
  h200_mesh = _FakeMesh("NVIDIA H200", 4)
  assert flops.peak_tflops(c, h200_mesh) == 4 * 495.0  # tiny computes in float32
  c.model.dtype = "bfloat16"
  assert flops.peak_tflops(c, h200_mesh) == 4 * 989.0
  config_lib.override(c, {"train.peak_tflops": "100"})
  config_lib.validate(c)
  assert flops.peak_tflops(c, _FakeMesh("cpu", 4)) == 400.0
  assert flops.mfu(2e4, 5e9, 400.0) == pytest.approx(2e4 * 5e9 / 4e14)  # 0.25


class _FakeMesh:
  def __init__(self, device_kind: str, n: int):
    self.devices = np.array([type("Device", (), {"device_kind": device_kind})()] * n, dtype=object)
    self.size = n


class _FakeDevice:
  def __init__(self, stats):
    self.stats = stats

  def memory_stats(self):
    return self.stats


def test_peak_memory_bytes():
  assert flops.peak_memory_bytes(_FakeDevice({"peak_bytes_in_use": 1234, "bytes_in_use": 9})) == 1234
  assert flops.peak_memory_bytes(_FakeDevice(None)) is None
  assert flops.peak_memory_bytes(_FakeDevice({"bytes_in_use": 9})) is None
  got = flops.peak_memory_bytes()  # the real first device: None on CPU, bytes on GPU/TPU
  assert got is None if jax.devices()[0].platform == "cpu" else got > 0


@pytest.mark.parametrize("spec", ["3", "a:b", "3:3", "4:2", "-1:2", "1:2:3"])
def test_bad_profile_steps_name_the_field(spec):
  c = load_config("configs/tiny.py", "elas")
  config_lib.override(c, {"train.profile_steps": spec})
  with pytest.raises(config_lib.ConfigError, match=r"config\.train\.profile_steps"):
    config_lib.validate(c)
  with pytest.raises(config_lib.ConfigError, match=r"config\.train\.profile_steps"):
    profiling.parse_profile_steps(5)  # not a string


def test_bad_peak_tflops_names_the_field():
  c = load_config("configs/tiny.py", "elas")
  c.train.peak_tflops = -1.0
  with pytest.raises(config_lib.ConfigError, match=r"config\.train\.peak_tflops"):
    config_lib.validate(c)


def test_parse_profile_steps():
  assert profiling.parse_profile_steps("") is None
  assert profiling.parse_profile_steps(" 2:5 ") == (2, 5)


def test_profiler_traces_the_window(tmp_path):
  prof = profiling.StepProfiler("1:3", str(tmp_path))
  f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())
  x = jnp.ones((16, 16))
  started, stopped = [], []
  for step in range(4):
    started.append(prof.maybe_start(step))
    out = f(x + step)
    stopped.append(prof.maybe_stop(step, out))
  prof.close()
  assert started == [False, True, False, False] and stopped == [False, False, True, False]
  traces = glob.glob(os.path.join(str(tmp_path), "profile", "**", "*.xplane.pb"), recursive=True)
  assert traces and os.path.getsize(traces[0]) > 0
  assert np.isfinite(float(out))
