"""Pre-tokenisation into ArrayRecord shards: the plan, the per-shard work, the manifest.

The unit of work is one input file (an "input shard", e.g. one C4
``c4-train.00017-of-01024.json.gz``). Input file ``i`` of ``n`` in a split
becomes the output shard ``{split}-{i:05d}-of-{n:05d}.arrayrecord`` (with
``shard_docs`` > 0: parts ``....p0000.arrayrecord`` of at most that many
documents each). :func:`tokenize_shard` does one input file:

1. streams its documents (``sources.iter_documents``), encodes them one batch
   at a time and writes each document's token ids as one record, under a
   temporary name; memory holds one batch, whatever the corpus size;
2. renames the finished output(s) to their final names;
3. writes a small record ``{split}-{i:05d}-of-{n:05d}.shard.json``: document and
   token counts per output, the input's size and mtime, the settings.

A shard whose record matches its input and settings, and whose outputs exist
with the recorded sizes, is finished: a rerun (after a kill, or on another
machine) skips it. The single-machine prepare (:func:`run_local`, ``--workers``
processes) and the Beam pipeline (``beam_prepare.py``) both call
:func:`tokenize_shard`, so they write the same bytes. :func:`merge` turns the
records into the manifest ``elas_prepared.json`` once every shard of the plan
is finished; until then the directory has no manifest and training refuses it.

A broken input (truncated gzip, a bad record) fails only its own shard: the
others go on, and the failure is reported at the end (exit status 2). With
``data.skip_bad_records`` bad records are skipped and counted, and a broken
file is skipped whole, as in training.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import shlex
import sys
import time
from typing import Callable, Iterable, Iterator

import numpy as np
from tqdm import tqdm

from elas_jax.data import corpus, sources, tokenizer as tokenizer_lib
from elas_jax.errors import DataError, UserError

RECORD_SUFFIX = ".shard.json"
RECORD_VERSION = 1
FINISHED = ("done", "skipped_broken")  # statuses a rerun does not redo
SPLITS = (("train", "train_files"), ("validation", "eval_files"))

Progress = Callable[[int, int, int], None]  # (documents, tokens, input bytes) just processed


@dataclasses.dataclass(frozen=True)
class Settings:
  """What every shard of one prepare run shares."""

  out_dir: str
  tokenizer: str  # tokenizer file (absolute path or URL)
  tokenizer_sha256: str
  text_key: str = "text"
  txt_split: str = "blank_line"
  skip_bad_records: bool = False
  shard_docs: int = 0  # documents per output shard; 0 = one output shard per input file
  encode_batch: int = 1024  # documents encoded per tokenizer call (bounds memory)

  def options(self) -> sources.Options:
    return sources.Options(text_key=self.text_key, txt_split=self.txt_split,
                           skip_bad_records=self.skip_bad_records)

  def key(self) -> dict:
    """The settings that decide an output's bytes.

    Not encode_batch; and skip_bad_records only where a shard had bad records
    (see :func:`is_finished`), so turning it on after a failure redoes only
    the failed shards.
    """
    return {"tokenizer_sha256": self.tokenizer_sha256, "text_key": self.text_key,
            "txt_split": self.txt_split, "shard_docs": self.shard_docs}


@dataclasses.dataclass(frozen=True)
class Task:
  """One input file of a split."""

  split: str
  index: int
  count: int  # input files in the split
  path: str
  kind: str  # jsonl | txt | parquet | arrayrecord

  @property
  def name(self) -> str:
    return f"{self.split}-{self.index:05d}-of-{self.count:05d}"


class LocalStorage:
  """Files on this machine (``beam_prepare.BeamStorage`` adds remote filesystems)."""

  def join(self, *parts: str) -> str:
    return os.path.join(*parts)

  def makedirs(self, path: str) -> None:
    os.makedirs(path, exist_ok=True)

  def open(self, path: str):
    try:
      return open(path, "rb")
    except OSError as e:
      raise DataError(f"{path}: cannot read ({e.strerror})") from None

  def stat(self, path: str) -> list[int]:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]

  def size(self, path: str) -> int | None:
    try:
      return os.path.getsize(path)
    except OSError:
      return None

  def read_json(self, path: str) -> dict | None:
    try:
      with open(path, "rb") as f:
        return json.load(f)
    except (OSError, ValueError):
      return None

  def write_json(self, path: str, obj: dict) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
      json.dump(obj, f, indent=1)
    os.replace(tmp, path)

  def writer_path(self, final: str) -> str:
    """Where ArrayRecordWriter writes an output before :meth:`publish` (a local path)."""
    return final + ".tmp"

  def publish(self, tmp: str, final: str) -> None:
    os.replace(tmp, final)  # atomic: a reader never sees a partial shard

  def remove(self, path: str) -> None:
    try:
      os.remove(path)
    except FileNotFoundError:
      pass


LOCAL = LocalStorage()


# ----------------------------------------------------------------- the plan


def absolute(path: str) -> str:
  return path if "://" in path else os.path.abspath(path)


def input_files(cfg, match=None) -> dict[str, tuple[list[str], str]]:
  """``{split: (files, kind)}`` of a config's data section, validated.

  ``match`` expands a glob (default: local files; ``beam_prepare.match`` for remote ones).
  """
  d = cfg.data
  out = {}
  for split, field in SPLITS:
    if d.source == "sample":
      out[split] = ([corpus.sample_corpus()[split]], "jsonl")
      continue
    if split == "validation" and not d.eval_files:
      continue
    files = sources.resolve_files(d[field], f"data.{field}", *([match] if match else []))
    kinds = {sources.file_format(f, d.format) for f in files}
    if len(kinds) > 1:
      raise DataError(f"config.data.{field}: files of several formats ({', '.join(sorted(kinds))}); "
                      "use one format per glob")
    out[split] = (files, kinds.pop())
  return out


def plan(cfg, match=None) -> list[Task]:
  """Every input file of the config's splits, in order (train, then validation)."""
  tasks = []
  for split, (files, kind) in input_files(cfg, match).items():
    tasks += [Task(split, i, len(files), absolute(f), kind) for i, f in enumerate(files)]
  return tasks


