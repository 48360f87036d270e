"""Shared test helpers."""

import os

from elas_jax import config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(path: str, variant: str):
  """A config from ``configs/`` (path relative to the repository root)."""
  return config_lib.load(f"{os.path.join(ROOT, path)}:{variant}")


def tiny_train_config(variant: str = "elas", **overrides):
  """A shrunken tiny config that trains a step in well under a second on CPU.

  ``overrides`` are dotted paths: ``tiny_train_config(**{"train.steps": 6})``.
  """
  c = load_config("configs/tiny.py", variant)
  c.model.d_model, c.model.n_heads, c.model.n_layers, c.model.rank = 64, 4, 2, 16
  c.model.ffn_dim = 258 if c.model.ffn_kind == "relu2" else 172  # 258: a dense tail of 2 features
  c.model.sparsity.dense_warmup_steps = 4
  c.optimizer.warmup_steps, c.optimizer.exact_every = 2, 5
  c.train.steps, c.train.batch_size, c.train.seq_len = 12, 8, 32
  c.train.log_every, c.train.eval_every, c.train.ckpt_every = 1, 6, 3
  c.train.eval_tokens = 2048
  c.data.read_threads = 1
  config_lib.override(c, overrides)
  config_lib.validate(c)
  return c


def read_metrics(workdir: str) -> list[dict]:
  import json
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def step_losses(workdir: str) -> dict[int, float]:
  """step -> training loss, asserting no step was logged twice."""
  out: dict[int, float] = {}
  for m in read_metrics(workdir):
    if "loss" in m:
      assert m["step"] not in out, f"step {m['step']} logged twice"
      out[m["step"]] = m["loss"]
  return out


# train.py flags for the same shrunken model as tiny_train_config (subprocess tests).
TINY_TRAIN_FLAGS = [
    "--config.model.d_model=64", "--config.model.n_heads=4", "--config.model.n_layers=2",
    "--config.model.rank=16", "--config.model.ffn_dim=256", "--config.train.batch_size=8",
    "--config.train.seq_len=32", "--config.optimizer.warmup_steps=2", "--config.train.eval_tokens=2048",
    "--config.train.log_every=1", "--config.model.sparsity.dense_warmup_steps=3",
    "--config.optimizer.exact_every=5"]
