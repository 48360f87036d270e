"""Checkpoints that survive being killed, truncated or corrupted, and the workdir lock.

* Saves go through orbax's ``CheckpointManager``: asynchronous, written to a
  temporary directory and renamed when complete, so a process killed mid-save
  leaves no half checkpoint under a step name (leftover temporary directories
  are removed at start-up).
* Each checkpoint also stores an integrity record: a position-aware checksum
  of every array of the train state (:func:`checksums`) and the config. A
  restore recomputes the checksums; a checkpoint that fails to read or whose
  checksums differ is reported and the next older one is tried. Checkpoints
  written before (an order-blind sum of the bits) are verified with that sum.
* A workdir holding checkpoints of which none is intact is an error: training
  never restarts from scratch over it silently.
* ``WorkdirLock``: an exclusive ``flock`` on ``workdir/.lock``, so a second run
  on the same workdir is refused. The OS drops it when the holder dies.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import shutil
import sys
import time
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp

from elas_jax import config_lib
from elas_jax.errors import ConfigError, UserError

ITEMS = ("state", "data", "config", "integrity")
# Fields that may change between a run and its resumption without breaking it.
# The kernel, attention implementation, loss chunking and remat change how a value
# is computed, never the function; scan_layers changes the parameter layout, so it
# is not resumable (elas_jax.stacking converts).
RESUMABLE_CHANGES = {"model": {"kernel", "remat", "attention", "attention_block", "loss_chunk"},
                     "optimizer": set(), "train": None, "data": None, "mesh": None}


class CheckpointError(UserError):
  """No usable checkpoint where one is needed."""


def manager(workdir: str, keep: int = 3, *, read_only: bool = False) -> ocp.CheckpointManager:
  """The run's orbax manager. ``read_only`` (evaluation, export, generation)
  neither creates directories nor removes temporary ones, which may be a save
  in progress by a run still training in the same workdir."""
  # A save's directories are created in the calling thread: created in orbax's background
  # thread, a full or read-only disk there left the data iterator's (synchronous) save
  # waiting 300 s for a creation signal that never came, then raising a bare timeout;
  # here it raises the OSError at once, which storage.reported reports in one line.
  # The arrays are still written in the background.
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=not read_only,
                                         create=not read_only, cleanup_tmp_directories=not read_only,
                                         read_only=read_only,
                                         async_options=ocp.AsyncOptions(
                                             create_directories_asynchronously=False))
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")),
                               options=options, item_names=ITEMS)


def _as_uint32(x: jax.Array) -> jax.Array:
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


# The checksum scheme of the integrity record ("scheme"); records without one
# hold the legacy bit sums (:func:`legacy_checksums`).
CHECKSUM_SCHEME = "fmix32-position-sum"


def _fmix32(h: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finaliser: a bijection in which every input bit flips
  about half of the output bits (uint32 arithmetic wraps mod 2^32)."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _flat_index(shape: tuple[int, ...]) -> jax.Array:
  """The row-major flat index of every element (uint32, mod 2^32), built from iotas
  so that each device computes its own shard's global indices."""
  index = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for dim in reversed(range(len(shape))):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, dim) * jnp.uint32(stride % 2**32)
    stride *= shape[dim]
  return index


@jax.jit
def _positional_checksums(state) -> list[jax.Array]:
  # Each element contributes a mix of its bits and its position; the terms are
  # summed mod 2^32, exactly and in any order, so the result does not depend on
  # the sharding or the number of processes. A moved or changed element changes
  # its term pseudo-randomly: swapped chunks or compensating flips are caught
  # (but for a 2^-32 chance), which a plain sum of the bits misses.
  out = []
  for x in jax.tree.leaves(state):
    salt = _fmix32(_flat_index(x.shape) + jnp.uint32(0x9E3779B9))
    out.append(jnp.sum(_fmix32(_as_uint32(x) ^ salt), dtype=jnp.uint32))
  return out


@jax.jit
def _bit_sums(state) -> list[jax.Array]:
  return [jnp.sum(_as_uint32(x), dtype=jnp.uint32) for x in jax.tree.leaves(state)]


def checksums(state) -> list[int]:
  """Position-aware checksum of every array: ``sum_i fmix32(bits_i ^ fmix32(i + c))``
  mod 2^32 over its elements ``i`` (row-major), computed on the devices."""
  return [int(c) for c in jax.device_get(_positional_checksums(state))]


