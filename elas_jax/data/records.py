"""Records of text files: reading options, bad-record accounting, and the scanners
that turn JSON lines, plain text and Parquet into document texts, validating
them as they go. Shared by :mod:`elas_jax.data.sources` (documents) and
:mod:`elas_jax.data.text_index` (offset indexes), which both import this module.
"""

from __future__ import annotations

import dataclasses
import json
from typing import BinaryIO, Iterator

from elas_jax.errors import DataError

DEFAULT_MAX_IN_MEMORY_BYTES = 4 << 30  # = config data.max_in_memory_bytes
SKIP_HINT = "set data.skip_bad_records=True to skip such records"


@dataclasses.dataclass
class Options:
  text_key: str = "text"  # JSON key / Parquet column holding the text
  txt_split: str = "blank_line"  # txt: one document per blank-line-separated block | per file
  skip_bad_records: bool = False  # skip (and count) bad records and broken files instead of failing
  max_in_memory_bytes: int = DEFAULT_MAX_IN_MEMORY_BYTES  # text read into memory (.gz, Parquet), at most
  prepare_hint: str = ""  # the prepare command to suggest when that limit is exceeded


class BrokenFile(DataError):
  """A file that cannot be read to its end: truncated or corrupt gzip, unreadable Parquet."""


class BadRecords:
  """Counts skipped records and broken files; reports one summary line each."""

  def __init__(self, skip: bool):
    self.skip, self.count, self.first = skip, 0, None
    self.broken: list[str] = []  # messages of the skipped broken files

  def bad(self, where: str, why: str) -> None:
    if not self.skip:
      raise DataError(f"{where}: {why} ({SKIP_HINT})")
    self.add(1, f"{where}: {why}")

  def add(self, count: int, first: str | None) -> None:
    """Records ``count`` bad records seen elsewhere (a cached index, a worker)."""
    if count:
      self.count += count
      self.first = self.first or first

  def broken_file(self, err: BrokenFile) -> None:
    if not self.skip:
      raise err
    self.broken.append(str(err))

  def report(self, what: str) -> None:
    if self.count:
      print(f"warning: skipped {self.count} bad record(s) in {what}; first: {self.first}", flush=True)
    if self.broken:
      print(f"warning: skipped {len(self.broken)} broken file(s) in {what}; first: {self.broken[0]}",
            flush=True)

def one_line(e: BaseException) -> str:
  return " ".join(str(e).split()) or type(e).__name__


# ------------------------------------------------------------- record parsing


class Position:
  """Where a reader is in its file, for messages about a broken stream."""

  def __init__(self):
    self.line = 0


def _decode(raw: bytes, where: str, bad: BadRecords) -> str | None:
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    bad.bad(where, f"undecodable bytes (not UTF-8) at byte {e.start}")
    return None


def record_text(record, where: str, opts: Options, bad: BadRecords) -> str | None:
  """The text of one parsed JSON record, or None (counted) when it has none."""
  if not isinstance(record, dict) or opts.text_key not in record:
    keys = ", ".join(map(str, record)) if isinstance(record, dict) else type(record).__name__
    bad.bad(where, f"no {opts.text_key!r} key (found: {keys}); set data.text_key")
  elif not isinstance(record[opts.text_key], str):
    bad.bad(where, f"{opts.text_key!r} is {type(record[opts.text_key]).__name__}, not text")
  else:
    return record[opts.text_key]
  return None


def jsonl_line_text(raw: bytes, where: str, opts: Options, bad: BadRecords) -> str | None:
  """The text of one JSON line, or None (counted) for a bad line."""
  line = _decode(raw, where, bad)
  if line is None:
    return None
  try:
    record = json.loads(line)
  except json.JSONDecodeError as e:
    bad.bad(where, f"invalid JSON ({e.msg} at column {e.colno})")
    return None
  return record_text(record, where, opts, bad)


def txt_block_text(raw: bytes) -> str:
  """A blank-line-separated block's bytes -> its document (the scanner's exact output)."""
  return "\n".join(s.rstrip("\r\n") for s in raw.decode("utf-8", errors="replace").split("\n")
                   if s.strip())


