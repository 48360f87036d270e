"""Training's data start-up: open the train split, build the stream, take the first batch.

    python -m benchmarks.data_startup --train_files 'c4_tok/train-*.arrayrecord' \\
        [--tokenizer spm.model] [--max_in_memory_bytes N] [--config configs/tiny.py:elas]

Prints the documents, the seconds to open the split (indexing or reading text
files included), to the first batch and to the next 50, and the process's RSS
before and its peak after (run it once per source, in a fresh process, for
comparable peaks). docs/data.md has the numbers.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

from elas_jax import config_lib
from elas_jax.data import pipeline, tokenizer as tokenizer_lib


def _rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--config", default="configs/tiny.py:elas")
  ap.add_argument("--train_files", required=True)
  ap.add_argument("--tokenizer", default="", help="default: the tiny config's sample tokenizer")
  ap.add_argument("--max_in_memory_bytes", type=int, default=None)
  args = ap.parse_args()
  cfg = config_lib.load(args.config)
  cfg.data.source, cfg.data.train_files = "files", args.train_files
  cfg.data.tokenizer = args.tokenizer or tokenizer_lib.train_sample_tokenizer(cfg.model.vocab_size)
  if args.max_in_memory_bytes is not None:
    cfg.data.max_in_memory_bytes = args.max_in_memory_bytes
  tok = tokenizer_lib.from_config(cfg.data, cfg.model.vocab_size)
  before = _rss_mb()
  t0 = time.perf_counter()
  docs = pipeline.open_split(cfg, "train")
  t1 = time.perf_counter()
  it = iter(pipeline.train_dataset(docs, tok, pipeline.Spec.from_config(cfg), 0, 1))
  next(it)
  t2 = time.perf_counter()
  for _ in range(50):
    next(it)
  t3 = time.perf_counter()
  print(json.dumps({"train_files": args.train_files, "documents": len(docs), "open_s": round(t1 - t0, 2),
                    "first_batch_s": round(t2 - t1, 2), "next_50_batches_s": round(t3 - t2, 2),
                    "rss_before_mb": round(before), "peak_rss_mb": round(_rss_mb())}), flush=True)


if __name__ == "__main__":
  main()