def legacy_checksums(state) -> list[int]:
  """The checksum of checkpoints written before :data:`CHECKSUM_SCHEME`: every
  array's bits summed mod 2^32 (blind to where the bits are)."""
  return [int(c) for c in jax.device_get(_bit_sums(state))]


def check_scheme(integrity: dict, where: str) -> None:
  """A record whose checksum scheme this version does not know is an error, not damage."""
  scheme = integrity.get("scheme")
  if scheme is not None and scheme != CHECKSUM_SCHEME:
    raise CheckpointError(f"{where}: unknown checksum scheme {scheme!r} (written by a newer "
                          "ELAS-JAX?); upgrade to restore it")


def checksums_match(state, integrity: dict) -> bool:
  """Whether ``state`` has the checksums recorded in ``integrity``, by the record's scheme."""
  if integrity.get("scheme") is None:
    return legacy_checksums(state) == integrity["checksums"]
  return checksums(state) == integrity["checksums"]


def save(mngr: ocp.CheckpointManager, step: int, state, data_iter, cfg) -> None:
  integrity = {"scheme": CHECKSUM_SCHEME, "checksums": checksums(state),
               "n_arrays": len(jax.tree.leaves(state))}
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iter),
      config=ocp.args.JsonSave(cfg.to_dict()), integrity=ocp.args.JsonSave(integrity)), force=True)


def raise_failed_save(mngr: ocp.CheckpointManager) -> None:
  """Raises the error of an asynchronous save that failed (a full disk, say) as soon
  as it has ended; orbax itself raises it only at the next save."""
  if not mngr.is_saving_in_progress():
    mngr.wait_until_finished()  # returns at once, or re-raises the failed save's error


def _restore_target(abstract_state, integrity: dict):
  """The abstract tree to restore a checkpoint into.

  Checkpoints written before the train state was a dataclass hold one more
  array: an unused ``rng`` key. Such a checkpoint (recognised by its recorded
  array count) is restored with that key, checked, and the key dropped by
  :func:`_as_state`.
  """
  if integrity["n_arrays"] == len(jax.tree.leaves(abstract_state)) + 1:
    fields = {f.name: getattr(abstract_state, f.name) for f in dataclasses.fields(abstract_state)}
    return {**fields, "rng": jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=abstract_state.step.sharding)}
  return abstract_state


def _as_state(restored, abstract_state):
  if isinstance(restored, dict):  # a checkpoint from before TrainState
    return abstract_state.replace(**{k: v for k, v in restored.items() if k != "rng"})
  return restored


def check_compatible(saved: dict, cfg, where: str) -> None:
  """Model and optimizer structure must match the checkpoint's."""
  now = cfg.to_dict()
  saved = config_lib.complete_saved(saved)  # checkpoints older than some fields
  for section, allowed in RESUMABLE_CHANGES.items():
    if allowed is None:
      continue
    for key, value in saved.get(section, {}).items():
      if key in allowed or now.get(section, {}).get(key) == value:
        continue
      if (section, key) == ("model", "scan_layers"):
        raise ConfigError(
            f"config.model.scan_layers = {now['model'].get(key)!r} but the checkpoint in {where} stores "
            f"{'stacked' if value else 'per-layer'} block parameters (scan_layers = {value!r}); resume "
            "with the checkpoint's value or convert with stacking.stack_layers / stacking.unstack_layers")
      raise ConfigError(
          f"config.{section}.{key} = {now.get(section, {}).get(key)!r} but the checkpoint in {where} "
          f"was written with {value!r}; resume with the checkpoint's value or use another --workdir")


def _warn(msg: str) -> None:
  print(f"warning: {msg}", file=sys.stderr, flush=True)


