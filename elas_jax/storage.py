"""Storage faults of a long run, reported in one line with nothing lost.

A run writes to its workdir for days: ``metrics.jsonl``, TensorBoard events and
orbax checkpoints (in orbax's background threads). The disk fills up, the
filesystem turns read-only (ext4 ``errors=remount-ro``, a failing NFS server)
or the workdir disappears (deleted, moved, unmounted). Wherever such a fault
surfaces, :func:`reported` turns it into one :class:`StorageError` line naming
the path, the cause and the newest completely written checkpoint, and the run
stops; once the storage is fixed, the same command resumes from that
checkpoint. Nothing intact is lost: orbax writes a checkpoint into a temporary
directory and renames it when complete, so a save that fails leaves the older
ones as they were (and the next start removes the temporary directory).

:class:`Watch` notices a vanished workdir, which writes to already open files
would not (they would land in deleted files).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import sys
import threading
from collections.abc import Iterator

from elas_jax.errors import UserError

# errno values that mean "the storage", not "the program"; a missing path counts
# only inside the workdir (elsewhere it is a missing input, reported as such).
FAULTS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.ESTALE, errno.EACCES}
MISSING = {errno.ENOENT, errno.ENOTDIR}

# tensorstore (orbax's array writer) reports the OS error inside its message, or
# only its status for a file that vanished.
_TS_ERRNO = re.compile(r"os_error_code='?(\d+)")
_TS_NOT_FOUND = re.compile(r"^NOT_FOUND: ")
_PATH = re.compile(r"""(?:^|[\s"'(:])(/[^\s"'\\:,)]+)""")


class StorageError(UserError):
  """The workdir's storage failed (full, read-only, gone): path, cause, last intact checkpoint."""


def fault_of(exc: BaseException, workdir: str) -> tuple[str | None, str] | None:
  """``(path, cause)`` when ``exc`` (or an exception it wraps) is a storage fault, else None."""
  root = os.path.abspath(workdir)
  seen = set()
  while exc is not None and id(exc) not in seen:
    seen.add(id(exc))
    code, path = None, None
    if isinstance(exc, OSError):
      code, path = exc.errno, exc.filename
    elif (m := _TS_ERRNO.search(str(exc))) or _TS_NOT_FOUND.match(str(exc)):
      # tensorstore names the database, then the file that failed: the last path
      code, paths = int(m.group(1)) if m else errno.ENOENT, _PATH.findall(str(exc))
      path = paths[-1] if paths else None
    inside = path is None or os.path.commonpath([os.path.abspath(str(path)), root]) == root
    if code in FAULTS or (code in MISSING and inside):
      return (str(path) if path is not None else None), os.strerror(code)
    exc = exc.__cause__ or exc.__context__
  return None


def intact_checkpoints(workdir: str) -> list[int]:
  """Steps of the completely written checkpoints (orbax renames a save's temporary
  directory to the bare step number only once it is complete)."""
  try:
    names = os.listdir(os.path.join(workdir, "checkpoints"))
  except OSError:
    return []
  return sorted(int(n) for n in names if n.isdigit())


def _last_intact(workdir: str) -> str:
  steps = intact_checkpoints(workdir)
  if not steps:
    return "No checkpoint written yet"
  return (f"Last intact checkpoint: step {steps[-1]} in {os.path.join(workdir, 'checkpoints')}; "
          "once the storage is fixed, the same command resumes from it")


class Watch:
  """Notices the workdir disappearing (deleted, moved, unmounted or replaced) during a
  run, and remembers its newest intact checkpoint for the report.

  Looks at the workdir itself and at its lock file (``.lock``, which a running
  training keeps): a deletion racing with a checkpoint write may leave the
  directory in place, emptied, but never the lock file.
  """

  def __init__(self, workdir: str):
    self.workdir = workdir
    self._identity = self._stat(workdir)
    self._lock = None  # the lock file's identity, once it exists
    self._checkpoints_mtime = None
    self.last_intact: int | None = None
    self._note_checkpoints()

  @staticmethod
  def _stat(path: str) -> tuple[int, int, int] | None:
    try:
      st = os.stat(path)
    except OSError:
      return None
    return st.st_dev, st.st_ino, st.st_mtime_ns

  def _note_checkpoints(self) -> None:
    st = self._stat(os.path.join(self.workdir, "checkpoints"))
    if st is not None and st[2] != self._checkpoints_mtime:  # a save was renamed into place
      self._checkpoints_mtime = st[2]
      steps = intact_checkpoints(self.workdir)
      self.last_intact = steps[-1] if steps else None

  def gone(self) -> bool:
    """Whether the workdir, or its lock file once seen, is no longer the one of this run."""
    now = self._stat(self.workdir)
    if now is None or now[:2] != self._identity[:2]:
      return True
    lock = self._stat(os.path.join(self.workdir, ".lock"))
    if self._lock is None:
      self._lock = lock and lock[:2]
      return False
    return lock is None or lock[:2] != self._lock

  def check(self) -> None:
    """Raises :class:`StorageError` if the workdir is no longer the one the run started in."""
    if self.gone():
      last = (f"the last intact checkpoint was step {self.last_intact}, deleted with it unless moved"
              if self.last_intact is not None else "no checkpoint had been written")
      raise StorageError(f"{self.workdir}: the workdir was deleted, moved or unmounted during "
                         f"training; training stopped; {last}")
    self._note_checkpoints()


def _at_exit(exc: BaseException) -> bool:
  """The error of a thread still saving when the process exits (on a reported fault)."""
  return isinstance(exc, RuntimeError) and "after interpreter shutdown" in str(exc)


class _Quiet:
  """Drops the other reports of a storage fault, which orbax, asyncio and tensorstore
  print from their own threads, some only at exit:

  * orbax logs (through absl) the traceback of a failed background save, which it
    then re-raises in the main thread;
  * asyncio logs the failed, never awaited write tasks of that save when they are
    collected ("Task exception was never retrieved");
  * tensorstore reports "Event loop is closed" (``sys.unraisablehook``) for each
    write of that save still pending when orbax closed its event loop;
  * a save thread still running when the process exits on the fault fails to
    schedule its next write ("cannot schedule new futures after interpreter
    shutdown"), which orbax logs (and any other thread prints through
    ``threading.excepthook``).

  Only records whose exception is a storage fault are dropped (and those
  unraisable errors), or any exception record once the workdir has vanished, or
  that exit error once the fault was reported: anything else is still printed.
  """

  LOGGERS = ("absl", "asyncio")

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.watch: Watch | None = None  # set once the workdir exists
    self.faulted = False  # set once the run has stopped on a storage fault
    self._previous_hook = None
    self._previous_thread_hook = None

  def silenced(self, exc: BaseException) -> bool:
    """Whether ``exc``, reported from another thread, is the run's storage fault again."""
    # Once the workdir has vanished, orbax's threads fail in ways that name no storage
    # fault (e.g. "No ArrayMetadata found" for a save whose files were deleted under it):
    # all of them are that one fault, which the run reports.
    if self.watch is not None and self.watch.gone():
      return True
    return fault_of(exc, self.workdir) is not None or (self.faulted and _at_exit(exc))

  def filter(self, record: logging.LogRecord) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    return exc is None or not self.silenced(exc)

  def _unraisable(self, unraisable) -> None:
    if not (unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == "Event loop is closed"):
      self._previous_hook(unraisable)

  def _thread_exception(self, args) -> None:
    if args.exc_value is None or not self.silenced(args.exc_value):
      self._previous_thread_hook(args)

  def install(self) -> None:
    for name in self.LOGGERS:
      logging.getLogger(name).addFilter(self)
    self._previous_hook, sys.unraisablehook = sys.unraisablehook, self._unraisable
    self._previous_thread_hook, threading.excepthook = threading.excepthook, self._thread_exception

  def remove(self) -> None:
    for name in self.LOGGERS:
      logging.getLogger(name).removeFilter(self)
    sys.unraisablehook = self._previous_hook
    threading.excepthook = self._previous_thread_hook


@contextlib.contextmanager
def reported(workdir: str) -> Iterator[Watch]:
  """Creates ``workdir`` and yields its :class:`Watch`; storage faults inside become one
  :class:`StorageError` line, other errors pass (unless the workdir vanished under them).

  After a fault, the late reports of it stay silenced for the rest of the process
  (the run has ended on it; they come as its objects are collected, at exit).
  """
  quiet = _Quiet(workdir)
  quiet.install()
  watch = None
  try:
    os.makedirs(workdir, exist_ok=True)
    watch = quiet.watch = Watch(workdir)
    yield watch
  except StorageError:
    raise
  except Exception as e:  # noqa: BLE001 - classified below, re-raised when not a storage fault
    if watch is not None and watch.gone():
      try:
        watch.check()
      except StorageError as gone:  # the root cause of whatever failed (orbax's errors vary)
        quiet.faulted = True
        raise gone from e
    fault = fault_of(e, workdir)
    if fault is None:
      quiet.remove()
      raise
    path, cause = fault
    quiet.faulted = True
    if path is None or not os.path.isabs(path):  # orbax names some files without their directory
      path = workdir if path is None else f"{workdir} ({path})"
    raise StorageError(f"{path}: {cause}; training stopped. {_last_intact(workdir)}") from e
  except BaseException:
    quiet.remove()
    raise
  else:
    quiet.remove()


@contextlib.contextmanager
def naming(path: str) -> Iterator[None]:
  """Adds ``path`` to an OSError raised inside without a file name (a write or
  flush on an open file), so that the report names the file."""
  try:
    yield
  except OSError as e:
    if e.filename is not None or e.errno is None:
      raise
    raise OSError(e.errno, e.strerror, path) from e


def close_all(*closers, failing: bool) -> None:
  """Calls every closer. When the run is already ``failing``, their errors (the same
  fault again, e.g. a final flush to a full disk) are dropped so that the first
  error is the one reported; otherwise the first is raised after all ran."""
  first = None
  for close in closers:
    try:
      close()
    except Exception as e:  # noqa: BLE001
      if first is None:
        first = e
  if first is not None and not failing:
    raise first
