"""Zero-shot downstream table of the tiny variants, with lm-eval on held-out text, offline.

    python -m benchmarks.downstream --runs /tmp/quality_cpu --seeds 0,1,2 --out /tmp/downstream
    python -m benchmarks.downstream --preset smoke --seeds 0 --n_items 16 --out /tmp/ds    # minutes

Tasks (lm-eval YAML + JSON lines, written to ``--out/tasks``) are built from
the validation split of the offline sample corpus (Wikipedia articles the
models never train on), with a fixed seed:

- ``elas_cloze``: multiple choice, the last word of a held-out sentence
  against the last words of three other sentences (acc, acc_norm);
- ``elas_ending``: multiple choice, the second half of a sentence against the
  second halves of three others (acc, acc_norm; HellaSwag-like);
- ``elas_lastword``: log-likelihood of the true last word (acc = it is the
  greedy continuation, perplexity; LAMBADA-like);
- ``elas_wiki``: rolling perplexity of every validation document
  (word_perplexity, bits_per_byte).

Models: ``full``, ``loro``, ``loro_relu2`` and ``elas`` runs of
``benchmarks.quality`` (``<variant>-s<seed>`` under ``--runs``; missing ones
are trained here with the same preset, so ``--runs`` can be a finished
quality study), each evaluated by :class:`elas_jax.downstream.ElasJaxLM`;
ELAS twice, with its 2:4 FFN (the default) and with ``dense=True``. Writes
``results.json`` and ``results.md`` (mean ± std over seeds, chance levels,
ELAS 2:4 - dense per seed, and the measured scoring rate); each evaluation is
kept in ``--out/evals/``, so a rerun with more seeds evaluates only the new runs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

import numpy as np

CHOICES = 4
METRICS = [  # (task, lm-eval metric key, column title, format)
    ("elas_cloze", "acc,none", "cloze acc", ".3f"), ("elas_cloze", "acc_norm,none", "cloze acc_norm", ".3f"),
    ("elas_ending", "acc,none", "ending acc", ".3f"), ("elas_ending", "acc_norm,none", "ending acc_norm", ".3f"),
    ("elas_lastword", "acc,none", "last-word acc", ".3f"),
    ("elas_lastword", "perplexity,none", "last-word ppl", ",.0f"),
    ("elas_wiki", "word_perplexity,none", "wiki word ppl", ",.0f"),
    ("elas_wiki", "bits_per_byte,none", "wiki bits/byte", ".3f"),
]
TASKS = sorted({m[0] for m in METRICS})
MC_YAML = """output_type: multiple_choice
doc_to_text: "{{context}}"
doc_to_choice: "{{choices}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""
LASTWORD_YAML = """output_type: loglikelihood
doc_to_text: "{{context}}"
doc_to_target: "{{target}}"
target_delimiter: ""
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
WIKI_YAML = """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""


# ----------------------------------------------------------------- tasks


def sentences(docs: list[str]) -> list[str]:
  """Plain sentences (8-24 words, ending in a word of 3+ letters and a full stop; no
  abbreviations such as "St.") of the documents."""
  out = []
  for doc in docs:
    for line in doc.splitlines():
      for s in re.split(r"(?<=[.!?])\s+", line.strip()):
        words = s.split()
        if 8 <= len(words) <= 24 and re.fullmatch(r"[A-Za-z][a-z]{2,}\.", words[-1]):
          out.append(s)
  return out


def _write(path: str, text: str) -> None:
  """Atomically (another study reading the same tasks never sees a partial file)."""
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(path + ".tmp", path)


