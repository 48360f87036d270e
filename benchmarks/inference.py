"""Inference benchmark: KV-cached prefill and decode, and the paper's FFN-only comparison.

    python -m benchmarks.inference --preset cpu             # docs/benchmarks.md numbers (~10 min, 2 cores)
    python -m benchmarks.inference --preset gpu             # bf16, kernel=triton for elas
    python -m benchmarks.inference --preset smoke           # seconds; used by tests/test_generate.py

Random weights (``build_model`` at each config's init), in one process:

1. **Generation**: prefill tokens/s (a ``[B, prompt_len]`` right-padded
   prefill into the KV cache, :mod:`elas_jax.decode`) and decode tokens/s
   (``B`` tokens per compiled decode step, cache of ``max_len``) for the
   variants full, loro, loro_relu2 and elas (2:4 on) at the sizes asked,
   batches 1, 8, 64. ``--layers size=N`` shrinks a size's depth (stated in
   the table) so that it fits a CPU.
2. **FFN only** (the paper's inference comparison): one FFN block's forward
   on ``[1, S, d]`` for S = 512 … 4096, the full-rank SwiGLU FFN (width f)
   against the ELAS FFN (low-rank, squared ReLU of width 1.5 f, 2:4) and,
   to separate the two effects, the same low-rank ReLU² FFN dense (loro_relu2).
3. **Cache vs recompute** (the issue's goal): per generated token, one
   decode step against a full forward over the ``max_len`` window (what a
   cache-less generator with a fixed shape recomputes per token).

Timing (:func:`time_call`): compiled and warmed up first, then the median of
``--repeats`` synchronised calls (``jax.block_until_ready``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import statistics
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks import harness
from elas_jax import config_lib, decode, model as model_lib


PRESETS: dict[str, dict[str, Any]] = {
    "smoke": dict(sizes="tiny", batches="2", prompt_len=8, max_len=16, decode_steps=2,
                  ffn_sizes="tiny", ffn_seqs="64", layers="tiny=1", dtype="float32",
                  kernel="xla", repeats=1, warmup=1, recompute_size="tiny", recompute_batch=2),
    # 2 shared cores: short prompts, few steps, the 1B stack cut to 1 block (stated in the table).
    "cpu": dict(sizes="60m,1b", batches="1,8,64", prompt_len=16, max_len=64, decode_steps=4,
                ffn_sizes="60m,1b", ffn_seqs="512,1024,2048,4096", layers="1b=1",
                dtype="float32", kernel="xla", repeats=2, warmup=1, recompute_size="tiny",
                recompute_batch=8),
    "gpu": dict(sizes="60m,1b", batches="1,8,64", prompt_len=256, max_len=512, decode_steps=32,
                ffn_sizes="60m,1b", ffn_seqs="512,1024,2048,4096", layers="", dtype="bfloat16",
                kernel="triton", repeats=10, warmup=2, recompute_size="tiny", recompute_batch=8),
}


def time_call(fn: Callable[[Any], Any], *, setup: Callable[[], Any] = lambda: None,
              repeats: int, warmup: int) -> dict[str, float]:
  """Median and minimum seconds of ``fn(setup())`` (``setup`` untimed), after ``warmup`` calls."""
  samples, _ = harness.Timer(repeats=repeats, warmup=warmup, min_time_s=0.0).measure(fn, setup=setup)
  return {"median_s": statistics.median(samples), "min_s": min(samples)}


def load_config(size: str, variant: str, *, dtype: str, kernel: str, layers: dict[str, int]):
  cfg = config_lib.load(f"{os.path.join(harness.ROOT, harness.CONFIG_FILES[size])}:{variant}")
  cfg.model.dtype = cfg.model.param_dtype = dtype
  if size in layers:
    cfg.model.n_layers = layers[size]
  if cfg.model.sparsity.enabled:
    cfg.model.kernel = kernel
  return cfg


@dataclasses.dataclass
class GenRow:
  size: str
  layers: int
  variant: str
  batch: int
  prefill_tok_s: float
  decode_tok_s: float
  decode_ms_per_step: float


def bench_generation(size: str, variant: str, batches: list[int], a) -> list[GenRow]:
  cfg = load_config(size, variant, dtype=a.dtype, kernel=a.kernel, layers=a.layer_map)
  model = model_lib.build_model(cfg.model, seed=0)
  graphdef, params = nnx.split(model, nnx.Param)
  rows = []
  for b in batches:
    gen = decode.Generator(graphdef, params, cfg.model, batch_size=b, max_len=a.max_len,
                           sparse_on=True, eos_id=-1, pad_id=0, temperature=0.0)
    rng = np.random.RandomState(0)
    tokens = rng.randint(0, cfg.model.vocab_size, (b, a.prompt_len)).astype(np.int32)
    lengths = np.full(b, a.prompt_len, np.int32)
    on, key = gen.sparse_on, jax.random.key(0)
    pre = time_call(lambda cache: gen._prefill(params, cache, tokens, lengths, on, key),
                    setup=gen.new_cache, repeats=a.repeats, warmup=a.warmup)

    def steps(state):
      tok, cache = state
      for i in range(a.decode_steps):
        tok, cache = gen._decode(params, cache, tok, lengths + i, on, key)
      return tok

    dec = time_call(steps, setup=lambda: gen._prefill(params, gen.new_cache(), tokens, lengths, on, key),
                    repeats=a.repeats, warmup=a.warmup)
    per_step = dec["median_s"] / a.decode_steps
    rows.append(GenRow(size, cfg.model.n_layers, variant, b, b * a.prompt_len / pre["median_s"],
                       b / per_step, 1e3 * per_step))
    print(f"  {size} ({cfg.model.n_layers} layers) {variant:10s} batch {b:3d}: prefill "
          f"{rows[-1].prefill_tok_s:10,.0f} tok/s  decode {rows[-1].decode_tok_s:9,.0f} tok/s "
          f"({rows[-1].decode_ms_per_step:.2f} ms/step)", flush=True)
  return rows


@dataclasses.dataclass
class FfnRow:
  size: str
  seq: int
  full_swiglu_ms: float
  loro_relu2_ms: float
  elas_ms: float


def bench_ffn(size: str, seqs: list[int], a) -> list[FfnRow]:
  """One FFN block, forward only, of each kind at the same d."""
  ffns = {}
  for variant in ("full", "loro_relu2", "elas"):
    cfg = load_config(size, variant, dtype=a.dtype, kernel=a.kernel, layers={})
    dtype = model_lib.DTYPES[cfg.model.dtype]
    ffns[variant] = (cfg, model_lib.FFN(cfg.model, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0)))
  rows = []
  for s in seqs:
    times = {}
    for variant, (cfg, ffn) in ffns.items():
      graphdef, params = nnx.split(ffn)
      fwd = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x, jnp.asarray(True))[0])
      x = jax.random.normal(jax.random.key(1), (1, s, cfg.model.d_model), model_lib.DTYPES[cfg.model.dtype])
      times[variant] = 1e3 * time_call(lambda x: fwd(params, x), setup=lambda: x, repeats=a.repeats,
                                       warmup=a.warmup)["median_s"]
    rows.append(FfnRow(size, s, times["full"], times["loro_relu2"], times["elas"]))
    print(f"  FFN {size} seq {s}: full SwiGLU {times['full']:.2f} ms, loro_relu2 "
          f"{times['loro_relu2']:.2f} ms, elas {times['elas']:.2f} ms "
          f"(elas speed-up vs full {times['full'] / times['elas']:.2f}x)", flush=True)
  return rows


def bench_recompute(size: str, batch: int, a) -> dict[str, float]:
  """Per generated token: a cached decode step vs a full forward over ``max_len``."""
  cfg = load_config(size, "elas", dtype=a.dtype, kernel=a.kernel, layers={})
  max_len = cfg.train.seq_len
  model = model_lib.build_model(cfg.model, seed=0)
  graphdef, params = nnx.split(model, nnx.Param)
  gen = decode.Generator(graphdef, params, cfg.model, batch_size=batch, max_len=max_len,
                         sparse_on=True, eos_id=-1, pad_id=0, temperature=0.0)
  tokens = np.random.RandomState(0).randint(0, cfg.model.vocab_size, (batch, max_len)).astype(np.int32)
  half = np.full(batch, max_len // 2, np.int32)
  on, key = gen.sparse_on, jax.random.key(0)
  n = 8

  def steps(state):
    tok, cache = state
    for i in range(n):
      tok, cache = gen._decode(params, cache, tok, half + i, on, key)
    return tok

  cached = time_call(steps, setup=lambda: gen._prefill(params, gen.new_cache(), tokens[:, :max_len // 2],
                                                       half, on, key),
                     repeats=a.repeats, warmup=a.warmup)

  @jax.jit
  def full(p, t):  # the next token from a whole-window forward
    return jnp.argmax(nnx.merge(graphdef, p)(t, on)[0][:, -1], axis=-1)

  recompute = time_call(lambda t: full(params, t), setup=lambda: tokens, repeats=a.repeats,
                        warmup=a.warmup)
  # Medians, and minima (the least disturbed call on a shared machine).
  out = {"size": size, "batch": batch, "window": max_len,
         "cached_ms_per_token_step": 1e3 * cached["median_s"] / n,
         "recompute_ms_per_token_step": 1e3 * recompute["median_s"],
         "speedup": recompute["median_s"] / (cached["median_s"] / n),
         "speedup_of_minima": recompute["min_s"] / (cached["min_s"] / n)}
  print(f"  cache vs recompute ({size}, batch {batch}, window {max_len}): "
        f"{out['cached_ms_per_token_step']:.2f} ms vs {out['recompute_ms_per_token_step']:.2f} ms per "
        f"step = {out['speedup']:.1f}x (of minima {out['speedup_of_minima']:.1f}x)", flush=True)
  return out


def markdown(gen_rows: list[GenRow], ffn_rows: list[FfnRow], rec: dict | None) -> str:
  lines = ["| size (layers) | variant | batch | prefill tok/s | decode tok/s | decode ms/step |",
           "|---|---|---:|---:|---:|---:|"]
  for r in gen_rows:
    lines.append(f"| {r.size} ({r.layers}) | {r.variant} | {r.batch} | {r.prefill_tok_s:,.0f} | "
                 f"{r.decode_tok_s:,.0f} | {r.decode_ms_per_step:.2f} |")
  lines += ["", "| size | seq | full SwiGLU ms | loro_relu2 ms | ELAS 2:4 ms | ELAS vs full | "
            "ELAS vs loro_relu2 |", "|---|---:|---:|---:|---:|---:|---:|"]
  for r in ffn_rows:
    lines.append(f"| {r.size} | {r.seq} | {r.full_swiglu_ms:.2f} | {r.loro_relu2_ms:.2f} | "
                 f"{r.elas_ms:.2f} | {r.full_swiglu_ms / r.elas_ms:.2f}x | "
                 f"{r.loro_relu2_ms / r.elas_ms:.2f}x |")
  if rec:
    lines += ["", f"Cache vs recompute ({rec['size']}, batch {rec['batch']}, window {rec['window']}): "
              f"{rec['cached_ms_per_token_step']:.2f} ms per decode step vs "
              f"{rec['recompute_ms_per_token_step']:.2f} ms per full forward = {rec['speedup']:.1f}x "
              f"(medians; {rec['speedup_of_minima']:.1f}x of the minima)"]
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
  for name in ("sizes", "batches", "ffn_sizes", "ffn_seqs", "layers", "dtype", "kernel",
               "recompute_size", "variants"):
    p.add_argument(f"--{name}", default=None)
  for name in ("prompt_len", "max_len", "decode_steps", "repeats", "warmup", "recompute_batch"):
    p.add_argument(f"--{name}", type=int, default=None)
  p.add_argument("--skip", default="", help="comma list of sections to skip: generation,ffn,recompute")
  p.add_argument("--out", default=None, help="write results.json and results.md to this directory")
  a = p.parse_args(argv)
  for k, v in PRESETS[a.preset].items():
    if getattr(a, k) is None:
      setattr(a, k, v)
  ints = lambda s: [int(x) for x in s.split(",") if x]
  a.layer_map = {k: int(v) for k, v in (kv.split("=") for kv in a.layers.split(",") if kv)}
  variants = a.variants.split(",") if a.variants else list(harness.VARIANTS)
  skip = set(a.skip.split(","))
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, {a.dtype}, elas kernel {a.kernel}, "
        f"preset {a.preset}", flush=True)
  gen_rows: list[GenRow] = []
  ffn_rows: list[FfnRow] = []
  rec = None
  if "generation" not in skip:
    for size in a.sizes.split(","):
      for variant in variants:
        gen_rows += bench_generation(size, variant, ints(a.batches), a)
  if "ffn" not in skip:
    for size in a.ffn_sizes.split(","):
      ffn_rows += bench_ffn(size, ints(a.ffn_seqs), a)
  if "recompute" not in skip:
    rec = bench_recompute(a.recompute_size, a.recompute_batch, a)
  table = markdown(gen_rows, ffn_rows, rec)
  print(table)
  result = {"date": datetime.date.today().isoformat(), "jax": jax.__version__,
            "backend": jax.default_backend(), "args": {k: v for k, v in vars(a).items()},
            "generation": [dataclasses.asdict(r) for r in gen_rows],
            "ffn": [dataclasses.asdict(r) for r in ffn_rows], "recompute": rec}
  if a.out:
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "results.json"), "w") as f:
      json.dump(result, f, indent=1)
    with open(os.path.join(a.out, "results.md"), "w") as f:
      f.write(table + "\n")
  return result


if __name__ == "__main__":
  main()
