"""Pre-tokenisation on Apache Beam (DirectRunner): the same shards, manifest and token ids
as the single-machine prepare. Skipped without apache-beam (requirements-beam.txt)."""

import json
import os

import numpy as np
import pytest

beam = pytest.importorskip("apache_beam")

from elas_jax.data import beam_prepare, pretokenize, tokenizer as tokenizer_lib  # noqa: E402
from elas_jax.errors import DataError, UserError  # noqa: E402
from tests.test_prepare import (N_SHARDS, corpus_shards, prepare, read_records,  # noqa: E402,F401
                                reference, shard_bytes, summary, tok)


@pytest.mark.slow
def test_direct_runner_multiprocess_matches_the_single_machine_prepare(reference, corpus_shards,
                                                                       tmp_path):
  root, _ = corpus_shards
  ref_out, _ = reference
  out = tmp_path / "beam"
  p = prepare(root, out, "--runner=DirectRunner", "--", "--direct_num_workers=2",
              "--direct_running_mode=multi_processing", timeout=600)
  assert p.returncode == 0, p.stderr[-4000:]
  ref = json.loads((ref_out / "elas_prepared.json").read_text())
  got = json.loads((out / "elas_prepared.json").read_text())
  assert got == ref
  for split in ("train", "validation"):
    assert [s["tokens"] for s in got["splits"][split]["shards"]] == \
        [s["tokens"] for s in ref["splits"][split]["shards"]]
  names = sorted(shard_bytes(ref_out))
  assert len(names) == N_SHARDS + 1 and sorted(shard_bytes(out)) == names
  for name in names:  # token ids, record by record
    a, b = read_records(ref_out / name), read_records(out / name)
    assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b)), name
  assert shard_bytes(out) == shard_bytes(ref_out)
  assert summary(p)["input_shards"]["written"] == N_SHARDS + 1
  again = prepare(root, out, "--runner=DirectRunner", timeout=600)  # finished: nothing to run
  assert again.returncode == 0 and summary(again)["input_shards"]["reused"] == N_SHARDS + 1
  assert "6 of 6 input shard(s) already finished" in again.stderr


def test_beam_filesystems_path_writes_the_same_bytes(corpus_shards, reference, tmp_path, tok):
  """Beam's FileSystems (used for gs:// and other remote paths), here on local files."""
  root, _ = corpus_shards
  ref_out, _ = reference
  files = sorted(str(root / f) for f in os.listdir(root) if f.startswith("c4-train"))
  broken = tmp_path / "broken.json.gz"
  broken.write_bytes((root / os.path.basename(files[0])).read_bytes()[:-200])
  tasks = [pretokenize.Task("train", i, N_SHARDS, f, "jsonl") for i, f in enumerate(files[:2])]
  tasks.append(pretokenize.Task("train", 2, N_SHARDS, str(broken), "jsonl"))
  settings = pretokenize.Settings(out_dir=str(tmp_path / "out"), tokenizer=tok.path,
                                  tokenizer_sha256=tokenizer_lib.fingerprint(tok))
  storage = beam_prepare.BeamStorage(everywhere=True)
  records = beam_prepare.run(tasks, settings, ["--runner=DirectRunner"], storage)
  assert [r["status"] for r in records] == ["done", "done", "failed"]
  assert "broken.json.gz: truncated gzip data after line" in records[2]["error"]
  for i in range(2):
    name = f"train-{i:05d}-of-{N_SHARDS:05d}.arrayrecord"
    assert (tmp_path / "out" / name).read_bytes() == (ref_out / name).read_bytes()
  assert not [f for f in os.listdir(tmp_path / "out") if ".tmp" in f]
  assert pretokenize.merge(tasks, settings, tok, storage) is None  # a shard failed: no manifest
  with pytest.raises(UserError, match="1 of 3 input shard"):
    pretokenize.summarize(tasks, records, settings, None, len(tasks))


def test_beam_globs_plan_the_same_tasks(corpus_shards):
  from tests.helpers import load_config

  root, _ = corpus_shards
  cfg = load_config("configs/tiny.py", "elas")
  cfg.data.source = "files"
  cfg.data.train_files = f"{root}/c4-train.*.json.gz"
  cfg.data.eval_files = f"{root}/c4-validation.*.json.gz"
  assert pretokenize.plan(cfg, beam_prepare.match) == pretokenize.plan(cfg)
  assert len(pretokenize.plan(cfg)) == N_SHARDS + 1
  cfg.data.train_files = f"{root}/nothing-*.json.gz"
  with pytest.raises(DataError, match="matches no file"):
    pretokenize.plan(cfg, beam_prepare.match)
