"""Checkpoint integrity: the position-aware checksum catches moved data; checkpoints
written with the old order-blind checksum still restore and are still checked."""

import os
import shutil

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from elas_jax import checkpointing, trainer
from tests.helpers import tiny_train_config


@pytest.fixture(scope="module")
def tiny():
  """The shrunken tiny model's config, abstract state and initial state."""
  cfg = tiny_train_config("elas")
  run = trainer.build(cfg, with_tokenizer=False)
  return cfg, run.abstract_state, run.init_state()


def _data_iter():
  return iter(grain.MapDataset.range(8).to_iter_dataset())


def _save(workdir, step, state, cfg, integrity=None):
  """A checkpoint as training writes it, or with the given integrity record."""
  mngr = checkpointing.manager(str(workdir))
  if integrity is None:
    checkpointing.save(mngr, step, state, _data_iter(), cfg)
  else:  # the layout of checkpointing.save, with another record
    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(_data_iter()),
        config=ocp.args.JsonSave(cfg.to_dict()), integrity=ocp.args.JsonSave(integrity)), force=True)
  mngr.wait_until_finished()
  mngr.close()


def _replace_leaf(state, index, new):
  leaves, treedef = jax.tree.flatten(state)
  leaves[index] = jax.device_put(new, leaves[index].sharding)
  return jax.tree.unflatten(treedef, leaves)


def _largest(state) -> int:
  sizes = [x.size for x in jax.tree.leaves(state)]
  return sizes.index(max(sizes))


def _swap_rows(x, n):
  """Rows [0, n) and [n, 2n) exchanged: the same values, moved."""
  return jnp.concatenate([x[n:2 * n], x[:n], x[2 * n:]])


def _legacy_sums(state) -> list[int]:
  """The old checksum, computed here on the host: each array's bits summed mod 2^32."""
  out = []
  for x in jax.tree.leaves(state):
    x = np.asarray(x)
    bits = x.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize])
    out.append(int(bits.astype(np.uint64).sum() % 2**32))
  return out


def _fmix32(h):
  h = h.astype(np.uint64)
  for shift, mult in ((16, 0x85EBCA6B), (13, 0xC2B2AE35)):
    h = ((h ^ (h >> np.uint64(shift))) * np.uint64(mult)) & np.uint64(0xFFFFFFFF)
  return h ^ (h >> np.uint64(16))


def test_checksum_is_the_documented_position_aware_sum(tiny):
  # checksums(): sum_i fmix32(bits_i ^ fmix32(i + 0x9E3779B9)) mod 2^32, i the
  # row-major index; recomputed here on the host with numpy, independently of jax.
  _, _, state = tiny
  want = []
  for x in jax.tree.leaves(state):
    x = np.asarray(x)
    bits = x.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize]).astype(np.uint64).ravel()
    salt = _fmix32((np.arange(bits.size, dtype=np.uint64) + np.uint64(0x9E3779B9)) % 2**32)
    want.append(int(_fmix32(bits ^ salt).sum() % 2**32))
  assert checkpointing.checksums(state) == want
  assert checkpointing.legacy_checksums(state) == _legacy_sums(state)


def test_swapped_chunks_in_a_saved_checkpoint_are_detected(tmp_path, tiny):
  cfg, abstract, state = tiny
  i = _largest(state)  # the embedding table, [vocab, d]
  swapped = _replace_leaf(state, i, _swap_rows(jax.tree.leaves(state)[i], 64))
  assert not np.array_equal(jax.tree.leaves(swapped)[i], jax.tree.leaves(state)[i])
  # The old checksum cannot see it: same bits, other places.
  assert _legacy_sums(swapped) == _legacy_sums(state)
  run, twin = tmp_path / "run", tmp_path / "twin"
  _save(run, 1, state, cfg)
  _save(run, 2, state, cfg)
  _save(twin, 2, swapped, cfg)
  # Checkpoint 2 of the run gets the twin's array files: its own record, swapped rows on disk.
  state_dir = run / "checkpoints" / "2" / "state"
  shutil.rmtree(state_dir)
  shutil.copytree(twin / "checkpoints" / "2" / "state", state_dir)
  with pytest.raises(checkpointing.CheckpointError, match="2 is damaged: array checksums do not match"):
    checkpointing.restore_state(str(run), 2, abstract)
  # Training's restore falls back to the intact checkpoint and moves the damaged one aside.
  mngr = checkpointing.manager(str(run))
  try:
    step, restored = checkpointing.restore_latest_intact(mngr, abstract, _data_iter(), cfg, str(run))
  finally:
    mngr.close()
  assert step == 1
  np.testing.assert_array_equal(jax.tree.leaves(restored)[i], jax.tree.leaves(state)[i])
  assert os.listdir(run / "damaged_checkpoints")[0].startswith("2-")
  # The twin itself, whose record matches its arrays, restores: the copy is readable.
  twin_state = checkpointing.restore_state(str(twin), 2, abstract)
  np.testing.assert_array_equal(jax.tree.leaves(twin_state)[i], jax.tree.leaves(swapped)[i])


def test_checkpoint_with_the_old_checksum_restores_and_is_still_checked(tmp_path, tiny):
  cfg, abstract, state = tiny
  # The record checkpoints were written with before the scheme field: bit sums only.
  old = {"checksums": _legacy_sums(state), "n_arrays": len(jax.tree.leaves(state))}
  _save(tmp_path / "old", 3, state, cfg, integrity=old)
  restored = checkpointing.restore_state(str(tmp_path / "old"), 3, abstract)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
    np.testing.assert_array_equal(a, b)
  # ... and checked by that old checksum: a changed value is caught.
  i = _largest(state)
  flipped = _replace_leaf(state, i, jax.tree.leaves(state)[i].at[5, 7].add(1.0))
  _save(tmp_path / "old_flipped", 3, flipped, cfg, integrity=old)
  with pytest.raises(checkpointing.CheckpointError, match="array checksums do not match"):
    checkpointing.restore_state(str(tmp_path / "old_flipped"), 3, abstract)


def test_unknown_checksum_scheme_is_an_error_not_damage(tmp_path, tiny):
  # A record from a newer version is neither trusted nor moved aside as damaged.
  cfg, abstract, state = tiny
  newer = {"scheme": "sha512-v9", "checksums": [], "n_arrays": len(jax.tree.leaves(state))}
  _save(tmp_path, 4, state, cfg, integrity=newer)
  with pytest.raises(checkpointing.CheckpointError, match="unknown checksum scheme 'sha512-v9'"):
    checkpointing.restore_state(str(tmp_path), 4, abstract)
  mngr = checkpointing.manager(str(tmp_path))
  try:
    with pytest.raises(checkpointing.CheckpointError, match="unknown checksum scheme"):
      checkpointing.restore_latest_intact(mngr, abstract, _data_iter(), cfg, str(tmp_path))
  finally:
    mngr.close()
  assert os.listdir(tmp_path / "checkpoints") == ["4"]
