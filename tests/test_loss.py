"""The chunked lm_head + cross-entropy (elas_jax/loss.py) against the full-logits loss.

The reference is optax's cross-entropy on the full fp32 logits (``h @ wᵀ``
upcast), the loss the trainer used before chunking. fp32 values and gradients
must agree to 1e-5 relative; bf16 within 1% (the upcast logits of a bf16
matmul may be rounded differently when XLA fuses the cast into one big dot).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from benchmarks.harness import rel_err
from elas_jax import config_lib, memory, model as model_lib
from elas_jax.ops import loss as loss_lib
from tests.helpers import assert_trainings_match, tiny_train_config, xla_flags


def inputs(t, d, v, dtype=jnp.float32, seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 4)
  h = jax.random.normal(ks[0], (t, d), jnp.float32).astype(dtype)
  w = (jax.random.normal(ks[1], (v, d), jnp.float32) / np.sqrt(d)).astype(dtype)
  targets = jax.random.randint(ks[2], (t,), 0, v)
  mask = (jax.random.uniform(ks[3], (t,)) > 0.3).astype(jnp.float32)  # ~30% masked
  return h, w, targets, mask


def full_loss(h, w, targets, mask):
  ce = optax.softmax_cross_entropy_with_integer_labels((h @ w.T).astype(jnp.float32), targets)
  return jnp.sum(ce * mask), jnp.sum(mask)


def value_and_grads(fn, h, w):
  return jax.jit(jax.value_and_grad(lambda h, w: fn(h, w)[0], argnums=(0, 1)))(h, w)


@pytest.mark.parametrize("t,chunk", [(37, 8), (40, 8), (37, 100), (37, 1), (37, 37)])
def test_chunked_matches_full_logits_fp32(t, chunk):
  # 37 / 8: T not divisible by the chunk (padded, masked tail); 100 > T: one chunk.
  h, w, targets, mask = inputs(t, 16, 50)
  assert 0 < float(mask.sum()) < t
  chunked = lambda h, w: loss_lib.chunked_cross_entropy(h, w, targets, mask, chunk=chunk)
  (value, grads), (ref, ref_grads) = (value_and_grads(chunked, h, w),
                                      value_and_grads(lambda h, w: full_loss(h, w, targets, mask), h, w))
  assert abs(float(value) - float(ref)) <= 1e-5 * abs(float(ref))
  assert float(chunked(h, w)[1]) == float(mask.sum())
  for name, g, r in zip(("h", "w"), grads, ref_grads):
    assert rel_err(g, r) < 1e-5, name
  # Masked tokens get no gradient.
  assert float(jnp.max(jnp.abs(grads[0][mask == 0]))) == 0.0


def test_chunked_matches_full_logits_bf16():
  h, w, targets, mask = inputs(37, 16, 50, jnp.bfloat16, seed=1)
  chunked = lambda h, w: loss_lib.chunked_cross_entropy(h, w, targets, mask, chunk=8)
  (value, grads), (ref, ref_grads) = (value_and_grads(chunked, h, w),
                                      value_and_grads(lambda h, w: full_loss(h, w, targets, mask), h, w))
  assert abs(float(value) - float(ref)) <= 1e-2 * abs(float(ref))
  for name, g, r in zip(("h", "w"), grads, ref_grads):
    assert g.dtype == jnp.bfloat16 and rel_err(g, r) < 1e-2, name


def test_chunked_keeps_no_txv_array_for_backward():
  t, d, v = 37, 16, 50
  h, w, targets, mask = inputs(t, d, v)
  kept_full = memory.residuals(lambda h, w: full_loss(h, w, targets, mask)[0], h, w)
  kept = memory.residuals(
      lambda h, w: loss_lib.chunked_cross_entropy(h, w, targets, mask, chunk=8)[0], h, w)
  big = lambda res: [s for s, _, _ in res if int(np.prod(s)) >= t * v]
  assert big(kept_full)  # the full loss keeps [T, V] softmax / logits
  assert not big(kept), kept
  # h, w, targets, mask and one fp32 logsumexp per (padded) token.
  t_pad = 40
  assert sorted(tuple(s) for s, _, _ in kept) == sorted([(t, d), (v, d), (t,), (t,), (t_pad // 8, 8)])


def _tiny(variant, **changes):
  return tiny_train_config(variant, **changes)


def _model_loss_and_grads(cfg, batch, sparse_on):
  model = model_lib.build_model(cfg.model, seed=2)
  graphdef, params = nnx.split(model, nnx.Param)

  def loss(params):
    total, count, stats = loss_lib.lm_loss(nnx.merge(graphdef, params), batch, sparse_on, cfg.model)
    return total / count, (total, count, stats)

  (_, aux), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return aux, grads


def _batch(b, l, vocab, seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 3)
  return {"inputs": jax.random.randint(ks[0], (b, l), 0, vocab),
          "targets": jax.random.randint(ks[1], (b, l), 0, vocab),
          "mask": (jax.random.uniform(ks[2], (b, l)) > 0.2).astype(jnp.int32)}


@pytest.mark.parametrize("kernel", ["xla", "triton"])
def test_lm_loss_chunked_equals_full_on_the_model(kernel):
  # The ELAS model in its 2:4 phase; kernel=triton runs the Pallas kernels (interpreted on CPU).
  batch = _batch(2, 19, 300)
  out = {}
  for chunk in (0, 16):  # 38 tokens: the last of 3 chunks is padded
    cfg = _tiny("elas", **{"model.loss_chunk": chunk, "model.kernel": kernel})
    out[chunk] = _model_loss_and_grads(cfg, batch, True)
  (total, count, stats), grads = out[16]
  (ref_total, ref_count, ref_stats), ref_grads = out[0]
  assert float(count) == float(ref_count) == float(batch["mask"].sum())
  assert abs(float(total) - float(ref_total)) <= 1e-5 * abs(float(ref_total))
  assert stats.keys() == ref_stats.keys() and stats
  for k in stats:
    np.testing.assert_allclose(stats[k], ref_stats[k], rtol=1e-5)
  flat, ref_flat = jax.tree.leaves_with_path(grads), jax.tree.leaves(ref_grads)
  for (path, g), r in zip(flat, ref_flat):
    assert rel_err(g, r) < 1e-5, jax.tree_util.keystr(path)


def test_tiny_training_with_chunked_loss_and_attention_matches_the_plain_step(tmp_path):
  # Dense warm-up, the 2:4 switch at step 4, a LORO exact step at 5, evaluation;
  # 48-token loss chunks and 12-position attention blocks divide neither 8 x 32 nor 32.
  common = {"train.steps": 6, "train.eval_every": 6, "train.ckpt_every": 6, "train.eval_tokens": 1024}
  plain = tiny_train_config(**common, **{"model.attention": "xla", "model.loss_chunk": 0})
  chunked = tiny_train_config(**common, **{"model.loss_chunk": 48, "model.attention": "chunked",
                                           "model.attention_block": 12})
  assert_trainings_match(tmp_path, plain, chunked, rtol=2e-5)


@pytest.mark.parametrize("value", [-1, True])
def test_bad_loss_chunk_names_the_field(value):
  c = tiny_train_config("loro")
  c.model.loss_chunk = value
  with pytest.raises(config_lib.ConfigError, match=re.escape("config.model.loss_chunk = ")):
    config_lib.validate(c)


_MESH_SCRIPT = r"""
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from elas_jax.ops import attention, loss
mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
ks = jax.random.split(jax.random.PRNGKey(0), 4)
h = jax.random.normal(ks[0], (8, 32, 64)); w = jax.random.normal(ks[1], (300, 64)) * 0.1
t = jax.random.randint(ks[2], (8, 32), 0, 300); m = jnp.ones((8, 32))
batch = NamedSharding(mesh, P("data"))
hs, ts, ms = (jax.device_put(x, batch) for x in (h, t, m))
def ce(h, w):
  return loss.chunked_cross_entropy(h.reshape(-1, 64), w, ts.reshape(-1), ms.reshape(-1), chunk=48)[0]
