"""LORO-AdamW, AdamW and the schedules against references written from the math.

The LORO reference is numpy float64 built from the LORO update alone (Adam on
the factors with the r/d scale; the exact step as the rank-r truncated SVD of
``W - α·P_T(G)`` with balanced factors; moments reset after it); it never calls
``elas_jax.optim``. The AdamW variants are compared with an ``optax.adamw``
chain the test assembles itself.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from elas_jax import optim
from tests.helpers import load_config


def _projector(x):
  """Orthogonal projector onto the column space of ``x`` (full column rank)."""
  return x @ np.linalg.pinv(x)


def _tangent_projection(b, a, g):
  """P_T(G) = P_B G + G P_A - P_B G P_A, the tangent space of the rank-r manifold at W = b a."""
  p_b, p_a = _projector(b), _projector(a.T)
  return p_b @ g + g @ p_a - p_b @ g @ p_a


def _truncated_svd_balanced(w, r):
  """Factors of the rank-r truncated SVD of ``w``: B = U_r Σ_r^½, A = Σ_r^½ V_rᵀ."""
  u, s, vt = np.linalg.svd(w)
  root = np.sqrt(s[:r])
  return u[:, :r] * root, root[:, None] * vt[:r]


def _full_gradient_from_directions(b, a, d_b, d_a):
  """A full gradient G that the factor directions ``d_b``, ``d_a`` describe.

  For one consistent gradient, ``d_b = G aᵀ`` and ``d_a = bᵀ G``. Adam's
  elementwise scaling breaks that consistency (``bᵀ d_b != d_a aᵀ``), and the
  span(b) component is then given twice; LORO's core takes it from ``d_a``
  (block ``R_B R_Aᵀ - α Ĝ_A Q_A``) and only the complement of span(b) from
  ``d_b`` (``Q̄_B R̄_B``). So G is the minimal-norm matrix with ``bᵀ G = d_a``
  and ``(I - P_B) G aᵀ = (I - P_B) d_b``; for consistent directions its
  tangent projection is P_T of the original G.
  """
  comp_b = np.eye(b.shape[0]) - _projector(b)
  return np.linalg.pinv(b).T @ d_a + comp_b @ d_b @ np.linalg.pinv(a).T


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
  p_t = _tangent_projection(b, a, g)
  # The reference's G from consistent directions has the same tangent projection.
  np.testing.assert_allclose(_tangent_projection(b, a, _full_gradient_from_directions(b, a, g @ a.T, b.T @ g)),
                             p_t, atol=1e-9 * np.abs(p_t).max())
  want_b, want_a = _truncated_svd_balanced(b @ a - alpha * p_t, r)
  want = want_b @ want_a
  np.testing.assert_allclose(new_b @ new_a, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
  # Balanced factors: bᵀb = a aᵀ = Σ_r (diagonal, the top singular values).
  sigma = np.diag(want_b.T @ want_b)
  btb, aat = new_b.T @ new_b, new_a @ new_a.T
  np.testing.assert_allclose(btb, aat, atol=1e-3 * sigma[0])
  np.testing.assert_allclose(np.diag(btb), sigma, rtol=1e-4)
  np.testing.assert_allclose(btb - np.diag(np.diag(btb)), 0, atol=1e-3 * sigma[0])


# ---------------------------------------------------- LORO-AdamW step by step

B1, B2, EPS, K, RANK_RATIO = 0.9, 0.999, 1e-6, 4, 0.25


def _lr(u):
  """A plain decaying lr (works on ints and traced arrays); the schedules are tested separately."""
  return 0.05 / (1.0 + 0.1 * u)


def _problem(seed=0, d_out=10, r=3, d_in=8, steps=11):
  """Initial params and a loss per step whose gradients depend on the params.

  Gradients that follow the params keep the two trajectories comparable after
  an exact step, whose factors are defined up to the sign of each singular
  pair: flipping column i of b and row i of a flips their gradients, moments
  and Adam directions alike, so W = b a evolves the same way.
  """
  rng = np.random.default_rng(seed)
  params = {"lin": {"b": 0.5 * rng.normal(size=(d_out, r)), "a": 0.5 * rng.normal(size=(r, d_in))},
            "emb": rng.normal(size=(5, 4))}
  coef = [rng.normal(size=(d_out, d_in)) for _ in range(steps)]
  target = [rng.normal(size=(5, 4)) for _ in range(steps)]

  def grads(p, t):
    """Gradient of sum(coef_t ⊙ tanh(b a)) + ½‖emb - target_t‖², in float64."""
    b, a = p["lin"]["b"], p["lin"]["a"]
    g_w = coef[t] * (1.0 - np.tanh(b @ a) ** 2)
    return {"lin": {"b": g_w @ a.T, "a": b.T @ g_w}, "emb": p["emb"] - target[t]}

  return params, grads, steps


def _reference_loro_trajectory(params, grads, steps):
  """Brief section 4 in numpy float64: the params and the exact-step flag after every update."""
  p = jax.tree.map(np.copy, params)
  m = jax.tree.map(np.zeros_like, p)
  v = jax.tree.map(np.zeros_like, p)
  k = 0  # updates since the last reset
  out = []
  for u in range(steps):
    g = grads(p, u)
    k += 1
    m = jax.tree.map(lambda m_, g_: B1 * m_ + (1 - B1) * g_, m, g)
    v = jax.tree.map(lambda v_, g_: B2 * v_ + (1 - B2) * g_ ** 2, v, g)
    d = jax.tree.map(lambda m_, v_: m_ / (np.sqrt(v_) + EPS), m, v)  # eps on the uncorrected sqrt(v)
    alpha = _lr(u) * np.sqrt(1 - B2 ** k) / (1 - B1 ** k)
    exact = (u + 1) % K == 0
    p["emb"] = p["emb"] - alpha * d["emb"]  # full-size: plain Adam
    b, a = p["lin"]["b"], p["lin"]["a"]
    if exact:  # Riemannian step, no r/d factor; then every moment and the counter restart
      g_full = _full_gradient_from_directions(b, a, d["lin"]["b"], d["lin"]["a"])
      p["lin"]["b"], p["lin"]["a"] = _truncated_svd_balanced(
          b @ a - alpha * _tangent_projection(b, a, g_full), b.shape[1])
      m, v, k = jax.tree.map(np.zeros_like, m), jax.tree.map(np.zeros_like, v), 0
    else:
      p["lin"]["b"] = b - alpha * RANK_RATIO * d["lin"]["b"]
      p["lin"]["a"] = a - alpha * RANK_RATIO * d["lin"]["a"]
    out.append((jax.tree.map(np.copy, p), exact))
  return out


def _align_signs(b, a, b_ref):
  """``b``, ``a`` with each singular pair's sign chosen to match ``b_ref``."""
  s = np.sign(np.sum(b * b_ref, axis=0))
  return b * s, a * s[:, None]


