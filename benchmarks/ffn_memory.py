"""Activation memory of one FFN block: dense ReLU² (loro_relu2) vs ELAS 2:4.

    python -m benchmarks.ffn_memory [--config configs/llama_1b.py] [--dtype bfloat16]

Traces forward+backward of one low-rank FFN block (nothing is allocated, so
the 1B shapes run on a laptop) and lists every array autodiff keeps for the
backward pass that grows with the number of tokens, for ``loro_relu2`` and for
``elas`` in each backward mode, side by side in one process. Reports bytes per
token and the ratios to the dense ReLU² block:
  * ``block``: everything the FFN block keeps (its input, the rank-r codes, ...);
  * ``intermediate``: only the f-wide activation between up and down
    projections (the part 2:4 compresses; ideal 9/16 of one dense copy).
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks import harness
from elas_jax import config_lib, memory, model as model_lib


def ffn_residuals(cfg, dtype: str, seq_len: int) -> list[memory.Residual]:
  cfg.model.dtype = dtype
  ffn = nnx.eval_shape(lambda: model_lib.FFN(cfg.model, dtype=model_lib.DTYPES[dtype],
                                              param_dtype=jnp.float32, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(ffn)
  state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)

  def fn(state, x):
    y, _ = nnx.merge(graphdef, state)(x, jnp.bool_(True))
    return jnp.sum(y.astype(jnp.float32))

  make = lambda b: (state, jax.ShapeDtypeStruct((b, seq_len, cfg.model.d_model), model_lib.DTYPES[dtype]))
  return memory.token_residuals(make, fn, seq_len)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--config", default="configs/llama_1b.py", help="size config file (no variant)")
  ap.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
  ap.add_argument("--seq_len", type=int, default=256)
  args = ap.parse_args()

  rows = {}
  base = config_lib.load(f"{args.config}:loro_relu2")
  d, r, f = base.model.d_model, base.model.rank, base.model.ffn_dim
  runs = [("loro_relu2", None)] + [("elas", m) for m in config_lib.BACKWARD_MODES]
  for variant, mode in runs:
    cfg = config_lib.load(f"{args.config}:{variant}")
    if mode:
      cfg.model.sparsity.backward = mode
    name = variant if mode is None else f"elas/{mode}"
    res = ffn_residuals(cfg, args.dtype, args.seq_len)
    inter = [x for x in res if x.shape[-1] not in (d, r)]
    rows[name] = {"block": memory.total_bytes_per_token(res),
                  "intermediate": memory.total_bytes_per_token(inter), "residuals": res}

  print(f"# FFN activation memory, {base.size} shapes: d={d} r={r} f={f}, {args.dtype}, "
        f"seq_len {args.seq_len}, jax {jax.__version__}\n")
  for name, row in rows.items():
    print(f"{name}: arrays kept for backward (bytes/token)")
    for x in row["residuals"]:
      print(f"    {x.dtype:>9}{list(x.shape)!s:<16} {x.bytes_per_token:>9.1f}  {x.source}")
  dense = rows["loro_relu2"]
  one_copy = f * jnp.dtype(args.dtype).itemsize  # one dense f-wide activation, per token
  print()
  print("\n".join(harness.markdown_table(
      ["FFN", "block bytes/token", "ratio", "intermediate bytes/token", "ratio",
       "vs one dense copy of y2"],
      [[name, f"{row['block']:.0f}", f"{row['block'] / dense['block']:.3f}",
        f"{row['intermediate']:.0f}", f"{row['intermediate'] / dense['intermediate']:.3f}",
        f"{row['intermediate'] / one_copy:.4f}"] for name, row in rows.items()], "lrrrrr")))
  print(json.dumps({name: {k: v for k, v in row.items() if k != "residuals"} for name, row in rows.items()}))


if __name__ == "__main__":
  main()
