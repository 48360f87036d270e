"""The LLaMA model family: parameter counts, causality, dtypes, the 2:4 switch."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from elas_jax import config_lib, model as model_lib
from elas_jax.ops import sparsity
from tests.helpers import load_config

SIZES = ("60m", "130m", "350m", "1b")

# Brief section 2, in millions (full-rank, LORO, ELAS).
BRIEF_M = {
    "60m": (58.07, 42.77, 42.25), "130m": (134.11, 94.00, 91.64),
    "350m": (367.97, 185.22, 178.93), "1b": (1339.08, 609.31, 584.13),
}


def expected_params(c) -> int:
  """Parameter count from the shapes alone (independent of the model code)."""
  m = c.model
  d, f, r, v = m.d_model, m.ffn_dim, m.rank, m.vocab_size

  def linear(d_in, d_out):
    return d_in * d_out if m.linear_kind == "full" else r * (d_in + d_out)

  ffn = (3 if m.ffn_kind == "swiglu" else 2) * linear(d, f)
  block = 4 * linear(d, d) + ffn + 2 * d
  return 2 * v * d + m.n_layers * block + d


def count(model):
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("size", [s if s in ("60m", "130m") else pytest.param(s, marks=pytest.mark.slow)
                                  for s in SIZES])
def test_parameter_counts_match_the_shapes_and_the_papers(size):
  counts = {}
  for variant in config_lib.VARIANTS:
    c = load_config(f"configs/llama_{size}.py", variant)
    abstract = nnx.eval_shape(functools.partial(model_lib.build_model, c.model))
    counts[variant] = count(abstract)
    assert counts[variant] == expected_params(c), variant
  full, loro, elas = BRIEF_M[size]
  assert round(counts["full"] / 1e6, 2) == full
  assert round(counts["loro"] / 1e6, 2) == loro
  assert round(counts["elas"] / 1e6, 2) == elas
  assert counts["loro_relu2"] == counts["elas"]
  assert counts["cola"] == counts["loro"]  # same factor shapes, SiLU in between


@pytest.fixture(scope="module")
def tiny_models():
  out = {}
  for variant in config_lib.VARIANTS:
    c = load_config("configs/tiny.py", variant)
    c.model.vocab_size = 64  # keep the causality Jacobians small
    c.model.n_layers = 2
    out[variant] = (c, model_lib.build_model(c.model, seed=1))
  return out


@pytest.mark.parametrize("variant", config_lib.VARIANTS)
def test_causal_through_gradients(tiny_models, variant):
  # Distinct tokens per position: the gradient of logits at position t with
  # respect to the embedding row of a later token must be exactly zero.
  _, model = tiny_models[variant]
  seq = 12
  tokens = jnp.arange(3, 3 + seq)[None]
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def logit_sum(params, t):
    m = nnx.merge(graphdef, params, rest)
    logits, _ = m(tokens, True)
    return logits[0, t].sum()

  grad_fn = jax.jit(jax.grad(logit_sum), static_argnums=1)
  for t in (0, 5, seq - 1):
    g = grad_fn(params, t)
    emb = np.asarray(g["embed"]["embedding"][...])
    rows = np.abs(emb[3:3 + seq]).sum(-1)
    assert (rows[t + 1:] == 0).all(), f"position {t} sees the future"
    assert (rows[: t + 1] > 0).all(), f"position {t} does not see its past"


@pytest.mark.parametrize("variant", config_lib.VARIANTS)
def test_jit_matches_eager_and_logits_are_finite(tiny_models, variant):
  c, model = tiny_models[variant]
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, c.model.vocab_size)
  eager, _ = model(tokens, True)
  jitted, _ = nnx.jit(lambda m, t: m(t, True))(model, tokens)
  assert eager.shape == (2, 16, c.model.vocab_size) and eager.dtype == jnp.float32
  assert np.isfinite(np.asarray(eager)).all()
  np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_bf16_compute_close_to_fp32():
  c = load_config("configs/tiny.py", "elas")
  c.model.vocab_size = 256
  m32 = model_lib.build_model(c.model, seed=3)
  c.model.dtype = "bfloat16"
  m16 = model_lib.build_model(c.model, seed=3)
  tokens = jax.random.randint(jax.random.key(1), (2, 32), 0, 256)
  fwd = nnx.jit(lambda m, t: m(t, True)[0])
  l32, l16 = fwd(m32, tokens), fwd(m16, tokens)
  assert l16.dtype == jnp.float32  # logits are upcast for the loss
  np.testing.assert_allclose(np.asarray(l16), np.asarray(l32), atol=0.05 * float(jnp.abs(l32).max()))
  p16 = nnx.state(m16, nnx.Param)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(p16))  # param dtype stays fp32
  c.model.param_dtype = "bfloat16"
  mb = model_lib.build_model(c.model, seed=3)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(nnx.state(mb, nnx.Param)))


def _loss_and_grads(model, tokens, sparse_on):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(params):
    logits, stats = nnx.merge(graphdef, params, rest)(tokens, sparse_on)
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean(), stats

  (value, stats), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return value, stats, grads


@pytest.mark.slow
def test_elas_dense_warmup_equals_loro_relu2_and_sparse_phase_differs():
  # Same seed -> the same parameters (identical module structure); in the dense
  # warm-up the ELAS model is exactly the ReLU² model, loss and gradients.
  ce = load_config("configs/tiny.py", "elas")
  cr = load_config("configs/tiny.py", "loro_relu2")
  me, mr = model_lib.build_model(ce.model, seed=4), model_lib.build_model(cr.model, seed=4)
  tokens = jax.random.randint(jax.random.key(2), (2, 32), 0, ce.model.vocab_size)
  le, _, ge = _loss_and_grads(me, tokens, False)
  lr, none_stats, gr = _loss_and_grads(mr, tokens, False)
  assert none_stats == {}
  np.testing.assert_allclose(float(le), float(lr), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(ge), jax.tree.leaves(gr)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
  ls, stats_s, _ = _loss_and_grads(me, tokens, True)
  assert float(ls) != float(le)
  lr_on, _, _ = _loss_and_grads(mr, tokens, True)
  assert float(lr_on) == float(lr)  # models without sparsity ignore the switch
  for k in ("zero_frac", "dropped_mass"):
    assert stats_s[k].shape == (ce.model.n_layers,)
  z = np.asarray(stats_s["zero_frac"])
  assert ((z > 0.2) & (z < 0.9)).all()  # ReLU² of a fresh model: about half zeros
  assert (np.asarray(stats_s["dropped_mass"]) > 0).all()


@pytest.mark.slow
def test_initialisation_scales():
  c = load_config("configs/llama_60m.py", "loro")
  m = model_lib.build_model(c.model)
  up = m.layer(0).ffn.up  # (any layout) d_in 512, d_out 1376, r 128
  np.testing.assert_allclose(float(jnp.std(up.b[...])), np.sqrt(2 / (1376 + 128)), rtol=0.02)
  np.testing.assert_allclose(float(jnp.std(up.a[...])), np.sqrt(2 / (512 + 128)), rtol=0.02)
  np.testing.assert_allclose(float(jnp.std(m.embed.embedding[...])), 0.02, rtol=0.02)
  np.testing.assert_allclose(float(jnp.std(m.lm_head.w[...])), 0.02, rtol=0.02)
  assert float(jnp.min(m.final_norm.scale[...])) == float(jnp.max(m.final_norm.scale[...])) == 1.0
  cc = load_config("configs/llama_60m.py", "cola")
  mc = model_lib.build_model(cc.model)
  want = 128 ** -0.25 * (512 + 1376) ** -0.25
  np.testing.assert_allclose(float(jnp.std(mc.layer(0).ffn.up.a[...])), want, rtol=0.02)


def test_sparsity_active_is_data():
  assert not bool(sparsity.sparsity_active(99, 100))
  assert bool(sparsity.sparsity_active(100, 100))
  assert bool(jax.jit(sparsity.sparsity_active)(jnp.int32(7), jnp.int32(0)))