def assign(tasks: list[Task], shard_index: int, num_shards: int) -> list[Task]:
  """This machine's tasks when ``num_shards`` machines split the work (round robin)."""
  return [t for i, t in enumerate(tasks) if i % num_shards == shard_index]


def make_settings(cfg, tok, out_dir: str, shard_docs: int = 0, encode_batch: int = 1024,
                  tokenizer: str = "") -> Settings:
  """``tokenizer``: the path workers load (default ``tok``'s own file)."""
  d = cfg.data
  return Settings(out_dir=out_dir, tokenizer=tokenizer or absolute(tok.path),
                  tokenizer_sha256=tokenizer_lib.fingerprint(tok), text_key=d.text_key,
                  txt_split=d.txt_split, skip_bad_records=d.skip_bad_records,
                  shard_docs=shard_docs, encode_batch=encode_batch)


# ------------------------------------------------------------ one input shard


def record_path(task: Task, settings: Settings, storage: LocalStorage = LOCAL) -> str:
  return storage.join(settings.out_dir, task.name + RECORD_SUFFIX)


def _key(task: Task, settings: Settings, storage: LocalStorage) -> dict:
  size, mtime = storage.stat(task.path)
  return {"input": task.path, "input_size": size, "input_mtime": mtime, "kind": task.kind,
          **settings.key()}


def is_finished(record: dict | None, task: Task, settings: Settings,
                storage: LocalStorage = LOCAL) -> bool:
  """Whether ``record`` says this task is done for this input and these settings."""
  if not record or record.get("version") != RECORD_VERSION or record.get("status") not in FINISHED:
    return False
  try:
    if record.get("key") != _key(task, settings, storage):
      return False
  except OSError:
    return False
  if (record["bad_records"] or record["status"] == "skipped_broken") and \
      record["skip_bad_records"] != settings.skip_bad_records:
    return False
  return all(storage.size(storage.join(settings.out_dir, o["name"])) == o["bytes"]
             for o in record["outputs"])


