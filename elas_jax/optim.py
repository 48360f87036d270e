"""Optimizers and learning-rate schedules (optax).

* ``adamw``: ``optax.adamw`` (decay on matrices only), optional global-norm clipping.
* ``loro_adamw``: LORO-AdamW (docs/optimizer.md). Low-rank factor pairs
  ``(b [d_out, r], a [r, d_in])`` take Adam steps scaled by ``r/d`` and, every
  ``K`` updates, an exact Riemannian step on the rank-r manifold built from
  factor-sized matrices only; then every Adam moment and counter is reset.
  Full-size parameters (embeddings, lm_head, norms) take plain Adam steps.
* Schedules: linear warm-up + cosine to a floor (``cosine``), and LORO's
  ``cosine_restart`` as the official LORO code computes it (warm-up from
  ``min_lr_ratio·lr``, cosine to the floor, optionally shifted by
  ``lr_adjust_steps``; after every exact step the lr restarts from 1e-6·lr and
  ramps back over a few updates). docs/optimizer.md lists what still differs.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx


# ------------------------------------------------------------------ schedules


def cosine_schedule(lr: float, warmup_steps: int, total_steps: int, min_ratio: float,
                    warmup_from: float = 0.0) -> Callable[[jax.Array], jax.Array]:
  """Linear warm-up from ``warmup_from·lr`` to ``lr``, cosine down to ``min_ratio·lr``."""

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = lr * (warmup_from + (1 - warmup_from) * step / max(warmup_steps, 1))
    progress = jnp.clip((step - warmup_steps) / max(total_steps - warmup_steps, 1), 0.0, 1.0)
    cos = lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + jnp.cos(jnp.pi * progress)))
    return jnp.where(step < warmup_steps, warm, cos)

  return schedule


def cosine_restart_schedule(lr: float, warmup_steps: int, total_steps: int, min_ratio: float,
                            cycle: int, restart_warmup: int, lr_adjust_steps: int = 0,
                            ramp_floor: float = 1e-6) -> Callable[[jax.Array], jax.Array]:
  """LORO's ``cosine_restart`` schedule as the official code computes it.

  The multiplier of ``lr`` at update ``u`` (0-based; see docs/optimizer.md for
  the source it follows, LORO-main ``_get_cosine_schedule_with_multiple_warmups_lambda``),
  with ``W`` warm-up steps, ``T`` total, ``m`` = ``min_ratio``, ``c`` = ``cycle``
  (= the exact-step period K), ``a`` = ``lr_adjust_steps``:

  * warm-up (``u < W``): linear from ``m`` to ``peak_w = ½(1 + cos(π·(−a)/(T−W)))``
    (1 for ``a = 0``); the cycle clock is ``s = u``;
  * after (``u >= W``): the cosine ``m + (1−m)·½(1 + cos(π·(s−W)/(T−W)))`` of the
    shifted clock ``s = u + a`` (no clipping: a negative ``a`` moves the peak to
    ``W − a`` and makes the first part rise again);
  * restart ramp: where ``j = s mod c < restart_warmup`` and ``s // c >= 1``
    (floor division, so a negative clock never ramps), the multiplier is
    ``j/restart_warmup · (target − floor) + floor``: it starts at ``floor``
    (1e-6) right after an exact step and climbs towards ``target``, the value
    of the active branch's formula at the cycle's start ``s − j``.
  """
  w, t, a = int(warmup_steps), int(total_steps), int(lr_adjust_steps)
  span = max(1, t - w)
  peak_w = 0.5 * (1.0 + math.cos(math.pi * -a / span))
  f = lambda x: x.astype(jnp.float32)

  def warm(s):  # linear warm-up multiplier at (int) clock s
    return f(s) / max(1, w) * (peak_w - min_ratio) + min_ratio

  def cosine(s):  # cosine multiplier at (int) clock s
    # cos(π·x/span) has period 2·span in x: reduce x exactly in integers so the
    # fp32 argument stays in [0, 2π) however far a negative shift moves the clock.
    x = (s - w) % (2 * span)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + jnp.cos(jnp.pi * f(x) / span))

  def schedule(step):
    step = jnp.asarray(step, jnp.int32)
    in_warm = step < w
    clock = jnp.where(in_warm, step, step + a)
    j, n = clock % cycle, clock // cycle  # floor semantics, as Python's % and //
    base = jnp.where(in_warm, warm(clock), cosine(clock))
    target = jnp.where(in_warm, warm(clock - j), cosine(clock - j))
    ramp = f(j) / max(1, restart_warmup) * (target - ramp_floor) + ramp_floor
    return lr * jnp.where((j < restart_warmup) & (n > 0), ramp, base)

  return schedule


def make_schedule(opt_cfg, total_steps: int) -> Callable[[jax.Array], jax.Array]:
  if opt_cfg.schedule == "cosine_restart":
    return cosine_restart_schedule(opt_cfg.lr, opt_cfg.warmup_steps, total_steps, opt_cfg.min_lr_ratio,
                                   opt_cfg.exact_every, opt_cfg.restart_warmup,
                                   lr_adjust_steps=opt_cfg.lr_adjust_steps)
  return cosine_schedule(opt_cfg.lr, opt_cfg.warmup_steps, total_steps, opt_cfg.min_lr_ratio)


# --------------------------------------------------------------- exact step


def loro_exact_step(b: jax.Array, a: jax.Array, d_b: jax.Array, d_a: jax.Array, alpha
                    ) -> tuple[jax.Array, jax.Array]:
  """One Riemannian step of ``W = b @ a`` on the rank-r manifold, in fp32.

  With ``d_b = G aᵀ`` and ``d_a = bᵀ G`` for a full gradient ``G`` this returns
  factors of the rank-r truncated SVD of ``W - alpha · P_T(G)``, where ``P_T``
  projects onto the tangent space at ``W``; no ``d_out x d_in`` matrix is
  formed. The result is balanced: ``b'ᵀ b' = a' a'ᵀ = Σ_r``.
  """
  dt = b.dtype
  b, a, d_b, d_a = (x.astype(jnp.float32) for x in (b, a, d_b, d_a))
  r = b.shape[1]
  q_b, r_b = jnp.linalg.qr(b)                    # [o, r], [r, r]
  q_a, r_a = jnp.linalg.qr(a.T)                  # [i, r], [r, r]
  g_b = jnp.linalg.solve(r_a.T, d_b.T).T         # d_b r_a⁻¹        [o, r]
  g_a = jnp.linalg.solve(r_b.T, d_a)             # r_b⁻ᵀ d_a        [r, i]
  qc_b, rc_b = jnp.linalg.qr(g_b - q_b @ (q_b.T @ g_b))        # complement of span(b)
  g_a_t = g_a.T
  qc_a, rc_a = jnp.linalg.qr(g_a_t - q_a @ (q_a.T @ g_a_t))    # complement of span(aᵀ)
  core = jnp.block([[r_b @ r_a.T - alpha * (g_a @ q_a), -alpha * rc_a.T],
                    [-alpha * rc_b, jnp.zeros((r, r), jnp.float32)]])
  u, s, vt = jnp.linalg.svd(core)
  root = jnp.sqrt(s[:r])
  new_b = jnp.concatenate([q_b, qc_b], axis=1) @ (u[:, :r] * root[None, :])
  new_a = (root[:, None] * vt[:r]) @ jnp.concatenate([q_a, qc_a], axis=1).T
  return new_b.astype(dt), new_a.astype(dt)


def stacked_exact_step(b: jax.Array, a: jax.Array, d_b: jax.Array, d_a: jax.Array, alpha
                       ) -> tuple[jax.Array, jax.Array]:
  """:func:`loro_exact_step` per matrix pair, looped over any leading (stacked-layer) axes.

  A ``lax.map`` (one compiled body, pairs one after another), not a vmap: the
  batched QR/SVD of a vmap hung XLA:CPU multi-device steps (the ``layers``
  axis was partitioned across devices inside the exact-step branch).
  """
  if b.ndim == 2:
    return loro_exact_step(b, a, d_b, d_a, alpha)
  return jax.lax.map(lambda x: stacked_exact_step(*x, alpha), (b, a, d_b, d_a))


# ------------------------------------------------------------ LORO-AdamW


class LoroState(NamedTuple):
  count: jax.Array  # updates since the last reset (k)
  step: jax.Array   # updates since the start (u)
  mu: Any
  nu: Any


def _key_name(entry) -> str | None:
  return getattr(entry, "key", getattr(entry, "name", None))


def factor_pairs(params) -> tuple[list[tuple[int, int]], list[int]]:
  """Leaf indices of ``(b, a)`` factor pairs and of the remaining leaves.

  A pair is two leaves named ``b`` and ``a`` under the same module whose
  shapes chain as ``[d_out, r] @ [r, d_in]`` (the ``lowrank`` linear), or as
  ``[..., d_out, r] @ [..., r, d_in]`` with equal leading (``layers``) axes
  for the stacked factors of a ``scan_layers`` model.
  """
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  by_module: dict[tuple, dict[str, int]] = {}
  for i, (path, _) in enumerate(leaves):
    names = [_key_name(p) for p in path]
    while names and names[-1] in ("value", "raw_value"):  # nnx Variable fields
      names.pop()
    if names and names[-1] in ("a", "b"):
      by_module.setdefault(tuple(map(str, names[:-1])), {})[names[-1]] = i
  pairs = []
  for mod in by_module.values():
    if set(mod) == {"a", "b"}:
      b, a = leaves[mod["b"]][1], leaves[mod["a"]][1]
      if (b.ndim == a.ndim >= 2 and b.shape[:-2] == a.shape[:-2]
          and b.shape[-1] == a.shape[-2]):
        pairs.append((mod["b"], mod["a"]))
  in_pairs = {i for p in pairs for i in p}
  return pairs, [i for i in range(len(leaves)) if i not in in_pairs]


def loro_adamw(learning_rate: Callable[[jax.Array], jax.Array], *, rank_ratio: float,
               exact_every: int, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6,
               weight_decay: float = 0.0) -> optax.GradientTransformation:
  """LORO-AdamW as an optax transformation (needs ``params`` in ``update``).

  Args:
    learning_rate: schedule of the update index ``u`` (0-based).
    rank_ratio: ``r / d`` (rank over hidden size), scaling the factors' Adam steps.
    exact_every: ``K``; update ``u`` is exact when ``(u + 1) % K == 0``.
  """

  def init(params):
    zeros = lambda p: jnp.zeros(p.shape, jnp.float32)
    return LoroState(count=jnp.zeros([], jnp.int32), step=jnp.zeros([], jnp.int32),
                     mu=jax.tree.map(zeros, params), nu=jax.tree.map(zeros, params))

  def update(grads, state, params=None):
    if params is None:
      raise ValueError("loro_adamw needs params: tx.update(grads, state, params)")
    pairs, others = factor_pairs(params)
    p_leaves, treedef = jax.tree.flatten(params)
    g_leaves = treedef.flatten_up_to(grads)
    m_leaves = treedef.flatten_up_to(state.mu)
    v_leaves = treedef.flatten_up_to(state.nu)

    k = state.count + 1
    lr = learning_rate(state.step)
    alpha = lr * jnp.sqrt(1 - b2 ** k.astype(jnp.float32)) / (1 - b1 ** k.astype(jnp.float32))
    m_new = [b1 * m + (1 - b1) * g.astype(jnp.float32) for m, g in zip(m_leaves, g_leaves)]
    v_new = [b2 * v + (1 - b2) * jnp.square(g.astype(jnp.float32)) for v, g in zip(v_leaves, g_leaves)]
    direction = [m / (jnp.sqrt(v) + eps) for m, v in zip(m_new, v_new)]

    def adam(i, scale, decay_lr):
      # As the official LOROAdamW: decay applies to the Adam-updated value, with
      # the scheduled lr for full-size parameters and the bias-corrected step
      # size for factors (``decay_lr``); no decay in the exact step.
      step = -alpha * scale * direction[i]
      stepped = p_leaves[i].astype(jnp.float32) + step
      return (step - decay_lr * weight_decay * stepped).astype(p_leaves[i].dtype)

    updates: list[Any] = [None] * len(p_leaves)
    for i in others:
      updates[i] = adam(i, 1.0, lr)
    is_exact = (state.step + 1) % exact_every == 0

    def exact_pairs():
      out = []
      for ib, ia in pairs:
        new_b, new_a = stacked_exact_step(p_leaves[ib], p_leaves[ia], direction[ib], direction[ia],
                                          alpha)
        out += [new_b - p_leaves[ib], new_a - p_leaves[ia]]
      return out

    def approx_pairs():
      return [u for ib, ia in pairs for u in (adam(ib, rank_ratio, alpha), adam(ia, rank_ratio, alpha))]

    pair_updates = jax.lax.cond(is_exact, exact_pairs, approx_pairs) if pairs else []
    for (ib, ia), j in zip(pairs, range(0, len(pair_updates), 2)):
      updates[ib], updates[ia] = pair_updates[j], pair_updates[j + 1]

    # After an exact step every moment and the counter restart from zero.
    keep = jnp.where(is_exact, 0.0, 1.0)
    new_state = LoroState(
        count=jnp.where(is_exact, 0, k).astype(jnp.int32), step=state.step + 1,
        mu=treedef.unflatten([m * keep for m in m_new]),
        nu=treedef.unflatten([v * keep for v in v_new]))
    return treedef.unflatten(updates), new_state

  return optax.GradientTransformation(init, update)


def _decay_mask(params):
  """Weight decay on matrices only; a stacked ``layers`` axis (scan_layers) does not count."""

  def one(p):
    if not isinstance(p, nnx.Variable):
      return p.ndim >= 2
    axes = p.get_metadata().get("logical_axes") or ()
    stacked = 1 if tuple(axes[:1]) == ("layers",) else 0
    return p.replace(p.get_value().ndim - stacked >= 2)

  return jax.tree.map(one, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def make_optimizer(cfg) -> tuple[optax.GradientTransformation, Callable[[jax.Array], jax.Array]]:
  """The optimizer and schedule ``config.optimizer`` describes."""
  o = cfg.optimizer
  schedule = make_schedule(o, cfg.train.steps)
  if o.name == "loro_adamw":
    tx = loro_adamw(schedule, rank_ratio=cfg.model.rank / cfg.model.d_model,
                    exact_every=o.exact_every, b1=o.b1, b2=o.b2, eps=o.eps,
                    weight_decay=o.weight_decay)
  else:
    tx = optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                     mask=_decay_mask)
  if o.grad_clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(o.grad_clip), tx)
  return tx, schedule
