"""Hugging Face Hub datasets (``hf://datasets/...`` globs) and tokenizers (``hf:<owner>/<name>``),
offline: a Hub cache in huggingface_hub's own layout is built in a temporary directory
(tests/hub_cache.py) and ``HF_HUB_OFFLINE=1`` / ``HF_HUB_CACHE`` point at it, so the code
runs the huggingface_hub calls a download runs, less the network.

The "t5-base" repository holds a T5-shaped tokenizer: a 4096-piece SentencePiece model
(the tiny config's) as ``spiece.model`` and its ``tokenizer.json`` with T5's post-processor
and 100 ``<extra_id_*>`` sentinels after the pieces (T5: 32,000 + 100). Token ids are checked
against SentencePiece called directly.
"""

import gzip
import hashlib
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest

from elas_jax.data import corpus, hub, sources, tokenizer as tokenizer_lib
from elas_jax.errors import DataError
from tests import hub_cache
from tests.helpers import ROOT, read_metrics, tiny_train_config

C4 = "hf://datasets/allenai/c4"
TRAIN = f"{C4}/en/c4-train.*-of-01024.json.gz"
VALIDATION = f"{C4}/en/c4-validation.*-of-00008.json.gz"
PIECES = 4096  # the sample tokenizer's SentencePiece pieces
SENTINELS = 100


def _gz_jsonl(texts) -> bytes:
  lines = "".join(json.dumps({"text": t, "timestamp": "2019-04-25", "url": "https://x"}) + "\n" for t in texts)
  return gzip.compress(lines.encode(), mtime=0)


def _t5_like_tokenizer_json(spm_path: str) -> bytes:
  from tokenizers import AddedToken, processors

  from elas_jax import hf

  tok = hf._sp_to_tokenizer_json(spm_path)  # encodes like SentencePiece (tests/test_export.py)
  tok.add_special_tokens([AddedToken(f"<extra_id_{i}>", special=True, normalized=False)
                          for i in reversed(range(SENTINELS))])  # T5: <extra_id_0> is the last id
  tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
  return tok.to_str().encode()


@pytest.fixture(scope="module")
def hub_files(tmp_path_factory):
  """The Hub cache: C4-style shards of the sample corpus, a T5-shaped tokenizer, and
  repositories for the error cases."""
  cache = str(tmp_path_factory.mktemp("hf") / "hub")
  with open(corpus.sample_corpus()["train"]) as f:
    texts = [json.loads(line)["text"] for line in f][:60]
  shards = {f"en/c4-train.{i:05d}-of-01024.json.gz": texts[i:50:3] for i in range(3)}
  shards["en/c4-validation.00000-of-00008.json.gz"] = texts[50:]
  shards["en.noblocklist/c4-train.00000-of-01024.json.gz"] = texts[:2]  # not matched by TRAIN
  c4 = {name: _gz_jsonl(docs) for name, docs in shards.items()}
  c4["README.md"] = b"# C4\n"
  commit = hub_cache.add_repo(cache, "allenai/c4", c4, repo_type="dataset")
  spm_path = tokenizer_lib.train_sample_tokenizer(PIECES)
  t5 = {"spiece.model": open(spm_path, "rb").read(), "tokenizer.json": _t5_like_tokenizer_json(spm_path),
        "config.json": b"{}"}
  hub_cache.add_repo(cache, "google-t5/t5-base", t5)
  hub_cache.add_repo(cache, "someone/no-tokenizer", {"config.json": b"{}"})
  hub_cache.add_repo(cache, "acme/partial", {"a.jsonl": b'{"text": "a"}\n', "b.jsonl": b'{"text": "b"}\n'},
                     repo_type="dataset", omit=("b.jsonl",))
  hub_cache.add_repo(cache, "acme/unlisted", {"a.jsonl": b'{"text": "a"}\n'}, repo_type="dataset",
                     listed=False)
  return types.SimpleNamespace(cache=cache, shards=shards, c4=c4, commit=commit, t5=t5, spm_path=spm_path)


@pytest.fixture
def offline(monkeypatch, hub_files):
  """HF_HUB_OFFLINE=1 and HF_HUB_CACHE = the test's cache, for this process (huggingface_hub
  reads both at import, so its constants are set too) and for subprocesses (the environment)."""
  from huggingface_hub import constants

  env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": hub_files.cache,
         "HF_HOME": os.path.dirname(hub_files.cache)}
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
  monkeypatch.setattr(constants, "HF_HUB_CACHE", hub_files.cache)
  return hub_files


def _spm():
  import sentencepiece as spm

  return spm.SentencePieceProcessor(model_file=tokenizer_lib.train_sample_tokenizer(PIECES))


