"""Attention implementations and the chunked loss: backward residuals per token and fwd+bwd time.

    python -m benchmarks.attention_loss [--seq 256] [--heads 32] [--head-dim 64] [--batch 4] \\
        [--vocab 32000] [--d-model 2048] [--dtype bfloat16] [--repeats 5]

Residual bytes per token are what autodiff keeps between forward and backward
(:mod:`elas_jax.memory`: traced at batch 1 and 2, the difference per token),
including the op's inputs. Times are the best of ``--repeats`` jitted
forward+backward calls on this machine's default backend, after compilation.
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp

from benchmarks import harness
from elas_jax import memory
from elas_jax.ops import attention, loss as loss_lib


def measure(name, loss, make_args, seq, batch, repeats) -> dict:
  res = memory.token_residuals(lambda b: make_args(b, abstract=True), loss, seq)
  grad = jax.jit(jax.grad(loss, argnums=tuple(range(len(make_args(1, abstract=True))))))
  args = make_args(batch, abstract=False)
  samples, _ = harness.Timer(repeats=repeats, warmup=1, min_time_s=0.0).measure(lambda: grad(*args))
  t = min(samples)  # one call per sample (min_time_s = 0), the first call compiles in warm-up
  out = {"residual_bytes_per_token": memory.total_bytes_per_token(res), "fwd_bwd_ms": 1e3 * t}
  print(f"{name:<28} {out['residual_bytes_per_token'] / 1024:>10.2f} KiB/token {out['fwd_bwd_ms']:>10.2f} ms",
        flush=True)
  return out


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--heads", type=int, default=32)
  p.add_argument("--head-dim", type=int, default=64)
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--vocab", type=int, default=32000)
  p.add_argument("--d-model", type=int, default=2048)
  p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
  p.add_argument("--blocks", default="64,128,256", help="chunked attention block sizes")
  p.add_argument("--loss-chunks", default="0,1024,4096", help="loss_chunk values (0 = full logits)")
  p.add_argument("--repeats", type=int, default=5)
  a = p.parse_args()
  dtype = jnp.dtype(a.dtype)
  print(f"backend {jax.default_backend()}, seq {a.seq}, batch {a.batch} (timing), {a.dtype}")
  results: dict = {"attention": {}, "loss": {}}

  def qkv(b, abstract):
    shape = (b, a.seq, a.heads, a.head_dim)
    if abstract:
      return tuple(jax.ShapeDtypeStruct(shape, dtype) for _ in range(3))
    ks = jax.random.split(jax.random.PRNGKey(0), 3)
    return tuple(jax.random.normal(k, shape, jnp.float32).astype(dtype) for k in ks)

  impls = [("xla", {})] + [(f"chunked(block={blk})", {"block": int(blk)}) for blk in a.blocks.split(",")]
  if jax.default_backend() == "gpu":
    impls.insert(1, ("cudnn", {}))
  for name, kw in impls:
    impl = name.split("(")[0]
    fn = lambda q, k, v, impl=impl, kw=kw: jnp.sum(
        attention.attend(q, k, v, impl=impl, **kw).astype(jnp.float32))
    results["attention"][name] = measure(f"attention {name}", fn, qkv, a.seq, a.batch, a.repeats)

  def hidden(b, abstract):
    t = b * a.seq
    shapes = [((t, a.d_model), dtype), ((a.vocab, a.d_model), dtype)]
    if abstract:
      return tuple(jax.ShapeDtypeStruct(s, d) for s, d in shapes)
    ks = jax.random.split(jax.random.PRNGKey(1), 2)
    return tuple(jax.random.normal(k, s, jnp.float32).astype(d) * 0.02 for k, (s, d) in zip(ks, shapes))

  for chunk in (int(c) for c in a.loss_chunks.split(",")):
    def fn(h, w, chunk=chunk):
      t = h.shape[0]
      targets, mask = jnp.arange(t) % a.vocab, jnp.ones((t,), jnp.float32)
      if chunk:
        return loss_lib.chunked_cross_entropy(h, w, targets, mask, chunk=chunk)[0]
      return loss_lib.cross_entropy((h @ w.T).astype(jnp.float32), targets, mask)[0]
    name = f"loss_chunk={chunk}"
    results["loss"][name] = measure(f"lm_head+CE {name}", fn, hidden, a.seq, a.batch, a.repeats)
  print(json.dumps({"config": vars(a), "backend": jax.default_backend(), **results}))


if __name__ == "__main__":
  main()
