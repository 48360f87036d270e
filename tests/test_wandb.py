"""Weights & Biases logging (elas_jax/wandb_log.py), offline: the run's own .wandb
transaction log, read back with W&B's reader (``wandb leet inspect --json``), must hold
what metrics.jsonl holds. Skipped without wandb (pip install -r requirements-wandb.txt)."""

import glob
import json
import os
import subprocess
import sys

import importlib.util

import pytest

from elas_jax import config_lib, trainer, wandb_log
from tests.helpers import read_metrics, tiny_train_config


def test_logging_on_without_wandb_is_one_line_before_anything_compiles(tmp_path, monkeypatch):
  if importlib.util.find_spec("wandb") is not None:  # make it absent, as without the extra
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
  cfg = tiny_train_config(**{"wandb.enabled": True})
  with pytest.raises(config_lib.ConfigError, match=r"^config\.wandb\.enabled = True but wandb is not "
                     r"installed: pip install -r requirements-wandb\.txt"):
    trainer.train_and_evaluate(cfg, str(tmp_path / "run"))
  assert not (tmp_path / "run" / "checkpoints").exists()
  cfg.wandb.enabled = False
  wandb_log.check_available(cfg)  # off: wandb is never needed


def records(run_file: str) -> list[dict]:
  """Every record of a .wandb transaction log, as W&B's own inspector prints them."""
  p = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", run_file],
                     capture_output=True, text=True, timeout=120)
  assert p.returncode == 0, p.stderr
  return [json.loads(line) for line in p.stdout.splitlines() if line.strip()]


@pytest.mark.slow
def test_offline_run_holds_the_metrics_and_a_resumed_run_keeps_its_id(tmp_path, monkeypatch):
  pytest.importorskip("wandb")
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.setenv("WANDB_SILENT", "true")
  workdir = tmp_path / "run"
  cfg = tiny_train_config(**{"wandb.enabled": True, "wandb.project": "elas-test"})
  trainer.train_and_evaluate(cfg, str(workdir), stop_at_step=5)  # pre-empted after step 5
  run_id = (workdir / "wandb_run_id").read_text().strip()
  trainer.train_and_evaluate(cfg, str(workdir))  # resumed: steps 6..12
  assert (workdir / "wandb_run_id").read_text().strip() == run_id

  # Offline, each start writes its own directory of the one run id (`wandb sync` of both
  # uploads one run).
  files = sorted(glob.glob(str(workdir / "wandb" / "offline-run-*" / "run-*.wandb")))
  assert [os.path.basename(f) for f in files] == [f"run-{run_id}.wandb"] * 2
  history: dict[int, dict] = {}
  for i, f in enumerate(files):
    recs = records(f)
    (run,) = [r["run"] for r in recs if r["type"] == "run"]
    assert run["run_id"] == run_id and run["project"] == "elas-test" and run["resume"] is True
    config = {k: v for k, v in run["config"]["update"].items() if not k.startswith("_")}
    assert config == json.loads(json.dumps(cfg.to_dict()))  # the resolved config, whole
    for r in recs:
      if r["type"] == "history":
        item = r["history"]["item"]
        assert item["_step"] not in history  # every step once, over both starts
        history[item["_step"]] = item
    assert max(history) == [5, 12][i]  # the first start logged steps 1..5, the second 6..12

  # The same per-step values as metrics.jsonl, every key of every record.
  metrics = read_metrics(str(workdir))
  assert sorted(history) == [m["step"] for m in metrics] == list(range(1, 13))
  for m in metrics:
    logged = history[m["step"]]
    assert {k: logged[k] for k in m if k != "step"} == {k: v for k, v in m.items() if k != "step"}
  assert {m["step"] for m in metrics if "eval_loss" in m} == {6, 12}
