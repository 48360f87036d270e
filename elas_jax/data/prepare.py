"""Pre-tokenises a corpus once into ArrayRecord shards the pipeline can train from.

    python -m elas_jax.data.prepare --config configs/llama_60m.py:elas \\
        --config.data.train_files='c4/en/c4-train.*.json.gz' \\
        --config.data.eval_files='c4/en/c4-validation.*.json.gz' \\
        --config.data.tokenizer=t5.model --output c4_tokens/

then train with ``--config.data.train_files='c4_tokens/train-*.arrayrecord'
--config.data.eval_files='c4_tokens/validation-*.arrayrecord'`` and the same
tokenizer. Each record is one document's token ids (int32, no EOS: the
pipeline adds it). ``elas_prepared.json`` beside the shards records the
tokenizer's hash, which the pipeline checks.
"""

from __future__ import annotations

import json
import os

import numpy as np
from absl import flags
from tqdm import tqdm

from elas_jax.cli import common as cli
from elas_jax.data import pipeline, sources, tokenizer as tokenizer_lib

_OUTPUT = flags.DEFINE_string("output", None, "Directory for the ArrayRecord shards.", required=True)
_SHARD_DOCS = flags.DEFINE_integer("shard_docs", 100_000, "Documents per ArrayRecord shard.")
_BATCH = flags.DEFINE_integer("encode_batch", 1024, "Documents tokenised per call.")


def write_split(docs, tok, out_dir: str, split: str, shard_docs: int, batch: int) -> dict:
  from array_record.python.array_record_module import ArrayRecordWriter

  n = len(docs)
  n_shards = max(1, -(-n // shard_docs))
  names, tokens = [], 0
  with tqdm(total=n, desc=f"tokenising {split}", unit="doc") as bar:
    for s in range(n_shards):
      name = f"{split}-{s:05d}-of-{n_shards:05d}.arrayrecord"
      tmp = os.path.join(out_dir, name + ".tmp")
      writer = ArrayRecordWriter(tmp, "group_size:1")
      lo, hi = s * shard_docs, min(n, (s + 1) * shard_docs)
      for start in range(lo, hi, batch):
        chunk = [docs[i] for i in range(start, min(hi, start + batch))]
        if getattr(docs, "kind", "text") == "tokens":
          ids_list = [np.asarray(c, np.int32) for c in chunk]
        else:
          ids_list = [np.asarray(ids, np.int32) for ids in tok.encode_batch(chunk)]
        for ids in ids_list:
          writer.write(ids.tobytes())
          tokens += len(ids)
        bar.update(len(chunk))
        bar.set_postfix(tokens=f"{tokens:,}")
      writer.close()
      os.replace(tmp, os.path.join(out_dir, name))
      names.append(name)
  return {"documents": n, "tokens": tokens, "shards": names}


def main(argv) -> None:
  del argv
  cfg = flags.FLAGS.config
  tok = tokenizer_lib.from_config(cfg.data, cfg.model.vocab_size)
  out_dir = _OUTPUT.value
  os.makedirs(out_dir, exist_ok=True)
  splits = {}
  for split in ("train", "validation"):
    if split == "validation" and cfg.data.source == "files" and not cfg.data.eval_files:
      continue
    docs = pipeline.open_split(cfg, split)
    splits[split] = write_split(docs, tok, out_dir, split, _SHARD_DOCS.value, _BATCH.value)
  manifest = {"tokenizer": os.path.abspath(tok.path), "tokenizer_sha256": tokenizer_lib.fingerprint(tok),
              "vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "splits": splits}
  with open(os.path.join(out_dir, sources.PREPARED_MANIFEST), "w") as f:
    json.dump(manifest, f, indent=1)
  print(json.dumps({"output": out_dir, **{k: {"documents": v["documents"], "tokens": v["tokens"]}
                                          for k, v in splits.items()}}))


if __name__ == "__main__":
  cli.define_config_flag()
  cli.run(main)