def test_loro_adamw_matches_step_by_step_reference():
  params, grads, steps = _problem()
  want = _reference_loro_trajectory(params, grads, steps)
  assert [e for _, e in want].count(True) == 2  # exact steps at updates 4 and 8
  tx = optim.loro_adamw(_lr, rank_ratio=RANK_RATIO, exact_every=K, b1=B1, b2=B2, eps=EPS)
  p = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  state = tx.init(p)
  update = jax.jit(tx.update)
  for u, (ref, exact) in enumerate(want):
    g = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), grads(jax.tree.map(np.asarray, p), u))
    upd, state = update(g, state, p)
    p = optax.apply_updates(p, upd)
    got = jax.tree.map(lambda x: np.asarray(x, np.float64), p)
    where = f"update {u + 1} ({'exact' if exact else 'Adam'})"
    np.testing.assert_allclose(got["emb"], ref["emb"], rtol=1e-4, atol=1e-5, err_msg=where)
    w_ref = ref["lin"]["b"] @ ref["lin"]["a"]
    np.testing.assert_allclose(got["lin"]["b"] @ got["lin"]["a"], w_ref, rtol=1e-4,
                               atol=1e-5 * np.abs(w_ref).max(), err_msg=where)
    # The factors themselves (balanced after an exact step), up to each pair's sign.
    b, a = _align_signs(got["lin"]["b"], got["lin"]["a"], ref["lin"]["b"])
    np.testing.assert_allclose(b, ref["lin"]["b"], rtol=1e-4, atol=1e-5, err_msg=where)
    np.testing.assert_allclose(a, ref["lin"]["a"], rtol=1e-4, atol=1e-5, err_msg=where)
    assert int(state.step) == u + 1
    assert int(state.count) == (0 if exact else (u + 1) % K), where
    if exact:  # every moment of every parameter restarts from zero
      assert all(not np.asarray(x).any() for x in jax.tree.leaves((state.mu, state.nu))), where


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


