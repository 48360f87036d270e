"""Lazy random access into plain JSON-lines and text files through a cached offset index.

The index of a file holds the byte span (start, length) of each document,
found in one pass that also validates every record (the same checks, and the
same bad-record handling, as reading the file whole). A document is then one
``os.pread`` and one ``json.loads``: the corpus stays on disk, and grain's
global shuffle, per-process sharding and exact resume work on document
indices exactly as for an in-memory list (same documents, same order).

Indexes are cached under ``$ELAS_JAX_CACHE/text_index/`` (default
``~/.cache/elas_jax``), one ``.npy`` (int64 [n, 2], memory-mapped when used)
and one ``.json`` (the file's size and mtime, the options, bad-record counts)
per data file and options; a file whose size or mtime changed is indexed
again. Data directories are never written to (they may be read-only). The
cache is safe to delete. Gzip files have no index: random access into a gzip
stream means decompressing from its start (see sources.py).
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
from tqdm import tqdm

from elas_jax.data import corpus, records
from elas_jax.errors import DataError

INDEX_VERSION = 1
_PROGRESS_MIN_BYTES = 64 << 20  # show a progress bar when indexing at least this much


def cache_root() -> str:
  return os.path.join(corpus.cache_dir(), "text_index")


def _key(path: str, kind: str, opts: records.Options) -> str:
  what = [INDEX_VERSION, os.path.abspath(path), kind, opts.text_key, opts.txt_split]
  return hashlib.sha256(json.dumps(what).encode()).hexdigest()[:24]


def _stat(path: str) -> dict:
  st = os.stat(path)
  return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _atomic_write(path: str, write) -> None:
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "wb") as f:
    write(f)
  os.replace(tmp, path)  # concurrent builders of one index write the same bytes


def _build(path: str, kind: str, opts: records.Options, bad: records.BadRecords,
           bar: tqdm) -> np.ndarray:
  spans: list[tuple[int, int]] = []
  scan = {"jsonl": records.scan_jsonl, "txt": records.scan_txt}[kind]
  done = 0
  with open(path, "rb", buffering=1 << 20) as f:
    for start, end, _ in scan(path, f, opts, bad):
      spans.append((start, end - start))
      if end - done > 1 << 22:
        bar.update(end - done)
        done = end
  bar.update(os.path.getsize(path) - done)
  return np.asarray(spans, np.int64).reshape(-1, 2)


def _cached(path: str, kind: str, opts: records.Options) -> tuple[str, dict | None]:
  """The index's base path, and its metadata when it is current for the file."""
  base = os.path.join(cache_root(), _key(path, kind, opts))
  try:
    with open(base + ".json") as f:
      meta = json.load(f)
  except (OSError, ValueError):
    return base, None
  current = meta.get("file") == _stat(path) and os.path.isfile(base + ".npy")
  return base, meta if current else None


def index_file(path: str, kind: str, opts: records.Options, bad: records.BadRecords,
               bar: tqdm | None = None) -> str:
  """The cached index (``.npy`` path) of one file, built when missing or stale."""
  root = cache_root()
  base, meta = _cached(path, kind, opts)
  if meta is not None:
    if meta["bad_records"] and not bad.skip:  # built with skip_bad_records=True
      raise DataError(f"{meta['first_bad']} ({records.SKIP_HINT})")
    bad.add(meta["bad_records"], meta["first_bad"])
    return base + ".npy"
  stat = _stat(path)
  local = records.BadRecords(bad.skip)
  spans = _build(path, kind, opts, local, bar or tqdm(disable=True))
  os.makedirs(root, exist_ok=True)
  _atomic_write(base + ".npy", lambda f: np.save(f, spans))
  meta = {"version": INDEX_VERSION, "path": os.path.abspath(path), "kind": kind,
          "text_key": opts.text_key, "txt_split": opts.txt_split, "file": stat,
          "documents": len(spans), "bad_records": local.count, "first_bad": local.first}
  _atomic_write(base + ".json", lambda f: f.write(json.dumps(meta, indent=1).encode()))
  bad.add(local.count, local.first)
  return base + ".npy"


class IndexedTextFile:
  """The documents of one plain ``.jsonl`` / ``.txt`` file, read on demand."""

  kind = "text"

  def __init__(self, path: str, kind: str, opts: records.Options, index_path: str):
    self.path, self._kind, self._text_key = os.path.abspath(path), kind, opts.text_key
    self._file_doc = kind == "txt" and opts.txt_split == "file"
    self._index_path = index_path
    self._spans = np.load(index_path, mmap_mode="r")
    self._fd, self._pid = -1, -1

  def __getstate__(self):  # grain worker processes: reopen the index and file there
    state = dict(self.__dict__)
    state["_spans"], state["_fd"], state["_pid"] = None, -1, -1
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._spans = np.load(self._index_path, mmap_mode="r")

  def __del__(self):
    if self._fd >= 0 and self._pid == os.getpid():
      os.close(self._fd)

  def __len__(self) -> int:
    return len(self._spans)

  def _file(self) -> int:
    if self._pid != os.getpid():  # one descriptor per process; pread is thread-safe
      self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
    return self._fd

  def __getitem__(self, i: int) -> str:
    start, length = (int(x) for x in self._spans[i])
    raw = os.pread(self._file(), length, start)
    if len(raw) != length:
      raise DataError(f"{self.path}: shorter than its index says (changed while in use?); rerun "
                      "to index it again")
    if self._kind == "jsonl":
      return json.loads(raw)[self._text_key]
    if self._file_doc:
      return raw.decode("utf-8", errors="replace").strip()
    return records.txt_block_text(raw)


def open_indexed(files: list[str], kind: str, opts: records.Options,
                 bad: records.BadRecords) -> dict[str, IndexedTextFile]:
  """Indexed sources of ``files`` (indexing those not cached yet, with a progress bar)."""
  total = sum(os.path.getsize(f) for f in files if _cached(f, kind, opts)[1] is None)  # to build
  out = {}
  with tqdm(total=total, unit="B", unit_scale=True, desc="indexing text files",
            disable=total < _PROGRESS_MIN_BYTES) as bar:
    for f in files:
      out[f] = IndexedTextFile(f, kind, opts, index_file(f, kind, opts, bad, bar))
  return out
