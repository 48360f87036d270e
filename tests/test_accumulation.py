"""Gradient accumulation (train.micro_batch): the same step as one big batch."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from elas_jax import config_lib, model as model_lib, sharding, trainer
from elas_jax.errors import ConfigError
from tests.helpers import ROOT, step_losses, tiny_train_config

B, L = 8, 32


def _setup(variant, **overrides):
  cfg = tiny_train_config(variant, **{"train.batch_size": B, "train.seq_len": L, **overrides})
  model = model_lib.build_model(cfg.model, seed=0)
  graphdef, params = nnx.split(model, nnx.Param)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, cfg.model.vocab_size, (B, L + 1))
  mask = np.ones((B, L), np.float32)
  mask[1, 20:] = 0  # padding: micro-batches hold different numbers of real tokens
  mask[6, 5:] = 0
  batch = {"inputs": jnp.asarray(tokens[:, :-1], jnp.int32),
           "targets": jnp.asarray(tokens[:, 1:], jnp.int32), "mask": jnp.asarray(mask)}
  return cfg, graphdef, params, batch


def _grads(cfg, graphdef, params, batch, micro, sparse_on):
  cfg = config_lib.override(cfg.copy_and_resolve_references(), {"train.micro_batch": micro})
  return jax.jit(trainer.make_grad_fn(graphdef, cfg))(params, batch, jnp.asarray(sparse_on))


def _assert_close(a, b, rel):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    assert np.max(np.abs(x - y)) <= rel * np.max(np.abs(y)) + 1e-12


@pytest.mark.parametrize("variant,sparse_on", [("full", False), ("loro", False), ("elas", True),
                                               ("elas", False)])
def test_micro_batches_give_the_loss_and_gradients_of_one_batch(variant, sparse_on):
  cfg, graphdef, params, batch = _setup(variant)
  loss1, stats1, count1, g1 = _grads(cfg, graphdef, params, batch, 0, sparse_on)
  loss4, stats4, count4, g4 = _grads(cfg, graphdef, params, batch, 2, sparse_on)  # 4 micro-batches
  assert float(count4) == float(count1) == float(batch["mask"].sum())
  assert float(loss4) == pytest.approx(float(loss1), rel=1e-5)
  _assert_close(g4, g1, 1e-5)
  if sparse_on:  # a mean over equal-sized micro-batches is the batch mean
    np.testing.assert_allclose(stats4["zero_frac"], stats1["zero_frac"], rtol=1e-5)
    # dropped_mass is a ratio: logged as the mean of the micro-batches' ratios.
    np.testing.assert_allclose(stats4["dropped_mass"], stats1["dropped_mass"], rtol=0.1)


def test_split_mode_accumulates_per_micro_batch_gradients():
  """Split mode's token groups are per micro-batch: the accumulated gradient is the
  token-weighted sum of each micro-batch's own one-batch gradient."""
  cfg, graphdef, params, batch = _setup("elas", **{"model.sparsity.backward": "split"})
  k = 4
  loss, _, count, g = _grads(cfg, graphdef, params, batch, B // k, True)
  # Reference: each micro-batch (rows i, i+k, ...) on its own as a one-batch step.
  one = config_lib.override(cfg.copy_and_resolve_references(), {"train.batch_size": B // k})
  grad_one = jax.jit(trainer.make_grad_fn(graphdef, one))
  total, want = 0.0, None
  for i in range(k):
    mb = {n: x[i::k] for n, x in batch.items()}
    l_i, _, c_i, g_i = grad_one(params, mb, jnp.asarray(True))
    total += float(l_i) * float(c_i)
    g_i = jax.tree.map(lambda x: np.asarray(x, np.float64) * float(c_i), g_i)
    want = g_i if want is None else jax.tree.map(np.add, want, g_i)
  want = jax.tree.map(lambda x: x / float(count), want)
  assert float(loss) == pytest.approx(total / float(count), rel=1e-5)
  _assert_close(g, want, 1e-5)
  # ... and that differs from the big batch's split-mode gradient (groups along tokens change).
  _, _, _, g_big = _grads(cfg, graphdef, params, batch, 0, True)
  diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
             for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_big)))
  assert diff > 1e-6


def test_resume_with_accumulation_is_bitwise(tmp_path):
  cfg = tiny_train_config("elas", **{"train.micro_batch": 2})
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  trainer.train_and_evaluate(cfg, str(straight))
  trainer.train_and_evaluate(cfg, str(resumed), stop_at_step=5)
  trainer.train_and_evaluate(cfg, str(resumed))
  a, b = step_losses(str(straight)), step_losses(str(resumed))
  assert sorted(a) == list(range(1, 13)) and a == b


def test_bad_micro_batch_values_are_one_line_errors():
  with pytest.raises(ConfigError, match=r"config.train.micro_batch = 3: must be 0 .* divisor of "
                                        r"train.batch_size = 8"):
    tiny_train_config("elas", **{"train.micro_batch": 3})
  with pytest.raises(ConfigError, match="config.train.micro_batch = -2"):
    tiny_train_config("elas", **{"train.micro_batch": -2})
  mesh = type("M", (), {"shape": {"data": 2, "fsdp": 2, "tensor": 1}})()
  cfg = tiny_train_config("elas", **{"train.micro_batch": 2})
  with pytest.raises(ConfigError, match=r"config.train.micro_batch = 2 is not divisible by the "
                                        r"4-way data x fsdp split"):
    sharding.check_batch(cfg.train, mesh)
  sharding.check_batch(tiny_train_config("elas", **{"train.micro_batch": 4}).train, mesh)


def test_paper_1b_config_with_micro_batches_runs_a_step(tmp_path):
  """The issue's goal in test size: 1B widths, 2 layers, global batch 512 in micro-batches of 16."""
  flags = ["--config=configs/llama_1b.py:elas", "--config.train.micro_batch=16",
           "--config.model.n_layers=2", "--config.train.seq_len=16", "--config.train.steps=1",
           "--config.optimizer.warmup_steps=0", "--config.model.sparsity.dense_warmup_steps=0",
           "--config.data.source=sample", "--config.data.tokenizer=", "--config.data.packing=concat",
           "--config.model.vocab_size=4096",
           "--config.train.eval_tokens=8192", "--config.model.dtype=float32",
           f"--workdir={tmp_path}"]
  p = subprocess.run([sys.executable, "train.py", *flags], cwd=ROOT, capture_output=True, text=True,
                     timeout=900)
  assert p.returncode == 0, p.stderr[-3000:]
  final = json.loads(p.stdout.strip().splitlines()[-1])
  assert final["step"] == 1 and np.isfinite(final["eval_loss"])
  (record,) = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
  assert record["tokens"] == 512 * 16  # the whole global batch in one optimizer step
