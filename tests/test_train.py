"""The training system end to end on CPU: train, checkpoint, resume, evaluate, shard."""

import glob
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from elas_jax import trainer
from tests.helpers import ROOT, TINY_TRAIN_FLAGS, read_metrics, step_losses, tiny_train_config, xla_flags


@pytest.mark.slow
def test_tiny_run_trains_checkpoints_and_evaluates(tmp_path):
  cfg = tiny_train_config()
  final = trainer.train_and_evaluate(cfg, str(tmp_path))
  losses = step_losses(str(tmp_path))
  assert sorted(losses) == list(range(1, 13))
  assert np.mean([losses[s] for s in (10, 11, 12)]) < np.mean([losses[s] for s in (1, 2, 3)]) - 0.3
  metrics = read_metrics(str(tmp_path))
  logged = metrics[0]
  for key in ("lr", "grad_norm", "param_norm", "update_norm", "tokens_per_s", "step_time",
              "zero_frac/layer0", "dropped_mass/layer1", "sparse_on", "ppl"):
    assert key in logged, key
  assert [m["sparse_on"] for m in metrics if "loss" in m][3:5] == [0.0, 1.0]  # 2:4 from step 4 on
  evals = [m for m in metrics if "eval_loss" in m]
  assert [m["step"] for m in evals] == [6, 12]
  assert evals[-1]["eval_tokens"] == 2048 and final["eval_loss"] == evals[-1]["eval_loss"]
  assert final["eval_ppl"] == pytest.approx(np.exp(final["eval_loss"]))
  assert sorted(int(os.path.basename(p)) for p in glob.glob(str(tmp_path / "checkpoints" / "*"))
                if os.path.basename(p).isdigit()) == [6, 9, 12]  # keep_checkpoints = 3
  assert glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))
  again = trainer.evaluate_checkpoint(str(tmp_path))
  assert again == {"step": 12, "eval_loss": final["eval_loss"], "eval_ppl": final["eval_ppl"],
                   "eval_tokens": 2048}
  earlier = trainer.evaluate_checkpoint(str(tmp_path), step=9)
  assert earlier["step"] == 9 and earlier["eval_loss"] != final["eval_loss"]


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["elas", "full"])
def test_resume_reproduces_the_uninterrupted_run_bitwise(tmp_path, variant):
  # elas covers LORO (exact steps at 5 and 10) and the 2:4 switch at step 4.
  cfg = tiny_train_config(variant)
  straight = tmp_path / "straight"
  trainer.train_and_evaluate(cfg, str(straight))
  resumed = tmp_path / "resumed"
  trainer.train_and_evaluate(cfg, str(resumed), stop_at_step=5)  # pre-empted after step 5
  assert max(step_losses(str(resumed))) == 5
  final = trainer.train_and_evaluate(cfg, str(resumed))
  a, b = step_losses(str(straight)), step_losses(str(resumed))
  assert sorted(b) == list(range(1, 13))
  assert a == b  # float equality: bitwise identical per-step losses
  assert final == trainer.evaluate_checkpoint(str(straight))


@pytest.mark.slow
def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
  cfg = tiny_train_config("full", **{"optimizer.lr": 1e9, "optimizer.warmup_steps": 0,
                                     "train.ckpt_every": 1, "train.log_every": 1})
  with pytest.raises(trainer.NonFiniteError, match=r"non-finite loss or gradients at step (\d+)") as e:
    trainer.train_and_evaluate(cfg, str(tmp_path))
  bad = int(e.value.args[0].split("at step ")[1].split(":")[0])
  steps = sorted(int(os.path.basename(p)) for p in glob.glob(str(tmp_path / "checkpoints" / "[0-9]*")))
  assert steps and max(steps) <= bad  # nothing written after the bad step
  # the newest checkpoint is intact: it restores (checksums verified), with finite parameters
  import jax
  from elas_jax import checkpointing
  state = checkpointing.restore_state(str(tmp_path), max(steps), trainer.build(cfg).abstract_state)
  assert int(state.step) == max(steps) and int(state.bad_steps) == 0
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))
  cfg.train.skip_nonfinite = True
  skipped = tmp_path / "skip"
  trainer.train_and_evaluate(cfg, str(skipped))
  last = [m for m in read_metrics(str(skipped)) if "loss" in m][-1]
  assert last["skipped_nonfinite"] >= 1


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


