"""Smoke runs of the benchmarks that have no test of their own (their smallest
settings, seconds each), as a user runs them: ``python -m benchmarks.<name>``.

The others are run by tests/test_step_memory.py, test_train_throughput.py,
test_quality.py, test_generate.py (inference), test_kernels_triton.py (ffn_kernels),
test_lm_eval.py (downstream), test_gpu_compile.py (kernel_tiles, and xla_static
compiled for the H200; its HLO reader is tested here on the CPU's compile) and
test_gpu_compile_mosaic.py (mosaic_static).
Each check compares the benchmark's numbers with a count made without it.
"""

import glob
import json
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT


def _run(name: str, *args: str) -> dict:
  p = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", *args], cwd=ROOT, capture_output=True,
                     text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  return json.loads(p.stdout.strip().splitlines()[-1])


def test_every_benchmark_has_a_smoke_test():
  tested = {"attention_loss", "compile_time", "data_throughput", "ffn_memory",  # here
            "downstream",  # tests/test_lm_eval.py
            "prepare_scale", "data_startup",
            "kernel_tiles",  # needs the CUDA plugin: run by tests/test_gpu_compile.py (--one)
            "mosaic_static",  # needs the CUDA plugin: run by tests/test_gpu_compile_mosaic.py
            "calibrate_model",  # needs the CUDA plugin: run by tests/test_perf_model.py (--quick)
            "sass_check",  # needs the CUDA plugin and nvdisasm: tests/test_perf_model.py
            "xla_static",  # here (its HLO reader) and in tests/test_gpu_compile.py (the H200 run)
            "step_memory", "train_throughput", "quality", "inference", "ffn_kernels"}
  names = {f[:-3] for f in os.listdir(os.path.join(ROOT, "benchmarks"))
           if f.endswith(".py") and f not in ("__init__.py", "harness.py")}
  assert names <= tested, f"benchmarks without a smoke test: {sorted(names - tested)}"


def test_attention_loss():
  seq, vocab = 32, 64
  out = _run("attention_loss", "--seq", str(seq), "--heads", "2", "--head-dim", "8", "--batch", "1",
             "--vocab", str(vocab), "--d-model", "16", "--dtype", "float32", "--blocks", "16",
             "--loss-chunks", "0,16", "--repeats", "1")
  att, loss = out["attention"], out["loss"]
  # xla keeps the [heads, L, L] fp32 probabilities: 2 x 32 x 4 bytes per token at least.
  assert att["xla"]["residual_bytes_per_token"] >= 2 * seq * 4
  assert att["chunked(block=16)"]["residual_bytes_per_token"] < att["xla"]["residual_bytes_per_token"]
  # Full logits keep one fp32 row of V per token; the chunked loss does not.
  assert loss["loss_chunk=0"]["residual_bytes_per_token"] >= vocab * 4
  assert loss["loss_chunk=16"]["residual_bytes_per_token"] < vocab * 4
  assert all(r["fwd_bwd_ms"] > 0 for r in [*att.values(), *loss.values()])


def test_xla_static_reads_every_dot_and_byte_of_a_compiled_program():
  import jax
  import jax.numpy as jnp

  from benchmarks import xla_static as xs

  # The dense FFN core as XLA's CPU pipeline compiles it (fusions, plain dots, converts):
  # by hand, 2·T·F·r FLOPs per product, 2 products forward and 6 with the backward.
  t, f, r = 256, 96, 32
  for train, products in ((False, 2), (True, 6)):
    text = jax.jit(xs.dense_core(train)).lower(*xs.core_args(f, r, t, train)).compile().as_text()
    kernels = xs.hlo_kernels(text)
    assert sum(k.flops for k in kernels) == products * 2 * t * f * r, (train, kernels)
    assert len([k for k in kernels if k.flops]) == products, kernels
    assert {k.gemm for k in kernels if k.flops} >= {f"{t}x{f}x{r}", f"{t}x{r}x{f}"}, kernels
  # Bytes: an elementwise kernel reads its operand and writes its result once.
  text = jax.jit(lambda x, y: x * 2 + y).lower(jnp.zeros((1000,), jnp.float32),
                                                jnp.zeros((1000,), jnp.bfloat16)).compile().as_text()
  (k,) = xs.hlo_kernels(text)
  assert (k.flops, k.bytes) == (0, 4000 + 2000 + 4000), k
  s, bound = xs.cost_s(k, 989e12, hbm_bytes_per_s=1e9, overhead_s=2e-6)
  assert (s, bound) == (10000 / 1e9 + 2e-6, "bytes")


