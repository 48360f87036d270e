"""Per-step throughput accounting and on-demand profiles in a real training run."""

import glob

import pytest

from elas_jax import trainer
from tests.helpers import read_metrics, tiny_train_config


def test_metrics_carry_flops_mfu_compile_time_and_a_profile_is_written(tmp_path):
  cfg = tiny_train_config("elas", **{"train.steps": 6, "train.peak_tflops": 0.5,
                                     "train.profile_steps": "2:4", "train.eval_every": 6})
  trainer.train_and_evaluate(cfg, str(tmp_path))
  records = [r for r in read_metrics(str(tmp_path)) if "loss" in r]
  assert "compile_s" in records[0] and records[0]["compile_s"] > 0
  assert all("compile_s" not in r for r in records[1:])  # once per (re)start
  # Model FLOPs per token of the shrunken tiny elas model (d=64, 2 layers, rank 16,
  # ReLU² width 258, vocab 4096, seq 32), counted by hand: per layer q,k,v,o and
  # up, down low-rank linears r·(d_in+d_out) MACs, lm_head d·V, attention 2·L·d;
  # 6 FLOPs per MAC for training.
  d, r, f, v, L, layers = 64, 16, 258, 4096, 32, 2
  macs = layers * (4 * r * (d + d) + 2 * r * (d + f) + 2 * L * d) + d * v
  tokens_per_step = cfg.train.batch_size * cfg.train.seq_len  # 8 x 32, every target real
  for rec in records:
    assert rec["tflops_per_s"] == pytest.approx(rec["tokens_per_s"] * 6 * macs / 1e12, rel=1e-9)
    # MFU by its definition: the step's model FLOPs over its time, over the 0.5 TFLOP/s peak
    assert rec["mfu"] == pytest.approx(tokens_per_step * 6 * macs / rec["step_time"] / 0.5e12, rel=1e-6)
  traces = glob.glob(str(tmp_path / "profile" / "**" / "*.xplane.pb"), recursive=True)
  assert len(traces) == 1, traces
