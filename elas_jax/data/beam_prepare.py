"""Pre-tokenisation as an Apache Beam pipeline, for corpora beyond one machine.

The pipeline is ``Create(input shards) | Reshuffle | ParDo(TokenizeShard)``:
each element is one input file, and ``TokenizeShard`` runs
``pretokenize.tokenize_shard`` on it, the function the single-machine prepare
runs. So the outputs are byte-identical to ``--workers``' and a Beam run is
resumable the same way (finished shards are skipped, also across runners).
The driver merges the shard records into the manifest after the pipeline.

Why not array_record's Beam sink (``WriteToArrayRecord``): it is a
``FileBasedSink``, which distributes records over shards by Beam's own
sharding, so which document lands in which shard, and in what order, varies
from run to run; a shard per input file, written by our DoFn, keeps the
document order (and with it the training data order) of the input glob.

Paths with a scheme (``gs://``, ``s3://``, ``hdfs://``) go through Beam's
``FileSystems`` (inputs, the tokenizer, outputs and records); ArrayRecord is
written to a local temporary file and then copied to its final name. Workers
need this package installed: build a wheel (``pip wheel --no-deps . -w dist``)
and pass ``--extra_package dist/elas_jax-*.whl`` among the Beam options.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import types

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from elas_jax.data import pretokenize, tokenizer as tokenizer_lib
from elas_jax.errors import DataError

_RAW = CompressionTypes.UNCOMPRESSED  # never let Beam decompress .gz inputs: the readers do


class BeamStorage(pretokenize.LocalStorage):
  """Local paths as on one machine; paths with a scheme through Beam's ``FileSystems``.

  ``everywhere=True`` sends local paths through ``FileSystems`` too (its
  local filesystem), which is how the tests exercise the remote code path.
  """

  def __init__(self, everywhere: bool = False):
    self.everywhere = everywhere
    self._local_tmps: set[str] = set()  # writer_path's local files

  def _remote(self, path: str) -> bool:
    return self.everywhere or "://" in path

  def join(self, *parts: str) -> str:
    return FileSystems.join(*parts) if self._remote(parts[0]) else super().join(*parts)

  def makedirs(self, path: str) -> None:
    if not self._remote(path):
      return super().makedirs(path)
    if not FileSystems.exists(path):
      try:
        FileSystems.mkdirs(path)
      except IOError:  # object stores have no directories (and may say so)
        pass

  def open(self, path: str):
    if not self._remote(path):
      return super().open(path)
    try:
      return FileSystems.open(path, compression_type=_RAW)
    except Exception as e:  # BeamIOError wraps the filesystem's error
      raise DataError(f"{path}: cannot read ({e})") from None

  def _metadata(self, path: str):
    found = FileSystems.match([path])[0].metadata_list
    return found[0] if found else None

  def stat(self, path: str) -> list[int]:
    if not self._remote(path):
      return super().stat(path)
    m = self._metadata(path)
    if m is None:
      raise FileNotFoundError(path)
    return [m.size_in_bytes, int(round(m.last_updated_in_seconds * 1e6))]

  def size(self, path: str) -> int | None:
    if not self._remote(path):
      return super().size(path)
    try:
      m = self._metadata(path)
    except Exception:
      return None
    return None if m is None else m.size_in_bytes

  def read_json(self, path: str) -> dict | None:
    if not self._remote(path):
      return super().read_json(path)
    try:
      if not FileSystems.exists(path):
        return None
      with FileSystems.open(path, compression_type=_RAW) as f:
        return json.loads(f.read())
    except (IOError, ValueError):
      return None

  def write_json(self, path: str, obj: dict) -> None:
    if not self._remote(path):
      return super().write_json(path, obj)
    tmp = f"{path}.tmp-{os.getpid()}"
    with FileSystems.create(tmp, compression_type=_RAW) as f:
      f.write(json.dumps(obj, indent=1).encode())
    self._replace(tmp, path)

  def _replace(self, src: str, dst: str) -> None:
    if FileSystems.exists(dst):  # some filesystems refuse to rename onto an existing file
      FileSystems.delete([dst])
    FileSystems.rename([src], [dst])

  def writer_path(self, final: str) -> str:
    if not self._remote(final):
      return super().writer_path(final)
    fd, tmp = tempfile.mkstemp(suffix=".arrayrecord")  # ArrayRecordWriter needs a local file
    os.close(fd)
    self._local_tmps.add(tmp)
    return tmp

  def publish(self, tmp: str, final: str) -> None:
    if not self._remote(final):
      return super().publish(tmp, final)
    with open(tmp, "rb") as src, FileSystems.create(final + ".tmp", compression_type=_RAW) as dst:
      shutil.copyfileobj(src, dst, 1 << 22)
    self.remove(tmp)
    self._replace(final + ".tmp", final)

  def remove(self, path: str) -> None:
    if not self._remote(path) or path in self._local_tmps:
      self._local_tmps.discard(path)
      return super().remove(path)
    if FileSystems.exists(path):
      FileSystems.delete([path])

  def localize(self, path: str) -> str:
    """A local copy of a (remote) file, e.g. the tokenizer, for libraries that need a path."""
    if "://" not in path:
      return path
    fd, local = tempfile.mkstemp(suffix="-" + os.path.basename(path))
    with os.fdopen(fd, "wb") as dst, FileSystems.open(path, compression_type=_RAW) as src:
      shutil.copyfileobj(src, dst, 1 << 22)
    return local


def match(pattern: str) -> list[str]:
  """The files a glob matches, on any filesystem Beam knows (gs://, s3://, local, ...)."""
  try:
    return [m.path for m in FileSystems.match([pattern])[0].metadata_list]
  except Exception:  # BeamIOError: nothing matched, or an unknown scheme
    return []


def load_tokenizer(data_cfg, vocab_size: int, storage: BeamStorage):
  """The config's tokenizer, copied locally first when it is remote; and the path workers load."""
  path = data_cfg.tokenizer
  local = types.SimpleNamespace(tokenizer=storage.localize(path) if path else path,
                                source=data_cfg.source)
  tok = tokenizer_lib.from_config(local, vocab_size)
  return tok, (path if "://" in path else os.path.abspath(tok.path))


class TokenizeShard(beam.DoFn):
  """One input file -> its output shard(s) and record, via ``pretokenize.tokenize_shard``."""

  def __init__(self, settings: pretokenize.Settings, everywhere: bool = False):
    self._settings, self._everywhere = settings, everywhere

  def setup(self):
    self._storage = BeamStorage(self._everywhere)
    tok = tokenizer_lib.load(self._storage.localize(self._settings.tokenizer))
    if tokenizer_lib.fingerprint(tok) != self._settings.tokenizer_sha256:
      raise DataError(f"{self._settings.tokenizer}: changed since the pipeline was built")
    if hasattr(tok, "threads"):
      tok.threads = 1  # Beam runs one element per core: no threads on top
    self._tok = tok

  def process(self, task: pretokenize.Task):
    record = pretokenize.tokenize_shard(task, self._settings, self._tok, self._storage)
    counter = lambda name: beam.metrics.Metrics.counter("elas_prepare", name)
    counter("documents").inc(record["documents"])
    counter("tokens").inc(record["tokens"])
    counter("shards_" + ("reused" if record.get("reused") else record["status"])).inc()
    yield task.name, record["status"]


def run(tasks: list[pretokenize.Task], settings: pretokenize.Settings, pipeline_args: list[str],
        storage: BeamStorage | None = None) -> list[dict]:
  """Runs the pipeline over ``tasks`` and returns their records (read back from the output)."""
  storage = storage or BeamStorage()
  storage.makedirs(settings.out_dir)
  path = lambda t: pretokenize.record_path(t, settings, storage)
  reused = {t for t in tasks if pretokenize.is_finished(storage.read_json(path(t)), t, settings, storage)}
  todo = [t for t in tasks if t not in reused]
  if reused:
    print(f"{len(reused)} of {len(tasks)} input shard(s) already finished in {settings.out_dir}: "
          "skipping them", file=sys.stderr, flush=True)
  if todo:  # the directory is changing: no manifest until every shard is finished again
    storage.remove(storage.join(settings.out_dir, pretokenize.sources.PREPARED_MANIFEST))
    if not any(a.split("=")[0] == "--default_sdk_harness_log_level" for a in pipeline_args):
      pipeline_args = [*pipeline_args, "--default_sdk_harness_log_level=WARNING"]  # no INFO flood
    with beam.Pipeline(options=PipelineOptions(pipeline_args)) as p:
      _ = (p
           | "InputShards" >> beam.Create(todo)
           | "Spread" >> beam.Reshuffle()  # one input shard per worker at a time
           | "Tokenise" >> beam.ParDo(TokenizeShard(settings, storage.everywhere)))
  records = []
  for t in tasks:
    r = storage.read_json(path(t))
    if r is None:
      raise DataError(f"{path(t)}: missing after the Beam pipeline finished")
    records.append(dict(r, reused=True) if t in reused else r)
  return records
