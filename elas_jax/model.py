"""Pre-norm LLaMA decoder with pluggable linear and FFN kinds (Flax NNX).

Projection kinds (``config.model.linear_kind``; every attention and FFN projection):
  ``full``     y = x Wᵀ                       W: [out, in], N(0, 0.02²)
  ``lowrank``  y = x Aᵀ Bᵀ  (W = BA, LORO)     B: [out, r], A: [r, in], Xavier-normal
  ``cola``     y = σ(x Aᵀ) Bᵀ  (σ = SiLU)      CoLA init N(0,1)·r^-1/4·(in+out)^-1/4
FFN kinds: ``swiglu`` (down(silu(gate x) · up x); down(gate x · up x) with
``model.cola_only_lr_act``, CoLA's ``only_lr_act``) and ``relu2`` (down(relu(up x)²)),
the latter optionally 2:4-sparse (ELAS) through :func:`elas_jax.ops.ffn.sparse_ffn`
(``config.model.kernel`` picks its implementation).

Weights are stored as ``[out, in]`` (the orientation of ``W`` in ``y = x Wᵀ``, which the
LORO optimizer works in). Every parameter carries ``logical_axes`` metadata
for sharding rules.

Layer loop (``config.model``): ``remat`` = ``none`` | ``block`` (each decoder
block under ``jax.checkpoint``, keeping only its input) | ``lowrank`` (keeping
the block input and the arrays tagged with :data:`LOWRANK_SAVED` names: the
rank-r codes ``x Aᵀ`` of every low-rank linear, the attention output and
statistics, and the ELAS FFN's compressed 2:4 activation). ``scan_layers``
stores the blocks' parameters stacked on a leading ``layers`` axis and runs
them with ``jax.lax.scan`` (compile time flat in depth); :mod:`elas_jax.stacking`
converts parameters between the two layouts.

``mesh`` (of :func:`build_model`) is the mesh the model's steps are compiled
for: implementation choices (``model.kernel``, ``model.attention`` = ``auto``)
follow its devices, and the FFN kernels run per device on it.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from elas_jax import sharding, stacking
from elas_jax.ops import attention, ffn as ffn_ops
from elas_kernels import ffn as kernel_ffn

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

REMAT_MODES = ("none", "block", "lowrank")
# checkpoint_name tags of the arrays that remat = lowrank keeps for backward.
LOWRANK_CODE = "lowrank_code"  # x Aᵀ [T, r] of every lowrank / cola linear
ATTN_OUT = "attn_out"  # attention output [T, d] (before the o projection)
ATTN_STATS = "attn_stats"  # softmax statistics, where the attention implementation exposes them
LOWRANK_SAVED = (LOWRANK_CODE, ATTN_OUT, ATTN_STATS, kernel_ffn.SAVED_24_NAME)


def _normal(std: float):
  return lambda key, shape, dtype: std * jax.random.normal(key, shape, dtype)


class Projection(nnx.Module):
  """One projection ``d_in -> d_out``: linear (``full``, ``lowrank`` W = BA) or
  CoLA's non-linear ``σ(x Aᵀ) Bᵀ`` (``cola``), hence not called Linear.

  Written as ``post_first(x @ first_weightᵀ)`` and as ``pre_last(x) @
  last_weightᵀ`` so the sparse FFN op can fuse the matmuls on either side of
  the activation.
  """

  def __init__(self, d_in: int, d_out: int, *, kind: str, rank: int, axes: tuple[str, str],
               dtype: Any, param_dtype: Any, rngs: nnx.Rngs, full_std: float = 0.02):
    self.kind, self.dtype = kind, dtype
    ax_out, ax_in = axes
    key = rngs.params()
    if kind == "full":
      self.w = nnx.Param(_normal(full_std)(key, (d_out, d_in), param_dtype),
                         logical_axes=(ax_out, ax_in))
      return
    ka, kb = jax.random.split(key)
    if kind == "lowrank":  # LORO: Xavier-normal (gain 1) per factor
      std_b = math.sqrt(2.0 / (d_out + rank))
      std_a = math.sqrt(2.0 / (d_in + rank))
    elif kind == "cola":
      std_a = std_b = rank ** -0.25 * (d_in + d_out) ** -0.25
    else:
      raise ValueError(f"unknown linear kind {kind!r}")
    self.b = nnx.Param(_normal(std_b)(kb, (d_out, rank), param_dtype), logical_axes=(ax_out, "rank"))
    self.a = nnx.Param(_normal(std_a)(ka, (rank, d_in), param_dtype), logical_axes=("rank", ax_in))

  def _cast(self, p: nnx.Param) -> jax.Array:
    return p[...].astype(self.dtype)

  def first_weight(self) -> jax.Array:
    return self._cast(self.w if self.kind == "full" else self.a)

  def last_weight(self) -> jax.Array:
    return self._cast(self.w if self.kind == "full" else self.b)

  def tag_code(self, u: jax.Array) -> jax.Array:
    """Names ``x @ first_weightᵀ`` as a rank-r code for remat = lowrank (full: untouched)."""
    return u if self.kind == "full" else checkpoint_name(u, LOWRANK_CODE)

  def post_first(self, u: jax.Array) -> jax.Array:
    """What follows ``x @ first_weightᵀ``."""
    if self.kind == "full":
      return u
    if self.kind == "cola":
      u = jax.nn.silu(u)
    return u @ self._cast(self.b).T

  def pre_last(self, x: jax.Array) -> jax.Array:
    """The input of the final matmul (``@ last_weightᵀ``)."""
    if self.kind == "full":
      return x
    z = self.tag_code(x @ self._cast(self.a).T)
    return jax.nn.silu(z) if self.kind == "cola" else z

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.post_first(self.tag_code(x.astype(self.dtype) @ self.first_weight().T))


def rotary(x_BxLxNxH: jax.Array, theta: float, positions: jax.Array | None = None) -> jax.Array:
  """Rotary position embedding (rotate-half convention), computed in fp32.

  ``positions`` (int ``[B, L]`` or ``[L]``) are the tokens' positions; the
  default ``0 .. L-1`` is the training layout. Cached decoding passes each
  row's own positions (:mod:`elas_jax.decode`).
  """
  _, l, _, h = x_BxLxNxH.shape
  inv_freq = 1.0 / (theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
  pos = jnp.arange(l) if positions is None else positions
  pos_BxL = pos[None, :] if pos.ndim == 1 else pos  # [1, L] broadcasts over the batch
  ang_BxLxH2 = pos_BxL.astype(jnp.float32)[..., None] * inv_freq
  cos = jnp.cos(ang_BxLxH2)[:, :, None, :]
  sin = jnp.sin(ang_BxLxH2)[:, :, None, :]
  x = x_BxLxNxH.astype(jnp.float32)
  x1, x2 = x[..., : h // 2], x[..., h // 2:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxLxNxH.dtype)


class KVCache(NamedTuple):
  """Keys and values of every layer for cached decoding, ``[layers, B, max_len, heads, head_dim]``."""

  k: jax.Array
  v: jax.Array


class LayerCache(NamedTuple):
  """What one block's attention reads and writes: the whole cache and its layer index
  (an int, or traced under ``lax.scan``)."""

  k: jax.Array
  v: jax.Array
  layer: Any


def init_cache(model_cfg, batch: int, max_len: int) -> KVCache:
  """A zero cache for ``batch`` rows of ``max_len`` tokens, in the model's dtype."""
  shape = (model_cfg.n_layers, batch, max_len, model_cfg.n_heads,
           model_cfg.d_model // model_cfg.n_heads)
  dtype = DTYPES[model_cfg.dtype]
  return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


class Attention(nnx.Module):
  """Causal multi-head self-attention with rotary embeddings and no biases."""

  def __init__(self, cfg, *, dtype, param_dtype, rngs: nnx.Rngs,
               mesh: jax.sharding.Mesh | None = None):
    d = cfg.d_model
    lin = dict(kind=cfg.linear_kind, rank=cfg.rank, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.n_heads, self.theta = cfg.n_heads, cfg.rope_theta
    # model.attention, auto resolved for the devices the step is compiled for
    self.impl = attention.resolve(cfg, sharding.target_device(mesh))
    self.block = cfg.attention_block
    self.mesh = mesh  # the step's: the cuDNN call's operand layout
    self.q = Projection(d, d, axes=("heads", "embed"), **lin)
    self.k = Projection(d, d, axes=("heads", "embed"), **lin)
    self.v = Projection(d, d, axes=("heads", "embed"), **lin)
    self.o = Projection(d, d, axes=("embed", "heads"), **lin)

  def __call__(self, x_BxLxD: jax.Array, cache: "LayerCache | None" = None,
               positions_BxL: jax.Array | None = None) -> tuple[jax.Array, "LayerCache | None"]:
    """The block's attention output, and with a ``cache`` (decoding) the updated cache.

    Without a cache: causal attention over ``x`` itself (positions ``0 .. L-1``),
    by the configured implementation. With one: the new tokens at
    ``positions_BxL`` write their keys and values into the cache's slots of
    this layer and attend to every slot ``<=`` their own position (right-padded
    rows, positions starting at 0 at each row's first token; stale slots past a
    row's last token are never seen).
    """
    b, l, d = x_BxLxD.shape
    split = lambda t: t.reshape(b, l, self.n_heads, d // self.n_heads)
    q = rotary(split(self.q(x_BxLxD)), self.theta, positions_BxL)
    k = rotary(split(self.k(x_BxLxD)), self.theta, positions_BxL)
    v = split(self.v(x_BxLxD))
    if cache is None:
      o_BxLxNxH = attention.attend(q, k, v, impl=self.impl, block=self.block, mesh=self.mesh)
      o_BxLxNxH = checkpoint_name(o_BxLxNxH, ATTN_OUT)
      return self.o(o_BxLxNxH.reshape(b, l, d)), None
    k_all, v_all, i = cache
    rows_Bx1 = jnp.arange(b)[:, None]
    k_all = k_all.at[i, rows_Bx1, positions_BxL].set(k.astype(k_all.dtype), mode="drop")
    v_all = v_all.at[i, rows_Bx1, positions_BxL].set(v.astype(v_all.dtype), mode="drop")
    s = k_all.shape[2]
    # Query at position p sees slots 0..p of its own row (causal, padding-free).
    mask_Bx1xLxS = (jnp.arange(s)[None, None, :] <= positions_BxL[:, :, None])[:, None]
    o_BxLxNxH = jax.nn.dot_product_attention(q, k_all[i].astype(q.dtype), v_all[i].astype(q.dtype),
                                             mask=mask_Bx1xLxS)
    return self.o(o_BxLxNxH.reshape(b, l, d)), LayerCache(k_all, v_all, i)


class FFN(nnx.Module):
  """SwiGLU or (2:4-sparse) squared-ReLU feed-forward block."""

  def __init__(self, cfg, *, dtype, param_dtype, rngs: nnx.Rngs,
               mesh: jax.sharding.Mesh | None = None):
    d, f = cfg.d_model, cfg.ffn_dim
    lin = dict(kind=cfg.linear_kind, rank=cfg.rank, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.kind = cfg.ffn_kind
    self.sparse = bool(cfg.sparsity.enabled)
    self.backward = cfg.sparsity.backward
    self.dense_fraction = cfg.sparsity.split_dense_fraction
    self.kernel = cfg.kernel
    self.mesh = mesh  # where the 2:4 op runs per device (Pallas kernels)
    if self.kind == "swiglu":
      self.gate = Projection(d, f, axes=("mlp", "embed"), **lin)
      # CoLA's only_lr_act: no SiLU on the gate (each CoLA linear has its own inner SiLU)
      self.gate_act = not cfg.cola_only_lr_act
    self.up = Projection(d, f, axes=("mlp", "embed"), **lin)
    self.down = Projection(f, d, axes=("embed", "mlp"), **lin)

  def __call__(self, x: jax.Array, sparse_on: jax.Array) -> tuple[jax.Array, dict | None]:
    if self.kind == "swiglu":
      g = self.gate(x)
      return self.down((jax.nn.silu(g) if self.gate_act else g) * self.up(x)), None
    if not self.sparse:
      # Of the plain-JAX spellings of ReLU², maximum + r * r keeps the fewest
      # f-wide arrays for backward (3; relu/where/square keep an extra mask).
      r = jnp.maximum(self.up(x), 0)
      return self.down(r * r), None
    h = self.up.pre_last(x.astype(self.up.dtype))
    u, stats = ffn_ops.sparse_ffn(h, self.up.last_weight(), self.down.first_weight(), sparse_on,
                                  kernel=self.kernel, mode=self.backward,
                                  dense_fraction=self.dense_fraction, mesh=self.mesh)
    return self.down.post_first(self.down.tag_code(u)), stats


class Block(nnx.Module):
  """Pre-norm decoder block: x + attn(norm(x)); x + ffn(norm(x))."""

  def __init__(self, cfg, *, dtype, param_dtype, rngs: nnx.Rngs,
               mesh: jax.sharding.Mesh | None = None):
    norm = dict(epsilon=cfg.norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                scale_metadata={"logical_axes": ("embed",)})
    self.attn_norm = nnx.RMSNorm(cfg.d_model, **norm)
    self.attn = Attention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs, mesh=mesh)
    self.ffn_norm = nnx.RMSNorm(cfg.d_model, **norm)
    self.ffn = FFN(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs, mesh=mesh)

  def __call__(self, x: jax.Array, sparse_on: jax.Array, cache: "LayerCache | None" = None,
               positions_BxL: jax.Array | None = None):
    """``(output, FFN statistics or None, updated cache or None)``; see :meth:`Attention.__call__`."""
    a, cache = self.attn(self.attn_norm(x), cache, positions_BxL)
    x = x + a
    y, stats = self.ffn(self.ffn_norm(x), sparse_on)
    return x + y, stats, cache


def remat_policy(mode: str):
  """The ``jax.checkpoint`` policy of ``model.remat`` (None: no checkpointing)."""
  if mode == "none":
    return None
  if mode == "block":
    return jax.checkpoint_policies.nothing_saveable
  if mode == "lowrank":
    return jax.checkpoint_policies.save_only_these_names(*LOWRANK_SAVED)
  raise ValueError(f"config.model.remat = {mode!r}: must be one of {', '.join(REMAT_MODES)}")


class Transformer(nnx.Module):
  """LLaMA decoder: embed -> blocks -> RMSNorm -> untied lm_head."""

  def __init__(self, cfg, *, rngs: nnx.Rngs, mesh: jax.sharding.Mesh | None = None):
    dtype, param_dtype = DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
    self.dtype = dtype
    self.remat = cfg.remat
    self.scan_layers = bool(cfg.scan_layers)
    remat_policy(self.remat)  # an unknown mode fails here, before any tracing
    self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, dtype=dtype, param_dtype=param_dtype,
                           embedding_init=_normal(0.02), rngs=rngs,
                           embedding_metadata={"logical_axes": ("vocab", "embed")})
    # Built one by one in both layouts, so a scanned model's parameters are
    # exactly stack_layers of the unscanned model's with the same seed.
    blocks = [Block(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs, mesh=mesh)
              for _ in range(cfg.n_layers)]
    if self.scan_layers:
      graphdef, _ = nnx.split(blocks[0])
      states = [nnx.state(b) for b in blocks]
      self.blocks = nnx.merge(graphdef, jax.tree.map(stacking.stack_vars, *states, is_leaf=stacking.is_var))
    else:
      self.blocks = nnx.List(blocks)
    self.final_norm = nnx.RMSNorm(cfg.d_model, epsilon=cfg.norm_eps, dtype=dtype,
                                  param_dtype=param_dtype, rngs=rngs,
                                  scale_metadata={"logical_axes": ("embed",)})
    self.lm_head = Projection(cfg.d_model, cfg.vocab_size, kind="full", rank=0, axes=("vocab", "embed"),
                          dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def run_blocks(self, x_BxLxD: jax.Array, sparse_on: jax.Array
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The decoder blocks (looped or scanned, rematerialised per ``remat``).

    Returns the last block's output and the per-layer statistics ``{name: [n_layers]}``.
    """
    policy = remat_policy(self.remat)

    def apply(graphdef, state, x):
      x, stats, _ = nnx.merge(graphdef, state)(x, sparse_on)
      return x, stats

    if self.scan_layers:
      graphdef, stacked = nnx.split(self.blocks)

      def body(x, state):
        return apply(graphdef, state, x)

      if policy is not None:
        # prevent_cse is not needed under scan (and would block optimisations).
        body = jax.checkpoint(body, policy=policy, prevent_cse=False)
      x_BxLxD, stats = jax.lax.scan(body, x_BxLxD, stacked)
      return x_BxLxD, stats if stats is not None else {}

    per_layer = []
    for block in self.blocks:
      if policy is None:
        x_BxLxD, stats, _ = block(x_BxLxD, sparse_on)
      else:
        graphdef, state = nnx.split(block)
        x_BxLxD, stats = jax.checkpoint(
            lambda state, x, g=graphdef: apply(g, state, x), policy=policy)(state, x_BxLxD)
      if stats is not None:
        per_layer.append(stats)
    stats = {k: jnp.stack([s[k] for s in per_layer]) for k in per_layer[0]} if per_layer else {}
    return x_BxLxD, stats

  def forward_cached(self, tokens_BxT: jax.Array, sparse_on: jax.Array, cache: KVCache,
                     start_B: jax.Array) -> tuple[jax.Array, KVCache]:
    """Cached decoding through the model's own blocks (either layout, no remat).

    Runs ``T`` new tokens per row at positions ``start_B[b] + 0..T-1``, writes
    their keys and values into ``cache`` at those slots (writes past the cache
    are dropped) and returns the last block's output ``[B, T, D]`` (before
    ``final_norm``: :meth:`logits` finishes it) and the updated cache.
    """
    t = tokens_BxT.shape[1]
    pos_BxT = start_B[:, None].astype(jnp.int32) + jnp.arange(t, dtype=jnp.int32)[None, :]
    x = self.embed(tokens_BxT)
    if self.scan_layers:
      graphdef, stacked = nnx.split(self.blocks)

      def body(carry, state):
        x, k_all, v_all, i = carry
        x, _, c = nnx.merge(graphdef, state)(x, sparse_on, LayerCache(k_all, v_all, i), pos_BxT)
        return (x, c.k, c.v, i + 1), None

      (x, k_all, v_all, _), _ = jax.lax.scan(body, (x, cache.k, cache.v, jnp.int32(0)), stacked)
      return x, KVCache(k_all, v_all)
    k_all, v_all = cache
    for i, block in enumerate(self.blocks):
      x, _, c = block(x, sparse_on, LayerCache(k_all, v_all, i), pos_BxT)
      k_all, v_all = c.k, c.v
    return x, KVCache(k_all, v_all)

  def logits(self, h_BxTxD: jax.Array) -> jax.Array:
    """fp32 logits of block outputs, as at the end of :meth:`__call__`."""
    return self.lm_head(self.final_norm(h_BxTxD)).astype(jnp.float32)

  def layer(self, i: int) -> Block:
    """Decoder block ``i`` as a module of its own, in either layout."""
    if not self.scan_layers:
      return self.blocks[i]
    return stacking.unstacked_layer(self.blocks, i)

  def __call__(self, tokens_BxL: jax.Array, sparse_on: jax.Array | bool = True
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Returns fp32 logits ``[B, L, V]`` and per-layer sparsity statistics.

    ``sparse_on`` (traced scalar bool) switches the ELAS FFN between the
    dense warm-up and 2:4; models without sparsity ignore it. Statistics are
    ``{name: [n_layers]}``, empty when no layer is sparse.
    """
    x, stats = self.hidden_states(tokens_BxL, sparse_on)
    return self.lm_head(x).astype(jnp.float32), stats

  def hidden_states(self, tokens_BxL: jax.Array, sparse_on: jax.Array | bool = True
                    ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The final-normed hidden states ``[B, L, d]`` (compute dtype) and the statistics.

    What :meth:`__call__` feeds to ``lm_head``; the chunked loss
    (:mod:`elas_jax.ops.loss`) applies ``lm_head`` itself, chunk by chunk.
    """
    sparse_on = jnp.asarray(sparse_on, dtype=bool)
    x = self.embed(tokens_BxL)
    x, stats = self.run_blocks(x, sparse_on)
    return self.final_norm(x), stats


def build_model(model_cfg, seed: int = 0, *, mesh: jax.sharding.Mesh | None = None) -> Transformer:
  """Instantiates a :class:`Transformer` from ``config.model`` for steps compiled on
  ``mesh`` (None: this process's devices, unsharded)."""
  return Transformer(model_cfg, rngs=nnx.Rngs(params=seed), mesh=mesh)