class _ShardWriter:
  """The output shard(s) of one task, written under temporary names."""

  def __init__(self, task: Task, settings: Settings, storage: LocalStorage):
    self._task, self._settings, self._storage = task, settings, storage
    self.outputs: list[dict] = []
    self._files: list[tuple[str, str]] = []  # (temporary, final)
    self._writer = None

  def _next(self) -> None:
    from array_record.python.array_record_module import ArrayRecordWriter

    self._close()
    part = f".p{len(self.outputs):04d}" if self._settings.shard_docs else ""
    name = f"{self._task.name}{part}.arrayrecord"
    final = self._storage.join(self._settings.out_dir, name)
    tmp = self._storage.writer_path(final)
    self._files.append((tmp, final))
    self._writer = ArrayRecordWriter(tmp, "group_size:1")
    self.outputs.append({"name": name, "documents": 0, "tokens": 0})

  def write(self, ids_list: Iterable) -> int:
    tokens = 0
    for ids in ids_list:
      ids = np.asarray(ids, np.int32)
      if self._writer is None or self.outputs[-1]["documents"] == self._settings.shard_docs:
        self._next()
      self._writer.write(ids.tobytes())
      self.outputs[-1]["documents"] += 1
      self.outputs[-1]["tokens"] += len(ids)
      tokens += len(ids)
    return tokens

  def _close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None

  def finish(self) -> list[dict]:
    self._close()
    for (tmp, final), out in zip(self._files, self.outputs):
      self._storage.publish(tmp, final)
      out["bytes"] = self._storage.size(final)
    return self.outputs

  def abort(self) -> None:
    try:
      self._close()
    finally:
      for tmp, _ in self._files:
        self._storage.remove(tmp)


def _batches(items: Iterator, n: int) -> Iterator[list]:
  batch = []
  for item in items:
    batch.append(item)
    if len(batch) == n:
      yield batch
      batch = []
  if batch:
    yield batch


def tokenize_shard(task: Task, settings: Settings, tok, storage: LocalStorage = LOCAL,
                   progress: Progress | None = None) -> dict:
  """Tokenises one input file into its output shard(s); returns the shard's record.

  A finished shard is not redone (its record comes back with ``reused``). A
  broken input gives status ``failed`` (or ``skipped_broken`` with
  ``skip_bad_records``) and no outputs; other errors propagate.
  """
  rpath = record_path(task, settings, storage)
  old = storage.read_json(rpath)
  if is_finished(old, task, settings, storage):
    return dict(old, reused=True)
  key = _key(task, settings, storage)
  for o in (old or {}).get("outputs", []):  # outputs of an earlier run with other settings
    storage.remove(storage.join(settings.out_dir, o["name"]))
  bad = sources.BadRecords(settings.skip_bad_records)
  writer = _ShardWriter(task, settings, storage)
  status, error, seen = "done", None, 0
  try:
    with storage.open(task.path) as raw:
      docs = sources.iter_documents(task.path, task.kind, settings.options(), bad, raw)
      for batch in _batches(docs, settings.encode_batch):
        if isinstance(batch[0], np.ndarray):  # already token ids (a prepared input)
          ids_list = batch
        else:
          ids_list = tok.encode_batch(batch)
        tokens = writer.write(ids_list)
        if progress:
          pos = raw.tell()
          progress(len(batch), tokens, pos - seen)
          seen = pos
  except sources.BrokenFile as e:
    writer.abort()
    status, error = ("skipped_broken" if settings.skip_bad_records else "failed"), str(e)
  except DataError as e:  # a bad record without skip_bad_records, a missing column
    writer.abort()
    status, error = "failed", str(e)
  except BaseException:
    writer.abort()
    raise
  outputs = writer.finish() if status == "done" else []
  record = {"version": RECORD_VERSION, "name": task.name, "split": task.split, "key": key,
            "status": status, "error": error,
            "documents": sum(o["documents"] for o in outputs),
            "tokens": sum(o["tokens"] for o in outputs),
            "bad_records": bad.count, "first_bad_record": bad.first,
            "skip_bad_records": settings.skip_bad_records, "outputs": outputs}
  storage.write_json(rpath, record)  # last: the record marks the shard finished
  if progress:
    progress(0, 0, max(0, key["input_size"] - seen))
  return record


# ------------------------------------------------------------- one machine


