"""LORO-AdamW and the schedules against independent references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from elas_jax import optim
from tests.helpers import load_config


def _orth_basis(x):
  q, _ = np.linalg.qr(x)
  return q


@pytest.mark.parametrize("shape", [(40, 6, 30), (17, 4, 23), (12, 3, 12)])
def test_exact_step_is_truncated_svd_of_the_riemannian_step(shape):
  d_out, r, d_in = shape
  rng = np.random.default_rng(d_out)
  b = rng.normal(size=(d_out, r))
  a = rng.normal(size=(r, d_in))
  g = rng.normal(size=(d_out, d_in))
  alpha = 0.3
  # Factor "directions" that come from one consistent full gradient G.
  new_b, new_a = optim.loro_exact_step(jnp.asarray(b, jnp.float32), jnp.asarray(a, jnp.float32),
                                       jnp.asarray(g @ a.T, jnp.float32),
                                       jnp.asarray(b.T @ g, jnp.float32), alpha)
  new_b, new_a = np.asarray(new_b, np.float64), np.asarray(new_a, np.float64)
  # Independent reference in float64: tangent projection, then truncated SVD.
  u, v = _orth_basis(b), _orth_basis(a.T)
  pu, pv = u @ u.T, v @ v.T
  p_t = pu @ g + g @ pv - pu @ g @ pv
  y = b @ a - alpha * p_t
  uu, ss, vvt = np.linalg.svd(y)
  want = (uu[:, :r] * ss[:r]) @ vvt[:r]
  np.testing.assert_allclose(new_b @ new_a, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
  # Balanced factors: bᵀb = a aᵀ = Σ_r (diagonal, the top singular values).
  btb, aat = new_b.T @ new_b, new_a @ new_a.T
  np.testing.assert_allclose(btb, aat, atol=1e-3 * ss[0])
  np.testing.assert_allclose(np.diag(btb), ss[:r], rtol=1e-4)
  np.testing.assert_allclose(btb - np.diag(np.diag(btb)), 0, atol=1e-3 * ss[0])


def _reference_loro(params, grads_seq, lr_fn, rank_ratio, K, b1=0.9, b2=0.999, eps=1e-6):
  """Step-by-step numpy reimplementation of brief section 4 (approximate steps only
  for non-exact updates; exact updates via the numpy truncated SVD of the
  Riemannian step computed from the Adam directions)."""
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v_ = {k: np.zeros_like(v) for k, v in p.items()}
  k_count = 0
  for u, g in enumerate(grads_seq):
    k_count += 1
    lr = float(lr_fn(u))
    alpha = lr * np.sqrt(1 - b2 ** k_count) / (1 - b1 ** k_count)
    d = {}
    for name in p:
      m[name] = b1 * m[name] + (1 - b1) * g[name]
      v_[name] = b2 * v_[name] + (1 - b2) * g[name] ** 2
      d[name] = m[name] / (np.sqrt(v_[name]) + eps)
    exact = (u + 1) % K == 0
    p["emb"] = p["emb"] - alpha * d["emb"]
    if exact:
      nb, na = optim.loro_exact_step(jnp.asarray(p["b"], jnp.float32), jnp.asarray(p["a"], jnp.float32),
                                     jnp.asarray(d["b"], jnp.float32), jnp.asarray(d["a"], jnp.float32), alpha)
      p["b"], p["a"] = np.asarray(nb, np.float64), np.asarray(na, np.float64)
      m = {k: np.zeros_like(x) for k, x in m.items()}
      v_ = {k: np.zeros_like(x) for k, x in v_.items()}
      k_count = 0
    else:
      p["b"] = p["b"] - alpha * rank_ratio * d["b"]
      p["a"] = p["a"] - alpha * rank_ratio * d["a"]
  return p


def test_loro_adamw_matches_step_by_step_reference():
  rng = np.random.default_rng(0)
  params = {"lin": {"b": rng.normal(size=(10, 3)), "a": rng.normal(size=(3, 8))},
            "emb": rng.normal(size=(5, 4))}
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  grads_seq = [jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
               for _ in range(9)]
  lr_fn = optim.cosine_restart_schedule(0.01, 2, 9, 0.1, cycle=4, restart_warmup=2)
  tx = optim.loro_adamw(lr_fn, rank_ratio=0.25, exact_every=4)
  state = tx.init(params)
  step = jax.jit(tx.update)
  p = params
  for g in grads_seq:
    upd, state = step(g, state, p)
    p = jax.tree.map(lambda x, y: x + y, p, upd)
  flat = {"b": params["lin"]["b"], "a": params["lin"]["a"], "emb": params["emb"]}
  ref = _reference_loro(flat, [{"b": g["lin"]["b"], "a": g["lin"]["a"], "emb": g["emb"]} for g in grads_seq],
                        lr_fn, 0.25, 4)
  np.testing.assert_allclose(np.asarray(p["emb"]), ref["emb"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(p["lin"]["b"] @ p["lin"]["a"]), ref["b"] @ ref["a"], rtol=1e-4, atol=1e-5)
  assert int(state.count) == 9 - 8 and int(state.step) == 9  # reset after updates 4 and 8


def test_loro_moments_reset_after_exact_step():
  params = {"m": {"b": jnp.ones((6, 2)), "a": jnp.ones((2, 5)) * 0.5}, "n": jnp.ones((3,))}
  tx = optim.loro_adamw(lambda s: 0.1, rank_ratio=0.5, exact_every=3)
  state = tx.init(params)
  g = jax.tree.map(jnp.ones_like, params)
  for i in range(3):
    _, state = tx.update(g, state, params)
    nonzero = float(jnp.abs(state.mu["n"]).sum()) > 0
    assert nonzero == (i < 2)
  assert int(state.count) == 0 and float(jnp.abs(state.nu["m"]["b"]).sum()) == 0


def test_factor_pairs_found_in_a_model_state():
  from flax import nnx
  from elas_jax import model as model_lib
  c = load_config("configs/tiny.py", "elas")
  params = nnx.state(model_lib.build_model(c.model), nnx.Param)
  pairs, others = optim.factor_pairs(params)
  assert len(pairs) == c.model.n_layers * 6  # q, k, v, o, up, down
  assert len(others) == 3 + 2 * c.model.n_layers  # embed, final norm, lm_head, 2 norms/layer


def test_cosine_schedule_formula():
  s = optim.cosine_schedule(1.0, warmup_steps=10, total_steps=110, min_ratio=0.1)
  assert float(s(0)) == 0.0 and float(s(5)) == pytest.approx(0.5)
  assert float(s(10)) == pytest.approx(1.0)
  assert float(s(60)) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 0.5)))
  assert float(s(110)) == pytest.approx(0.1) and float(s(500)) == pytest.approx(0.1)


def test_cosine_restart_formula():
  s = optim.cosine_restart_schedule(1.0, warmup_steps=10, total_steps=110, min_ratio=0.1,
                                    cycle=20, restart_warmup=5)
  base = lambda t: 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * (t - 10) / 100))
  assert float(s(0)) == pytest.approx(0.1)  # warm-up starts at 0.1·lr
  assert float(s(5)) == pytest.approx(0.1 + 0.9 * 0.5)
  assert float(s(19)) == pytest.approx(base(19))  # the exact step itself: full lr
  assert float(s(20)) == pytest.approx(1e-6)  # right after the exact step (official LORO floor)
  assert float(s(22)) == pytest.approx((base(20) - 1e-6) * 2 / 5 + 1e-6)  # towards the cycle-start lr
  assert float(s(25)) == pytest.approx(base(25))
  assert float(s(3)) == pytest.approx(0.1 + 0.9 * 0.3)  # no restart ramp in the first cycle


def test_make_optimizer_per_variant():
  for variant, kind in (("elas", optim.LoroState), ("full", None), ("cola", None)):
    c = load_config("configs/tiny.py", variant)
    tx, _ = optim.make_optimizer(c)
    params = {"w": jnp.ones((4, 4)), "blk": {"b": jnp.ones((4, 2)), "a": jnp.ones((2, 4))}}
    state = tx.init(params)
    if kind:
      assert isinstance(state, kind)
    upd, _ = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(upd))
