"""Data pipeline: sources, tokenizers, packing, determinism, sharding, checkpointing, errors."""

import dataclasses
import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from elas_jax import config_lib
from elas_jax.data import corpus, pipeline, records, sources, tokenizer as tokenizer_lib
from elas_jax.errors import DataError
from tests.helpers import ROOT, load_config, xla_flags

WORDS = [f"w{i}" for i in range(200)]
SPECIALS = ["<pad>", "</s>", "<unk>", "<s>"]  # ids 0..3
EOS, BOS, PAD = 1, 3, 0


def wid(word: str) -> int:
  return len(SPECIALS) + WORDS.index(word)


@pytest.fixture(scope="module")
def word_tokenizer(tmp_path_factory):
  """A word-level tokenizer.json whose ids are known exactly: wN -> N + 4."""
  from tokenizers import Tokenizer, models, pre_tokenizers

  vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  path = str(tmp_path_factory.mktemp("tok") / "tokenizer.json")
  tok.save(path)
  return tokenizer_lib.load(path)


def doc(i: int, length: int = 5) -> str:
  """Document i: its first word names it (w{i}), then filler words."""
  return " ".join([f"w{i}"] + [f"w{100 + (i + k) % 100}" for k in range(length - 1)])


def write_jsonl(path, texts, key="text", gz=False):
  data = "".join(json.dumps({key: t, "url": "x"}) + "\n" for t in texts).encode()
  with (gzip.open(path, "wb") if gz else open(path, "wb")) as f:
    f.write(data)
  return str(path)


def spec(**kw):
  base = dict(seq_len=8, global_batch=4, packing="concat", seed=0, read_threads=1, prefetch_buffer=4)
  base.update(kw)
  return pipeline.Spec(**base)


# ----------------------------------------------------------------- sources


