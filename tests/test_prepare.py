"""Pre-tokenisation (python -m elas_jax.data.prepare): streaming shards, workers, machine
splits, resumption after a kill, broken input shards.

Inputs are json.gz shards of the sample corpus; the tokenizer is the tiny config's
SentencePiece model. Token ids are checked against SentencePiece called directly.
"""

import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from elas_jax.data import pipeline, pretokenize, sources, tokenizer as tokenizer_lib
from elas_jax.errors import DataError
from tests.helpers import ROOT, load_config

N_SHARDS = 5


def read_records(path):
  from array_record.python.array_record_module import ArrayRecordReader

  r = ArrayRecordReader(str(path))
  out = [np.frombuffer(b, np.int32) for b in r.read_all()]
  r.close()
  return out


@pytest.fixture(scope="module")
def tok():
  return tokenizer_lib.load(tokenizer_lib.train_sample_tokenizer(4096))


@pytest.fixture(scope="module")
def corpus_shards(tmp_path_factory):
  """The sample's documents dealt into N_SHARDS json.gz shards (C4's layout)."""
  from elas_jax.data import corpus

  root = tmp_path_factory.mktemp("c4")
  with open(corpus.sample_corpus()["train"]) as f:
    texts = [json.loads(line)["text"] for line in f][:400]
  shards = [texts[i::N_SHARDS] for i in range(N_SHARDS)]
  for i, part in enumerate(shards):
    with gzip.open(root / f"c4-train.{i:05d}-of-{N_SHARDS:05d}.json.gz", "wt") as f:
      for t in part:
        f.write(json.dumps({"text": t, "url": "https://example.com", "timestamp": "2019"}) + "\n")
  with gzip.open(root / "c4-validation.00000-of-00001.json.gz", "wt") as f:
    for t in texts[:20]:
      f.write(json.dumps({"text": t}) + "\n")
  return root, shards


def prepare(root, out, *extra, tok_path=None, wrapper=None, timeout=300):
  args = ["--config", "configs/tiny.py:elas", "--config.data.source=files",
          f"--config.data.train_files={root}/c4-train.*.json.gz",
          f"--config.data.eval_files={root}/c4-validation.*.json.gz",
          f"--config.data.tokenizer={tok_path or tokenizer_lib.train_sample_tokenizer(4096)}",
          f"--output={out}", *extra]
  cmd = [sys.executable, "-c", wrapper, *args] if wrapper else \
      [sys.executable, "-m", "elas_jax.data.prepare", *args]
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def summary(p):
  return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def reference(corpus_shards, tmp_path_factory):
  """A clean single-process run."""
  root, _ = corpus_shards
  out = tmp_path_factory.mktemp("ref")
  p = prepare(root, out)
  assert p.returncode == 0, p.stderr[-3000:]
  return out, p


def shard_bytes(out):
  return {f: (out / f).read_bytes() for f in sorted(os.listdir(out)) if f.endswith(".arrayrecord")}


def test_one_output_shard_per_input_with_the_tokenizers_ids(reference, corpus_shards, tok):
  out, p = reference
  _, shards = corpus_shards
  manifest = json.loads((out / "elas_prepared.json").read_text())
  train = manifest["splits"]["train"]
  assert [s["name"] for s in train["shards"]] == [f"train-{i:05d}-of-{N_SHARDS:05d}.arrayrecord"
                                                  for i in range(N_SHARDS)]
  assert manifest["tokenizer_sha256"] == tokenizer_lib.fingerprint(tok)
  for i, texts in enumerate(shards):
    expected = [tok._sp.encode(t) for t in texts]  # SentencePiece itself, one document at a time
    got = read_records(out / f"train-{i:05d}-of-{N_SHARDS:05d}.arrayrecord")
    assert [g.tolist() for g in got] == expected
    assert train["shards"][i]["documents"] == len(texts)
    assert train["shards"][i]["tokens"] == sum(map(len, expected))
  assert train["tokens"] == sum(s["tokens"] for s in train["shards"])
  s = summary(p)
  assert s["train"] == {"documents": 400, "tokens": train["tokens"]}
  assert s["input_shards"] == {"written": N_SHARDS + 1, "reused": 0, "skipped_broken": 0, "failed": 0}
  assert "tokenising train" in p.stderr and "tokens/s" in p.stderr
  assert not [f for f in os.listdir(out) if ".tmp" in f]


def test_training_reads_the_prepared_shards_like_the_text(reference, corpus_shards, tok):
  out, _ = reference
  root, _ = corpus_shards
  cfg = load_config("configs/tiny.py", "elas")
  cfg.data.source = "files"
  cfg.data.tokenizer = tok.path
  cfg.data.train_files = f"{root}/c4-train.*.json.gz"
  cfg.train.seq_len, cfg.train.batch_size = 16, 4
  raw = pipeline.open_split(cfg, "train")
  cfg.data.train_files = f"{out}/train-*.arrayrecord"
  prepared = pipeline.open_split(cfg, "train")
  assert prepared.kind == "tokens" and len(prepared) == len(raw) == 400
  s = pipeline.Spec.from_config(cfg)
  a = iter(pipeline.train_dataset(raw, tok, s, 0, 1))
  b = iter(pipeline.train_dataset(prepared, tok, s, 0, 1))
  for _ in range(10):
    np.testing.assert_array_equal(next(a)["inputs"], next(b)["inputs"])


