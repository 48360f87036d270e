"""LORO's cosine_restart schedule against the official LORO code, and the
weight decay of LORO-AdamW as the official optimizer applies it.

The reference below is a plain-Python transcription of the math of
``_get_cosine_schedule_with_multiple_warmups_lambda`` in mzf666/LORO-main,
``peft_pretraining/training_utils.py`` (with ``lr_jag_after_warmup = False``, as
every official script runs it), written from the formula, not copied. The
official run_c4.py steps the scheduler once per update after
``optimizer.step``, so update ``u`` (0-based) uses ``lr · lambda(u)``.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from elas_jax import config_lib, optim
from tests.helpers import load_config


def official_multiplier(u: int, *, warmup: int, total: int, cycle: int, restart_warmup: int,
                        min_ratio: float, adjust: int, floor: float = 1e-6) -> float:
  """lambda(u) of the official LORO cosine_restart scheduler (see module docstring).

  Warm-up (u < W): linear in u from min_ratio (u = 0) towards
  M = ½(1 + cos(π·(−adjust)/(T − W))) (u = W); a restart inside the warm-up ramps from
  ``floor`` to the warm-up line's value at n·cycle. After it, the clock is
  u + adjust; cosine value at clock s is m + (1 − m)·½(1 + cos(π(s − W)/(T − W)));
  a restart (n = s // cycle >= 1, j = s mod cycle < restart_warmup) ramps from
  ``floor`` towards the cosine at s = n·cycle.
  """
  span = max(1, total - warmup)
  if u < warmup:
    top = 0.5 * (1.0 + math.cos(math.pi * (-adjust) / span))
    line = lambda s: s / max(1, warmup) * (top - min_ratio) + min_ratio
    n, j = divmod(u, cycle)
    if j < restart_warmup and n != 0:
      return j / max(1, restart_warmup) * (line(n * cycle) - floor) + floor
    return line(u)
  s = u + adjust
  n, j = divmod(s, cycle)  # Python floor division, as in the official code
  cos = lambda t: min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * (t - warmup) / span))
  if j < restart_warmup and n > 0:
    return j / max(1, restart_warmup) * (cos(n * cycle) - floor) + floor
  return cos(s)


# (warm-up, total steps, K = cosine_restart_freq = loro_freq) of the official
# scripts/loro_c4/llama_{60m,130m,350m,1b}.sh, and a small case.
SHAPES = {"60m": (1000, 10_000, 500), "130m": (2000, 20_000, 500), "350m": (2000, 60_000, 500),
          "1b": (10_000, 100_000, 200), "small": (10, 110, 20)}


def _ours(lr, warmup, total, cycle, adjust, restart_warmup=5, min_ratio=0.1):
  s = optim.cosine_restart_schedule(lr, warmup, total, min_ratio, cycle, restart_warmup,
                                    lr_adjust_steps=adjust)
  return np.asarray(jax.jit(jax.vmap(s))(jnp.arange(total, dtype=jnp.int32)), np.float64)


def _official(lr, warmup, total, cycle, adjust, restart_warmup=5, min_ratio=0.1):
  return lr * np.array([official_multiplier(u, warmup=warmup, total=total, cycle=cycle,
                                            restart_warmup=restart_warmup, min_ratio=min_ratio,
                                            adjust=adjust) for u in range(total)])


@pytest.mark.parametrize("size", list(SHAPES))
@pytest.mark.parametrize("adjust", ["0", "-warmup", "-6000", "-3warmup"])
def test_cosine_restart_equals_official_formula(size, adjust):
  warmup, total, cycle = SHAPES[size]
  adj = {"0": 0, "-warmup": -warmup, "-6000": -6000, "-3warmup": -3 * warmup}[adjust]
  lr = 0.01
  ours, ref = _ours(lr, warmup, total, cycle, adj), _official(lr, warmup, total, cycle, adj)
  assert total // cycle >= 3  # at least 3 restart cycles
  np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6 * lr)
  np.testing.assert_allclose(ours, ref, rtol=1e-4)  # also relative: the ramps' 1e-6·lr floor


def test_small_case_restart_ramp_and_nonmultiple_warmup():
  # restart_warmup 3, a warm-up that ends inside a ramp (W = 22, cycle 10), min_ratio 0.05.
  for adj in (0, -22, -7, 4):
    ours = _ours(1.0, 22, 130, 10, adj, restart_warmup=3, min_ratio=0.05)
    ref = _official(1.0, 22, 130, 10, adj, restart_warmup=3, min_ratio=0.05)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)


# The official scripts' settings: (lr, warm-up, steps, loro_freq, lr_adjust_steps);
# min_lr_ratio 0.1 and cosine_restart_warmup 5 (run_c4.py's default) throughout.
SCRIPTS = {"60m": (0.01, 1000, 10_000, 500, -1000), "130m": (0.01, 2000, 20_000, 500, -2000),
           "350m": (0.01, 2000, 60_000, 500, -6000), "1b": (0.005, 10_000, 100_000, 200, -10_000)}


@pytest.mark.parametrize("size", list(SCRIPTS))
@pytest.mark.parametrize("variant", ["loro", "elas"])
def test_paper_configs_run_the_official_scripts_schedule(size, variant):
  lr, warmup, total, freq, adj = SCRIPTS[size]
  c = load_config(f"configs/llama_{size}.py", variant)
  o = c.optimizer
  assert (o.lr, o.warmup_steps, c.train.steps, o.exact_every, o.lr_adjust_steps) == (lr, warmup, total, freq, adj)
  assert (o.schedule, o.min_lr_ratio, o.restart_warmup) == ("cosine_restart", 0.1, 5)
  ours = np.asarray(jax.jit(jax.vmap(optim.make_schedule(o, c.train.steps)))(jnp.arange(total)), np.float64)
  np.testing.assert_allclose(ours, _official(lr, warmup, total, freq, adj), rtol=0, atol=1e-6 * lr)


def test_60m_shape_as_the_issue_describes():
  # peak at 2x warm-up, end of warm-up ~0.97 lr, final ~0.127 lr, ramps start at 1e-6 lr.
  ours = _ours(1.0, 1000, 10_000, 500, -1000)
  # the cosine peaks at u = 2000, where a restart ramp starts; u = 1999 (an exact step) is ~lr
  assert ours[1999] == pytest.approx(1.0, abs=1e-6) and ours.max() <= 1.0 + 1e-6
  assert ours[1700] < 0.999 and ours[2300] < 0.999  # a peak, not a plateau
  assert ours[999] == pytest.approx(0.97, abs=0.01) and ours[-1] == pytest.approx(0.127, abs=0.001)
  assert ours[1500] == pytest.approx(1e-6)  # after the exact step at update 1499
  assert ours[1000] > 0.9  # the ramp after the exact step at 999 is skipped (clock 0)


def test_tiny_and_full_cola_variants_keep_adjust_zero():
  assert load_config("configs/tiny.py", "loro").optimizer.lr_adjust_steps == 0
  for size in ("60m", "350m"):
    for variant in ("full", "cola"):
      assert load_config(f"configs/llama_{size}.py", variant).optimizer.lr_adjust_steps == 0


@pytest.mark.parametrize("overrides, field", [
    ({"optimizer.schedule": "cosine", "optimizer.lr_adjust_steps": -10}, "optimizer.lr_adjust_steps"),
    ({"optimizer.lr_adjust_steps": 590}, "optimizer.lr_adjust_steps"),
    ({"optimizer.restart_warmup": -1}, "optimizer.restart_warmup"),
])
def test_bad_schedule_fields_name_the_field(overrides, field):
  c = load_config("configs/tiny.py", "loro")
  with pytest.raises(config_lib.ConfigError, match=f"config.{field}"):
    config_lib.override(c, overrides)
    config_lib.validate(c)


def test_loro_adamw_weight_decay_as_official():
  """One update with weight decay against the official LOROAdamW arithmetic
  (loro_torch/loro_optim.py): full-size p <- p - α·m̂/(√v+ε), then p <- p - lr·wd·p
  (scheduled lr); factors M <- M - α·s·d, then M <- M - α·wd·M (α bias-corrected)."""
  rng = np.random.default_rng(1)
  p = {"lin": {"b": rng.normal(size=(7, 2)), "a": rng.normal(size=(2, 5))}, "emb": rng.normal(size=(4, 3))}
  g = jax.tree.map(lambda x: rng.normal(size=x.shape), p)
  lr, wd, s, b1, b2, eps = 0.05, 0.3, 0.25, 0.9, 0.999, 1e-6
  tx = optim.loro_adamw(lambda u: lr, rank_ratio=s, exact_every=100, b1=b1, b2=b2, eps=eps, weight_decay=wd)
  p32, g32 = (jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), t) for t in (p, g))
  upd, _ = tx.update(g32, tx.init(p32), p32)
  new = jax.tree.map(lambda x, y: np.asarray(x + y, np.float64), p32, upd)
  alpha = lr * math.sqrt(1 - b2) / (1 - b1)
  d = lambda x: (1 - b1) * x / (np.sqrt((1 - b2) * x * x) + eps)
  emb = p["emb"] - alpha * d(g["emb"])
  emb = emb - lr * wd * emb
  np.testing.assert_allclose(new["emb"], emb, rtol=1e-5, atol=1e-6)
  for k in ("a", "b"):
    f = p["lin"][k] - alpha * s * d(g["lin"][k])
    f = f - alpha * wd * f
    np.testing.assert_allclose(new["lin"][k], f, rtol=1e-5, atol=1e-6)
