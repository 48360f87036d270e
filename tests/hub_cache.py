"""A Hugging Face Hub cache on local disk, in huggingface_hub's own layout, for offline tests.

One repository is ``<cache>/<type>s--<owner>--<name>/`` holding

- ``blobs/<sha256>``: each file's bytes (LFS files are stored under their sha256);
- ``snapshots/<commit>/<path>``: a relative symlink to the blob;
- ``refs/<revision>``: the commit the revision points to;
- ``trees/<commit>.json``: the commit's file listing (written by an online
  ``snapshot_download``; what lets an offline one tell a partial snapshot).

as ``huggingface_hub.file_download`` and ``_tree_cache`` write them after a download; the
tests check that huggingface_hub's own readers (``scan_cache_dir``,
``get_cached_repo_tree``) see it as theirs. Nothing here is read by elas_jax.
"""

from __future__ import annotations

import hashlib
import os


def add_repo(cache: str, repo_id: str, files: dict[str, bytes], repo_type: str = "model",
             revision: str = "main", listed: bool = True, omit: tuple[str, ...] = ()) -> str:
  """Adds ``files`` (path in repo -> bytes) as ``repo_id`` at ``revision``; returns the commit.

  ``listed=False`` writes no file listing (files fetched one by one, by hf_hub_download);
  ``omit`` lists files the listing holds but the snapshot lacks (an interrupted download).
  """
  from huggingface_hub._tree_cache import TreeCacheEntry, write_tree_cache
  from huggingface_hub.file_download import repo_folder_name

  storage = os.path.join(cache, repo_folder_name(repo_id=repo_id, repo_type=repo_type))
  digest = hashlib.sha1(repo_id.encode())
  for path in sorted(files):
    digest.update(path.encode() + hashlib.sha256(files[path]).digest())
  commit = digest.hexdigest()  # 40 hex digits, like a git commit
  entries = {}
  for path, data in files.items():
    sha256 = hashlib.sha256(data).hexdigest()
    git_blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    entries[path] = TreeCacheEntry(size=len(data), blob_id=git_blob, lfs_sha256=sha256, lfs_size=len(data))
    if path in omit:
      continue
    blob = os.path.join(storage, "blobs", sha256)
    os.makedirs(os.path.dirname(blob), exist_ok=True)
    with open(blob, "wb") as f:
      f.write(data)
    link = os.path.join(storage, "snapshots", commit, *path.split("/"))
    os.makedirs(os.path.dirname(link), exist_ok=True)
    os.symlink(os.path.relpath(blob, os.path.dirname(link)), link)
  os.makedirs(os.path.join(storage, "refs"), exist_ok=True)
  with open(os.path.join(storage, "refs", revision), "w") as f:
    f.write(commit)
  if listed:
    write_tree_cache(storage, commit, entries)
  return commit