@pytest.mark.slow
def test_compile_time():
  out = _run("compile_time", "--config", "configs/tiny.py:elas", "--seq-len", "8", "--micro-batch", "2",
             "--config.model.n_layers=2")
  for layout in ("unscanned", "scanned"):
    assert out[layout]["lower_s"] > 0 and out[layout]["compile_s"] > 0


@pytest.mark.slow
def test_data_throughput():
  out = _run("data_throughput", "--config", "configs/tiny.py:elas", "--batches", "3", "--steps", "1")
  assert out["batch"] == [16, 128]
  for key in ("pipeline_concat_tokens_per_s", "pipeline_truncate_pad_tokens_per_s", "train_step_tokens_per_s"):
    assert out[key] > 0, key


def test_ffn_memory():
  out = _run("ffn_memory", "--config", "configs/tiny.py", "--dtype", "float32", "--seq_len", "16")
  f = 516  # the tiny ReLU² width
  # loro_relu2 keeps dense f-wide activations (at least one fp32 copy per token);
  # masked ELAS keeps the compressed one: 2 fp32 values + 4 bits per 4 features.
  assert out["loro_relu2"]["intermediate"] >= f * 4
  assert out["elas/masked"]["intermediate"] == pytest.approx(f // 2 * 4 + f // 8, rel=0.02)
  assert out["elas/ste"]["intermediate"] < out["elas/masked"]["intermediate"]  # ste recomputes


@pytest.mark.slow
def test_prepare_scale_and_data_startup(tmp_path):
  # Two small synthetic C4 shards (0.2 MB of text each) prepared in a fresh
  # process, then training's data start-up on the prepared shards.
  data, out = tmp_path / "c4", tmp_path / "tokens"
  p = subprocess.run([sys.executable, "-m", "benchmarks.prepare_scale", "--data", str(data), "--out", str(out),
                      "--shards", "1,2", "--shard_mb", "0.2"], cwd=ROOT, capture_output=True, text=True,
                     timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  rows = json.loads(p.stdout.strip().splitlines()[-1])
  assert [r["shards"] for r in rows] == [1, 2]
  assert len(glob.glob(str(data / "*.json.gz"))) == 2
  one, two = rows
  assert 0 < one["tokens"] < two["tokens"] and one["peak_rss_mb"] > 0
  with open(out / "elas_prepared.json") as f:  # the last run's output: both shards
    manifest = json.load(f)
  assert sum(s["tokens"] for s in manifest["splits"]["train"]["shards"]) == two["tokens"]
  start = _run("data_startup", "--train_files", str(out / "train-*.arrayrecord"))
  assert start["documents"] == two["documents"] and start["open_s"] >= 0


def test_rel_err_does_not_let_a_nan_through():
  # max() drops a NaN (every comparison with it is False): a kernel writing NaN into
  # part of its output once compared as exact. Non-finite entries must now match.
  import numpy as np

  from benchmarks.harness import rel_err

  ref = np.array([1.0, 2.0, 4.0])
  assert rel_err(np.array([1.0, np.nan, 4.0]), ref) == float("inf")
  assert rel_err(ref, np.array([1.0, np.nan, 4.0])) == float("inf")
  assert rel_err(np.array([1.0, np.inf, 4.0]), ref) == float("inf")
  assert rel_err(np.array([1.0, np.nan, 4.4]), np.array([1.0, np.nan, 4.0])) == pytest.approx(0.1)
  assert rel_err(np.array([1.0, 2.2, 4.0]), ref) == pytest.approx(0.05)
