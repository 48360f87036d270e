"""The persistent compilation cache of a training run (elas_jax/compile_cache.py)."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import pytest

from elas_jax import compile_cache
from tests.helpers import ROOT, TINY_TRAIN_FLAGS

HIT = "Persistent compilation cache hit for 'jit_train_step'"  # jax's own log line (JAX_LOG_COMPILES)


def _start(cmd, env, metrics) -> tuple[str, dict]:
  """One start of ``cmd``, stopped with SIGTERM once it logged a step: its stderr and the
  first metrics record it wrote."""
  before = len(metrics.read_text().splitlines()) if metrics.exists() else 0
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None and (
      not metrics.exists() or len(metrics.read_text().splitlines()) <= before):
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  return err, json.loads(metrics.read_text().splitlines()[before])


@pytest.mark.slow
def test_second_start_loads_the_train_step_from_the_cache(tmp_path):
  workdir = tmp_path / "run"
  # The default place (<workdir>/xla_cache): no JAX_COMPILATION_CACHE_DIR (the test session's).
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  env.update(JAX_PLATFORMS="cpu", JAX_LOG_COMPILES="1",
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")  # cache even a fast-compiling step
  cmd = [sys.executable, "train.py", "--config=configs/tiny.py:elas", *TINY_TRAIN_FLAGS,
         "--config.train.steps=100000", "--config.train.ckpt_every=100000",
         "--config.train.eval_every=100000", f"--workdir={workdir}"]
  metrics = workdir / "metrics.jsonl"

  err1, first = _start(cmd, env, metrics)
  assert HIT not in err1
  cache = workdir / compile_cache.CACHE_SUBDIR
  entries = sorted(os.listdir(cache))
  assert [e for e in entries if e.startswith("jit_train_step-")], entries

  err2, second = _start(cmd, env, metrics)  # resumes from the SIGTERM checkpoint
  assert "resumed from step" in err2
  assert HIT in err2  # jax found the first start's entry
  assert "(from the persistent compilation cache)" in err2
  assert ([e for e in os.listdir(cache) if e.startswith("jit_train_step-")]
          == [e for e in entries if e.startswith("jit_train_step-")])  # nothing compiled anew
  # The time saved is reported, not asserted (a timed assertion fails on a loaded machine:
  # 1.94 vs 3.71 s once beside other compiles); the cache hit above is the behaviour.
  print(f"train step compile: first start {first['compile_s']:.2f} s, second {second['compile_s']:.2f} s")


def test_an_explicit_cache_dir_wins_and_the_switch_turns_it_off(tmp_path):
  # The test session sets JAX_COMPILATION_CACHE_DIR (tests/conftest.py): it stays in use.
  explicit = jax.config.jax_compilation_cache_dir
  assert explicit and explicit == os.environ.get("JAX_COMPILATION_CACHE_DIR")
  assert compile_cache.configure(True, str(tmp_path)) == explicit
  assert jax.config.jax_compilation_cache_dir == explicit
  assert not (tmp_path / compile_cache.CACHE_SUBDIR).exists()
  try:
    assert compile_cache.configure(False, str(tmp_path)) is None
    assert jax.config.jax_enable_compilation_cache is False
  finally:
    jax.config.update("jax_enable_compilation_cache", True)
