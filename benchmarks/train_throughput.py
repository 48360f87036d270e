"""Training throughput of several variants side by side, in one process.

    python -m benchmarks.train_throughput [--config configs/tiny.py] \\
        [--variants full,loro_relu2,elas] [--steps 30] [--repeats 3]

Builds each variant with the real trainer (sharded jitted step, optimizer,
non-finite guard), feeds it batches from the real pipeline, and times
``--steps`` steps after compilation, ``--repeats`` times, interleaving the
variants so machine noise hits them alike. ELAS runs in its 2:4 phase
(``dense_warmup_steps = 0``). Reports the best tokens/s per variant and the
ratio elas / loro_relu2.
"""

from __future__ import annotations

import argparse
import json

import jax

from benchmarks import harness
from elas_jax import config_lib, trainer
from elas_jax.data import pipeline


def prepare(spec_path: str, variant: str):
  cfg = config_lib.load(f"{spec_path}:{variant}")
  cfg.model.sparsity.dense_warmup_steps = 0  # time the 2:4 phase
  run = trainer.build(cfg)
  step_fn = jax.jit(trainer.make_train_step(run.graphdef, run.tx, run.schedule, cfg),
                    in_shardings=(run.state_shardings, run.batch_sharding), donate_argnums=0)
  docs = pipeline.open_split(cfg, "train")
  it = iter(pipeline.train_dataset(docs, run.tokenizer, run.spec))
  batches = [pipeline.global_batch(next(it), run.batch_sharding) for _ in range(4)]
  state = run.init_state()
  state, m = step_fn(state, batches[0])  # compile
  jax.block_until_ready(m)
  return {"cfg": cfg, "step": step_fn, "state": state, "batches": batches}


def time_steps(v, n: int) -> float:
  """Tokens/s of ``n`` steps (the state carries over from call to call)."""
  count = iter(range(n))

  def one_step():
    v["state"], m = v["step"](v["state"], v["batches"][next(count) % len(v["batches"])])
    return m

  cfg = v["cfg"]
  return cfg.train.batch_size * cfg.train.seq_len / harness.seconds_per_call(one_step, n)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--config", default="configs/tiny.py")
  ap.add_argument("--variants", default="full,loro_relu2,elas")
  ap.add_argument("--steps", type=int, default=30)
  ap.add_argument("--repeats", type=int, default=3)
  args = ap.parse_args()
  variants = {name: prepare(args.config, name) for name in args.variants.split(",")}
  best = {name: 0.0 for name in variants}
  for _ in range(args.repeats):
    for name, v in variants.items():
      best[name] = max(best[name], time_steps(v, args.steps))
  cfg = next(iter(variants.values()))["cfg"]
  print(f"# {args.config}: batch {cfg.train.batch_size} x {cfg.train.seq_len}, {jax.device_count()} "
        f"{jax.devices()[0].platform} device(s), jax {jax.__version__}")
  print("\n".join(harness.markdown_table(["variant", "tokens/s"],
                                        [[name, f"{tps:,.0f}"] for name, tps in best.items()], "lr")))
  result = {"tokens_per_s": best}
  if "elas" in best and "loro_relu2" in best:
    result["elas_over_loro_relu2"] = best["elas"] / best["loro_relu2"]
    print(f"elas / loro_relu2 = {result['elas_over_loro_relu2']:.3f}")
  print(json.dumps(result))


if __name__ == "__main__":
  main()