def restore_latest_intact(mngr: ocp.CheckpointManager, abstract_state, data_iter, cfg, workdir: str
                          ) -> tuple[int, Any] | None:
  """``(step, state)`` of the newest intact checkpoint (restoring ``data_iter``), or None.

  Raises :class:`CheckpointError` when checkpoints exist but none is intact,
  and :class:`ConfigError` when the config does not fit the checkpoint.
  """
  steps = sorted(mngr.all_steps(), reverse=True)
  if not steps:
    return None
  damaged = []
  for step in steps:
    where = os.path.join(workdir, "checkpoints", str(step))
    try:
      meta = mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore(),
                                                        integrity=ocp.args.JsonRestore()))
    except Exception as e:  # noqa: BLE001 - any read failure means a damaged checkpoint
      damaged.append(step)
      _warn(f"checkpoint {where} is damaged ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            "trying an older one")
      continue
    check_compatible(meta["config"], cfg, where)
    check_scheme(meta["integrity"], where)
    try:
      restored = mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(_restore_target(abstract_state, meta["integrity"])),
          data=grain.checkpoint.CheckpointRestore(data_iter)))
      if not checksums_match(restored["state"], meta["integrity"]):
        raise ValueError("array checksums do not match the ones recorded at save time")
      state = _as_state(restored["state"], abstract_state)
    except Exception as e:  # noqa: BLE001
      damaged.append(step)
      _warn(f"checkpoint {where} is damaged ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            "trying an older one")
      continue
    if damaged:
      # Newer damaged checkpoints would block saving those steps again: move
      # them aside (kept for inspection, never deleted).
      aside = os.path.join(workdir, "damaged_checkpoints")
      os.makedirs(aside, exist_ok=True)
      for bad in damaged:
        target = os.path.join(aside, f"{bad}-{int(time.time())}")
        shutil.move(os.path.join(workdir, "checkpoints", str(bad)), target)
      mngr.reload()
      _warn(f"resuming from step {step}, the newest intact checkpoint; damaged checkpoints "
            f"{damaged} moved to {aside}")
    return step, state
  raise CheckpointError(
      f"{os.path.join(workdir, 'checkpoints')} holds checkpoints (steps {sorted(steps)}) but none is "
      "intact; refusing to start from scratch over them. Move them away or use another --workdir")


def truncate_metrics(workdir: str, step: int) -> None:
  """Drop metric records after ``step`` (they belong to progress that was lost)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path) or jax.process_index() != 0:
    return
  kept, dropped = [], 0
  with open(path) as f:
    for line in f:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:  # a line cut short by a kill
        dropped += 1
        continue
      if record.get("step", 0) <= step:
        kept.append(line if line.endswith("\n") else line + "\n")
      else:
        dropped += 1
  if dropped:
    with open(path + ".tmp", "w") as f:
      f.writelines(kept)
    os.replace(path + ".tmp", path)


class WorkdirLock:
  """An exclusive lock on a workdir for the lifetime of a run (process 0)."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, ".lock")
    self._f = None

  def __enter__(self):
    if jax.process_index() != 0:
      return self
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    self._f = open(self.path, "a+")
    try:
      fcntl.flock(self._f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      self._f.seek(0)
      holder = self._f.read().strip() or "another process"
      self._f.close()
      raise UserError(f"{os.path.dirname(self.path)} is in use by a running training ({holder}); "
                      "wait for it, stop it, or use another --workdir") from None
    self._f.seek(0)
    self._f.truncate()
    self._f.write(f"pid {os.getpid()}\n")
    self._f.flush()
    return self

  def __exit__(self, *exc):
    if self._f is not None:
      fcntl.flock(self._f, fcntl.LOCK_UN)
      self._f.close()


def load_config(workdir: str, step: int | None = None) -> tuple[ml_collections.ConfigDict, int]:
  """The config saved with a checkpoint (the latest by default)."""
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    raise CheckpointError(f"{workdir}: no checkpoints directory (is this a training --workdir?)")
  mngr = manager(workdir, read_only=True)
  try:
    steps = sorted(mngr.all_steps())
    if not steps:
      raise CheckpointError(f"{workdir}/checkpoints: no checkpoint found")
    if step is None:
      step = steps[-1]
    elif step not in steps:
      raise CheckpointError(f"{workdir}/checkpoints: no checkpoint for step {step} (have {steps})")
    saved = mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
  finally:
    mngr.close()
  return ml_collections.ConfigDict(config_lib.complete_saved(saved)), step


def restore_state(workdir: str, step: int, abstract_state) -> Any:
  """The train state of checkpoint ``step``, checked against its recorded checksums."""
  mngr = manager(workdir, read_only=True)
  try:
    integrity = mngr.restore(step, args=ocp.args.Composite(integrity=ocp.args.JsonRestore()))["integrity"]
    state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(
        _restore_target(abstract_state, integrity))))["state"]
  except Exception as e:  # noqa: BLE001
    raise CheckpointError(f"{workdir}/checkpoints/{step} cannot be read ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200]})") from None
  finally:
    mngr.close()
  check_scheme(integrity, f"{workdir}/checkpoints/{step}")
  if not checksums_match(state, integrity):
    raise CheckpointError(f"{workdir}/checkpoints/{step} is damaged: array checksums do not match")
  return _as_state(state, abstract_state)

