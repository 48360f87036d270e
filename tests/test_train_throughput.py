"""The end-to-end throughput benchmark on its smoke preset: runs, and its arithmetic is right."""

import json
import subprocess
import sys

import pytest

from tests.helpers import ROOT


@pytest.mark.slow
def test_train_throughput_smoke_reports_consistent_numbers(tmp_path):
  out = tmp_path / "tp.json"
  p = subprocess.run([sys.executable, "-m", "benchmarks.train_throughput", "--preset", "smoke",
                      "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert p.returncode == 0, p.stderr[-3000:]
  res = json.loads(out.read_text())
  runs = {(r["variant"], r["micro_batches"]): r for r in res["runs"]}
  assert set(runs) == {("loro_relu2", 1), ("loro_relu2", 2), ("elas", 1), ("elas", 2)}
  # Model FLOPs per token of the smoke model, by hand: tiny widths (d 128, rank 32,
  # ReLU² 516, vocab 4096) with 1 layer at seq 16; q,k,v,o and up, down low-rank,
  # attention 2·L·d, lm_head d·V; 6 FLOPs per MAC for training.
  d, r, f, v, L = 128, 32, 516, 4096, 16
  macs = 4 * r * (d + d) + 2 * r * (d + f) + 2 * L * d + d * v
  for run in res["runs"]:
    assert run["tokens_per_s"] > 0 and run["compile_s"] > 0
    assert run["tflops_per_s"] == pytest.approx(run["tokens_per_s"] * 6 * macs / 1e12, rel=1e-9)
    assert run["micro_batch"] * run["micro_batches"] == res["batch"] == 4
  for variant in ("loro_relu2", "elas"):
    one, two = runs[(variant, 1)], runs[(variant, 2)]
    assert two["vs_first_micro_batch"] == pytest.approx(two["tokens_per_s"] / one["tokens_per_s"])
  for k in (1, 2):
    assert runs[("elas", k)]["vs_loro_relu2"] == pytest.approx(
        runs[("elas", k)]["tokens_per_s"] / runs[("loro_relu2", k)]["tokens_per_s"])
