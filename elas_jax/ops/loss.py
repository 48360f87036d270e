"""The language-model loss, with or without the full ``[B, L, V]`` logits.

``lm_loss(model, batch, sparse_on, model_cfg)`` is what the train and eval
steps call. With ``model.loss_chunk = 0`` it is the plain loss on the fp32
logits of :meth:`Transformer.__call__`. With ``loss_chunk = C > 0`` it runs
the model up to the final norm (:meth:`Transformer.hidden_states`) and
computes lm_head + log-softmax + cross-entropy over chunks of ``C`` tokens
(:func:`chunked_cross_entropy`): the live logits are ``[C, V]`` fp32, and
backward keeps only the hidden states ``[T, d]``, the lm_head weight and one
fp32 logsumexp per token, recomputing each chunk's logits.

Chunks are strided: of the ``T = B·L`` tokens (padded with masked tokens to
``n·C``, ``n = ceil(T / C)``), chunk ``j`` holds tokens ``j, n + j, 2n + j,
...``. Each chunk therefore spans the whole batch, so when the batch is split
over devices every device works on its share of every chunk instead of one
device holding a whole chunk.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax


def cross_entropy(logits, targets, mask):
  """Sum of per-token losses over unmasked targets, and their count."""
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  mask = mask.astype(jnp.float32)
  return jnp.sum(ce * mask), jnp.sum(mask)


def lm_loss(model, batch: dict[str, jax.Array], sparse_on, model_cfg
            ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
  """``(sum of CE over unmasked targets, their count, sparsity stats)`` of ``batch``.

  ``batch`` has ``inputs``, ``targets`` (int ``[B, L]``) and ``mask``
  (``[B, L]``, 0 = not counted); ``model_cfg.loss_chunk`` picks the full-logits
  (0) or chunked (> 0) loss. Both give the same values and gradients.
  """
  chunk = model_cfg.loss_chunk
  if not chunk:
    logits, stats = model(batch["inputs"], sparse_on)
    total, count = cross_entropy(logits, batch["targets"], batch["mask"])
    return total, count, stats
  h_BxLxD, stats = model.hidden_states(batch["inputs"], sparse_on)
  b, l, d = h_BxLxD.shape
  total, count = chunked_cross_entropy(
      h_BxLxD.reshape(b * l, d), model.lm_head.first_weight(), batch["targets"].reshape(b * l),
      batch["mask"].reshape(b * l), chunk=chunk)
  return total, count, stats


def chunked_cross_entropy(h_TxD: jax.Array, w_VxD: jax.Array, targets_T: jax.Array,
                          mask_T: jax.Array, *, chunk: int) -> tuple[jax.Array, jax.Array]:
  """``cross_entropy(fp32(h @ wᵀ), targets, mask)`` over token chunks, never forming ``[T, V]``.

  ``h`` and ``w`` are in the compute dtype (the matmul runs in it and its
  result is upcast, as ``Projection`` + ``astype(float32)`` does); ``chunk``
  tokens per chunk, clipped to ``T``. Differentiable in ``h`` and ``w``.
  """
  t = h_TxD.shape[0]
  c = max(1, min(int(chunk), t))
  mask_T = mask_T.astype(jnp.float32)
  total = _chunked_ce(h_TxD, w_VxD, targets_T.astype(jnp.int32), mask_T, c)
  return total, jnp.sum(mask_T)


def _strided(x, c: int):
  """``[T, ...] -> [c, n, ...]``: chunk j is ``x[:, j]`` (tokens j, n+j, ...); pads with zeros."""
  t = x.shape[0]
  n = -(-t // c)
  x = jnp.pad(x, [(0, n * c - t)] + [(0, 0)] * (x.ndim - 1))
  return x.reshape(c, n, *x.shape[1:])


def _chunk_logits(h_CxD, w_VxD):
  return (h_CxD @ w_VxD.T).astype(jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _chunked_ce(h_TxD, w_VxD, targets_T, mask_T, c: int):
  return _chunked_ce_fwd(h_TxD, w_VxD, targets_T, mask_T, c)[0]


def _chunked_ce_fwd(h_TxD, w_VxD, targets_T, mask_T, c: int):
  h_CxNxD, tgt_CxN, mask_CxN = _strided(h_TxD, c), _strided(targets_T, c), _strided(mask_T, c)

  def one(j):
    logits_CxV = _chunk_logits(h_CxNxD[:, j], w_VxD)
    lse_C = jax.nn.logsumexp(logits_CxV, axis=-1)
    target_C = jnp.take_along_axis(logits_CxV, tgt_CxN[:, j, None], axis=-1)[:, 0]
    return jnp.sum((lse_C - target_C) * mask_CxN[:, j]), lse_C

  totals_N, lse_NxC = jax.lax.map(one, jnp.arange(h_CxNxD.shape[1]))
  # Kept for backward: h and w (alive anyway), targets, mask, one fp32 scalar per token.
  return jnp.sum(totals_N), (h_TxD, w_VxD, targets_T, mask_T, lse_NxC)


def _chunked_ce_bwd(c: int, res, g):
  h_TxD, w_VxD, targets_T, mask_T, lse_NxC = res
  t, d = h_TxD.shape
  h_CxNxD, tgt_CxN = _strided(h_TxD, c), _strided(targets_T, c)
  scale_CxN = _strided(mask_T, c) * g  # d total / d ce per token
  n, v = h_CxNxD.shape[1], w_VxD.shape[0]

  def step(j, carry):
    dh_CxNxD, dw_VxD = carry
    h_CxD = h_CxNxD[:, j]
    logits_CxV = _chunk_logits(h_CxD, w_VxD)
    # d CE / d logits = softmax - onehot(target), weighted by mask * g.
    p_CxV = jnp.exp(logits_CxV - lse_NxC[j][:, None])
    dlogits_CxV = (p_CxV - jax.nn.one_hot(tgt_CxN[:, j], v, dtype=jnp.float32)) * scale_CxN[:, j, None]
    dlogits_CxV = dlogits_CxV.astype(h_CxD.dtype)  # the transpose of the upcast
    dh_CxD = dlogits_CxV @ w_VxD
    dw_VxD = dw_VxD + jnp.einsum("cv,cd->vd", dlogits_CxV, h_CxD, preferred_element_type=jnp.float32)
    return jax.lax.dynamic_update_index_in_dim(dh_CxNxD, dh_CxD, j, axis=1), dw_VxD

  init = (jnp.zeros_like(h_CxNxD), jnp.zeros(w_VxD.shape, jnp.float32))
  dh_CxNxD, dw_VxD = jax.lax.fori_loop(0, n, step, init)
  dh_TxD = dh_CxNxD.reshape(c * n, d)[:t]
  return dh_TxD, dw_VxD.astype(w_VxD.dtype), None, None


_chunked_ce.defvjp(_chunked_ce_fwd, _chunked_ce_bwd)
