"""Document sources: JSON lines (C4 shards), plain text, Parquet and ArrayRecord.

Every source is random-access (``len`` + ``__getitem__``), which grain needs
for a deterministic global shuffle and exact checkpointing. How the text is
held depends on the file:

- plain ``.jsonl`` / ``.txt`` files are read lazily through an offset index
  (``text_index.py``), built in one validating pass the first time a file is
  used and cached; memory does not grow with the corpus.
- ``.gz`` files, JSON-array ``.json`` files and Parquet are read into memory:
  gzip has no random access (a seek decompresses from the start) and a
  Parquet row group is the smallest readable unit, so neither can serve the
  global shuffle's random reads. Above ``data.max_in_memory_bytes`` of text
  they are refused with the ``prepare`` command that tokenises them once into
  (lazy) ArrayRecord shards.
- ArrayRecord files are read lazily. Shards written by ``python -m
  elas_jax.data.prepare`` hold token ids (recognised by the manifest next to
  them); other ArrayRecord files hold UTF-8 text documents.

Text files are validated when the source is built, so a broken file fails
before any compilation with one line naming it (and the line). The streaming
readers (:func:`iter_documents`) yield one document at a time; ``prepare``
reads through them, holding one batch of documents, never a file.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import zlib
from typing import BinaryIO, Callable, Iterator, Sequence

import numpy as np

from elas_jax.data import hub, text_index
from elas_jax.data.records import (SKIP_HINT, BadRecords, BrokenFile, Options, Position, one_line, scan_jsonl,
                                    scan_parquet, scan_txt)
from elas_jax.errors import DataError

FORMATS = ("auto", "jsonl", "txt", "parquet", "arrayrecord")
PREPARED_MANIFEST = "elas_prepared.json"

_EXTENSIONS = {
    ".jsonl": "jsonl", ".json": "jsonl", ".jsonl.gz": "jsonl", ".json.gz": "jsonl",
    ".txt": "txt", ".txt.gz": "txt", ".parquet": "parquet",
    ".arrayrecord": "arrayrecord", ".array_record": "arrayrecord",
}
def _local_glob(pattern: str) -> list[str]:
  return [p for p in glob.glob(os.path.expanduser(pattern)) if os.path.isfile(p)]


def resolve_files(patterns: str, field: str, match: Callable[[str], list[str]] = _local_glob) -> list[str]:
  """Comma-separated globs -> sorted, de-duplicated files; each glob must match.

  ``match`` expands one glob (local files by default; Beam's filesystems for prepare --runner).
  ``hf://`` globs are Hugging Face Hub files, fetched into (or found in) huggingface_hub's
  cache (:func:`hub.match`); what comes back are local paths.
  """
  files: list[str] = []
  if not patterns.strip():
    raise DataError(f"config.{field} is empty: give a glob of data files (local, or on the Hub: "
                    "'hf://datasets/allenai/c4/en/c4-train.0000*-of-01024.json.gz')")
  for pattern in (p.strip() for p in patterns.split(",") if p.strip()):
    matched = sorted(hub.match(pattern) if hub.is_hub_files(pattern) else match(pattern))
    if not matched:
      raise DataError(f"config.{field}: {pattern!r} matches no file")
    files.extend(m for m in matched if m not in files)
  return files


def file_format(path: str, fmt: str) -> str:
  if fmt != "auto":
    if fmt not in FORMATS:
      raise DataError(f"config.data.format = {fmt!r}: must be one of {', '.join(FORMATS)}")
    return fmt
  name = path.lower()
  for ext in sorted(_EXTENSIONS, key=len, reverse=True):
    if name.endswith(ext):
      return _EXTENSIONS[ext]
  raise DataError(f"{path}: unknown file type; set config.data.format to one of "
                  f"{', '.join(FORMATS[1:])}")


def is_gzip(path: str) -> bool:
  return path.lower().endswith(".gz")


def prepared_manifest(path: str) -> str:
  return os.path.join(os.path.dirname(os.path.abspath(path)), PREPARED_MANIFEST)


def iter_arrayrecord(path: str, batch: int = 1024) -> Iterator[str | np.ndarray]:
  """The records of one ArrayRecord file: token ids (prepared shards) or text."""
  from array_record.python.array_record_module import ArrayRecordReader

  tokens = os.path.isfile(prepared_manifest(path))
  try:
    reader = ArrayRecordReader(path)
  except Exception as e:
    raise BrokenFile(f"{path}: not a readable ArrayRecord file ({one_line(e)})") from None
  try:
    n = reader.num_records()
    for lo in range(0, n, batch):
      for i, raw in enumerate(reader.read(range(lo, min(n, lo + batch))), start=lo):
        if tokens:
          yield np.frombuffer(raw, dtype=np.int32)
        else:
          try:
            yield raw.decode("utf-8")
          except UnicodeDecodeError as e:
            raise DataError(f"{path}: record {i}: undecodable bytes (not UTF-8) at byte {e.start}") \
                from None
  finally:
    reader.close()




def iter_documents(path: str, kind: str, opts: Options, bad: BadRecords,
                   raw: BinaryIO | None = None) -> Iterator[str | np.ndarray]:
  """The documents of one file, one at a time.

  ``raw`` is the file's (compressed) byte stream, opened by the caller (who may
  track ``raw.tell()`` for progress); by default the local file is opened. A
  stream that ends early or is corrupt (gzip) raises :class:`BrokenFile`
  naming the file and the last line read; bad records go to ``bad``.
  """
  if kind == "arrayrecord":
    yield from iter_arrayrecord(path)
    return
  own = raw is None
  if own:
    try:
      raw = open(path, "rb")
    except OSError as e:
      raise DataError(f"{path}: cannot read ({e.strerror})") from None
  pos = Position()
  try:
    if kind == "parquet":
      for _, _, text in scan_parquet(path, raw, opts, bad):
        yield text
      return
    f = gzip.GzipFile(fileobj=raw, mode="rb") if is_gzip(path) else raw
    scan = {"jsonl": scan_jsonl, "txt": scan_txt}[kind]
    for _, _, text in scan(path, f, opts, bad, pos):
      yield text
  except (EOFError, zlib.error, OSError) as e:  # gzip.BadGzipFile is an OSError
    where = f" after line {pos.line}" if pos.line else ""
    what = "truncated" if isinstance(e, EOFError) else "corrupt"
    raise BrokenFile(f"{path}: {what} {'gzip data' if is_gzip(path) else 'file'}{where} "
                     f"({one_line(e)}); re-download it, or {SKIP_HINT} (a broken file is skipped "
                     "whole)") from None
  finally:
    if own:
      raw.close()


def read_documents(path: str, kind: str, opts: Options, bad: BadRecords) -> list:
  """All documents of one file; a broken file is skipped whole when ``bad.skip``."""
  try:
    return list(iter_documents(path, kind, opts, bad))
  except BrokenFile as e:
    bad.broken_file(e)
    return []


def text_bytes(path: str) -> int:
  """The bytes of text a file holds: its size, or for gzip the size its trailer records.

  The gzip trailer holds the (last member's) uncompressed size mod 2**32: an
  estimate, exact for the single-member files below 4 GiB that C4 ships.
  """
  size = os.path.getsize(path)
  if is_gzip(path) and size >= 18:
    with open(path, "rb") as f:
      f.seek(-4, os.SEEK_END)
      return max(size, int.from_bytes(f.read(4), "little"))
  return size


def _starts_json_array(path: str) -> bool:
  with open(path, "rb") as f:
    while chunk := f.read(4096):
      if chunk.strip():
        return chunk.lstrip()[:1] == b"["
  return False


def is_lazy(path: str, kind: str, opts: Options) -> bool:
  """Whether a text file is read through an offset index (plain JSON lines or text)."""
  if is_gzip(path) or kind not in ("jsonl", "txt"):
    return False
  return kind == "txt" or not _starts_json_array(path)


class TextDocuments:
  """In-memory text documents."""

  kind = "text"

  def __init__(self, docs: Sequence[str]):
    self._docs = list(docs)

  def __len__(self) -> int:
    return len(self._docs)

  def __getitem__(self, i: int) -> str:
    return self._docs[i]


class ConcatDocuments:
  """Several random-access sources, one after the other (the files' order)."""

  kind = "text"

  def __init__(self, parts: Sequence):
    self._parts = [p for p in parts if len(p)]
    self._ends = np.cumsum([len(p) for p in self._parts], dtype=np.int64)

  def __len__(self) -> int:
    return int(self._ends[-1]) if len(self._ends) else 0

  def __getitem__(self, i: int):
    i = int(i)
    if not 0 <= i < len(self):
      raise IndexError(i)
    part = int(np.searchsorted(self._ends, i, side="right"))
    return self._parts[part][i - (int(self._ends[part - 1]) if part else 0)]


class ArrayRecordDocuments:
  """ArrayRecord shards: token ids (prepared) or UTF-8 text, read lazily."""

  def __init__(self, files: list[str]):
    import grain

    dirs = {os.path.dirname(os.path.abspath(f)) for f in files}
    manifests = [os.path.join(d, PREPARED_MANIFEST) for d in dirs]
    prepared = [os.path.isfile(m) for m in manifests]
    for d, m in zip(sorted(dirs), prepared):
      if not m and glob.glob(os.path.join(glob.escape(d), "*.shard.json")):
        raise DataError(f"{d}: pre-tokenisation has not finished here (shard records but no "
                        f"{PREPARED_MANIFEST}); rerun the same prepare command to finish it")
    if any(prepared) and not all(prepared):
      raise DataError(f"{', '.join(sorted(dirs))}: mixing pre-tokenised and text ArrayRecord files")
    self.kind = "tokens" if all(prepared) else "text"
    self.manifests = [json.load(open(m)) for m in manifests] if self.kind == "tokens" else []
    for f in files:
      try:
        with open(f, "rb") as fh:
          fh.read(1)
      except OSError as e:
        raise DataError(f"{f}: cannot read ({e})") from None
    try:
      self._src = grain.sources.ArrayRecordDataSource(files)
    except Exception as e:
      raise DataError(f"{', '.join(files)}: not readable ArrayRecord files ({e})") from None
    self._files = files

  def __len__(self) -> int:
    return len(self._src)

  def __getitem__(self, i: int):
    raw = self._src[i]
    if self.kind == "tokens":
      return np.frombuffer(raw, dtype=np.int32)
    try:
      return raw.decode("utf-8")
    except UnicodeDecodeError as e:
      raise DataError(f"{', '.join(self._files)}: record {i}: undecodable bytes (not UTF-8) "
                      f"at byte {e.start}") from None


def _gb(n: int) -> str:
  return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def open_documents(patterns: str, field: str, fmt: str = "auto", opts: Options | None = None):
  """The documents of the files matched by ``patterns`` (config field ``field``)."""

  opts = opts or Options()
  files = resolve_files(patterns, field)
  formats = {file_format(f, fmt) for f in files}
  if len(formats) > 1:
    raise DataError(f"config.{field}: files of several formats ({', '.join(sorted(formats))}); "
                    "use one format per glob")
  (kind,) = formats
  if kind == "arrayrecord":
    docs = ArrayRecordDocuments(files)
  else:
    lazy = {f: is_lazy(f, kind, opts) for f in files}
    eager = [f for f in files if not lazy[f]]
    in_memory = sum(text_bytes(f) for f in eager)
    if in_memory > opts.max_in_memory_bytes:
      raise DataError(
          f"config.{field}: {len(eager)} file(s) ({'gzip' if any(map(is_gzip, eager)) else kind}) "
          f"hold ~{_gb(in_memory)} of text, more than config.data.max_in_memory_bytes = "
          f"{opts.max_in_memory_bytes} ({_gb(opts.max_in_memory_bytes)}) that may be read into memory "
          "(they have no random access); tokenise them once into ArrayRecord shards"
          + (f": {opts.prepare_hint}" if opts.prepare_hint else " with python -m elas_jax.data.prepare")
          + " (or decompress them: plain .jsonl/.txt files are read lazily)")
    bad = BadRecords(opts.skip_bad_records)
    parts = text_index.open_indexed([f for f in files if lazy[f]], kind, opts, bad)
    docs = ConcatDocuments([parts.pop(f) if lazy[f] else TextDocuments(read_documents(f, kind, opts, bad))
                            for f in files])
    bad.report(f"{len(files)} file(s) of config.{field}")
  if len(docs) == 0:
    raise DataError(f"config.{field}: no documents in {len(files)} file(s) matched by {patterns!r}")
  return docs