def test_the_cache_is_huggingface_hubs_own(hub_files):
  from huggingface_hub import get_cached_repo_tree, scan_cache_dir

  info = scan_cache_dir(hub_files.cache)
  assert not info.warnings
  repos = {(r.repo_type, r.repo_id): r for r in info.repos}
  c4 = repos[("dataset", "allenai/c4")]
  (rev,) = c4.revisions
  assert rev.commit_hash == hub_files.commit and rev.refs == {"main"}
  assert {f.file_name for f in rev.files} == {os.path.basename(p) for p in hub_files.c4}
  listed = get_cached_repo_tree("allenai/c4", repo_type="dataset", cache_dir=hub_files.cache)
  assert sorted(f.path for f in listed) == sorted(hub_files.c4)


def test_a_hub_glob_is_the_cached_snapshots_files(offline):
  import fnmatch

  files = hub.match(TRAIN)
  want = sorted(n for n in offline.c4 if fnmatch.fnmatchcase(n, "en/c4-train.*-of-01024.json.gz"))
  assert len(want) == 3
  snapshot = os.path.join(offline.cache, "datasets--allenai--c4", "snapshots", offline.commit)
  assert files == [os.path.join(snapshot, *n.split("/")) for n in want]
  assert [open(f, "rb").read() for f in files] == [offline.c4[n] for n in want]
  # a revision (here the commit), a character class, and the sources layer (the same files)
  assert hub.match(f"{C4}@{offline.commit}/en/c4-train.0000[02]-of-01024.json.gz") == [files[0], files[2]]
  assert sources.resolve_files(f"{TRAIN},{VALIDATION}", "data.train_files") == files + hub.match(VALIDATION)


def test_training_data_from_the_hub_equals_the_same_local_files(offline, tmp_path):
  local = []
  for name in sorted(n for n in offline.shards if n.startswith("en/c4-train")):
    local.append(tmp_path / os.path.basename(name))
    local[-1].write_bytes(offline.c4[name])
  from_hub = sources.open_documents(TRAIN, "data.train_files")
  from_disk = sources.open_documents(str(tmp_path / "c4-train.*.json.gz"), "data.train_files")
  assert len(from_hub) == len(from_disk) == 50
  assert [from_hub[i] for i in range(50)] == [from_disk[i] for i in range(50)]


def test_tokenizer_by_hub_name_and_t5s_sentinels(offline):
  tok = tokenizer_lib.load("hf:google-t5/t5-base")
  assert isinstance(tok, tokenizer_lib.HFTokenizer) and tok.path.endswith("tokenizer.json")
  assert open(tok.path, "rb").read() == offline.t5["tokenizer.json"]
  assert (tok.vocab_size, tok.text_vocab_size, tok.eos_id, tok.pad_id) == (PIECES + SENTINELS, PIECES, 1, 0)
  sp = _spm()
  texts = ["The history of <extra_id_0> and <extra_id_99> spans.", "Plain text, with  spaces."]
  for text in texts:  # sentinels in the text are text: SentencePiece's ids, all below 4096
    assert tok.encode(text) == sp.encode(text)
  # The model's vocabulary: the pieces (the paper configs' 32000 for T5) or every id; nothing else.
  data_cfg = types.SimpleNamespace(tokenizer="hf:google-t5/t5-base", source="files")
  for vocab in (PIECES, PIECES + SENTINELS):
    assert tokenizer_lib.from_config(data_cfg, vocab).vocab_size == PIECES + SENTINELS
  with pytest.raises(DataError) as e:
    tokenizer_lib.from_config(data_cfg, PIECES + 1)
  assert str(e.value) == ("config.model.vocab_size = 4097 but tokenizer hf:google-t5/t5-base has 4196 tokens "
                          "(the last 100 special tokens it never emits: 4096 fits too); set "
                          "--config.model.vocab_size=4096")
  named = tokenizer_lib.load("hf:google-t5/t5-base/spiece.model")  # a file of the repository
  assert isinstance(named, tokenizer_lib.SentencePieceTokenizer) and named.vocab_size == PIECES


