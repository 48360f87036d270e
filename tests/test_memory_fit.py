"""Out of device memory: the compiled step against a memory budget, ``train.micro_batch =
auto``, and XLA's RESOURCE_EXHAUSTED as one line (elas_jax/memory.py, trainer)."""

import math
import random
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from elas_jax import memory, sharding, trainer
from tests.helpers import ROOT, TINY_TRAIN_FLAGS, step_losses, tiny_ffn_dim, tiny_train_config

BATCH = 16  # candidates 1, 2, 4, 8, 16 on one device
VARIANT = "full"  # AdamW: the train step compiles twice as fast as LORO's; the memory fit is the same code


def test_micro_batch_candidates():
  assert memory.micro_batch_candidates(16, 1) == [1, 2, 4, 8, 16]
  assert memory.micro_batch_candidates(24, 4) == [4, 8, 12, 24]
  assert memory.micro_batch_candidates(512, 8) == [8, 16, 32, 64, 128, 256, 512]


def test_largest_fitting_equals_a_scan_of_every_candidate():
  rng = random.Random(0)
  for _ in range(300):
    n = rng.randint(1, 12)
    peaks = sorted(rng.randint(0, 50) for _ in range(n))  # non-decreasing, with plateaus
    candidates = list(range(1, n + 1))
    capacity = rng.randint(-1, 52)
    calls = []
    got = memory.largest_fitting(candidates, lambda m: calls.append(m) or peaks[m - 1], capacity)
    fitting = [m for m in candidates if peaks[m - 1] <= capacity]
    assert got == (max(fitting) if fitting else None)
    assert len(calls) == len(set(calls)) <= 1 + math.ceil(math.log2(n))  # each a compile: few, never twice


def _reference_peaks(run, micro_batches):
  """Per micro-batch, argument + output - alias + temp bytes of ``compiled.memory_analysis()``
  of the train step as training jits it, compiled here (nothing runs)."""
  shape = (BATCH, run.cfg.train.seq_len)
  batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=run.batch_sharding)
           for k in ("inputs", "targets", "mask")}
  peaks = {}
  for m in micro_batches:
    cfg = tiny_train_config(VARIANT, **{"train.batch_size": BATCH, "train.micro_batch": m})
    step = jax.jit(trainer.make_train_step(run.graphdef, run.tx, run.schedule, cfg, run.mesh),
                   in_shardings=(run.state_shardings, run.batch_sharding),
                   out_shardings=(run.state_shardings, sharding.replicated(run.mesh)), donate_argnums=0)
    a = step.lower(run.abstract_state, batch).compile().memory_analysis()
    peaks[m] = (a.argument_size_in_bytes + a.output_size_in_bytes - a.alias_size_in_bytes
                + a.temp_size_in_bytes)
  return peaks


@pytest.mark.slow
def test_auto_micro_batch_is_the_largest_that_fits_at_two_budgets(tmp_path):
  cfg = tiny_train_config(VARIANT, **{"train.batch_size": BATCH, "train.micro_batch": "auto"})
  run = trainer.build(cfg, jax.devices()[:1], with_tokenizer=False)
  peaks = _reference_peaks(run, (4, 8, 16))
  # What auto may fill: just below the larger step's need, so that the budget itself (the
  # usable bytes plus the margin) would hold it: a choice that ignored the margin fails.
  assert peaks[4] < 0.95 * peaks[8] and peaks[8] < 0.95 * peaks[16], peaks
  chosen = {}
  for low, high in ((4, 8), (8, 16)):
    usable = 0.95 * peaks[high]
    assert usable / (1 - memory.AUTO_MARGIN) > peaks[high]
    budget_gb = usable / (1 - memory.AUTO_MARGIN) / 1e9
    cfg.train.memory_budget_gb = budget_gb
    fitted = trainer.fit_micro_batch(trainer.build(cfg, jax.devices()[:1], with_tokenizer=False))
    m = fitted.cfg.train.micro_batch
    chosen[budget_gb] = m
    # Largest that fits: it fits the usable budget, the next candidate up does not.
    assert peaks[m] <= budget_gb * 1e9 * (1 - memory.AUTO_MARGIN) < peaks[2 * m], (m, peaks)
  assert sorted(chosen.values()) == [4, 8]

  # The whole batch at the smaller budget does not fit: one line naming auto's choice.
  cfg.train.micro_batch, cfg.train.memory_budget_gb = 0, min(chosen)
  whole = trainer.build(cfg, jax.devices()[:1], with_tokenizer=False)
  shape = (BATCH, cfg.train.seq_len)
  batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=whole.batch_sharding)
           for k in ("inputs", "targets", "mask")}
  with pytest.raises(memory.OutOfMemoryError) as e:
    trainer.check_step_memory(whole, trainer.jit_train_step(whole).lower(whole.abstract_state, batch).compile())
  msg = str(e.value)
  assert "\n" not in msg and msg.startswith(
      f"the train step does not fit: at micro-batch {BATCH} it needs {memory.fmt_bytes(peaks[BATCH])} "
      f"per device"), msg
  assert f"{memory.fmt_bytes(int(min(chosen) * 1e9))} are available (train.memory_budget_gb = " in msg, msg
  assert f"set train.micro_batch={chosen[min(chosen)]} (the largest" in msg and "model.remat=block" in msg, msg

  # A run with auto trains exactly as with that micro-batch set by hand (the same programs as
  # the reference compiled: the persistent cache serves them).
  auto_dir, hand_dir = tmp_path / "auto", tmp_path / "hand"
  common = {"train.batch_size": BATCH, "train.memory_budget_gb": min(chosen)}
  trainer.train_and_evaluate(tiny_train_config(VARIANT, **common, **{"train.micro_batch": "auto"}),
                             str(auto_dir), stop_at_step=3, devices=jax.devices()[:1])
  trainer.train_and_evaluate(tiny_train_config(VARIANT, **common, **{"train.micro_batch": chosen[min(chosen)]}),
                             str(hand_dir), stop_at_step=3, devices=jax.devices()[:1])
  assert step_losses(str(auto_dir)) == step_losses(str(hand_dir))
  assert f'"micro_batch": {chosen[min(chosen)]}' in (auto_dir / "config.json").read_text()


