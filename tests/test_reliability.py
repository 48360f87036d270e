"""Crash safety: SIGKILL anywhere, damaged checkpoints, graceful stops, bad input, workdir lock."""

import glob
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import ROOT, TINY_TRAIN_FLAGS, step_losses, xla_flags

# Every test here starts train.py (most of them several times).
pytestmark = pytest.mark.slow

TINY = ["--config=configs/tiny.py:elas", *TINY_TRAIN_FLAGS]


def train_cmd(workdir, steps=16, ckpt_every=2, extra=()):
  return [sys.executable, "train.py", *TINY, f"--config.train.steps={steps}",
          f"--config.train.ckpt_every={ckpt_every}", f"--config.train.eval_every={steps}",
          f"--workdir={workdir}", *extra]


def run(cmd, timeout=600):
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def final_json(stdout: str) -> dict:
  return json.loads(stdout.strip().splitlines()[-1])


def tree_digest(path) -> str:
  h = hashlib.sha256()
  for f in sorted(glob.glob(os.path.join(path, "**"), recursive=True)):
    if os.path.isfile(f):
      h.update(f.encode())
      h.update(open(f, "rb").read())
  return h.hexdigest()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted 16-step run: its per-step losses and final evaluation."""
  workdir = tmp_path_factory.mktemp("reference")
  p = run(train_cmd(workdir))
  assert p.returncode == 0, p.stderr[-3000:]
  return {"dir": workdir, "losses": step_losses(str(workdir)), "final": final_json(p.stdout)}


def _kill_when(proc, workdir, mode: str, rng: random.Random) -> str:
  """SIGKILL ``proc`` at a random training moment or while a checkpoint is written."""
  metrics = os.path.join(workdir, "metrics.jsonl")
  n0 = len(open(metrics).readlines()) if os.path.exists(metrics) else 0
  deadline = time.time() + 120
  while time.time() < deadline and proc.poll() is None:
    if mode == "checkpoint" and glob.glob(os.path.join(workdir, "checkpoints", "*orbax-checkpoint-tmp*")):
      proc.kill()
      return "during a checkpoint write"
    if mode == "random" and os.path.exists(metrics) and len(open(metrics).readlines()) > n0:
      time.sleep(rng.uniform(0.0, 1.5))
      proc.kill()
      return "at a random moment"
    time.sleep(0.002)
  proc.kill()
  return "late"


def test_sigkill_anywhere_loses_nothing(tmp_path, reference):
  rng = random.Random(0)
  workdir = tmp_path / "killed"
  kills = []
  for mode in ("random", "checkpoint", "random", "checkpoint", "random"):
    proc = subprocess.Popen(train_cmd(workdir), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    kills.append(_kill_when(proc, str(workdir), mode, rng))
    proc.communicate(timeout=60)
    if proc.returncode == 0:  # finished before the kill landed
      break
  assert "during a checkpoint write" in kills, kills  # at least one kill hit an async save
  p = run(train_cmd(workdir))  # the same command, until done
  assert p.returncode == 0, p.stderr[-3000:]
  losses = step_losses(str(workdir))  # asserts no step logged twice
  assert sorted(losses) == list(range(1, 17))  # none skipped
  assert losses == reference["losses"]  # bitwise: float equality
  assert final_json(p.stdout) == {**reference["final"], "workdir": str(workdir)}
  assert not glob.glob(str(workdir / "checkpoints" / "*orbax-checkpoint-tmp*"))
  # final parameters and optimizer state: bitwise equal to the uninterrupted run's
  import jax
  import numpy as np
  from elas_jax import checkpointing, trainer
  cfg, step = checkpointing.load_config(str(workdir))
  abstract = trainer.build(cfg).abstract_state
  killed = checkpointing.restore_state(str(workdir), step, abstract)
  straight = checkpointing.restore_state(str(reference["dir"]), step, abstract)
  for a, b in zip(jax.tree.leaves(killed), jax.tree.leaves(straight)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _copy_run(reference, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(reference["dir"], workdir)
  os.remove(workdir / ".lock") if (workdir / ".lock").exists() else None
  return workdir


def _state_files(workdir, step):
  files = [f for f in glob.glob(str(workdir / "checkpoints" / str(step) / "state" / "**"), recursive=True)
           if os.path.isfile(f) and os.path.getsize(f) > 1000]
  assert files
  return sorted(files, key=os.path.getsize)


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_latest_checkpoint_falls_back_to_an_intact_one(tmp_path, reference, damage):
  workdir = _copy_run(reference, tmp_path)
  target = _state_files(workdir, 16)[-1]  # the largest array file of the newest checkpoint
  data = bytearray(open(target, "rb").read())
  if damage == "truncate":
    data = data[: len(data) // 2]
  else:
    for i in range(len(data) // 3, len(data) // 3 + 64):
      data[i] ^= 0xFF
  open(target, "wb").write(bytes(data))
  p = run(train_cmd(workdir, steps=16) + ["--config.train.steps=18", "--config.train.eval_every=18"])
  assert p.returncode == 0, p.stderr[-3000:]
  assert "checkpoints/16 is damaged" in p.stderr
  assert "resuming from step 14, the newest intact checkpoint" in p.stderr
  assert final_json(p.stdout)["step"] == 18
  assert len(glob.glob(str(workdir / "damaged_checkpoints" / "16-*"))) == 1  # kept, not deleted


def test_no_intact_checkpoint_is_an_error_not_a_fresh_start(tmp_path, reference):
  workdir = _copy_run(reference, tmp_path)
  for step in (12, 14, 16):
    for f in _state_files(workdir, step):
      open(f, "wb").close()  # emptied
  before = tree_digest(workdir / "checkpoints")
  p = run(train_cmd(workdir))
  assert p.returncode == 2 and "Traceback" not in p.stderr
  last = p.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and "none is intact; refusing to start from scratch" in last
  assert tree_digest(workdir / "checkpoints") == before  # nothing touched


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_graceful_stop_checkpoints_and_exits_zero(tmp_path, sig):
  workdir = tmp_path / "run"
  proc = subprocess.Popen(train_cmd(workdir, steps=100000, ckpt_every=100000), cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics = workdir / "metrics.jsonl"
  deadline = time.time() + 300
  while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
    time.sleep(0.2)
  proc.send_signal(sig)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  step = final_json(out)["step"]
  assert f"{signal.Signals(sig).name}: checkpointed step {step}" in err
  assert os.path.isdir(workdir / "checkpoints" / str(step))
  assert max(step_losses(str(workdir))) == step  # the step in progress was finished and logged


def test_second_run_on_a_busy_workdir_is_refused(tmp_path):
  workdir = tmp_path / "run"
  first = subprocess.Popen(train_cmd(workdir, steps=100000, ckpt_every=100000), cwd=ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.time() + 300
    while time.time() < deadline and not (workdir / "metrics.jsonl").exists():
      time.sleep(0.2)
    p = run(train_cmd(workdir))
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "is in use by a running training (pid" in p.stderr.strip().splitlines()[-1]
  finally:
    first.send_signal(signal.SIGTERM)
    first.communicate(timeout=300)
  assert first.returncode == 0


def test_incompatible_config_on_resume_is_reported(tmp_path, reference):
  workdir = _copy_run(reference, tmp_path)
  before = tree_digest(workdir / "checkpoints")
  p = run(train_cmd(workdir, extra=["--config.model.rank=8"]))
  assert p.returncode == 2 and "Traceback" not in p.stderr
  last = p.stderr.strip().splitlines()[-1]
  assert "config.model.rank = 8 but the checkpoint in" in last and "was written with 16" in last
  assert tree_digest(workdir / "checkpoints") == before


BAD_INPUT = [
    (["--config.model.rnak=4"], "config.model.rnak: no such config field"),
    (["--config.train.steps=ten"], "--config.train.steps=ten"),
    (["--config.train.batch_size=0"], "config.train.batch_size = 0: must be a positive integer"),
    (["--config.model.d_model=-64"], "config.model.d_model = -64: must be a positive integer"),
    (["--config.model.rank=64"], "config.model.rank = 64: must be smaller than"),
    (["--config.train.batch_size=6", "--config.mesh.data=4"], "needs 4 devices but 1 are available"),
    (["--config.data.tokenizer=/nonexistent/spm.model"], "config.data.tokenizer = '/nonexistent/spm.model': file does not exist"),
    (["--config.data.source=files", "--config.data.train_files=/nonexistent/*.jsonl",
      "--config.data.tokenizer=__TOK__"], "config.data.train_files: '/nonexistent/*.jsonl' matches no file"),
    (["--config=configs/tiny.py:turbo"], "variant 'turbo'"),
]


@pytest.mark.parametrize("extra,needle", BAD_INPUT)
def test_bad_input_is_one_line_and_touches_nothing(tmp_path, reference, extra, needle):
  workdir = _copy_run(reference, tmp_path)
  before = tree_digest(workdir / "checkpoints")
  if any("__TOK__" in e for e in extra):
    from elas_jax.data import tokenizer as tokenizer_lib
    tok = tokenizer_lib.train_sample_tokenizer(4096)
    extra = [e.replace("__TOK__", tok) for e in extra]
  p = run(train_cmd(workdir) + list(extra), timeout=300)
  assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
  assert "Traceback" not in p.stderr, p.stderr[-2000:]
  errors = [l for l in p.stderr.splitlines() if l.startswith("error: ")]
  assert len(errors) == 1 and needle in errors[0], p.stderr[-2000:]
  assert tree_digest(workdir / "checkpoints") == before


def test_batch_not_divisible_by_devices(tmp_path):
  code = ("import sys; sys.argv = ['train.py'] + sys.argv[1:]; import runpy; "
          "runpy.run_path('train.py', run_name='__main__')")
  env = dict(os.environ, XLA_FLAGS=xla_flags(4))
  p = subprocess.run([sys.executable, "-c", code, *train_cmd(tmp_path / "w")[2:],
                      "--config.train.batch_size=6"], cwd=ROOT, env=env, capture_output=True,
                     text=True, timeout=300)
  assert p.returncode == 2 and "Traceback" not in p.stderr
  assert "config.train.batch_size = 6 is not divisible by the 4-way data x fsdp split" in p.stderr


# ------------------------------------------------------- storage faults


def _du(path) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def _one_error_line(p) -> str:
  assert p.returncode == 2, (p.returncode, p.stderr[-3000:])
  assert "Traceback" not in p.stderr, p.stderr[-3000:]
  errors = [l for l in p.stderr.splitlines() if l.startswith("error: ")]
  assert len(errors) == 1, p.stderr[-3000:]
  return errors[0][len("error: "):]


def _start(workdir) -> subprocess.Popen:
  """A long training; faulthandler on, so that a hang can be shown (:func:`_outcome`)."""
  return subprocess.Popen(train_cmd(workdir, steps=100000), cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONFAULTHANDLER="1"))


def _outcome(proc, timeout=300) -> subprocess.CompletedProcess:
  """The finished run; a run still going after ``timeout`` s fails the test with the
  stacks of all its threads (SIGABRT makes faulthandler print them)."""
  try:
    out, err = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.send_signal(signal.SIGABRT)
    out, err = proc.communicate(timeout=60)
    pytest.fail(f"the run did not end within {timeout} s after the fault; its threads:\n{err[-8000:]}")
  finally:
    proc.kill()
  return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _wait_for_steps(proc, workdir, n: int, with_checkpoint: bool = False) -> None:
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if (os.path.exists(metrics) and len(open(metrics).readlines()) >= n
        and (not with_checkpoint or any(d.isdigit() for d in os.listdir(os.path.join(workdir, "checkpoints"))))):
      return
    time.sleep(0.05)
  proc.kill()
  raise AssertionError(f"the run did not get going: {proc.communicate()[1][-3000:]}")


def test_full_disk_while_checkpointing_is_one_line_and_loses_nothing(tmp_path, reference):
  from tests.helpers import mounted_tmpfs
  # Room for one checkpoint and a half (and the metrics): the save of step 4 fails.
  room = int(1.5 * _du(reference["dir"] / "checkpoints" / "16")) + (256 << 10)
  with mounted_tmpfs(tmp_path / "disk", f"{room >> 10}k") as disk:
    workdir = disk / "run"
    line = _one_error_line(run(train_cmd(workdir)))
    assert line.startswith(f"{workdir}/checkpoints/4.orbax-checkpoint-tmp/"), line
    assert ": No space left on device; training stopped. Last intact checkpoint: step 2 in " in line
    assert [d for d in os.listdir(workdir / "checkpoints") if d.isdigit()] == ["2"]
    subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)  # space freed
    p = run(train_cmd(workdir))  # the same command
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed from step 2" in p.stderr
    assert step_losses(str(workdir)) == reference["losses"]  # bitwise, every step once
    assert final_json(p.stdout) == {**reference["final"], "workdir": str(workdir)}
    assert not glob.glob(str(workdir / "checkpoints" / "*orbax-checkpoint-tmp*"))


def test_workdir_turning_read_only_is_one_line_and_keeps_the_last_checkpoint(tmp_path):
  from tests.helpers import mounted_ext4
  with mounted_ext4(tmp_path / "disk", tmp_path / "ext4.img") as trigger:
    workdir = tmp_path / "disk" / "run"
    proc = _start(workdir)
    _wait_for_steps(proc, workdir, 4, with_checkpoint=True)
    with open(trigger, "w") as f:  # the kernel's reaction to a disk error: read-only, at once
      f.write("1")
    line = _one_error_line(_outcome(proc))
    path, _, rest = line.partition(": ")
    assert path.startswith(str(workdir)), line
    assert rest.split(";")[0] in ("Read-only file system", "Input/output error"), line
    step = int(rest.split("Last intact checkpoint: step ")[1].split()[0])
    # nothing lost: that checkpoint restores from the read-only disk, checksums verified
    from elas_jax import checkpointing, trainer
    cfg, _ = checkpointing.load_config(str(workdir), step)
    state = checkpointing.restore_state(str(workdir), step, trainer.build(cfg).abstract_state)
    assert int(state.step) == step


def test_workdir_deleted_during_training_is_one_line(tmp_path):
  workdir = tmp_path / "run"
  proc = _start(workdir)
  _wait_for_steps(proc, workdir, 3)
  shutil.rmtree(workdir, ignore_errors=True)  # races with a checkpoint write: may leave parts
  line = _one_error_line(_outcome(proc))
  assert line.startswith(f"{workdir}: the workdir was deleted, moved or unmounted during training; "
                         "training stopped"), line