@pytest.mark.slow
def test_workers_and_machine_splits_write_the_same_bytes(reference, corpus_shards, tmp_path):
  root, _ = corpus_shards
  ref_out, _ = reference
  ref_manifest = json.loads((ref_out / "elas_prepared.json").read_text())
  p = prepare(root, tmp_path / "w2", "--workers=2")
  assert p.returncode == 0, p.stderr[-3000:]
  assert shard_bytes(tmp_path / "w2") == shard_bytes(ref_out)
  assert json.loads((tmp_path / "w2" / "elas_prepared.json").read_text()) == ref_manifest
  # Two "machines" on one output directory: the first leaves no manifest, the second completes it.
  split = tmp_path / "split"
  p0 = prepare(root, split, "--shard_index=0", "--num_shards=2")
  assert p0.returncode == 0, p0.stderr[-3000:]
  assert summary(p0)["manifest"] is None and not (split / "elas_prepared.json").exists()
  assert "3 of 6 input shard(s) are this run's" in p0.stderr
  p1 = prepare(root, split, "--shard_index=1", "--num_shards=2")
  assert p1.returncode == 0, p1.stderr[-3000:]
  assert summary(p1)["input_shards"]["written"] == 3
  assert shard_bytes(split) == shard_bytes(ref_out)
  assert json.loads((split / "elas_prepared.json").read_text()) == ref_manifest


def test_shard_docs_cuts_each_input_into_parts(reference, corpus_shards, tmp_path):
  root, _ = corpus_shards
  ref_out, _ = reference
  p = prepare(root, tmp_path / "parts", "--shard_docs=30")
  assert p.returncode == 0, p.stderr[-3000:]
  names = sorted(f for f in os.listdir(tmp_path / "parts") if f.startswith("train-00000-"))
  names = [n for n in names if n.endswith(".arrayrecord")]
  assert names == [f"train-00000-of-{N_SHARDS:05d}.p{k:04d}.arrayrecord" for k in range(3)]  # 80 docs
  parts = [read_records(tmp_path / "parts" / n) for n in names]
  assert [len(x) for x in parts] == [30, 30, 20]
  whole = read_records(ref_out / f"train-00000-of-{N_SHARDS:05d}.arrayrecord")
  assert [a.tolist() for x in parts for a in x] == [a.tolist() for a in whole]


# A prepare run whose ArrayRecord writer logs every file it opens and, if asked, kills the
# process (SIGKILL: no cleanup, no finally) after the 5th record of one output shard.
WRAPPER = """
import os, runpy, signal, sys
from array_record.python import array_record_module as arm
LOG, KILL_IN = os.environ["WRITE_LOG"], os.environ.get("KILL_IN", "")
Real = arm.ArrayRecordWriter

class Writer:
  def __init__(self, path, options):
    self._w, self._path, self._n = Real(path, options), path, 0
    with open(LOG, "a") as f:
      f.write(os.path.basename(path) + "\\n")

  def write(self, record):
    self._w.write(record)
    self._n += 1
    if KILL_IN and KILL_IN in self._path and self._n == 5:
      os.kill(os.getpid(), signal.SIGKILL)

  def close(self):
    self._w.close()

arm.ArrayRecordWriter = Writer
sys.argv = ["prepare", *sys.argv[1:]]
runpy.run_module("elas_jax.data.prepare", run_name="__main__")
"""