# One process on 2 fake CPU devices, fed the global batches a two-process run
# assembles: process 0's rows of each batch, then process 1's (each process
# reads its own share of the documents, so a plain one-process run would see
# other batches).
_ONE_PROCESS_AS_TWO = """
import sys
import numpy as np
from grain import experimental as grain_exp
from elas_jax.cli import train as train_main
from elas_jax.data import pipeline

one_share = pipeline.train_dataset

def two_process_batches(docs, tok, spec, process_index=None, process_count=None):
  shares = [one_share(docs, tok, spec, i, 2) for i in range(2)]
  return grain_exp.ZipIterDataset(shares).map(
      lambda rows: {k: np.concatenate([rows[0][k], rows[1][k]]) for k in rows[0]})

pipeline.train_dataset = two_process_batches
sys.argv = ["train.py", *sys.argv[1:]]
train_main.run()
"""

# Two processes (gloo all-reduce) and one process combine the same per-device
# partial results; measured bitwise equal (jax 0.10.2, CPU), the tolerance
# allows for a different reduction order elsewhere. A step changes the loss by
# >= 2e-3 relative.
TWO_VS_ONE_RTOL = 1e-5


@pytest.mark.slow
def test_two_processes_match_one_process_on_the_same_global_batch(tmp_path):
  steps = ["--config.train.steps=6", "--config.train.eval_every=6", "--config.train.ckpt_every=3"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  port = _free_port()
  two = [subprocess.Popen([sys.executable, "train.py", *TINY_TRAIN_FLAGS, *steps, f"--workdir={tmp_path / 'two'}",
                           f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
                          cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
         for i in range(2)]
  one = subprocess.Popen([sys.executable, "-c", _ONE_PROCESS_AS_TWO, *TINY_TRAIN_FLAGS, *steps,
                          f"--workdir={tmp_path / 'one'}"], cwd=ROOT,
                         env=dict(env, XLA_FLAGS=xla_flags(2)),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  outs = [p.communicate(timeout=900) for p in two + [one]]
  for p, (_, err) in zip(two + [one], outs, strict=True):
    assert p.returncode == 0, err[-3000:]
  finals = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
  assert finals[0] == finals[1] and finals[0]["step"] == 6  # one model, evaluated once globally
  assert os.path.isdir(tmp_path / "two" / "checkpoints" / "6")
  metrics = read_metrics(str(tmp_path / "two"))
  assert [m["sparse_on"] for m in metrics if "loss" in m] == [0, 0, 0, 0, 1, 1]  # both phases covered
  two_losses, one_losses = step_losses(str(tmp_path / "two")), step_losses(str(tmp_path / "one"))
  assert sorted(two_losses) == sorted(one_losses) == list(range(1, 7))
  for step in two_losses:
    assert two_losses[step] == pytest.approx(one_losses[step], rel=TWO_VS_ONE_RTOL), step
  assert finals[0]["eval_loss"] == pytest.approx(finals[2]["eval_loss"], rel=TWO_VS_ONE_RTOL)
  assert finals[0]["eval_tokens"] == finals[2]["eval_tokens"] == 2048


def test_evaluation_fetches_once_and_sums_like_the_batches(monkeypatch):
  # Run.evaluate dispatches every batch without reading a result back (no
  # float() / int() / .item() of a device array, each a sync per batch) and
  # fetches the per-batch sums with one jax.device_get; the result is the sum
  # over the batches computed one by one here.
  import jax

  cfg = tiny_train_config("elas", **{"train.eval_tokens": 4096})
  run = trainer.build(cfg)
  state = run.init_state()
  eval_fn = run.jit_eval_step()
  batches = list(run.eval_batches()[0])
  assert len(batches) >= 4
  total = count = 0.0
  for b in batches:
    t, c = eval_fn(state.params, state.step, trainer.pipeline.global_batch(b, run.batch_sharding))
    total, count = total + float(t), count + float(c)
  fetches = []
  real_get = jax.device_get
  monkeypatch.setattr(jax, "device_get", lambda x: fetches.append(1) or real_get(x))
  array_type = type(state.step)

  def no_sync(*_):
    raise AssertionError("a device array was read back during evaluation")

  for name in ("__float__", "__int__", "item"):
    monkeypatch.setattr(array_type, name, no_sync)
  got = run.evaluate(eval_fn, state.params, state.step, batches)
  monkeypatch.undo()
  assert len(fetches) == 1
  assert got == {"eval_loss": total / count, "eval_ppl": float(np.exp(total / count)), "eval_tokens": int(count)}
