"""The quality-study script on its smoke preset: runs, table, curves."""

import argparse
import json
import os
import subprocess
import sys

import pytest

from benchmarks import quality
from elas_jax import config_lib
from tests.helpers import ROOT


def test_config_overrides_are_the_cli_form(monkeypatch):
  # --config.<field>=<value> (or a separate value), parsed as the field's type
  monkeypatch.chdir(ROOT)
  ap = argparse.ArgumentParser()
  over = quality.config_overrides(ap, ["--config.train.batch_size=4", "--config.model.sparsity.backward",
                                       "ste", "--config.model.sparsity.enabled=false"])
  assert over == {"train.batch_size": "4", "model.sparsity.backward": "ste",
                  "model.sparsity.enabled": "false"}
  cfg = quality.make_config("tiny", "elas", 10, 0, over)
  assert cfg.train.batch_size == 4 and cfg.model.sparsity.backward == "ste"
  assert cfg.model.sparsity.enabled is False
  with pytest.raises(config_lib.ConfigError, match="config.train.no_such_field"):
    quality.make_config("tiny", "elas", 10, 0, {"train.no_such_field": "1"})
  with pytest.raises(SystemExit):  # not a config field: refused, not ignored
    quality.config_overrides(ap, ["--set", "train.steps=3"])


def test_quality_smoke_preset_writes_table_and_curves(tmp_path):
  p = subprocess.run([sys.executable, "-m", "benchmarks.quality", "--preset", "smoke",
                      "--variants", "loro_relu2,elas", "--ablations", "warmup", "--out", str(tmp_path)],
                     cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert p.returncode == 0, p.stderr[-3000:]
  results = json.load(open(tmp_path / "results.json"))
  assert set(results["runs"]) == {"loro_relu2", "elas", "elas_warmup0", "elas_warmup1"}
  for name, per_seed in results["runs"].items():
    r = per_seed["0"]
    assert 1.0 < r["eval_ppl"] < 10_000 and len(r["train_curve"]) == 24, name
  runs = results["runs"]
  assert runs["elas"]["0"]["params"] == runs["loro_relu2"]["0"]["params"]
  # compressed 2:4 activation: the ELAS FFN keeps far fewer bytes per token
  assert runs["elas"]["0"]["ffn_bytes_per_token"] < 0.6 * runs["loro_relu2"]["0"]["ffn_bytes_per_token"]
  # identical data order and initial weights: the first step's loss is the same for
  # every run that starts dense; ELAS without warm-up is 2:4 from step 1 on
  first = {n: r["0"]["train_curve"][0][1] for n, r in runs.items()}
  assert first["loro_relu2"] == first["elas"] == first["elas_warmup1"]
  assert first["elas_warmup0"] != first["elas"]
  table = open(tmp_path / "results.md").read()
  assert "| elas_warmup0 |" in table and "Ranking, seed 0:" in table
  assert os.path.getsize(tmp_path / "loss_curves.png") > 10_000
  # rerunning skips every finished run (nothing is trained or evaluated again) and
  # rewrites the same table
  again = subprocess.run([sys.executable, "-m", "benchmarks.quality", "--preset", "smoke", "--variants",
                          "loro_relu2,elas", "--ablations", "warmup", "--out", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert again.returncode == 0 and json.load(open(tmp_path / "results.json"))["mean_ppl"] == results["mean_ppl"]
  assert "resumed from step" not in again.stderr  # finished runs are read, not rebuilt
