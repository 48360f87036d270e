"""Quality study: variants and ablations trained on identical data, table + loss curves.

    python -m benchmarks.quality --preset cpu --out results/quality_cpu
    python -m benchmarks.quality --preset smoke --out /tmp/q          # a few minutes
    python -m benchmarks.quality --size llama_60m --steps 10000 --seeds 0 \\
        --config.data.train_files='c4/*.json.gz' --config.data.eval_files='c4v/*.json.gz' \\
        --config.data.tokenizer=t5.model --out results/60m       # the paper's scale, on GPUs

``--config.<field>=<value>`` sets a config field of every run, as on the
training command line (``elas_jax.config_lib.override``: the value is parsed
as the field's type; an unknown field is an error).

Every run is a normal training run (``elas_jax.trainer``) in its own workdir
under ``--out``, so an interrupted study resumes where it stopped. All runs of
one seed see the same data in the same order (the data order depends only on
the seed). Writes ``results.json``, ``results.md`` and ``loss_curves.png``.

Runs: the main comparison (``--variants``), and with ``--ablations``:
``warmup`` (ELAS with 0, a short and the normal dense warm-up) and
``backward`` (ELAS with the masked, ste and split backward).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from benchmarks import harness
from elas_jax import config_lib

PRESETS = {
    # Tiny model on the sample corpus, sized for the 2-core CPU machine.
    "cpu": {"size": "tiny", "steps": 600, "overrides": {"train.eval_every": 100, "train.log_every": 10,
                                                        "train.ckpt_every": 200}},
    # A shrunken tiny model for tests: a few minutes for everything.
    "smoke": {"size": "tiny", "steps": 24, "overrides": {
        "model.d_model": 64, "model.n_heads": 4, "model.n_layers": 2, "model.rank": 16,
        "train.batch_size": 8, "train.seq_len": 32, "train.eval_tokens": 2048, "train.eval_every": 12,
        "train.log_every": 1, "train.ckpt_every": 12, "optimizer.exact_every": 8,
        "model.sparsity.dense_warmup_steps": 6, "data.read_threads": 1}},
}


def make_config(size: str, variant: str, steps: int, seed: int, overrides: dict):
  cfg = config_lib.load(os.path.join("configs", f"{size}.py") + f":{variant}")
  cfg.train.steps = steps
  cfg.seed = seed
  # Keep warm-up phases proportionate when a study shortens the run.
  cfg.optimizer.warmup_steps = min(cfg.optimizer.warmup_steps, max(1, steps // 10))
  config_lib.override(cfg, overrides)
  if "model.d_model" in overrides:  # shrunken widths: FFN 4 x d (ReLU² 1.5 x that)
    swiglu = 4 * cfg.model.d_model
    cfg.model.ffn_dim = int(1.5 * swiglu) if cfg.model.ffn_kind == "relu2" else swiglu
  cfg.model.sparsity.dense_warmup_steps = min(cfg.model.sparsity.dense_warmup_steps, steps)
  config_lib.validate(cfg)
  return cfg


def runs_to_do(variants, ablations, normal_warmup: int):
  """(name, variant, {override}) of every run of the study."""
  out = [(v, v, {}) for v in variants]
  if "warmup" in ablations:
    short = max(1, normal_warmup // 4)
    for w in (0, short):
      out.append((f"elas_warmup{w}", "elas", {"model.sparsity.dense_warmup_steps": w}))
  if "backward" in ablations:
    for mode in ("ste", "split"):
      out.append((f"elas_{mode}", "elas", {"model.sparsity.backward": mode}))
  return out


def ffn_bytes_per_token(cfg) -> float:
  from flax import nnx

  from elas_jax import model as model_lib, model_summary

  model = nnx.eval_shape(lambda: model_lib.build_model(cfg.model))
  return model_summary.activation_bytes(cfg, model, cfg.train.seq_len)["ffn"]


def finished_run(workdir: str, steps: int) -> dict | None:
  """The final evaluation of a run that already completed ``steps``, else None.

  Lets a re-invoked study (more seeds, more ablations) skip finished runs
  instead of rebuilding and re-evaluating each of them.
  """
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return None
  done = [r for r in map(json.loads, open(path)) if r.get("step") == steps and "eval_loss" in r]
  return {"eval_loss": done[-1]["eval_loss"], "eval_ppl": done[-1]["eval_ppl"]} if done else None


def run_one(cfg, workdir: str) -> dict:
  from flax import nnx

  from elas_jax import model as model_lib, model_summary, trainer

  final = finished_run(workdir, cfg.train.steps)
  if final is None:  # new, or interrupted: train (resuming from its last checkpoint)
    final = trainer.train_and_evaluate(cfg, workdir)
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  train = [(r["step"], r["loss"]) for r in records if "loss" in r]
  evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
  tps = [r["tokens_per_s"] for r in records if "tokens_per_s" in r][1:] or [float("nan")]
  model = nnx.eval_shape(lambda: model_lib.build_model(cfg.model))
  return {"eval_loss": final["eval_loss"], "eval_ppl": final["eval_ppl"],
          "params": model_summary.count_params(model), "tokens_per_s": float(np.median(tps)),
          "ffn_bytes_per_token": ffn_bytes_per_token(cfg), "train_curve": train, "eval_curve": evals,
          "nonfinite_steps": max((r.get("skipped_nonfinite", 0) for r in records), default=0)}


def write_report(results: dict, out: str, title: str) -> None:
  names = list(results)
  seeds = sorted({s for r in results.values() for s in r})
  base = "loro_relu2" if "loro_relu2" in results else None  # ELAS's dense twin
  rows = ["| run | " + " | ".join(f"val ppl (seed {s})" for s in seeds) +
          " | mean | std | vs loro_relu2, same seed | params | tokens/s | FFN act. bytes/token |",
          "|---|" + "---:|" * (len(seeds) + 6)]
  summary = {}
  for name in names:
    per_seed = results[name]
    ppls = [per_seed[s]["eval_ppl"] if s in per_seed else float("nan") for s in seeds]
    first = next(iter(per_seed.values()))
    summary[name] = float(np.mean(ppls))
    # Paired by seed (same data order and initial weights): the seed-to-seed
    # spread of one variant can be larger than the gap between variants.
    paired = "-"
    if base and name != base:
      d = [100 * (per_seed[s]["eval_ppl"] / results[base][s]["eval_ppl"] - 1)
           for s in seeds if s in per_seed and s in results[base]]
      paired = " / ".join(f"{x:+.1f}%" for x in d) if d else "-"
    rows.append(f"| {name} | " + " | ".join(f"{p:.2f}" for p in ppls) +
                f" | {np.mean(ppls):.2f} | {np.std(ppls, ddof=1) if len(ppls) > 1 else 0:.2f} | "
                f"{paired} | {first['params']:,} | {first['tokens_per_s']:,.0f} | "
                f"{first['ffn_bytes_per_token']:,.0f} |")
  ranking = {s: sorted(names, key=lambda n: results[n][s]["eval_ppl"]) for s in seeds
             if all(s in results[n] for n in names)}
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write(f"# {title}\n\n" + "\n".join(rows) + "\n\n")
    for s, order in ranking.items():
      f.write(f"Ranking, seed {s}: {' < '.join(order)}\n\n")
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump({"title": title, "runs": results, "mean_ppl": summary, "ranking": ranking}, f, indent=1)

  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  # Top row: the main comparison; bottom row (if any): the ablations next to elas.
  # One colour per run, one line style per seed.
  main_runs = [n for n in names if n in config_lib.VARIANTS]
  ablation_runs = [n for n in names if n not in config_lib.VARIANTS]
  groups = [g for g in (main_runs, (["elas"] if "elas" in names else []) + ablation_runs)
            if g and (g is main_runs or ablation_runs)]
  styles = ["-", "--", ":", "-."]
  colours = {n: f"C{i % 10}" for i, n in enumerate(names)}
  fig, axes = plt.subplots(len(groups), 2, figsize=(13, 4.5 * len(groups)), squeeze=False)
  for row, group in zip(axes, groups):
    for name in group:
      for s, r in results[name].items():
        style = styles[seeds.index(s) % len(styles)]
        label = name if s == seeds[0] else None
        steps, loss = zip(*r["train_curve"])
        window = max(1, len(loss) // 30)
        smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
        row[0].plot(steps[window - 1:], smooth, style, color=colours[name], label=label)
        if r["eval_curve"]:
          es, el = zip(*r["eval_curve"])
          row[1].plot(es, np.exp(el), style, marker="o", color=colours[name], label=label,
                      markersize=3)
    row[0].set(xlabel="step", ylabel="train loss (smoothed)", title="training loss")
    row[1].set(xlabel="step", ylabel="validation perplexity", title="validation perplexity",
               yscale="log")
    for ax in row:
      ax.grid(alpha=0.3)
      ax.legend(fontsize=8)
  seed_key = ", ".join(f"seed {s}: '{styles[i % len(styles)]}'" for i, s in enumerate(seeds))
  fig.suptitle(f"{title} (line style by seed: {seed_key})")
  fig.tight_layout()
  fig.savefig(os.path.join(out, "loss_curves.png"), dpi=110)
  plt.close(fig)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--preset", choices=sorted(PRESETS), default=None)
  ap.add_argument("--size", default=None, help="config file name in configs/: tiny, llama_60m, ...")
  ap.add_argument("--steps", type=int, default=None)
  ap.add_argument("--variants", default=",".join(config_lib.VARIANTS))
  ap.add_argument("--ablations", default="warmup,backward", help="comma list of warmup, backward; '' for none")
  ap.add_argument("--seeds", default="0")
  ap.add_argument("--out", required=True)
  ap.epilog = "--config.<field>=<value>: config override for every run (repeatable)"
  args, rest = ap.parse_known_args()
  cli_overrides = harness.config_overrides(ap, rest)

  preset = PRESETS.get(args.preset, {"size": "llama_60m", "steps": None, "overrides": {}})
  size = args.size or preset["size"]
  overrides = {**preset["overrides"], **cli_overrides}
  os.makedirs(args.out, exist_ok=True)
  probe = config_lib.load(os.path.join("configs", f"{size}.py") + ":elas")
  steps = args.steps or preset["steps"] or probe.train.steps
  normal_warmup = int(overrides.get("model.sparsity.dense_warmup_steps",
                                    probe.model.sparsity.dense_warmup_steps))
  ablations = [a for a in args.ablations.split(",") if a]
  plan = runs_to_do(args.variants.split(","), ablations, normal_warmup)
  results: dict = {}
  for seed in (int(s) for s in args.seeds.split(",")):
    for name, variant, extra in plan:
      cfg = make_config(size, variant, steps, seed, {**overrides, **extra})
      print(f"=== {name} seed {seed}", file=sys.stderr, flush=True)
      results.setdefault(name, {})[seed] = run_one(cfg, os.path.join(args.out, f"{name}-s{seed}"))
  title = f"{size}, {steps} steps, seeds {args.seeds}"
  write_report(results, args.out, title)
  print(json.dumps({n: {s: r[s]["eval_ppl"] for s in r} for n, r in results.items()}))


if __name__ == "__main__":
  main()