def build_tasks(out_dir: str, n_items: int, n_docs: int | None = None, seed: int = 0) -> dict[str, int]:
  """Writes the four tasks (YAML + JSON lines) to ``out_dir``; returns items per task.

  ``n_docs`` limits the rolling-perplexity documents (default: all of them).
  """
  from elas_jax.data import corpus

  with open(corpus.sample_corpus()["validation"], encoding="utf-8") as f:
    docs = [json.loads(line)["text"] for line in f]
  sents = sentences(docs)
  rng = np.random.RandomState(seed)
  order = rng.permutation(len(sents))
  if len(order) < 2 * n_items + CHOICES:
    raise SystemExit(f"--n_items={n_items}: the validation split has only {len(sents)} usable sentences")
  cloze_ids, ending_ids = order[:n_items], order[n_items:2 * n_items]
  last = lambda s: s.split()[-1][:-1]  # the last word without its full stop

  def others(i: int, key, n: int) -> list[str]:
    """``n`` distinct values of ``key`` over other sentences, none equal to sentence i's."""
    seen, picks = {key(sents[i]).lower()}, []
    while len(picks) < n:
      v = key(sents[rng.randint(len(sents))])
      if v.lower() not in seen:
        seen.add(v.lower())
        picks.append(v)
    return picks

  def mc(i: int, context: str, answer: str, distractors: list[str]) -> dict:
    choices = distractors + [answer]
    perm = rng.permutation(len(choices))
    return {"context": context, "choices": [choices[k] for k in perm],
            "label": int(np.where(perm == len(choices) - 1)[0][0]), "sentence": int(i)}

  cloze, lastword, ending = [], [], []
  for i in cloze_ids:
    s = sents[i]
    context = s[:s.rindex(" ")]
    cloze.append(mc(i, context, last(s), others(i, last, CHOICES - 1)))
    lastword.append({"context": context, "target": " " + last(s)})
  half = lambda s: " ".join(s.split()[len(s.split()) // 2:])
  for i in ending_ids:
    words = sents[i].split()
    ending.append(mc(i, " ".join(words[:len(words) // 2]), half(sents[i]), others(i, half, CHOICES - 1)))
  wiki = [{"text": d} for d in docs[:n_docs]]
  os.makedirs(out_dir, exist_ok=True)
  for name, rows, body in (("elas_cloze", cloze, MC_YAML), ("elas_ending", ending, MC_YAML),
                           ("elas_lastword", lastword, LASTWORD_YAML), ("elas_wiki", wiki, WIKI_YAML)):
    data = os.path.abspath(os.path.join(out_dir, f"{name}.jsonl"))
    _write(data, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    _write(os.path.join(out_dir, f"{name}.yaml"),
           f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
           f"test_split: test\n{body}metadata:\n  version: 1.0\n")
  return {"elas_cloze": len(cloze), "elas_ending": len(ending), "elas_lastword": len(lastword),
          "elas_wiki": len(wiki)}


def tasks_hash(out_dir: str) -> str:
  """Content hash of the task files: cached evaluations of other tasks are not reused."""
  import hashlib

  h = hashlib.sha256()
  for name in sorted(os.listdir(out_dir)):
    if name.endswith(".jsonl"):
      with open(os.path.join(out_dir, name), "rb") as f:
        h.update(name.encode() + f.read())
  return h.hexdigest()[:16]


# ----------------------------------------------------------------- runs


def ensure_run(runs: str, preset: str, variant: str, seed: int) -> str:
  """The workdir of ``variant``/``seed`` under ``runs``, trained first if it is not finished."""
  from benchmarks import quality

  p = quality.PRESETS[preset]
  cfg = quality.make_config(p["size"], variant, p["steps"], seed, p["overrides"])
  workdir = os.path.join(runs, f"{variant}-s{seed}")
  if quality.finished_run(workdir, cfg.train.steps) is None:
    print(f"=== training {variant} seed {seed} in {workdir}", file=sys.stderr, flush=True)
    quality.run_one(cfg, workdir)
  return workdir


def evaluate(workdir: str, tasks_dir: str, batch_size: int, dense: bool) -> dict:
  """lm-eval metrics of one checkpoint, plus the scoring rate (rows/s, tokens/s)."""
  import lm_eval
  from lm_eval.tasks import TaskManager

  from elas_jax import downstream

  lm = downstream.ElasJaxLM(workdir=workdir, batch_size=batch_size, dense=dense)
  timing = {"rows": 0, "tokens": 0, "seconds": 0.0, "calls": 0}
  real = lm.score_tokens

  def timed(pairs, **kw):  # the scoring rate, for the README's time estimates
    t0 = time.perf_counter()
    out = real(pairs, **kw)
    timing["seconds"] += time.perf_counter() - t0
    timing["rows"] += len(pairs)
    timing["tokens"] += sum(min(len(c) + len(x) - 1, lm.max_length) for c, x in pairs)
    timing["calls"] += 1
    return out

  lm.score_tokens = timed
  t0 = time.perf_counter()
  res = lm_eval.simple_evaluate(model=lm, tasks=TASKS, task_manager=TaskManager(include_path=tasks_dir),
                                verbosity="WARNING")
  metrics = {f"{task}/{key}": float(res["results"][task][key]) for task, key, _, _ in METRICS}
  return {"metrics": metrics, "wall_s": time.perf_counter() - t0, "sparse_on": lm.sparse_on,
          "step": lm.step, **{f"score_{k}": v for k, v in timing.items()}}


# ----------------------------------------------------------------- report


def write_report(results: dict, items: dict, out: str, title: str) -> None:
  names = list(results)
  seeds = sorted({s for r in results.values() for s in r})
  head = "| model | " + " | ".join(m[2] for m in METRICS) + " |"
  rows = [head, "|---|" + "---:|" * len(METRICS)]
  for name in names:
    cells = []
    for task, key, _, fmt in METRICS:
      v = [results[name][s]["metrics"][f"{task}/{key}"] for s in seeds if s in results[name]]
      sd = f" ± {np.std(v, ddof=1):{fmt}}" if len(v) > 1 else ""
      cells.append(f"{np.mean(v):{fmt}}{sd}")
    rows.append(f"| {name} | " + " | ".join(cells) + " |")
  rows.append("| chance | " + " | ".join(f"{1 / CHOICES:.3f}" if "acc" in m[1] and m[0] != "elas_lastword"
                                         else "-" for m in METRICS) + " |")
  lines = [f"# {title}", "", "Mean ± std over seeds " + ", ".join(map(str, seeds)) + "; items per task: " +
           ", ".join(f"{k} {v}" for k, v in items.items()) + ".", ""] + rows + [""]
  if "elas" in results and "elas (dense)" in results:
    lines.append("ELAS 2:4 minus ELAS dense, same checkpoint, per seed:")
    for task, key, col, fmt in METRICS:
      d = [results["elas"][s]["metrics"][f"{task}/{key}"] - results["elas (dense)"][s]["metrics"][f"{task}/{key}"]
           for s in seeds if s in results["elas"] and s in results["elas (dense)"]]
      lines.append(f"- {col}: " + " / ".join(f"{x:+{fmt}}" for x in d))
    lines.append("")
  timed = [r for per in results.values() for r in per.values() if r["score_seconds"] > 0]
  if timed:
    rate = np.median([r["score_rows"] / r["score_seconds"] for r in timed])
    tok = np.median([r["score_tokens"] / r["score_seconds"] for r in timed])
    wall = np.median([r["wall_s"] for r in timed])
    lines.append(f"Scoring rate (median over the {len(timed)} evaluations, first-call compiles "
                 f"included): {rate:,.0f} loglikelihood rows/s, {tok:,.0f} tokens/s; "
                 f"{wall:,.0f} s per model for all four tasks.")
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump({"title": title, "items": items, "runs": results}, f, indent=1)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--runs", default=None, help="directory of the quality study's runs (default: --out/runs)")
  ap.add_argument("--preset", choices=("cpu", "smoke"), default="cpu",
                  help="benchmarks.quality preset of runs trained here")
  ap.add_argument("--variants", default="full,loro,loro_relu2,elas")
  ap.add_argument("--seeds", default="0,1,2")
  ap.add_argument("--n_items", type=int, default=500, help="items of each sentence task")
  ap.add_argument("--n_docs", type=int, default=None, help="rolling-perplexity documents (default: all)")
  ap.add_argument("--batch_size", type=int, default=32)
  ap.add_argument("--out", required=True)
  args = ap.parse_args()

  os.makedirs(args.out, exist_ok=True)
  # lm-eval reads the task files through HF datasets: never the network.
  os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  os.environ.setdefault("HF_DATASETS_CACHE", os.path.join(os.path.abspath(args.out), "hf_datasets"))
  tasks_dir = os.path.join(args.out, "tasks")
  items = build_tasks(tasks_dir, args.n_items, args.n_docs)
  print(f"tasks in {tasks_dir}: {items}", file=sys.stderr, flush=True)
  runs = args.runs or os.path.join(args.out, "runs")
  results: dict = {}
  seeds = [int(s) for s in args.seeds.split(",")]
  for seed in seeds:
    for variant in args.variants.split(","):
      workdir = ensure_run(runs, args.preset, variant, seed)
      for dense in ((False, True) if variant == "elas" else (False,)):
        name = variant + (" (dense)" if dense else "")
        # One file per evaluation: an interrupted or extended study (more seeds)
        # re-evaluates only what is new.
        cache = os.path.join(args.out, "evals", f"{variant}{'-dense' if dense else ''}-s{seed}.json")
        key = {"workdir": os.path.abspath(workdir), "tasks": tasks_hash(tasks_dir),
               "batch_size": args.batch_size}
        r = None
        if os.path.exists(cache):
          with open(cache) as f:
            saved = json.load(f)
          r = saved["result"] if saved.get("key") == key else None
        if r is None:
          r = evaluate(workdir, tasks_dir, args.batch_size, dense)
          os.makedirs(os.path.dirname(cache), exist_ok=True)
          with open(cache, "w") as f:
            json.dump({"key": key, "result": r}, f, indent=1)
        results.setdefault(name, {})[seed] = r
        print(f"=== {name} seed {seed}: " + ", ".join(f"{k.split('/')[0]} {k.split('/')[1].split(',')[0]} "
              f"{v:.4g}" for k, v in r["metrics"].items()) + f" ({r['wall_s']:.0f} s)", file=sys.stderr,
              flush=True)
  title = f"Zero-shot downstream tasks, tiny variants ({args.preset} preset runs)"
  write_report(results, items, args.out, title)
  print(open(os.path.join(args.out, "results.md")).read())


if __name__ == "__main__":
  main()