def test_low_rank_variants_get_loro_adamw():
  for variant in ("loro", "loro_relu2", "elas"):
    tx, _ = optim.make_optimizer(load_config("configs/tiny.py", variant))
    assert isinstance(tx.init({"w": jnp.ones((4, 4))}), optim.LoroState), variant


def _documented_cosine(lr, warmup, total, floor):
  """README: linear warm-up from 0, then cosine down to ``floor·lr`` (jnp, for optax)."""

  def schedule(t):
    t = jnp.asarray(t, jnp.float32)
    progress = jnp.clip((t - warmup) / (total - warmup), 0.0, 1.0)
    return jnp.where(t < warmup, lr * t / warmup, lr * (floor + (1 - floor) * 0.5 * (1 + jnp.cos(jnp.pi * progress))))

  return schedule


@pytest.mark.parametrize("variant", ["full", "cola"])
def test_adamw_variants_match_optax_adamw(variant):
  c = load_config("configs/tiny.py", variant)
  c.train.steps, c.optimizer.warmup_steps = 10, 3  # warm-up and cosine both within the run
  o = c.optimizer
  assert (o.name, o.schedule) == ("adamw", "cosine")
  if variant == "cola":  # CoLA trains with AdamW wd 0.01, clip 0.5 (its paper's settings)
    assert (o.weight_decay, o.grad_clip) == (0.01, 0.5)
  tx, _ = optim.make_optimizer(c)
  # The reference: optax.adamw with weight decay on matrices only (README), after
  # global-norm clipping when grad_clip > 0.
  ref = optax.adamw(_documented_cosine(o.lr, 3, 10, o.min_lr_ratio), b1=o.b1, b2=o.b2, eps=o.eps,
                    weight_decay=o.weight_decay, mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p))
  if o.grad_clip > 0:
    ref = optax.chain(optax.clip_by_global_norm(o.grad_clip), ref)
  rng = np.random.default_rng(1)
  params = {"embed": rng.normal(size=(6, 4)), "norm": 1.0 + 0.1 * rng.normal(size=(4,)),
            "blk": {"a": rng.normal(size=(4, 2)), "b": rng.normal(size=(2, 4))}}
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  leaves, treedef = jax.tree.flatten(params)
  p, p_ref = params, params
  state, state_ref = tx.init(p), ref.init(p_ref)
  clipped = 0
  for t in range(10):
    # Gradient norms from ~0.1 to ~3: clipping at 0.5 acts on some steps only.
    scale = 0.5 * 1.5 ** (t - 5)
    g = treedef.unflatten([jnp.asarray(rng.normal(size=x.shape) * scale, jnp.float32) for x in leaves])
    clipped += np.sqrt(sum(float(jnp.sum(x * x)) for x in jax.tree.leaves(g))) > 0.5
    upd, state = tx.update(g, state, p)
    upd_ref, state_ref = ref.update(g, state_ref, p_ref)
    p, p_ref = optax.apply_updates(p, upd), optax.apply_updates(p_ref, upd_ref)
    for got, want in zip(jax.tree.leaves(p), jax.tree.leaves(p_ref), strict=True):
      np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-7, err_msg=f"step {t + 1}")
  assert 0 < clipped < 10
  moved = max(float(jnp.abs(x - y).max()) for x, y in zip(jax.tree.leaves(p), jax.tree.leaves(params)))
  assert moved > o.lr  # the runs really trained: not a comparison of two no-ops