def scan_jsonl(path: str, f: BinaryIO, opts: Options, bad: BadRecords,
               pos: Position | None = None) -> Iterator[tuple[int, int, str]]:
  """(start, end, text) of every record of a JSON-lines stream.

  A JSON array (a ``.json`` file whose first non-blank line opens ``[``) is
  parsed whole; its records have no byte span (start = end = -1).
  """
  pos = pos or Position()
  offset, first = 0, True
  for lineno, raw in enumerate(f, start=1):
    pos.line = lineno
    start, offset = offset, offset + len(raw)
    if not raw.strip():
      continue
    if first and raw.lstrip()[:1] == b"[":
      yield from _scan_json_array(path, raw + f.read(), opts, bad)
      return
    first = False
    text = jsonl_line_text(raw, f"{path}:{lineno}", opts, bad)
    if text is not None:
      yield start, offset, text


def _scan_json_array(path: str, data: bytes, opts: Options,
                     bad: BadRecords) -> Iterator[tuple[int, int, str]]:
  text = _decode(data, path, BadRecords(False))
  try:
    records = json.loads(text)
  except json.JSONDecodeError as e:
    raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
  for i, record in enumerate(records):
    t = record_text(record, f"{path}: element {i}", opts, bad)
    if t is not None:
      yield -1, -1, t


def scan_txt(path: str, f: BinaryIO, opts: Options, bad: BadRecords,
             pos: Position | None = None) -> Iterator[tuple[int, int, str]]:
  """(start, end, text) of every document of a text stream.

  ``blank_line``: a document is a block of non-blank lines (lines end at
  ``\\n``; a trailing ``\\r`` is dropped), joined by ``\\n``. ``file``: the
  whole stream, stripped, is one document.
  """
  pos = pos or Position()
  if opts.txt_split not in ("blank_line", "file"):
    raise DataError(f"config.data.txt_split = {opts.txt_split!r}: must be blank_line or file")
  if opts.txt_split == "file":
    data = f.read()
    try:
      text = data.decode("utf-8")
    except UnicodeDecodeError as e:
      line = data[: e.start].count(b"\n") + 1
      bad.bad(f"{path}:{line}", f"undecodable bytes (not UTF-8) at byte {e.start}")
      text = data.decode("utf-8", errors="replace")
    if text.strip():
      yield 0, len(data), text.strip()
    return
  offset, start, end, lines = 0, 0, 0, []
  for lineno, raw in enumerate(f, start=1):
    pos.line = lineno
    try:
      line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
      bad.bad(f"{path}:{lineno}", f"undecodable bytes (not UTF-8) at byte {offset + e.start}")
      line = raw.decode("utf-8", errors="replace")
    if line.strip():
      if not lines:
        start = offset
      lines.append(line.rstrip("\r\n"))
      end = offset + len(raw)
    elif lines:
      yield start, end, "\n".join(lines)
      lines = []
    offset += len(raw)
  if lines:
    yield start, end, "\n".join(lines)


def scan_parquet(path: str, f: BinaryIO | str, opts: Options,
                 bad: BadRecords) -> Iterator[tuple[int, int, str]]:
  """(row group, row, text) of every row, read one row group at a time."""
  import pyarrow.parquet as pq

  try:
    pf = pq.ParquetFile(f)
  except Exception as e:  # pyarrow raises ArrowInvalid / OSError with C++ text
    raise BrokenFile(f"{path}: not a readable Parquet file ({one_line(e)})") from None
  names = pf.schema_arrow.names
  if opts.text_key not in names:
    raise DataError(f"{path}: no column {opts.text_key!r} (columns: {', '.join(names)}); "
                    "set data.text_key")
  row = 0
  for group in range(pf.num_row_groups):
    try:
      column = pf.read_row_group(group, columns=[opts.text_key]).column(0).to_pylist()
    except Exception as e:
      raise BrokenFile(f"{path}: row group {group} is unreadable ({one_line(e)})") from None
    for value in column:
      if not isinstance(value, str):
        bad.bad(f"{path}: row {row}", f"{opts.text_key!r} is {type(value).__name__}, not text")
      else:
        yield group, row, value
      row += 1
