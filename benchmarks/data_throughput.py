"""Input-pipeline throughput vs. what the tiny training step consumes, in one process.

    python -m benchmarks.data_throughput [--config configs/tiny.py:elas] [--batches 200]

Times the grain pipeline on the sample corpus (tokenisation included: the
sample is raw text) in both packing modes, read lazily through the offset
index (what training uses for a plain .jsonl) and from an in-memory list of
the same documents, then a jitted forward + backward + AdamW step of the
config's model on batches of the same shape, and prints tokens/s for each and
their ratio. The pipeline must outrun the step.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from benchmarks import harness
from elas_jax import config_lib, model as model_lib
from elas_jax.data import pipeline, sources, tokenizer as tokenizer_lib


def pipeline_tokens_per_s(cfg, tok, docs, packing: str, n_batches: int) -> float:
  spec = pipeline.Spec.from_config(cfg)
  spec = dataclasses.replace(spec, packing=packing)
  it = iter(pipeline.train_dataset(docs, tok, spec, 0, 1))
  for _ in range(5):  # thread start-up, first reads
    next(it)
  start, tokens = time.perf_counter(), 0
  for _ in range(n_batches):
    tokens += int(next(it)["mask"].sum())
  return tokens / (time.perf_counter() - start)


def step_tokens_per_s(cfg, batch, n_steps: int) -> float:
  model = model_lib.build_model(cfg.model)
  graphdef, params = nnx.split(model, nnx.Param)
  opt = optax.adamw(1e-3)
  state = (params, opt.init(params))

  @jax.jit
  def step(state, batch):
    params, opt_state = state

    def loss_fn(p):
      logits, _ = nnx.merge(graphdef, p)(batch["inputs"], True)
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
      return jnp.sum(ce * batch["mask"]) / jnp.sum(batch["mask"])

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  batch = jax.tree.map(jnp.asarray, batch)
  state, loss = step(state, batch)
  loss.block_until_ready()

  def one_step():
    nonlocal state
    state, loss = step(state, batch)
    return loss

  return batch["inputs"].size / harness.seconds_per_call(one_step, n_steps)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--config", default="configs/tiny.py:elas")
  ap.add_argument("--batches", type=int, default=200)
  ap.add_argument("--steps", type=int, default=20)
  args = ap.parse_args()
  cfg = config_lib.load(args.config)
  tok = tokenizer_lib.from_config(cfg.data, cfg.model.vocab_size)
  docs = pipeline.open_split(cfg, "train")
  result = {"config": args.config, "batch": [cfg.train.batch_size, cfg.train.seq_len],
            "cpu_count": os.cpu_count(), "jax": jax.__version__}
  in_memory = sources.TextDocuments([docs[i] for i in range(len(docs))])
  for packing in pipeline.PACKING_MODES:
    result[f"pipeline_{packing}_tokens_per_s"] = pipeline_tokens_per_s(cfg, tok, docs, packing, args.batches)
    result[f"pipeline_{packing}_in_memory_tokens_per_s"] = pipeline_tokens_per_s(
        cfg, tok, in_memory, packing, args.batches)
  batch = next(iter(pipeline.train_dataset(docs, tok, pipeline.Spec.from_config(cfg), 0, 1)))
  result["train_step_tokens_per_s"] = step_tokens_per_s(cfg, batch, args.steps)
  result["pipeline_over_step"] = result["pipeline_concat_tokens_per_s"] / result["train_step_tokens_per_s"]
  for k, v in result.items():
    print(f"{k:<36} {v:,.0f}" if isinstance(v, float) and v > 10 else f"{k:<36} {v}")
  print(json.dumps(result))


if __name__ == "__main__":
  main()