def test_hub_errors_are_one_line_and_name_what_is_missing(offline, capsys):
  cases = [
      (lambda: hub.match(f"{C4.replace('c4', 'c5')}/en/*.json.gz"),
       "dataset repository 'allenai/c5' is not in the Hugging Face cache"),
      (lambda: hub.match(f"{C4}@v9/en/*.json.gz"),
       "dataset repository 'allenai/c4' at revision 'v9' is not in the Hugging Face cache"),
      (lambda: sources.resolve_files(f"{C4}/en/c4-train.9*.json.gz", "data.train_files"),
       f"config.data.train_files: '{C4}/en/c4-train.9*.json.gz' matches no file"),
      (lambda: hub.match("hf://datasets/acme/partial/*.jsonl"),
       "1 matching file(s) of the dataset repository 'acme/partial' are not in the Hugging Face cache "
       "(first: b.jsonl)"),
      (lambda: hub.match(C4), "give a glob of files inside the repository"),
      (lambda: tokenizer_lib.load("hf:google-t5/t5-large"),
       "config.data.tokenizer = 'hf:google-t5/t5-large': the model repository 'google-t5/t5-large' is not "
       "in the Hugging Face cache"),
      (lambda: tokenizer_lib.load("hf:someone/no-tokenizer"),
       "the model repository 'someone/no-tokenizer' has no tokenizer.json or spiece.model or tokenizer.model"),
      (lambda: tokenizer_lib.load("hf:t5-base"), "config.data.tokenizer = 'hf:t5-base': Invalid HF URI"),
  ]
  for call, needle in cases:
    with pytest.raises(DataError) as e:
      call()
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)
  assert "HF_HUB_OFFLINE is set" in str(pytest.raises(DataError, cases[0][0]).value)
  # Files fetched one by one (no cached listing): used, with a warning that more may exist.
  capsys.readouterr()
  assert len(hub.match("hf://datasets/acme/unlisted/*.jsonl")) == 1
  assert "no cached file listing of the dataset repository 'acme/unlisted'" in capsys.readouterr().err


def _prepare(out, *extra):
  args = ["--config", "configs/tiny.py:elas", "--config.data.source=files",
          f"--config.data.train_files={TRAIN}", f"--config.data.eval_files={VALIDATION}",
          "--config.data.tokenizer=hf:google-t5/t5-base", f"--output={out}", *extra]
  return subprocess.run([sys.executable, "-m", "elas_jax.data.prepare", *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=300)


@pytest.mark.slow
def test_prepare_reads_a_hub_dataset_with_a_hub_tokenizer_offline(offline, tmp_path):
  from tests.test_prepare import read_records

  out = tmp_path / "tok"
  p = _prepare(out)
  assert p.returncode == 0, p.stderr[-3000:]
  manifest = json.loads((out / "elas_prepared.json").read_text())
  assert manifest["tokenizer"].endswith("tokenizer.json") and manifest["vocab_size"] == PIECES + SENTINELS
  assert manifest["tokenizer_sha256"] == hashlib.sha256(offline.t5["tokenizer.json"]).hexdigest()[:16]
  sp = _spm()
  train = sorted(n for n in offline.shards if n.startswith("en/c4-train"))
  for i, name in enumerate(train):
    got = read_records(out / f"train-{i:05d}-of-00003.arrayrecord")
    assert [g.tolist() for g in got] == [sp.encode(t) for t in offline.shards[name]]
  assert manifest["splits"]["validation"]["documents"] == 10
  again = _prepare(out)  # resumable through the cached Hub files: nothing redone
  assert again.returncode == 0, again.stderr[-3000:]
  assert json.loads(again.stdout.strip().splitlines()[-1])["input_shards"]["reused"] == 4


@pytest.mark.slow
def test_tiny_run_with_the_papers_protocol_from_the_hub(offline, tmp_path):
  """The paper configs' data settings (truncate_pad, the T5-style Hub tokenizer whose vocabulary
  holds 100 sentinels more than the model's) on the tiny model, from the Hub cache."""
  from elas_jax import trainer

  cfg = tiny_train_config("elas", **{
      "data.source": "files", "data.train_files": TRAIN, "data.eval_files": VALIDATION,
      "data.tokenizer": "hf:google-t5/t5-base", "data.packing": "truncate_pad", "train.steps": 6,
      "train.eval_every": 6, "train.ckpt_every": 6, "train.eval_tokens": 200})
  final = trainer.train_and_evaluate(cfg, str(tmp_path))
  records = [r for r in read_metrics(str(tmp_path)) if "loss" in r]
  assert [r["step"] for r in records] == list(range(1, 7)) and all(np.isfinite(r["loss"]) for r in records)
  rows, seq = cfg.train.batch_size, cfg.train.seq_len
  for r in records:  # at most seq_len - 1 real targets per row; tokens_per_s counts them
    assert 0 < r["tokens"] <= rows * (seq - 1)
    assert r["tokens_per_s"] * r["step_time"] == pytest.approx(r["tokens"], rel=1e-6)
  # validation: whole batches until 200 real target tokens (the 10 documents hold more)
  assert 200 <= final["eval_tokens"] < 200 + rows * (seq - 1) and np.isfinite(final["eval_loss"])
  assert records[-1]["eval_tokens"] == final["eval_tokens"]