class _Bar:
  """A tqdm bar over input bytes showing documents, tokens and tokens/s."""

  def __init__(self, desc: str, total: int):
    self.bar = tqdm(total=total, unit="B", unit_scale=True, desc=desc, file=sys.stderr)
    self.docs = self.tokens = 0
    self._start = time.perf_counter()

  def add(self, docs: int, tokens: int, nbytes: int) -> None:
    self.set(self.docs + docs, self.tokens + tokens, self.bar.n + nbytes)

  def set(self, docs: int, tokens: int, nbytes: int) -> None:
    self.docs, self.tokens = docs, tokens
    rate = tokens / max(time.perf_counter() - self._start, 1e-9)
    self.bar.set_postfix_str(f"{docs:,} docs, {tokens:,} tokens, {rate:,.0f} tokens/s", refresh=False)
    self.bar.update(nbytes - self.bar.n)

  def close(self) -> None:
    self.bar.close()


_WORKER: dict = {}


def _init_worker(settings: Settings, threads: int, counters) -> None:
  tok = tokenizer_lib.load(settings.tokenizer)
  if hasattr(tok, "threads"):
    tok.threads = threads
  _WORKER.update(tok=tok, counters=counters)


def _count(docs: int, tokens: int, nbytes: int) -> None:
  for value, n in zip(_WORKER["counters"], (docs, tokens, nbytes)):
    with value.get_lock():
      value.value += n


def _work(task: Task, settings: Settings) -> dict:
  return tokenize_shard(task, settings, _WORKER["tok"], LOCAL, _count)


