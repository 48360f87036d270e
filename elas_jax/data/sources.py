"""Document sources: JSON lines (C4 shards), plain text, Parquet and ArrayRecord.

Every source is random-access (``len`` + ``__getitem__``), which grain needs
for a deterministic global shuffle and exact checkpointing. Text formats are
read and validated when the source is built, so a broken file fails before
any compilation, with its name and line; ArrayRecord files are read lazily.
ArrayRecord shards written by ``python -m elas_jax.data.prepare`` hold token
ids (recognised by the manifest next to them); other ArrayRecord files hold
UTF-8 text documents.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import json
import os
from typing import Sequence

import numpy as np

from elas_jax.errors import DataError

FORMATS = ("auto", "jsonl", "txt", "parquet", "arrayrecord")
PREPARED_MANIFEST = "elas_prepared.json"

_EXTENSIONS = {
    ".jsonl": "jsonl", ".json": "jsonl", ".jsonl.gz": "jsonl", ".json.gz": "jsonl",
    ".txt": "txt", ".txt.gz": "txt", ".parquet": "parquet",
    ".arrayrecord": "arrayrecord", ".array_record": "arrayrecord",
}


@dataclasses.dataclass
class Options:
  text_key: str = "text"  # JSON key / Parquet column holding the text
  txt_split: str = "blank_line"  # txt: one document per blank-line-separated block | per file
  skip_bad_records: bool = False  # skip (and count) bad records instead of failing


class BadRecords:
  """Counts skipped records; reports one summary line."""

  def __init__(self, skip: bool):
    self.skip, self.count, self.first = skip, 0, None

  def bad(self, where: str, why: str) -> None:
    if not self.skip:
      raise DataError(f"{where}: {why} (set data.skip_bad_records=True to skip such records)")
    self.count += 1
    self.first = self.first or f"{where}: {why}"

  def report(self, what: str) -> None:
    if self.count:
      print(f"warning: skipped {self.count} bad record(s) in {what}; first: {self.first}", flush=True)


def resolve_files(patterns: str, field: str) -> list[str]:
  """Comma-separated globs -> sorted, de-duplicated files; each glob must match."""
  files: list[str] = []
  if not patterns.strip():
    raise DataError(f"config.{field} is empty: give a glob of data files")
  for pattern in (p.strip() for p in patterns.split(",") if p.strip()):
    matched = sorted(p for p in glob.glob(os.path.expanduser(pattern)) if os.path.isfile(p))
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


def _open_bytes(path: str):
  return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _decode(raw: bytes, where: str, bad: BadRecords) -> str | None:
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    bad.bad(where, f"undecodable bytes (not UTF-8) at byte {e.start}")
    return None


def read_jsonl(path: str, opts: Options, bad: BadRecords) -> list[str]:
  """JSON lines (C4's format; also a ``.json`` file holding one JSON array)."""
  with _open_bytes(path) as f:
    data = f.read()
  if data.lstrip()[:1] == b"[":  # a JSON array of objects
    text = _decode(data, path, BadRecords(False))
    try:
      records = json.loads(text)
    except json.JSONDecodeError as e:
      raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    lines = [(i + 1, r) for i, r in enumerate(records)]
    where = lambda i: f"{path}: element {i - 1}"
  else:
    lines = []
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
      if not raw.strip():
        continue
      line = _decode(raw, f"{path}:{lineno}", bad)
      if line is None:
        continue
      try:
        lines.append((lineno, json.loads(line)))
      except json.JSONDecodeError as e:
        bad.bad(f"{path}:{lineno}", f"invalid JSON ({e.msg} at column {e.colno})")
    where = lambda i: f"{path}:{i}"
  docs = []
  for lineno, record in lines:
    if not isinstance(record, dict) or opts.text_key not in record:
      keys = ", ".join(map(str, record)) if isinstance(record, dict) else type(record).__name__
      bad.bad(where(lineno), f"no {opts.text_key!r} key (found: {keys}); set data.text_key")
    elif not isinstance(record[opts.text_key], str):
      bad.bad(where(lineno), f"{opts.text_key!r} is {type(record[opts.text_key]).__name__}, not text")
    else:
      docs.append(record[opts.text_key])
  return docs


def read_txt(path: str, opts: Options, bad: BadRecords) -> list[str]:
  with _open_bytes(path) as f:
    data = f.read()
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    line = data[: e.start].count(b"\n") + 1
    bad.bad(f"{path}:{line}", f"undecodable bytes (not UTF-8) at byte {e.start}")
    text = data.decode("utf-8", errors="replace")
  if opts.txt_split == "file":
    return [text.strip()] if text.strip() else []
  if opts.txt_split != "blank_line":
    raise DataError(f"config.data.txt_split = {opts.txt_split!r}: must be blank_line or file")
  blocks, cur = [], []
  for line in text.splitlines():
    if line.strip():
      cur.append(line)
    elif cur:
      blocks.append("\n".join(cur))
      cur = []
  if cur:
    blocks.append("\n".join(cur))
  return blocks


def read_parquet(path: str, opts: Options, bad: BadRecords) -> list[str]:
  import pyarrow.parquet as pq

  try:
    schema = pq.read_schema(path)
  except Exception as e:
    raise DataError(f"{path}: not a readable Parquet file ({e})") from None
  if opts.text_key not in schema.names:
    raise DataError(f"{path}: no column {opts.text_key!r} (columns: {', '.join(schema.names)}); "
                    "set data.text_key")
  column = pq.read_table(path, columns=[opts.text_key]).column(0).to_pylist()
  docs = []
  for row, value in enumerate(column):
    if not isinstance(value, str):
      bad.bad(f"{path}: row {row}", f"{opts.text_key!r} is {type(value).__name__}, not text")
    else:
      docs.append(value)
  return docs


_READERS = {"jsonl": read_jsonl, "txt": read_txt, "parquet": read_parquet}


class TextDocuments:
  """In-memory text documents read from JSON-lines, text or Parquet files."""

  kind = "text"

  def __init__(self, docs: Sequence[str]):
    self._docs = list(docs)

  def __len__(self) -> int:
    return len(self._docs)

  def __getitem__(self, i: int) -> str:
    return self._docs[i]


class ArrayRecordDocuments:
  """ArrayRecord shards: token ids (prepared) or UTF-8 text, read lazily."""

  def __init__(self, files: list[str]):
    import grain

    dirs = {os.path.dirname(os.path.abspath(f)) for f in files}
    manifests = [os.path.join(d, PREPARED_MANIFEST) for d in dirs]
    prepared = [os.path.isfile(m) for m in manifests]
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
    bad = BadRecords(opts.skip_bad_records)
    texts = []
    for f in files:
      texts.extend(_READERS[kind](f, opts, bad))
    bad.report(f"{len(files)} file(s) of config.{field}")
    docs = TextDocuments(texts)
  if len(docs) == 0:
    raise DataError(f"config.{field}: no documents in {len(files)} file(s) matched by {patterns!r}")
  return docs
