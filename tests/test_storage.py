"""Storage faults (full disk, read-only or vanished workdir) become one line naming the
path, the cause and the last intact checkpoint. In-process parts here; the train.py
runs on small filesystems are in test_reliability.py."""

import errno
import logging
import os
import sys
import threading
import time

import grain
import pytest

from elas_jax import checkpointing, storage, trainer
from tests.helpers import mounted_tmpfs, tiny_train_config

# Messages as tensorstore (orbax's array writer) produced them in the faults of
# test_reliability.py, and what they must be read as.
TENSORSTORE = [
    ('RESOURCE_EXHAUSTED: Error writing "opt_state.nu.blocks.0.attn.k.b.value/0.0" in OCDBT database at '
     'local file "/w/checkpoints/4.orbax-checkpoint-tmp/state.orbax-checkpoint-tmp/ocdbt.process_0/": Failed '
     'writing: "/w/checkpoints/4.orbax-checkpoint-tmp/state.orbax-checkpoint-tmp/ocdbt.process_0/d/b4b4": '
     "Failed to write 911686 bytes to file 12: No space left on device [os_error_code='28']",
     ("/w/checkpoints/4.orbax-checkpoint-tmp/state.orbax-checkpoint-tmp/ocdbt.process_0/d/b4b4",
      "No space left on device")),
    ("PERMISSION_DENIED: Error calling fsync on parent directory of: /w/checkpoints/6.orbax-checkpoint-tmp/"
     "state.orbax-checkpoint-tmp/d/ac8f: Failed to fsync directory: Read-only file system "
     "[os_error_code='30']",
     ("/w/checkpoints/6.orbax-checkpoint-tmp/state.orbax-checkpoint-tmp/d/ac8f", "Read-only file system")),
    ('NOT_FOUND: Error writing "params.embed/0.0" in OCDBT database at local file "/w/checkpoints/4.orbax-'
     'checkpoint-tmp/state.orbax-checkpoint-tmp/ocdbt.process_0/": Error reading Byte range [15350, 16163) '
     'of local file "/w/checkpoints/4.orbax-checkpoint-tmp/state.orbax-checkpoint-tmp/ocdbt.process_0/d/bb8e"',
     ("/w/checkpoints/4.orbax-checkpoint-tmp/state.orbax-checkpoint-tmp/ocdbt.process_0/d/bb8e",
      "No such file or directory")),
]


@pytest.mark.parametrize("message,want", TENSORSTORE)
def test_tensorstore_faults_are_read_as_path_and_cause(message, want):
  wrapped = RuntimeError("save failed")
  wrapped.__cause__ = ValueError(message)  # found through the exception chain
  assert storage.fault_of(wrapped, "/w") == want


def test_what_is_and_is_not_a_storage_fault():
  assert storage.fault_of(OSError(errno.ENOSPC, "x", "/w/metrics.jsonl"), "/w") == (
      "/w/metrics.jsonl", "No space left on device")
  assert storage.fault_of(OSError(errno.EROFS, "x"), "/w") == (None, "Read-only file system")
  # a missing file inside the workdir is a fault; a missing input elsewhere is not
  assert storage.fault_of(FileNotFoundError(errno.ENOENT, "x", "/w/checkpoints"), "/w") is not None
  assert storage.fault_of(FileNotFoundError(errno.ENOENT, "x", "/data/c4-train.json.gz"), "/w") is None
  assert storage.fault_of(FileNotFoundError(errno.ENOENT, "x", "/w2/x"), "/w") is None
  assert storage.fault_of(ValueError("shapes (3,) and (4,) do not match"), "/w") is None
  assert storage.fault_of(ValueError("INVALID_ARGUMENT: bad dtype"), "/w") is None


def _fill(directory) -> None:
  """Fills the filesystem of ``directory`` up to its last page."""
  fd = os.open(os.path.join(directory, "filler"), os.O_WRONLY | os.O_CREAT)
  try:
    while True:
      os.write(fd, b"\0" * 4096)
  except OSError as e:
    assert e.errno == errno.ENOSPC
  finally:
    os.close(fd)


def _du(path) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def test_metrics_on_a_full_disk_fail_in_this_thread_naming_the_file(tmp_path):
  with mounted_tmpfs(tmp_path / "disk", "256k") as disk:
    workdir = os.path.join(disk, "run")
    os.makedirs(os.path.join(workdir, "checkpoints", "4"))  # an intact checkpoint to name
    before = threading.active_count()
    writer = trainer.MetricWriter(workdir, start_step=0)
    assert threading.active_count() == before  # no writer thread that could die unseen
    record = {"loss": 1.25, **{f"zero_frac/layer{i}": 0.5 for i in range(24)}}
    writer.write(1, record)
    _fill(disk)
    with pytest.raises(storage.StorageError) as e:
      with storage.reported(workdir):
        for step in range(2, 2000):  # a page with room left takes a few records
          writer.write(step, record)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.split(":")[0] in (os.path.join(workdir, "metrics.jsonl"), os.path.join(workdir, "tensorboard"))
    assert "No space left on device; training stopped. Last intact checkpoint: step 4 in " in msg
    storage.close_all(writer.close, failing=True)  # closing again hits the full disk: dropped