@pytest.mark.slow
def test_a_step_over_the_budget_stops_with_one_line(tmp_path):
  # 10 MB per device: below the tiny step's state and temporaries at any micro-batch. (The
  # steps, evaluation and checkpoint cadence of tiny_train_config: the programs the other
  # tests compile.)
  cmd = [sys.executable, "train.py", f"--config=configs/tiny.py:{VARIANT}", *TINY_TRAIN_FLAGS,
         f"--config.model.ffn_dim={tiny_ffn_dim('swiglu')}",
         "--config.train.steps=12", "--config.train.eval_every=6", "--config.train.ckpt_every=3",
         f"--config.train.batch_size={BATCH}",
         "--config.train.memory_budget_gb=0.01", f"--workdir={tmp_path / 'run'}"]
  p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                     env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"})
  assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
  last = p.stderr.strip().splitlines()[-1]
  assert last.startswith("error: the train step does not fit: at micro-batch 16 it needs "), last
  assert "10.00 MB are available (train.memory_budget_gb = 0.01)" in last, last
  assert "no micro-batch fits" in last and "mesh.fsdp" in last, last
  assert (tmp_path / "run" / "metrics.jsonl").read_text() == ""  # no step ran


def test_resource_exhausted_at_run_time_becomes_one_line():
  # A real XLA RESOURCE_EXHAUSTED: a 4 TiB buffer on the CPU backend (its allocation fails
  # at once), run through the guard the trainer puts around its compiled train step (the
  # message's "compiled step" is then this program).
  too_big = jax.jit(lambda x: jnp.broadcast_to(x, (2 ** 22, 2 ** 20)) + 1)
  cfg = tiny_train_config(VARIANT, **{"train.batch_size": BATCH, "train.memory_budget_gb": 0.5})
  run = trainer.build(cfg, jax.devices()[:1], with_tokenizer=False)
  guarded = trainer.guard_out_of_memory(run, too_big, compiled=too_big.lower(jnp.int8(1)).compile())
  with pytest.raises(memory.OutOfMemoryError) as e:
    guarded(jnp.int8(1))
  msg = str(e.value)
  assert "\n" not in msg and msg.startswith("the train step ran out of device memory at micro-batch 16 "
                                            "(XLA RESOURCE_EXHAUSTED allocating 4398.05 GB)"), msg
  assert "; the compiled step needs 4398.05 GB per device (arguments " in msg, msg
  assert "500.00 MB available (train.memory_budget_gb = 0.5): set model.remat=block" in msg, msg
  # Outside the train step call (evaluation; an asynchronous step's error surfacing
  # later): the catch-all around the whole run.
  with pytest.raises(memory.OutOfMemoryError, match=r"^out of device memory \(RESOURCE_EXHAUSTED: Out of "
                     r"memory allocating 4398046511104 bytes\.\): lower train\.micro_batch"):
    memory.guard(too_big, trainer._out_of_memory_elsewhere)(jnp.int8(1))
  # Other errors pass through unchanged.
  with pytest.raises(TypeError):
    trainer.guard_out_of_memory(run, lambda: (_ for _ in ()).throw(TypeError("x")), compiled=None)()