def _run_logged(root, out, log, kill_in=""):
  env = dict(os.environ, WRITE_LOG=str(log), KILL_IN=kill_in)
  args = ["--config", "configs/tiny.py:elas", "--config.data.source=files",
          f"--config.data.train_files={root}/c4-train.*.json.gz",
          f"--config.data.eval_files={root}/c4-validation.*.json.gz",
          f"--config.data.tokenizer={tokenizer_lib.train_sample_tokenizer(4096)}", f"--output={out}"]
  return subprocess.run([sys.executable, "-c", WRAPPER, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


def _written(log):
  return [line.removesuffix(".tmp") for line in log.read_text().split()] if log.exists() else []


@pytest.mark.slow
def test_a_killed_prepare_resumes_without_redoing_finished_shards(reference, corpus_shards, tmp_path):
  root, _ = corpus_shards
  ref_out, _ = reference
  out = tmp_path / "out"
  killed = _run_logged(root, out, tmp_path / "log1", kill_in=f"train-00003-of-{N_SHARDS:05d}")
  assert killed.returncode == -9, killed.stderr[-2000:]
  first = [f"train-{i:05d}-of-{N_SHARDS:05d}.arrayrecord" for i in range(3)]
  assert _written(tmp_path / "log1") == first + [f"train-00003-of-{N_SHARDS:05d}.arrayrecord"]
  left = sorted(os.listdir(out))
  assert f"train-00003-of-{N_SHARDS:05d}.arrayrecord.tmp" in left  # the shard being written
  assert f"train-00003-of-{N_SHARDS:05d}.arrayrecord" not in left and "elas_prepared.json" not in left
  before = {f: os.stat(out / f) for f in first}
  # Training refuses the unfinished directory instead of reading it as text.
  with pytest.raises(DataError, match="pre-tokenisation has not finished here"):
    sources.open_documents(f"{out}/train-*.arrayrecord", "data.train_files")

  resumed = _run_logged(root, out, tmp_path / "log2")
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  # Only the unfinished shards were written again: counted by the writer itself.
  assert _written(tmp_path / "log2") == [f"train-{i:05d}-of-{N_SHARDS:05d}.arrayrecord"
                                         for i in range(3, N_SHARDS)] + \
      ["validation-00000-of-00001.arrayrecord"]
  assert "3 of 6 input shard(s) already finished" in resumed.stderr
  for f, st in before.items():  # untouched: same inode, same mtime
    now = os.stat(out / f)
    assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns), f
  assert shard_bytes(out) == shard_bytes(ref_out)
  assert json.loads((out / "elas_prepared.json").read_text()) == \
      json.loads((ref_out / "elas_prepared.json").read_text())
  assert not [f for f in os.listdir(out) if ".tmp" in f]


def test_a_broken_input_shard_fails_alone_and_can_be_skipped(corpus_shards, tmp_path):
  root, shards = corpus_shards
  broken_root = tmp_path / "c4"
  broken_root.mkdir()
  for f in os.listdir(root):
    (broken_root / f).write_bytes((root / f).read_bytes())
  bad = broken_root / f"c4-train.00002-of-{N_SHARDS:05d}.json.gz"
  bad.write_bytes(bad.read_bytes()[:-300])  # the download was interrupted
  out = tmp_path / "out"
  p = prepare(broken_root, out)
  assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
  last = p.stderr.strip().splitlines()[-1]
  assert last.startswith("error: 1 of 6 input shard(s) failed") and bad.name in last
  assert "truncated gzip data after line" in last and "the 5 finished shard(s) stay valid" in last
  assert summary(p)["input_shards"] == {"written": 5, "reused": 0, "skipped_broken": 0, "failed": 1}
  assert not (out / "elas_prepared.json").exists()
  assert not (out / f"train-00002-of-{N_SHARDS:05d}.arrayrecord").exists()
  assert not [f for f in os.listdir(out) if ".tmp" in f]
  # Skipping: the finished shards are reused, the broken one is recorded in the manifest.
  p = prepare(broken_root, out, "--config.data.skip_bad_records=True")
  assert p.returncode == 0, p.stderr[-3000:]
  assert summary(p)["input_shards"] == {"written": 0, "reused": 5, "skipped_broken": 1, "failed": 0}
  assert f"warning: skipped broken input: {bad}" in p.stderr
  manifest = json.loads((out / "elas_prepared.json").read_text())
  train = manifest["splits"]["train"]
  assert [b["input"] for b in train["broken_inputs"]] == [str(bad)]
  assert train["documents"] == sum(len(s) for i, s in enumerate(shards) if i != 2)


def test_bad_flags_are_one_line(corpus_shards, tmp_path):
  root, _ = corpus_shards
  for extra, needle in ((["--workers=0"], "--workers=0: must be >= 1"),
                        (["--shard_index=2", "--num_shards=2"], "--shard_index=2: must be in [0, "),
                        (["--", "--direct_num_workers=2"], "Beam options need --runner")):
    p = prepare(root, tmp_path / "o", *extra)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("error: ") and needle in p.stderr, p.stderr


def test_record_key_ignores_skip_bad_records_only_for_clean_shards(tmp_path, tok):
  path = tmp_path / "in.jsonl"
  path.write_text('{"text": "hello"}\n')
  settings = pretokenize.Settings(out_dir=str(tmp_path / "o"), tokenizer=tok.path,
                                  tokenizer_sha256=tokenizer_lib.fingerprint(tok))
  os.makedirs(settings.out_dir)
  task = pretokenize.Task("train", 0, 1, str(path), "jsonl")
  r = pretokenize.tokenize_shard(task, settings, tok)
  assert r["status"] == "done" and not r.get("reused")
  import dataclasses
  skip = dataclasses.replace(settings, skip_bad_records=True)
  assert pretokenize.tokenize_shard(task, skip, tok).get("reused")  # no bad records: same output
  path.write_text('{"text": "hello"}\nnot json\n')
  r = pretokenize.tokenize_shard(task, skip, tok)
  assert r["status"] == "done" and r["bad_records"] == 1 and not r.get("reused")
  assert not pretokenize.is_finished(r, task, settings)  # without skipping, that shard fails
  assert pretokenize.tokenize_shard(task, settings, tok)["status"] == "failed"