def test_tensorboard_events_on_a_full_disk_fail_in_this_thread(tmp_path):
  with mounted_tmpfs(tmp_path / "disk", "128k") as disk:
    events = trainer.ScalarEvents(os.path.join(disk, "tensorboard"), purge_step=1)
    _fill(disk)
    with pytest.raises(OSError) as e:
      for step in range(1, 2000):
        events.write(step, {f"zero_frac/layer{i}": 0.5 for i in range(24)})
    assert e.value.errno == errno.ENOSPC


def test_failed_background_save_is_raised_at_once_in_one_line(tmp_path, caplog):
  cfg = tiny_train_config("elas")
  state = trainer.build(cfg, with_tokenizer=False).init_state()

  data = iter(grain.MapDataset.range(8).to_iter_dataset())
  probe = checkpointing.manager(str(tmp_path / "probe"))  # the size of one checkpoint
  checkpointing.save(probe, 1, state, data, cfg)
  probe.close()
  size = _du(tmp_path / "probe" / "checkpoints" / "1")
  with mounted_tmpfs(tmp_path / "disk", f"{int(size * 1.5) // 1024}k") as disk:
    workdir = os.path.join(disk, "run")
    with pytest.raises(storage.StorageError) as e:
      with storage.reported(workdir):
        mngr = checkpointing.manager(workdir)
        checkpointing.save(mngr, 1, state, data, cfg)
        mngr.wait_until_finished()  # step 1 fits
        checkpointing.save(mngr, 2, state, data, cfg)  # step 2 does not: fails in the background
        deadline = time.time() + 60
        try:
          while time.time() < deadline:  # as the train loop does after every step
            checkpointing.raise_failed_save(mngr)
            time.sleep(0.05)
        finally:
          storage.close_all(mngr.close, failing=True)
    msg = str(e.value)
    # where the disk filled: inside step 2's checkpoint, or (a write orbax names without its
    # directory, e.g. commit_success.txt, as in 1 CI run of many) the workdir
    where = msg.split(": No space left on device")[0]
    assert (where == workdir
            or where.startswith(os.path.join(workdir, "checkpoints", "2.orbax-checkpoint-tmp"))), msg
    assert "No space left on device; training stopped. Last intact checkpoint: step 1" in msg
    assert storage.intact_checkpoints(workdir) == [1]
  # orbax's own reports of it (tracebacks logged from its threads) are silenced
  assert [r.getMessage()[:200] for r in caplog.records if r.exc_info] == []


def test_a_save_thread_failing_at_exit_after_the_fault_is_silent(tmp_path, monkeypatch, caplog):
  # After a run stopped on a storage fault, an orbax save thread still running at exit fails
  # to schedule its next write ("cannot schedule new futures after interpreter shutdown"),
  # which orbax logs through absl (another thread would print it through threading.excepthook):
  # dropped. The same error before any fault, and any other error, are still reported.
  printed = []
  monkeypatch.setattr(threading, "excepthook", lambda args: printed.append(args.exc_value))
  monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)  # restored after the test
  for name in storage._Quiet.LOGGERS:  # without the filters a faulted run left in this process
    monkeypatch.setattr(logging.getLogger(name), "filters", [])

  def in_thread(exc):
    def fail():
      raise exc
    t = threading.Thread(target=fail)
    t.start()
    t.join()

  shutdown = RuntimeError("cannot schedule new futures after interpreter shutdown")
  other = ValueError("an unrelated failure")
  workdir = tmp_path / "run"
  def log(exc):  # as orbax's _SignalingThread.run does
    logging.getLogger("absl").error("_SignalingThread.run() raised an exception", exc_info=exc)

  with pytest.raises(storage.StorageError, match="No space left on device; training stopped"):
    with storage.reported(str(workdir)):
      in_thread(shutdown)  # no fault yet: reported
      log(shutdown)
      raise OSError(errno.ENOSPC, "No space left on device", str(workdir / "metrics.jsonl"))
  in_thread(shutdown)  # after the fault: dropped
  log(shutdown)
  in_thread(other)
  log(other)
  assert printed == [shutdown, other]
  assert [r.exc_info[1] for r in caplog.records if r.exc_info] == [shutdown, other]


def test_the_line_names_the_workdir_where_the_error_names_no_directory(tmp_path):
  # orbax writes its commit marker by name only: OSError(EROFS, ..., "commit_success.txt")
  os.makedirs(tmp_path / "checkpoints" / "8")
  with pytest.raises(storage.StorageError) as e:
    with storage.reported(str(tmp_path)):
      raise OSError(errno.EROFS, "Read-only file system", "commit_success.txt")
  assert str(e.value).startswith(f"{tmp_path} (commit_success.txt): Read-only file system; training "
                                 f"stopped. Last intact checkpoint: step 8 in {tmp_path}/checkpoints; ")
  with pytest.raises(storage.StorageError, match=f"^{tmp_path}: No space left on device; "):
    with storage.reported(str(tmp_path)):
      raise OSError(errno.ENOSPC, "No space left on device")
  with pytest.raises(ValueError, match="not a storage fault"):  # anything else passes through
    with storage.reported(str(tmp_path)):
      raise ValueError("not a storage fault")
