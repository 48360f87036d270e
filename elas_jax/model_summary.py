"""Model summary: parameters per module and activation memory per token
(the command: :mod:`elas_jax.cli.summary`).

Nothing is allocated: the model is built abstractly (``nnx.eval_shape``) and
activation memory is measured by tracing what autodiff saves for backward
(:mod:`elas_jax.memory`). The last line printed is one JSON object.
"""

from __future__ import annotations

from collections import OrderedDict

import jax
import jax.numpy as jnp
from flax import nnx

from elas_jax import memory, model as model_lib, stacking
from elas_jax.ops import loss as loss_lib


def _path_str(path) -> str:
  parts = (getattr(p, "key", getattr(p, "idx", getattr(p, "name", p))) for p in path)
  return ".".join(str(x) for x in parts)


def param_table(model: nnx.Module) -> "OrderedDict[str, list[tuple[str, tuple[int, ...]]]]":
  """Module path -> [(param name, shape)], in definition order."""
  table: OrderedDict = OrderedDict()
  params = nnx.state(model, nnx.Param)
  if model.scan_layers:  # list stacked blocks per layer, as unscanned
    params = stacking.unstack_layers(params)
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    *mod, name = _path_str(path).split(".")
    if name == "value":  # tree paths may end in the Variable's value field
      *mod, name = mod
    table.setdefault(".".join(mod), []).append((name, tuple(leaf.shape)))
  return table


def count_params(model: nnx.Module) -> int:
  return int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def activation_bytes(cfg, model: nnx.Module, seq_len: int) -> dict[str, float]:
  """Bytes per token saved for backward, split by part, in the 2:4 phase."""
  dtype = model_lib.DTYPES[cfg.model.dtype]
  d = cfg.model.d_model

  def measure(module, call):
    graphdef, state = nnx.split(module)
    state = _abstract(state)

    def fn(state, x):
      return jnp.sum(call(nnx.merge(graphdef, state), x).astype(jnp.float32))
    return memory.total_bytes_per_token(memory.token_residuals(
        lambda b: (state, jax.ShapeDtypeStruct((b, seq_len, d), dtype)), fn, seq_len))

  block = model.layer(0)
  ffn = measure(block.ffn, lambda m, x: m(x, True)[0])
  blk = measure(block, lambda m, x: m(x, True)[0])

  graphdef, state = nnx.split(model)
  state = _abstract(state)

  def loss(state, tokens):  # the train step's loss (model.loss_chunk applies)
    batch = {"inputs": tokens, "targets": tokens, "mask": jnp.ones(tokens.shape, jnp.float32)}
    total, count, _ = loss_lib.lm_loss(nnx.merge(graphdef, state), batch, True, cfg.model)
    return total / count

  total = memory.total_bytes_per_token(memory.token_residuals(
      lambda b: (state, jax.ShapeDtypeStruct((b, seq_len), jnp.int32)), loss, seq_len))
  return {"ffn": ffn, "attention_and_norms": blk - ffn, "block": blk,
          "blocks_total": blk * cfg.model.n_layers, "total": total}


def _fmt_shape(name: str, shape) -> str:
  return f"{name}{list(shape)}"


def summarize(cfg) -> dict:
  """Prints the tables; returns the JSON-able summary."""
  m = cfg.model
  model = nnx.eval_shape(lambda: model_lib.build_model(m))
  table = param_table(model)
  n_layers = m.n_layers

  desc = f"linear {m.linear_kind}" + (f" r={m.rank}" if m.linear_kind != "full" else "")
  desc += f", FFN {m.ffn_kind} width {m.ffn_dim}"
  if m.sparsity.enabled:
    desc += (f", 2:4 after {m.sparsity.dense_warmup_steps} dense steps "
             f"(backward {m.sparsity.backward})")
  print(f"ELAS-JAX model: size={cfg.size} variant={cfg.variant}: {desc}; "
        f"d={m.d_model} layers={n_layers} heads={m.n_heads} vocab={m.vocab_size}")
  print(f"{'module':<28} {'parameters':<36} {'count':>15}")
  per_block = 0
  top_order = {"embed": 0, "blocks": 1, "final_norm": 2, "lm_head": 3}
  for mod, params in sorted(table.items(), key=lambda kv: top_order.get(kv[0].split(".")[0], 4)):
    count = sum(int(jnp.prod(jnp.array(s))) if s else 1 for _, s in params)
    if mod.startswith("blocks."):
      layer = int(mod.split(".")[1])
      if layer == 0:
        per_block += count
        print(f"{mod:<28} {' '.join(_fmt_shape(n, s) for n, s in params):<36} {count:>15,}")
      continue
    if mod.startswith("final_norm") and per_block:
      print(f"{'blocks.* (x%d)' % n_layers:<28} {'':<36} {per_block * n_layers:>15,}")
    print(f"{mod:<28} {' '.join(_fmt_shape(n, s) for n, s in params):<36} {count:>15,}")
  total = count_params(model)
  print(f"{'total':<28} {'':<36} {total:>15,}  ({total / 1e6:.2f}M)")

  seq_len = cfg.train.seq_len
  act = activation_bytes(cfg, model, seq_len)
  print(f"activation memory saved for backward, per token (seq_len {seq_len}, "
        f"{m.dtype} compute, 2:4 phase):")
  for k, v in act.items():
    print(f"  {k:<22} {v / 1024:>10.2f} KiB")
  return {"params": total, "variant": cfg.variant, "size": cfg.size,
          "params_per_block": per_block, "activation_bytes_per_token": act}