def run_local(tasks: list[Task], settings: Settings, workers: int = 1, tok=None) -> list[dict]:
  """Tokenises ``tasks`` on this machine with ``workers`` processes; their records.

  Finished shards are skipped (and reported); each split gets a progress bar.
  """
  LOCAL.makedirs(settings.out_dir)
  records: dict[Task, dict] = {}
  todo = []
  for t in tasks:
    old = LOCAL.read_json(record_path(t, settings))
    if is_finished(old, t, settings):
      records[t] = dict(old, reused=True)
    else:
      todo.append(t)
  if records:
    print(f"{len(records)} of {len(tasks)} input shard(s) already finished in {settings.out_dir}: "
          "skipping them", file=sys.stderr, flush=True)
  if todo:  # the directory is changing: no manifest until every shard is finished again
    LOCAL.remove(LOCAL.join(settings.out_dir, sources.PREPARED_MANIFEST))
  pool = None
  if workers > 1 and len(todo) > 1:
    ctx = multiprocessing.get_context("spawn")  # no fork: tokenizer threads, tqdm's monitor
    counters = [ctx.Value("q", 0) for _ in range(3)]
    threads = max(1, (os.cpu_count() or 1) // workers)
    pool = concurrent.futures.ProcessPoolExecutor(
        min(workers, len(todo)), mp_context=ctx, initializer=_init_worker,
        initargs=(settings, threads, counters))
  elif todo and tok is None:
    tok = tokenizer_lib.load(settings.tokenizer)
  try:
    for split in dict.fromkeys(t.split for t in todo):
      split_tasks = [t for t in todo if t.split == split]
      bar = _Bar(f"tokenising {split}", sum(os.path.getsize(t.path) for t in split_tasks))
      try:
        if pool is None:
          for t in split_tasks:
            records[t] = tokenize_shard(t, settings, tok, LOCAL, bar.add)
        else:
          base = [c.value for c in counters]
          futures = {pool.submit(_work, t, settings): t for t in split_tasks}
          pending = set(futures)
          while pending:
            done, pending = concurrent.futures.wait(pending, timeout=0.5)
            bar.set(*(c.value - b for c, b in zip(counters, base)))
            for f in done:
              records[futures[f]] = f.result()
      finally:
        bar.close()
  finally:
    if pool is not None:
      pool.shutdown(cancel_futures=True)
  return [records[t] for t in tasks]


# --------------------------------------------------------------- the manifest


def merge(tasks: list[Task], settings: Settings, tok, storage: LocalStorage = LOCAL) -> dict | None:
  """Writes and returns the manifest when every task of the plan is finished, else None."""
  records = [storage.read_json(record_path(t, settings, storage)) for t in tasks]
  if not all(is_finished(r, t, settings, storage) for r, t in zip(records, tasks)):
    return None
  splits: dict[str, dict] = {}
  for t, r in zip(tasks, records):
    s = splits.setdefault(t.split, {"documents": 0, "tokens": 0, "bad_records": 0, "inputs": 0,
                                    "broken_inputs": [], "shards": []})
    s["inputs"] += 1
    s["documents"] += r["documents"]
    s["tokens"] += r["tokens"]
    s["bad_records"] += r["bad_records"]
    if r["status"] == "skipped_broken":
      s["broken_inputs"].append({"input": t.path, "error": r["error"]})
    s["shards"] += [{"name": o["name"], "documents": o["documents"], "tokens": o["tokens"],
                     "input": t.path} for o in r["outputs"]]
  settings_key = {k: v for k, v in settings.key().items() if k != "tokenizer_sha256"}
  settings_key["skip_bad_records"] = settings.skip_bad_records
  manifest = {"tokenizer": settings.tokenizer, "tokenizer_sha256": settings.tokenizer_sha256,
              "vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "settings": settings_key,
              "splits": splits}
  storage.write_json(storage.join(settings.out_dir, sources.PREPARED_MANIFEST), manifest)
  return manifest


def summarize(tasks: list[Task], records: list[dict], settings: Settings, manifest: dict | None,
              all_tasks: int) -> dict:
  """Prints what this run did; raises a one-line UserError when a shard failed."""
  out: dict = {"output": settings.out_dir}
  for t, r in zip(tasks, records):
    s = out.setdefault(t.split, {"documents": 0, "tokens": 0})
    s["documents"] += r["documents"]
    s["tokens"] += r["tokens"]
  status = {"written": sum(r["status"] == "done" and not r.get("reused") for r in records),
            "reused": sum(bool(r.get("reused")) for r in records),
            "skipped_broken": sum(r["status"] == "skipped_broken" for r in records),
            "failed": sum(r["status"] == "failed" for r in records)}
  out["input_shards"] = status
  out["manifest"] = (settings.out_dir.rstrip("/") + "/" + sources.PREPARED_MANIFEST) if manifest else None
  bad = sum(r["bad_records"] for r in records)
  if bad:
    first = next(r["first_bad_record"] for r in records if r["bad_records"])
    print(f"warning: skipped {bad} bad record(s); first: {first}", file=sys.stderr)
  for r in records:
    if r["status"] == "skipped_broken":
      print(f"warning: skipped broken input: {r['error']}", file=sys.stderr)
  failed = [r for r in records if r["status"] == "failed"]
  for r in failed:
    print(f"failed: {r['error']}", file=sys.stderr)
  if manifest is None and not failed:
    print(f"{len(tasks)} of {all_tasks} input shard(s) are this run's; the manifest is written by the "
          "run that finishes the last shard (or rerun any part: finished shards are skipped)",
          file=sys.stderr)
  print(json.dumps(out), flush=True)
  if failed:
    finished = len(records) - len(failed)
    raise UserError(f"{len(failed)} of {len(records)} input shard(s) failed (first: {failed[0]['error']}); "
                    f"the {finished} finished shard(s) stay valid: fix or remove the failed input(s), "
                    "or set --config.data.skip_bad_records=True, and rerun the same command to finish")
  return out


# ------------------------------------------- the refusal to load a big corpus


def _config_arg(argv: list[str]) -> str | None:
  spec = None
  for i, arg in enumerate(argv[1:], start=1):
    if arg.startswith("--config="):
      spec = arg.split("=", 1)[1]
    elif arg == "--config" and i + 1 < len(argv):
      spec = argv[i + 1]
  return spec


def prepare_command(cfg, output: str = "elas_tokens") -> str:
  """The prepare command for a config's data, and the flags to train from its output."""
  d = cfg.data
  args = ["python", "-m", "elas_jax.data.prepare", "--config", _config_arg(sys.argv) or "CONFIG"]
  args += [f"--config.data.{k}={d[k]}" for k in ("train_files", "eval_files", "tokenizer") if d[k]]
  defaults = {"format": "auto", "text_key": "text", "txt_split": "blank_line"}
  args += [f"--config.data.{k}={d[k]}" for k, v in defaults.items() if d[k] != v]
  args += [f"--config.model.vocab_size={cfg.model.vocab_size}", f"--output={output}"]
  then = f"--config.data.train_files='{output}/train-*.arrayrecord'"
  if d.eval_files:
    then += f" --config.data.eval_files='{output}/validation-*.arrayrecord'"
  return f"{shlex.join(args)}, then train with {then}"
