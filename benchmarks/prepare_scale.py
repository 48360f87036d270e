"""Peak memory and speed of ``python -m elas_jax.data.prepare`` as the corpus grows.

    python -m benchmarks.prepare_scale --data /tmp/synth_c4 --shards 2,8,40 [--workers 1,2]
        [--beam]  [--config configs/tiny.py:elas]

Writes synthetic C4-style shards (json.gz, ``--shard_mb`` MB of text each,
C4's record layout; words drawn from the sample corpus's vocabulary with its
frequencies, document lengths log-normal around C4's ~2 kB) into ``--data``
once, then runs prepare on the first 2, 8, 40 ... shards, each run a fresh
process, and prints one row per run: input shards, text MB, peak RSS of the
largest process (``/usr/bin/time -v``), peak RSS of the whole process tree
(sampled from /proc every 0.2 s: workers and Beam's SDK workers included),
wall time, tokens and tokens/s. ``--beam`` adds DirectRunner runs (2 worker
processes). Never commit the generated data.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np


def _vocabulary() -> tuple[list[str], np.ndarray]:
  from elas_jax.data import corpus

  counts: collections.Counter = collections.Counter()
  with open(corpus.sample_corpus()["train"]) as f:
    for line in f:
      counts.update(json.loads(line)["text"].split())
  words, freq = zip(*counts.most_common())
  p = np.asarray(freq, np.float64)
  return list(words), p / p.sum()


def write_shards(root: str, n: int, shard_mb: float, seed: int = 0) -> list[str]:
  """``n`` synthetic json.gz shards of ``shard_mb`` MB of text each (kept when present)."""
  os.makedirs(root, exist_ok=True)
  paths = [os.path.join(root, f"c4-train.{i:05d}-of-01024.json.gz") for i in range(n)]
  missing = [p for p in paths if not os.path.isfile(p)]
  if not missing:
    return paths
  words, p = _vocabulary()
  words_arr = np.asarray(words, dtype=object)
  for path in missing:
    i = int(re.search(r"train\.(\d+)-of", path).group(1))
    rng = np.random.default_rng(seed + i)
    target, size = int(shard_mb * 1e6), 0
    tmp = path + ".tmp"
    with gzip.open(tmp, "wt", compresslevel=6) as f:
      while size < target:
        n_words = int(np.clip(rng.lognormal(5.6, 0.9), 20, 8000))
        ids = rng.choice(len(words), n_words, p=p)
        cut = np.sort(rng.choice(n_words, max(1, n_words // 80), replace=False))  # paragraphs
        parts = np.split(words_arr[ids], cut)
        text = "\n".join(" ".join(part) for part in parts if len(part))
        size += len(text.encode())
        f.write(json.dumps({"text": text, "timestamp": "2019-04-25T12:57:54Z",
                            "url": f"https://example.com/{i}/{size}"}) + "\n")
    os.replace(tmp, path)
    print(f"wrote {path}", file=sys.stderr, flush=True)
  return paths


class _TreeSampler(threading.Thread):
  """Samples the summed RSS of a process and all its descendants."""

  def __init__(self, pid: int):
    super().__init__(daemon=True)
    self.pid, self.peak, self.stop = pid, 0, threading.Event()

  def _tree_rss(self) -> int:
    parent, rss = {}, {}
    for d in os.listdir("/proc"):
      if not d.isdigit():
        continue
      try:
        with open(f"/proc/{d}/stat") as f:
          fields = f.read().rsplit(")", 1)[1].split()
      except OSError:
        continue
      parent[int(d)], rss[int(d)] = int(fields[1]), int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
    tree, frontier = set(), {self.pid}
    while frontier:
      tree |= frontier
      frontier = {p for p, pp in parent.items() if pp in frontier and p not in tree}
    return sum(rss.get(p, 0) for p in tree)

  def run(self):
    while not self.stop.wait(0.2):
      self.peak = max(self.peak, self._tree_rss())


def _peak_rss_mb(time_v: str) -> float:
  return int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", time_v).group(1)) / 1024


def run_prepare(cfg: str, files: list[str], out: str, extra: list[str]) -> dict:
  """One prepare run in a fresh process: peak RSS (MB), wall seconds, tokens."""
  shutil.rmtree(out, ignore_errors=True)
  link_dir = tempfile.mkdtemp(prefix="prepare-scale-")  # a glob of exactly these files
  for f in files:
    os.symlink(f, os.path.join(link_dir, os.path.basename(f)))
  cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "elas_jax.data.prepare", "--config", cfg,
         "--config.data.source=files", f"--config.data.train_files={link_dir}/*.json.gz",
         f"--output={out}", *extra]
  start = time.perf_counter()
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  sampler = _TreeSampler(proc.pid)
  sampler.start()
  stdout, stderr = proc.communicate()
  wall = time.perf_counter() - start
  sampler.stop.set()
  sampler.join()
  p = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
  shutil.rmtree(link_dir)
  if p.returncode:
    raise SystemExit(f"prepare failed:\n{p.stderr[-3000:]}")
  summary = json.loads(p.stdout.strip().splitlines()[-1])
  return {"peak_rss_mb": _peak_rss_mb(p.stderr), "tree_rss_mb": sampler.peak / 2**20, "wall_s": wall, "tokens": summary["train"]["tokens"],
          "documents": summary["train"]["documents"]}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--config", default="configs/tiny.py:elas")
  ap.add_argument("--tokenizer", default="", help="default: the tiny config's sample tokenizer")
  ap.add_argument("--data", default="/tmp/synth_c4")
  ap.add_argument("--out", default="/tmp/synth_c4_tokens")
  ap.add_argument("--shards", default="2,8,40")
  ap.add_argument("--shard_mb", type=float, default=25.0)
  ap.add_argument("--workers", default="1")
  ap.add_argument("--beam", action="store_true", help="also the Beam DirectRunner (2 processes)")
  args = ap.parse_args()
  from elas_jax.data import tokenizer as tokenizer_lib

  tok = args.tokenizer or tokenizer_lib.train_sample_tokenizer(4096)
  counts = [int(x) for x in args.shards.split(",")]
  files = write_shards(args.data, max(counts), args.shard_mb)
  # --workers "" runs prepare without the flag (e.g. an older checkout, for comparison)
  runs = [(n, ["--workers", w] if w else [], f"workers={w or 'default'}") for n in counts
          for w in args.workers.split(",")]
  if args.beam:
    runs += [(n, ["--runner=DirectRunner", "--", "--direct_num_workers=2",
                  "--direct_running_mode=multi_processing"], "beam DirectRunner x2") for n in counts]
  print(f"load average before: {os.getloadavg()}", flush=True)
  print(f"{'shards':>6} {'text MB':>8} {'mode':<22} {'peak RSS MB':>11} {'tree RSS MB':>11} {'wall s':>7} "
        f"{'tokens':>12} {'tokens/s':>10}", flush=True)
  rows = []
  for n, extra, mode in runs:
    r = run_prepare(args.config, files[:n], args.out, [f"--config.data.tokenizer={tok}", *extra])
    r.update(shards=n, text_mb=n * args.shard_mb, mode=mode, load=os.getloadavg()[0])
    rows.append(r)
    print(f"{n:>6} {r['text_mb']:>8.0f} {mode:<22} {r['peak_rss_mb']:>11.0f} {r['tree_rss_mb']:>11.0f} {r['wall_s']:>7.1f} "
          f"{r['tokens']:>12,} {r['tokens'] / r['wall_s']:>10,.0f}   (load {r['load']:.1f})", flush=True)
  print(json.dumps(rows))


if __name__ == "__main__":
  main()