def test_every_format_reads_the_same_documents(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  from array_record.python.array_record_module import ArrayRecordWriter

  texts = [doc(i) for i in range(6)]
  paths = {
      "jsonl": write_jsonl(tmp_path / "a.jsonl", texts),
      "json.gz": write_jsonl(tmp_path / "a.json.gz", texts, gz=True),
      "json array": str(tmp_path / "arr.json"),
      "txt": str(tmp_path / "a.txt"),
      "parquet": str(tmp_path / "a.parquet"),
      "arrayrecord": str(tmp_path / "a.arrayrecord"),
  }
  (tmp_path / "arr.json").write_text(json.dumps([{"text": t} for t in texts]))
  (tmp_path / "a.txt").write_text("\n\n".join(texts) + "\n")
  pq.write_table(pa.table({"text": texts, "id": list(range(6))}), paths["parquet"])
  w = ArrayRecordWriter(paths["arrayrecord"], "group_size:1")
  for t in texts:
    w.write(t.encode())
  w.close()
  for name, path in paths.items():
    docs = sources.open_documents(path, "data.train_files")
    assert [docs[i] for i in range(len(docs))] == texts, name


def test_txt_one_document_per_file_and_globs(tmp_path):
  for i in range(3):
    (tmp_path / f"d{i}.txt").write_text(f"{doc(i)}\n\n{doc(i + 10)}\n")
  docs = sources.open_documents(str(tmp_path / "d*.txt"), "data.train_files",
                                opts=sources.Options(txt_split="file"))
  assert len(docs) == 3 and docs[1] == f"{doc(1)}\n\n{doc(11)}"
  two = sources.open_documents(f"{tmp_path}/d0.txt, {tmp_path}/d2.txt", "data.train_files")
  assert [two[i] for i in range(4)] == [doc(0), doc(10), doc(2), doc(12)]


@pytest.mark.parametrize("content,needle", [
    (b'{"text": "ok"}\n{"txt": "no key"}\n', "bad.jsonl:2: no 'text' key (found: txt)"),
    (b'{"text": "ok"}\n\n{"text": "broken"\n', "bad.jsonl:3: invalid JSON"),
    (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', "bad.jsonl:2: undecodable bytes"),
    (b'{"text": 5}\n', "bad.jsonl:1: 'text' is int, not text"),
])
def test_bad_json_lines_name_file_and_line(tmp_path, content, needle):
  (tmp_path / "bad.jsonl").write_bytes(content)
  with pytest.raises(DataError) as e:
    sources.open_documents(str(tmp_path / "bad.jsonl"), "data.train_files")
  assert needle in str(e.value) and "\n" not in str(e.value)


def test_skip_bad_records_counts_and_warns(tmp_path, capsys):
  (tmp_path / "bad.jsonl").write_bytes(b'{"text": "a"}\nnot json\n{"x": 1}\n{"text": "b"}\n')
  docs = sources.open_documents(str(tmp_path / "bad.jsonl"), "data.train_files",
                                opts=sources.Options(skip_bad_records=True))
  assert [docs[0], docs[1]] == ["a", "b"]
  out = capsys.readouterr().out
  assert "skipped 2 bad record(s)" in out and "bad.jsonl:2: invalid JSON" in out


def test_file_level_errors(tmp_path):
  with pytest.raises(DataError, match=r"config.data.train_files: '.*nothing-\*.jsonl' matches no file"):
    sources.open_documents(str(tmp_path / "nothing-*.jsonl"), "data.train_files")
  (tmp_path / "empty.jsonl").write_text("\n\n")
  with pytest.raises(DataError, match="config.data.eval_files: no documents in 1 file"):
    sources.open_documents(str(tmp_path / "empty.jsonl"), "data.eval_files")
  (tmp_path / "x.csv").write_text("a,b\n")
  with pytest.raises(DataError, match="x.csv: unknown file type; set config.data.format"):
    sources.open_documents(str(tmp_path / "x.csv"), "data.train_files")
  (tmp_path / "bytes.txt").write_bytes(b"fine line\nbad \xff line\n")
  with pytest.raises(DataError, match=r"bytes.txt:2: undecodable bytes"):
    sources.open_documents(str(tmp_path / "bytes.txt"), "data.train_files")
  import pyarrow as pa
  import pyarrow.parquet as pq
  pq.write_table(pa.table({"content": ["a"]}), str(tmp_path / "p.parquet"))
  with pytest.raises(DataError, match=r"p.parquet: no column 'text' \(columns: content\)"):
    sources.open_documents(str(tmp_path / "p.parquet"), "data.train_files")


def test_tokenizer_errors(tmp_path, word_tokenizer):
  with pytest.raises(DataError, match=r"config.data.tokenizer = '.*missing.model': file does not exist"):
    tokenizer_lib.load(str(tmp_path / "missing.model"))
  (tmp_path / "junk.model").write_bytes(b"\x00\x01garbage")
  with pytest.raises(DataError, match="junk.model: not a readable SentencePiece model"):
    tokenizer_lib.load(str(tmp_path / "junk.model"))
  cfg = load_config("configs/tiny.py", "elas")
  cfg.data.source, cfg.data.tokenizer = "files", word_tokenizer.path
  with pytest.raises(DataError, match=r"config.model.vocab_size = 4096 but tokenizer .* has 204 tokens"):
    tokenizer_lib.from_config(cfg.data, cfg.model.vocab_size)
  cfg.data.tokenizer = ""
  with pytest.raises(DataError, match="config.data.tokenizer is empty"):
    tokenizer_lib.from_config(cfg.data, 204)


# ----------------------------------------------------------------- packing


def stream(texts, tok, **kw):
  docs = sources.TextDocuments(texts)
  return pipeline.eval_batches(docs, tok, spec(**kw), 0, 1)


def test_concat_exact_token_stream(word_tokenizer):
  texts = ["w1 w2 w3", "w4 w5", "w6 w7 w8 w9 w10 w11 w12"]
  batches, n = stream(texts, word_tokenizer, seq_len=4, global_batch=2, eval_tokens=16)
  expected = []
  for t in texts:
    expected += [wid(w) for w in t.split()] + [EOS]
  assert len(expected) == 15  # -> windows of 5 tokens: 3 full windows, then the padded remainder
  windows_ = [expected[i:i + 5] for i in range(0, 15, 5)]
  b0 = batches[0]
  np.testing.assert_array_equal(b0["inputs"], [w[:-1] for w in windows_[:2]])
  np.testing.assert_array_equal(b0["targets"], [w[1:] for w in windows_[:2]])
  assert b0["mask"].all()
  b1 = batches[1]
  np.testing.assert_array_equal(b1["inputs"][0], windows_[2][:-1])
  assert b1["mask"][0].all() and not b1["mask"][1].any()  # the padding row is masked
  assert n == 12


def test_truncate_pad_windows_and_mask(word_tokenizer):
  texts = ["w1 w2", " ".join(f"w{i}" for i in range(20, 40))]
  batches, n = stream(texts, word_tokenizer, seq_len=6, global_batch=2, packing="truncate_pad",
                      eval_tokens=7)
  b = batches[0]
  # short document: w1 w2 </s> then padding; mask marks the 2 real targets
  np.testing.assert_array_equal(b["inputs"][0], [wid("w1"), wid("w2"), EOS, PAD, PAD, PAD])
  np.testing.assert_array_equal(b["targets"][0], [wid("w2"), EOS, PAD, PAD, PAD, PAD])
  np.testing.assert_array_equal(b["mask"][0], [1, 1, 0, 0, 0, 0])
  # long document: a row of 6 tokens, its first 5 and EOS (the last real target); the
  # row's last position predicts padding, masked
  row = [wid(f"w{i}") for i in range(20, 25)] + [EOS]
  np.testing.assert_array_equal(b["inputs"][1], row)
  np.testing.assert_array_equal(b["targets"][1], row[1:] + [PAD])
  np.testing.assert_array_equal(b["mask"][1], [1, 1, 1, 1, 1, 0])
  assert n == 7


def test_truncate_pad_rows_are_the_papers_tokenizer_call(word_tokenizer):
  """GaLore/LORO rows: ``tokenizer(text, max_length=L, truncation=True, padding="max_length")``
  with T5's post-processor (``$A </s>``), here run by HF tokenizers itself; targets and mask
  as HF's causal-LM loss on them (labels = ids with pad -> -100, shifted by one)."""
  from tokenizers import Tokenizer, processors

  L = 8
  ref = Tokenizer.from_file(word_tokenizer.path)
  ref.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", EOS)])
  ref.enable_truncation(max_length=L)
  ref.enable_padding(length=L, pad_id=PAD, pad_token="<pad>")
  texts = [doc(i, length=k) for i, k in enumerate([1, 3, L - 1, L, L + 1, 3 * L])]
  batches, n = stream(texts, word_tokenizer, seq_len=L, global_batch=len(texts), packing="truncate_pad",
                      eval_tokens=10**6)
  (b,) = batches
  want_n = 0
  for i, text in enumerate(texts):
    ids = np.array(ref.encode(text).ids)
    labels = np.where(ids == PAD, -100, ids)
    np.testing.assert_array_equal(b["inputs"][i], ids)
    want_mask = np.append(labels[1:] != -100, False)  # HF's shift drops the last position
    np.testing.assert_array_equal(b["mask"][i], want_mask)
    np.testing.assert_array_equal(b["targets"][i][want_mask], labels[1:][want_mask[:-1]])
    want_n += int(want_mask.sum())
  assert ids[-1] == EOS and n == want_n  # the longest document kept its EOS


def test_truncate_pad_warns_when_the_run_would_repeat_documents(word_tokenizer, capsys):
  docs = sources.TextDocuments([doc(i) for i in range(40)])
  for packing, steps, warned in (("truncate_pad", 10, False), ("truncate_pad", 11, True), ("concat", 11, False)):
    pipeline.train_dataset(docs, word_tokenizer, spec(packing=packing, global_batch=4, steps=steps), 0, 1)
    out = capsys.readouterr().out
    assert ("holds 40 documents but train.steps x train.batch_size = 44 rows" in out) == warned, out


def test_truncate_pad_evaluates_until_eval_tokens_real_targets(word_tokenizer):
  # 10 documents of k words: rows of k + 1 tokens, k real targets each (seq_len 16)
  lengths = [3, 9, 2, 7, 5, 4, 8, 6, 1, 9]
  docs = sources.TextDocuments([doc(i, length=k) for i, k in enumerate(lengths)])
  s = spec(packing="truncate_pad", global_batch=2, seq_len=16, eval_tokens=30)
  batches, n = pipeline.eval_batches(docs, word_tokenizer, s, 0, 1)
  # per batch of 2 rows: 12, 9, 9, 14, ... -> 12 + 9 + 9 = 30 after 3 batches
  assert len(batches) == 3 and n == 30 == sum(lengths[:6])
  s = dataclasses.replace(s, eval_tokens=31)
  batches, n = pipeline.eval_batches(docs, word_tokenizer, s, 0, 1)
  assert len(batches) == 4 and n == sum(lengths[:8])


def test_add_bos(word_tokenizer):
  batches, _ = stream(["w1 w2"], word_tokenizer, seq_len=4, global_batch=1,
                      packing="truncate_pad", add_bos=True, eval_tokens=4)
  np.testing.assert_array_equal(batches[0]["inputs"][0], [BOS, wid("w1"), wid("w2"), EOS])


# ----------------------------------------- shuffling, determinism, checkpoints


def first_words(batch, tok):
  """Document ids of truncate_pad windows (the first token names the document)."""
  return [int(t) - len(SPECIALS) for t in batch["inputs"][:, 0]]


def take(it, n):
  return [next(it) for _ in range(n)]


def test_deterministic_by_seed_and_reshuffled_each_epoch(word_tokenizer):
  docs = sources.TextDocuments([doc(i) for i in range(40)])
  s = spec(packing="truncate_pad", global_batch=4, seq_len=6)
  a = take(iter(pipeline.train_dataset(docs, word_tokenizer, s, 0, 1)), 20)
  b = take(iter(pipeline.train_dataset(docs, word_tokenizer, s, 0, 1)), 20)
  for x, y in zip(a, b):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  ids = [i for batch in a for i in first_words(batch, word_tokenizer)]
  epoch1, epoch2 = ids[:40], ids[40:80]
  assert sorted(epoch1) == sorted(epoch2) == list(range(40))  # each epoch: every document once
  assert epoch1 != epoch2 and epoch1 != list(range(40))  # shuffled, differently per epoch
  c = take(iter(pipeline.train_dataset(docs, word_tokenizer,
                                       dataclasses.replace(s, seed=1), 0, 1)), 10)
  assert [i for batch in c for i in first_words(batch, word_tokenizer)] != ids[:40]


@pytest.mark.parametrize("packing", ["truncate_pad", "concat"])
def test_save_restore_mid_epoch_loses_and_repeats_nothing(word_tokenizer, packing):
  docs = sources.TextDocuments([doc(i, length=3 + i % 7) for i in range(40)])
  s = spec(packing=packing, global_batch=2, seq_len=6)
  ds = pipeline.train_dataset(docs, word_tokenizer, s, 0, 1)
  reference = take(iter(ds), 30)
  it = iter(ds)
  head = take(it, 7)
  state = json.loads(json.dumps(it.get_state()))  # survives serialisation, as in a checkpoint
  take(it, 5)  # progress that is lost when the process dies
  restored = iter(pipeline.train_dataset(docs, word_tokenizer, s, 0, 1))
  restored.set_state(state)
  tail = take(restored, 23)
  for x, y in zip(head + tail, reference):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  if packing == "truncate_pad":  # one document per window: exactly one epoch in 20 batches
    ids = [i for batch in (head + tail)[:20] for i in first_words(batch, word_tokenizer)]
    assert sorted(ids) == list(range(40))


def test_two_processes_get_disjoint_shards_covering_everything(word_tokenizer):
  docs = sources.TextDocuments([doc(i) for i in range(41)])
  s = spec(packing="truncate_pad", global_batch=4, seq_len=6)
  seen = []
  for pi in range(2):
    ds = pipeline.train_dataset(docs, word_tokenizer, s, pi, 2)
    n_local = len(range(pi, 41, 2))
    batches = take(iter(ds), -(-n_local // 2))  # local batch 2
    ids = [i for b in batches for i in first_words(b, word_tokenizer)][:n_local]
    assert sorted(ids) == sorted(set(ids)) and len(ids) == n_local
    seen.append(set(ids))
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == set(range(41))
  with pytest.raises(DataError, match="batch_size = 4 is not divisible by the 3 processes"):
    pipeline.train_dataset(docs, word_tokenizer, s, 0, 3)


def test_eval_stream_is_fixed_and_split_by_process(word_tokenizer):
  docs = sources.TextDocuments([doc(i, length=9) for i in range(30)])
  s = spec(global_batch=4, seq_len=8, eval_tokens=70)
  full, n = pipeline.eval_batches(docs, word_tokenizer, s, 0, 1)
  again, _ = pipeline.eval_batches(docs, word_tokenizer, s, 0, 1)
  assert len(full) == 3 and n == 96  # ceil(70 / 32) batches, all full
  for a, b in zip(full, again):
    np.testing.assert_array_equal(a["targets"], b["targets"])
  halves = [pipeline.eval_batches(docs, word_tokenizer, s, pi, 2)[0] for pi in range(2)]
  for i, batch in enumerate(full):
    np.testing.assert_array_equal(np.concatenate([halves[0][i]["inputs"], halves[1][i]["inputs"]]),
                                  batch["inputs"])


def test_eval_smaller_than_budget_warns(word_tokenizer, capsys):
  batches, n = stream(["w1 w2 w3"], word_tokenizer, seq_len=4, global_batch=2, eval_tokens=1000)
  assert len(batches) == 1 and n == 3
  assert "holds 3 target tokens, fewer than train.eval_tokens = 1000" in capsys.readouterr().out


# ------------------------------------------------------- sample corpus, prepare


def test_sample_corpus_split_and_tokenizer():
  files = corpus.sample_corpus()
  split = {s: [json.loads(l) for l in open(p)] for s, p in files.items()}
  titles = {s: {d["title"] for d in docs} for s, docs in split.items()}
  assert len(split["train"]) > 500 and len(split["validation"]) > 30
  assert not titles["train"] & titles["validation"]
  assert all(corpus.is_validation(t) for t in titles["validation"])
  text = " ".join(d["text"] for d in split["train"][:50])
  assert "thumb|" not in text and "[[" not in text and "{{" not in text
  cfg = load_config("configs/tiny.py", "elas")
  tok = tokenizer_lib.from_config(cfg.data, cfg.model.vocab_size)
  assert tok.vocab_size == 4096 and (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, 3)
  assert tok.decode(tok.encode("The state of Alabama.")) == "The state of Alabama."
  batches, n = pipeline.eval_batches(pipeline.open_split(cfg, "validation"), tok,
                                     pipeline.Spec.from_config(cfg), 0, 1)
  assert n == cfg.train.eval_tokens == sum(int(b["mask"].sum()) for b in batches)


def _files_config(tmp_path, tok, n_docs=50):
  write_jsonl(tmp_path / "train.jsonl", [doc(i, 4 + i % 5) for i in range(n_docs)])
  write_jsonl(tmp_path / "valid.jsonl.gz", [doc(i, 6) for i in range(n_docs, n_docs + 10)], gz=True)
  cfg = load_config("configs/tiny.py", "elas")
  cfg.data.source = "files"
  cfg.data.train_files = str(tmp_path / "train.jsonl")
  cfg.data.eval_files = str(tmp_path / "valid.jsonl.gz")
  cfg.data.tokenizer = tok.path
  cfg.model.vocab_size = tok.vocab_size
  cfg.train.seq_len, cfg.train.batch_size, cfg.train.eval_tokens = 8, 4, 64
  return cfg


def _run_prepare(cfg, out):
  overrides = [f"--config.data.{k}={cfg.data[k]}" for k in ("source", "train_files", "eval_files", "tokenizer")]
  return subprocess.run(
      [sys.executable, "-m", "elas_jax.data.prepare", "--config", "configs/tiny.py:elas", *overrides,
       f"--config.model.vocab_size={cfg.model.vocab_size}", f"--output={out}"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_prepare_cli_then_train_from_arrayrecord(tmp_path, word_tokenizer):
  cfg = _files_config(tmp_path, word_tokenizer)
  p = _run_prepare(cfg, tmp_path / "prep")
  assert p.returncode == 0, p.stderr
  summary = json.loads(p.stdout.strip().splitlines()[-1])
  assert summary["train"] == {"documents": 50, "tokens": sum(4 + i % 5 for i in range(50))}
  assert "tokenising train" in p.stderr  # the progress bar
  raw = {s: pipeline.open_split(cfg, s) for s in ("train", "validation")}
  cfg.data.train_files = str(tmp_path / "prep" / "train-*.arrayrecord")
  cfg.data.eval_files = str(tmp_path / "prep" / "validation-*.arrayrecord")
  prepared = {s: pipeline.open_split(cfg, s) for s in ("train", "validation")}
  assert prepared["train"].kind == "tokens"
  pipeline.check_prepared(prepared["train"], word_tokenizer)
  s = pipeline.Spec.from_config(cfg)
  a = take(iter(pipeline.train_dataset(raw["train"], word_tokenizer, s, 0, 1)), 12)
  b = take(iter(pipeline.train_dataset(prepared["train"], word_tokenizer, s, 0, 1)), 12)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["inputs"], y["inputs"])
  ea, _ = pipeline.eval_batches(raw["validation"], word_tokenizer, s, 0, 1)
  eb, _ = pipeline.eval_batches(prepared["validation"], word_tokenizer, s, 0, 1)
  np.testing.assert_array_equal(ea[0]["targets"], eb[0]["targets"])
  other = _sample_tokenizer()
  with pytest.raises(DataError, match="pre-tokenised data was made with tokenizer"):
    pipeline.check_prepared(prepared["train"], other)


def _sample_tokenizer():
  return tokenizer_lib.load(tokenizer_lib.train_sample_tokenizer(4096))


def test_prepare_cli_bad_input_is_one_line(tmp_path, word_tokenizer):
  cfg = _files_config(tmp_path, word_tokenizer)
  (tmp_path / "train.jsonl").write_text('{"text": "w1"}\n{"oops": 1}\n')
  p = _run_prepare(cfg, tmp_path / "prep")
  assert p.returncode == 2 and "Traceback" not in p.stderr
  assert p.stderr.strip().splitlines()[-1].startswith("error: ") and "train.jsonl:2: no 'text' key" in p.stderr


def test_global_batch_on_fake_devices(tmp_path):
  code = """
import jax, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from elas_jax.data import pipeline
mesh = jax.make_mesh((2, 2), ("data", "fsdp"))
local = {"inputs": np.arange(8 * 3, dtype=np.int32).reshape(8, 3)}
g = pipeline.global_batch(local, NamedSharding(mesh, P(("data", "fsdp"))))["inputs"]
assert g.shape == (8, 3) and len(g.addressable_shards) == 4
assert all(s.data.shape == (2, 3) for s in g.addressable_shards)
np.testing.assert_array_equal(np.asarray(g), local["inputs"])
print("ok")
"""
  env = dict(os.environ, XLA_FLAGS=xla_flags(4), JAX_PLATFORMS="cpu")
  p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                     timeout=120)
  assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr


def test_config_data_fields_validate():
  cfg = load_config("configs/tiny.py", "elas")
  cfg.data.packing = "pack"
  with pytest.raises(config_lib.ConfigError, match="config.data.packing = 'pack'"):
    config_lib.validate(cfg)


@pytest.mark.slow
def test_worker_processes_give_the_same_batches(tmp_path, word_tokenizer):
  # grain worker processes (data.worker_count > 0) must not change the stream.
  code = f"""
import dataclasses, json, numpy as np
from absl import flags
from elas_jax.data import pipeline, sources, tokenizer
if __name__ == "__main__":
  flags.FLAGS.mark_as_parsed()  # grain reads its absl flags; train.py parses them
  tok = tokenizer.load({word_tokenizer.path!r})
  docs = sources.TextDocuments([" ".join(f"w{{(i * 7 + k) % 200}}" for k in range(3 + i % 9)) for i in range(60)])
  s0 = pipeline.Spec(seq_len=8, global_batch=4, read_threads=1, prefetch_buffer=4)
  s1 = dataclasses.replace(s0, worker_count=1)
  a, b = iter(pipeline.train_dataset(docs, tok, s0, 0, 1)), iter(pipeline.train_dataset(docs, tok, s1, 0, 1))
  head = [next(a)["inputs"] for _ in range(12)]
  for x in head:
    assert (x == next(b)["inputs"]).all()
  # The workers' iterator state, through JSON as in a checkpoint, restored into a
  # fresh worker iterator: it continues where b stopped, not from the start.
  state = json.loads(json.dumps(b.get_state()))
  restored = iter(pipeline.train_dataset(docs, tok, s1, 0, 1))
  restored.set_state(state)
  tail = [next(restored)["inputs"] for _ in range(8)]
  assert not (tail[0] == head[0]).all()  # a restart from the beginning would fail here
  for i, x in enumerate(tail):
    assert (x == next(a)["inputs"]).all() and (x == next(b)["inputs"]).all(), i
  print("same")
"""
  p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert "same" in p.stdout, p.stderr[-3000:]


# ------------------------------------- streaming, broken files, lazy text index


def _truncated_gz(path, texts):
  write_jsonl(path, texts, gz=True)
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])  # an interrupted download
  return str(path)


def test_truncated_gzip_is_one_line_naming_the_file(tmp_path, capsys):
  write_jsonl(tmp_path / "a-0.json.gz", [doc(i) for i in range(5)], gz=True)
  # Incompressible-enough text, so half the file ends inside the deflate stream.
  _truncated_gz(tmp_path / "a-1.json.gz", [" ".join(f"w{(i * 37 + k * 11) % 200}" for k in range(300))
                                           for i in range(40)])
  with pytest.raises(DataError) as e:
    sources.open_documents(str(tmp_path / "a-*.json.gz"), "data.train_files")
  msg = str(e.value)
  assert "\n" not in msg and "a-1.json.gz: truncated gzip data after line" in msg, msg
  assert "skip_bad_records" in msg
  # skip_bad_records: the broken file is skipped whole and counted; the good one is read.
  docs = sources.open_documents(str(tmp_path / "a-*.json.gz"), "data.train_files",
                                opts=sources.Options(skip_bad_records=True))
  assert [docs[i] for i in range(len(docs))] == [doc(i) for i in range(5)]
  assert "skipped 1 broken file(s)" in capsys.readouterr().out


def test_corrupt_gzip_and_not_gzip_name_the_file(tmp_path):
  path = tmp_path / "c.json.gz"
  write_jsonl(path, [doc(i, 50) for i in range(200)], gz=True)
  data = bytearray(path.read_bytes())
  data[len(data) // 2: len(data) // 2 + 64] = bytes(64)  # zeroed bytes mid-stream
  path.write_bytes(bytes(data))
  with pytest.raises(DataError, match=r"c.json.gz: corrupt gzip data after line \d+ \(") as e:
    sources.open_documents(str(path), "data.train_files")
  assert "\n" not in str(e.value)
  (tmp_path / "plain.json.gz").write_bytes(b'{"text": "not gzipped"}\n')
  with pytest.raises(DataError, match=r"plain.json.gz: corrupt gzip data .*Not a gzipped file"):
    sources.open_documents(str(tmp_path / "plain.json.gz"), "data.train_files")


def test_streaming_reader_yields_documents_before_the_end(tmp_path):
  # A reader that loaded the file whole would fail before the first document.
  path = _truncated_gz(tmp_path / "t.json.gz", [doc(i % 100, 40) + f" w{i % 200}" * 20
                                                for i in range(3000)])
  it = sources.iter_documents(path, "jsonl", sources.Options(), sources.BadRecords(False))
  assert next(it) == doc(0, 40) + " w0" * 20
  with pytest.raises(sources.BrokenFile, match="t.json.gz: truncated gzip data after line"):
    list(it)


def test_parquet_is_read_by_row_group(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq

  texts = [doc(i) for i in range(10)]
  pq.write_table(pa.table({"text": texts}), str(tmp_path / "g.parquet"), row_group_size=3)
  assert pq.ParquetFile(str(tmp_path / "g.parquet")).num_row_groups == 4
  groups = [g for g, _, _ in records.scan_parquet(str(tmp_path / "g.parquet"),
                                                  str(tmp_path / "g.parquet"), sources.Options(),
                                                  sources.BadRecords(False))]
  assert groups == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3]
  (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
  with pytest.raises(DataError, match="bad.parquet: not a readable Parquet file"):
    sources.open_documents(str(tmp_path / "bad.parquet"), "data.train_files")


@pytest.fixture
def index_cache(tmp_path, monkeypatch):
  root = tmp_path / "cache"
  monkeypatch.setenv("ELAS_JAX_CACHE", str(root))
  return root / "text_index"


def _awkward_text_files(tmp_path):
  texts = [doc(i) for i in range(8)] + ["caf\u00e9 \u2014 ünïcode", "two\nlines"]
  jl = tmp_path / "a.jsonl"
  jl.write_bytes(b"\n".join(json.dumps({"text": t}).encode() for t in texts[:5]) + b"\r\n\n\n"
                 + b"\n".join(json.dumps({"text": t}, ensure_ascii=False).encode() for t in texts[5:]))
  tx = tmp_path / "a.txt"
  tx.write_bytes(b"first block\r\nstill first\r\n\r\n\n  \nsecond \xc3\xa9\n\nthird" )
  return str(jl), str(tx), texts


def test_lazy_index_reads_what_the_whole_file_reader_reads(tmp_path, index_cache):
  import pickle

  from elas_jax.data import text_index

  jl, tx, texts = _awkward_text_files(tmp_path)
  for path, kind, expected in ((jl, "jsonl", texts),
                               (tx, "txt", ["first block\nstill first", "second \u00e9", "third"])):
    assert sources.is_lazy(path, kind, sources.Options())
    docs = sources.open_documents(path, "data.train_files")
    got = [docs[i] for i in range(len(docs))]
    assert got == expected  # hand-written expectation
    assert got == sources.read_documents(path, kind, sources.Options(), sources.BadRecords(False))
    clone = pickle.loads(pickle.dumps(docs))  # grain worker processes
    assert [clone[i] for i in range(len(clone))] == expected
  assert len(list(index_cache.glob("*.npy"))) == 2
  whole = sources.open_documents(str(tmp_path / "a.txt"), "data.train_files",
                                 opts=sources.Options(txt_split="file"))
  assert len(whole) == 1 and whole[0].startswith("first block\r\nstill first")
  assert isinstance(sources.open_documents(jl, "data.train_files")._parts[0], text_index.IndexedTextFile)


def test_lazy_index_is_cached_and_rebuilt_when_the_file_changes(tmp_path, index_cache, monkeypatch):
  from elas_jax.data import text_index

  path = write_jsonl(tmp_path / "c.jsonl", [doc(i) for i in range(4)])
  assert len(sources.open_documents(path, "data.train_files")) == 4
  builds = []
  real = text_index._build
  monkeypatch.setattr(text_index, "_build", lambda *a: builds.append(a[0]) or real(*a))
  assert len(sources.open_documents(path, "data.train_files")) == 4
  assert builds == []  # served from the cache
  with open(path, "a") as f:
    f.write(json.dumps({"text": doc(4)}) + "\n")
  docs = sources.open_documents(path, "data.train_files")
  assert builds == [path] and len(docs) == 5 and docs[4] == doc(4)


def test_lazy_index_bad_records(tmp_path, index_cache, capsys):
  path = tmp_path / "b.jsonl"
  path.write_bytes(b'{"text": "a"}\nnot json\n{"text": "b"}\n{"x": 1}\n')
  for _ in range(2):  # built, then from the cache: the same count and the same error
    docs = sources.open_documents(str(path), "data.train_files",
                                  opts=sources.Options(skip_bad_records=True))
    assert [docs[0], docs[1]] == ["a", "b"] and len(docs) == 2
    assert "skipped 2 bad record(s)" in capsys.readouterr().out
    with pytest.raises(DataError, match="b.jsonl:2: invalid JSON"):
      sources.open_documents(str(path), "data.train_files")


def test_lazy_source_keeps_shuffle_sharding_and_resume(tmp_path, word_tokenizer, index_cache):
  texts = [doc(i, length=3 + i % 7) for i in range(41)]
  path = write_jsonl(tmp_path / "r.jsonl", texts)
  lazy = sources.open_documents(path, "data.train_files")
  memory = sources.TextDocuments(texts)
  s = spec(packing="concat", global_batch=2, seq_len=6)
  for pi, pc in ((0, 1), (0, 2), (1, 2)):
    a = take(iter(pipeline.train_dataset(lazy, word_tokenizer, s, pi, pc)), 25)
    b = take(iter(pipeline.train_dataset(memory, word_tokenizer, s, pi, pc)), 25)
    for x, y in zip(a, b):
      np.testing.assert_array_equal(x["inputs"], y["inputs"])
  it = iter(pipeline.train_dataset(lazy, word_tokenizer, s, 0, 1))
  take(it, 9)
  state = json.loads(json.dumps(it.get_state()))
  expected = take(it, 6)
  restored = iter(pipeline.train_dataset(lazy, word_tokenizer, s, 0, 1))
  restored.set_state(state)
  for x, y in zip(take(restored, 6), expected):
    np.testing.assert_array_equal(x["inputs"], y["inputs"])


def test_too_much_gzip_text_is_refused_with_the_prepare_command(tmp_path, word_tokenizer,
                                                                index_cache, monkeypatch):
  cfg = _files_config(tmp_path, word_tokenizer)
  write_jsonl(tmp_path / "train.json.gz", [doc(i, 30) for i in range(100)], gz=True)
  cfg.data.train_files = str(tmp_path / "train.json.gz")
  size = sources.text_bytes(cfg.data.train_files)
  assert size == len(gzip.decompress((tmp_path / "train.json.gz").read_bytes()))  # the trailer's size
  cfg.data.max_in_memory_bytes = size - 1
  monkeypatch.setattr(sys, "argv", ["train.py", "--config", "configs/tiny.py:elas"])
  with pytest.raises(DataError) as e:
    pipeline.open_split(cfg, "train")
  msg = str(e.value)
  assert "\n" not in msg and "more than config.data.max_in_memory_bytes" in msg
  assert (f"python -m elas_jax.data.prepare --config configs/tiny.py:elas "
          f"--config.data.train_files={cfg.data.train_files}") in msg
  assert "then train with --config.data.train_files='elas_tokens/train-*.arrayrecord'" in msg
  cfg.data.max_in_memory_bytes = size
  assert len(pipeline.open_split(cfg, "train")) == 100
  cfg.data.max_in_memory_bytes = 0  # plain .jsonl is read lazily: not limited
  cfg.data.train_files = str(tmp_path / "train.jsonl")
  assert len(pipeline.open_split(cfg, "train")) == 50


def test_max_in_memory_bytes_validates():
  cfg = load_config("configs/tiny.py", "elas")
  assert cfg.data.max_in_memory_bytes == 4 << 30
  cfg.data.max_in_memory_bytes = -1
  with pytest.raises(config_lib.ConfigError, match=r"config.data.max_in_memory_bytes = -1: must be an integer >= 0"):
    config_lib.validate(cfg)


def test_train_cli_truncated_gzip_is_one_line(tmp_path, word_tokenizer):
  write_jsonl(tmp_path / "c4-0.json.gz", [doc(i) for i in range(20)], gz=True)
  _truncated_gz(tmp_path / "c4-1.json.gz", [" ".join(f"w{(i * 37 + k * 11) % 200}" for k in range(300))
                                            for i in range(40)])
  p = subprocess.run(
      [sys.executable, "train.py", "--config", "configs/tiny.py:elas", "--config.data.source=files",
       f"--config.data.train_files={tmp_path}/c4-*.json.gz", f"--config.data.tokenizer={word_tokenizer.path}",
       f"--config.model.vocab_size={word_tokenizer.vocab_size}", f"--workdir={tmp_path}/run"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
  last = p.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and "c4-1.json.gz: truncated gzip data after line" in last