def attn(q):
  return jnp.sum(attention.chunked_attention(q, q * 0.5, q * 2.0, block=16) ** 2)
q = jax.device_put(jax.random.normal(ks[3], (8, 37, 2, 8)), batch)
out = {}
for name, fn, args in (("loss", ce, (hs, w)), ("attention", attn, (q,))):
  g = jax.jit(jax.grad(fn))
  out[name] = {"gathers": "all-gather" in g.lower(*args).compile().as_text(),
               "sharding": str(g(*args).sharding.spec), "grad": np.asarray(g(*args))}
ref_ce = lambda h, w: loss.cross_entropy((h @ w.T).astype(jnp.float32), t, m)[0]
ref_attn = lambda q: jnp.sum(jax.nn.dot_product_attention(q, q * 0.5, q * 2.0, is_causal=True) ** 2)
rel = lambda a, b: float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
print({"loss": (out["loss"]["gathers"], out["loss"]["sharding"], rel(out["loss"]["grad"], jax.grad(ref_ce)(h, w))),
       "attention": (out["attention"]["gathers"], out["attention"]["sharding"],
                     rel(out["attention"]["grad"], jax.grad(ref_attn)(np.asarray(q))))})
"""


def test_chunks_stay_batch_sharded_under_a_data_mesh():
  # 4 host devices, batch split over "data": the strided loss chunks and the
  # attention blocks keep every device on its own rows (no all-gather of the
  # hidden states or q/k/v), and the gradients equal the unsharded references.
  import ast
  import os
  import subprocess
  import sys

  from tests.helpers import ROOT

  env = dict(os.environ, XLA_FLAGS=xla_flags(4), PYTHONPATH=ROOT,
             JAX_PLATFORMS="cpu")
  p = subprocess.run([sys.executable, "-c", _MESH_SCRIPT], cwd=ROOT, env=env, capture_output=True,
                     text=True, timeout=600)
  assert p.returncode == 0, p.stderr
  res = ast.literal_eval(p.stdout.strip().splitlines()[-1])
  for name, (gathers, spec, err) in res.items():
    assert not gathers, name
    assert spec.startswith(("P('data'", "PartitionSpec('data'")), (name, spec)
    assert err < 1e-5, (name, err)
