"""Compile time of one train step, with the decoder blocks looped vs scanned.

    python -m benchmarks.compile_time [--config configs/llama_1b.py:elas] \\
        [--seq-len 256] [--micro-batch 2] [--remat none] [--layouts unscanned,scanned] \\
        [--config.<field>=<value> ...]

The step is the trainer's (``trainer.build`` and ``trainer.make_train_step``:
forward, backward, optimizer update, non-finite guard), jitted for the abstract
train state and batch and compiled with ``jax.jit(...).lower(...).compile()``
on the default backend, on one device. Nothing executes and no array of the model's size is allocated. The
persistent compilation cache is off so every number is a real compile.
Prints one line per layout (lowering and compile seconds) and, last, a JSON
object with both and the ratio scanned / unscanned.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp

from benchmarks import harness
from elas_jax import config_lib, model as model_lib, trainer


def step_and_inputs(cfg):
  """The jitted train step and abstract (state, batch) of ``cfg`` on one device."""
  run = trainer.build(cfg, jax.devices()[:1], with_tokenizer=False)
  b, l = cfg.train.batch_size, cfg.train.seq_len
  batch = {k: jax.ShapeDtypeStruct((b, l), jnp.int32, sharding=run.batch_sharding)
           for k in ("inputs", "targets", "mask")}
  step = jax.jit(trainer.make_train_step(run.graphdef, run.tx, run.schedule, cfg, run.mesh),
                 in_shardings=(run.state_shardings, run.batch_sharding), donate_argnums=0)
  return step, run.abstract_state, batch


def time_compile(cfg) -> tuple[float, float]:
  """Seconds to lower and to compile the train step of ``cfg``."""
  step, state, batch = step_and_inputs(cfg)
  t0 = time.perf_counter()
  lowered = step.lower(state, batch)
  t1 = time.perf_counter()
  lowered.compile()
  return t1 - t0, time.perf_counter() - t1


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default="configs/llama_1b.py:elas")
  p.add_argument("--seq-len", type=int, default=256)
  p.add_argument("--micro-batch", type=int, default=2)
  p.add_argument("--remat", default="none", choices=model_lib.REMAT_MODES)
  p.add_argument("--layouts", default="unscanned,scanned")
  args, rest = p.parse_known_args()
  overrides = harness.config_overrides(p, rest)  # --config.<field>=<value>
  jax.config.update("jax_enable_compilation_cache", False)
  out = {"config": args.config, "seq_len": args.seq_len, "micro_batch": args.micro_batch,
         "remat": args.remat, "backend": jax.default_backend()}
  for layout in args.layouts.split(","):
    cfg = config_lib.load(args.config)
    config_lib.override(cfg, {"train.seq_len": args.seq_len, "train.batch_size": args.micro_batch,
                              "mesh.data": 1,
                              "model.remat": args.remat,
                              "model.scan_layers": {"scanned": True, "unscanned": False}[layout]})
    config_lib.override(cfg, overrides)
    config_lib.validate(cfg)
    lower_s, compile_s = time_compile(cfg)
    out[layout] = {"lower_s": round(lower_s, 2), "compile_s": round(compile_s, 2),
                   "total_s": round(lower_s + compile_s, 2)}
    print(f"{layout:>10}: lower {lower_s:7.2f} s  compile {compile_s:7.2f} s  "
          f"({cfg.model.n_layers} layers, {args.config}, seq {args.seq_len}, micro-batch "
          f"{args.micro_batch}, remat {args.remat})", flush=True)
  if "scanned" in out and "unscanned" in out:
    out["ratio_scanned_over_unscanned"] = round(out["scanned"]["total_s"] / out["unscanned"]["total_s"], 3)
    print(f"scanned / unscanned: {out['ratio_scanned_over_unscanned']:.3f}")
  print(json.dumps(out))


if __name__ == "__main__":
  main()
