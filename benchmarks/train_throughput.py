"""End-to-end training throughput of the variants side by side, in one process.

    python -m benchmarks.train_throughput --preset cpu-tiny
    python -m benchmarks.train_throughput --config configs/llama_1b.py --micro_batch 0,32 \\
        --steps 10 --config.train.batch_size=512          # on a GPU: the paper's global batch

For each variant (``--variants``) and micro-batch size (``--micro_batch``, 0 =
the whole batch at once), builds the real jitted train step (trainer.make_train_step:
shardings, accumulation, optimizer, non-finite guard), compiles it (time and
XLA's compiled memory analysis), and times ``--steps`` steps ``--repeats``
times on synthetic token batches, interleaving the runs so machine noise hits
them alike; ELAS runs in its 2:4 phase. Reports per run: tokens/s (best
repeat), model TFLOP/s and MFU (elas_jax.flops; MFU where the device peak is
known or ``--config.train.peak_tflops`` is given), the device's allocator peak
(GPUs) and XLA's temp bytes, plus elas / loro_relu2 and accumulated /
one-batch ratios.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

from benchmarks import harness
from elas_jax import config_lib, flops, sharding, trainer

PRESETS = {
    # The tiny default model: 16 x 128 tokens per step, 1 and 4 micro-batches.
    "cpu-tiny": {"config": "configs/tiny.py", "micro_batch": "0,4", "steps": 20, "repeats": 3,
                 "overrides": {}},
    # The 60M shapes (vocab 32000, seq 256) at a CPU-sized batch of 8.
    "cpu-60m": {"config": "configs/llama_60m.py", "micro_batch": "0,2", "steps": 3, "repeats": 2,
                "overrides": {"train.batch_size": "8", "model.dtype": "float32"}},
    # For the test: tiny shapes, 2 variants, one step.
    "smoke": {"config": "configs/tiny.py", "micro_batch": "0,2", "steps": 2, "repeats": 1,
              "overrides": {"train.batch_size": "4", "train.seq_len": "16", "model.n_layers": "1"},
              "variants": "loro_relu2,elas"},
}


def prepare(spec: str, variant: str, micro_batch: int, overrides: dict[str, str]) -> dict:
  cfg = config_lib.load(f"{spec}:{variant}")
  config_lib.override(cfg, overrides)
  cfg.train.micro_batch = micro_batch
  cfg.model.sparsity.dense_warmup_steps = 0  # time the 2:4 phase
  cfg.optimizer.warmup_steps = 0
  config_lib.validate(cfg)
  run = trainer.build(cfg, with_tokenizer=False)
  step = jax.jit(trainer.make_train_step(run.graphdef, run.tx, run.schedule, cfg, run.mesh),
                 in_shardings=(run.state_shardings, run.batch_sharding),
                 out_shardings=(run.state_shardings, sharding.replicated(run.mesh)), donate_argnums=0)
  rng = np.random.default_rng(0)
  b, seq = cfg.train.batch_size, cfg.train.seq_len
  batches = []
  for _ in range(2):
    tokens = rng.integers(0, cfg.model.vocab_size, (b, seq + 1), dtype=np.int32)
    batches.append(jax.device_put({"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
                                   "mask": np.ones((b, seq), np.int32)}, run.batch_sharding))
  state = run.init_state()
  start = time.perf_counter()
  compiled = step.lower(state, batches[0]).compile()
  compile_s = time.perf_counter() - start
  mem = harness.memory_analysis(compiled) or {}
  state, m = compiled(state, batches[0])  # warm-up step
  jax.block_until_ready(m)
  return {"cfg": cfg, "step": compiled, "state": state, "batches": batches, "compile_s": compile_s,
          "temp_bytes": mem.get("temp"), "flops_per_token": flops.flops_per_token(cfg.model, seq)["total"]}


def time_steps(v: dict, n: int) -> float:
  """Tokens/s of ``n`` steps (the state carries over from call to call)."""
  count = iter(range(n))

  def one_step():
    v["state"], m = v["step"](v["state"], v["batches"][next(count) % len(v["batches"])])
    return m

  cfg = v["cfg"]
  return cfg.train.batch_size * cfg.train.seq_len / harness.seconds_per_call(one_step, n)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--preset", choices=sorted(PRESETS), default=None)
  ap.add_argument("--config", default=None, help="config file (default configs/tiny.py)")
  ap.add_argument("--variants", default=None, help="default full,loro,loro_relu2,elas")
  ap.add_argument("--micro_batch", default=None, help="comma list of train.micro_batch values; 0 = none")
  ap.add_argument("--steps", type=int, default=None)
  ap.add_argument("--repeats", type=int, default=None)
  ap.add_argument("--json", default=None, help="also write the results to this file")
  ap.epilog = "--config.<field>=<value>: config override for every run (repeatable)"
  args, rest = ap.parse_known_args()
  preset = PRESETS.get(args.preset, {})
  spec = args.config or preset.get("config", "configs/tiny.py")
  variants = (args.variants or preset.get("variants", "full,loro,loro_relu2,elas")).split(",")
  micros = [int(x) for x in (args.micro_batch or preset.get("micro_batch", "0")).split(",")]
  steps, repeats = args.steps or preset.get("steps", 20), args.repeats or preset.get("repeats", 3)
  overrides = {**preset.get("overrides", {}), **harness.config_overrides(ap, rest)}

  runs = {(v, mb): prepare(spec, v, mb, overrides) for v in variants for mb in micros}
  best = {key: 0.0 for key in runs}
  for _ in range(repeats):
    for key, r in runs.items():
      best[key] = max(best[key], time_steps(r, steps))

  cfg = next(iter(runs.values()))["cfg"]
  peak = flops.peak_tflops(cfg)  # this process's devices
  mem_peak = flops.peak_memory_bytes()  # the process's peak over all runs (GPUs only)
  results, rows = [], []
  for (variant, mb), r in runs.items():
    tps = best[(variant, mb)]
    k = cfg.train.batch_size // (mb or cfg.train.batch_size)
    res = {"variant": variant, "micro_batch": mb or cfg.train.batch_size, "micro_batches": k,
           "tokens_per_s": tps, "tflops_per_s": tps * r["flops_per_token"] / 1e12,
           "mfu": flops.mfu(tps, r["flops_per_token"], peak), "compile_s": r["compile_s"],
           "temp_bytes": r["temp_bytes"]}
    one = best.get((variant, micros[0]))
    res["vs_first_micro_batch"] = tps / one if one else None
    twin = best.get(("loro_relu2", mb))
    res["vs_loro_relu2"] = tps / twin if twin and variant == "elas" else None
    results.append(res)
    rows.append([variant, f"{res['micro_batch']} x {k}", f"{tps:,.0f}", f"{res['tflops_per_s']:.4f}",
                 harness.fmt(None if res["mfu"] is None else 100 * res["mfu"], ".1f", "%"),
                 f"{r['compile_s']:.1f}",
                 harness.fmt(None if r["temp_bytes"] is None else r["temp_bytes"] / 2**20, ".0f", " MiB"),
                 harness.fmt(res["vs_first_micro_batch"], ".3f"), harness.fmt(res["vs_loro_relu2"], ".3f")])
  print(f"# {spec}: batch {cfg.train.batch_size} x {cfg.train.seq_len} tokens, {jax.device_count()} "
        f"{jax.devices()[0].platform} device(s) ({jax.devices()[0].device_kind}), jax {jax.__version__}, "
        f"{steps} steps x {repeats} repeats, best repeat; allocator peak "
        f"{harness.fmt(None if mem_peak is None else mem_peak / 2**30, '.2f', ' GiB')}")
  print("\n".join(harness.markdown_table(
      ["variant", "micro-batch x k", "tokens/s", "model TFLOP/s", "MFU", "compile s", "XLA temp",
       f"vs micro {micros[0] or 'none'}", "elas / loro_relu2"], rows, "llrrrrrrr")))
  out = {"config": spec, "batch": cfg.train.batch_size, "seq_len": cfg.train.seq_len,
         "peak_memory_bytes": mem_peak, "runs": results}
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f, indent=1)
  print(json.dumps(out))


if __name__ == "__main__":
  main()
