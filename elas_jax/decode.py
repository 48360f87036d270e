"""KV-cached generation: compiled prefill and decode steps, sampling, text in and out.

The cached forward is the model's own (:meth:`elas_jax.model.Transformer.forward_cached`:
the same blocks as training, in either layer layout; only the attention reads
keys and values from the cache, :class:`elas_jax.model.KVCache`). Low-rank
linears stay factored, and the ELAS FFN takes the same ``sparse_on`` switch
(2:4 after the dense warm-up) and kernel (``model.kernel``).

Layout: the cache holds ``[layers, B, max_len, heads, head_dim]`` keys and
values; prompts are right-padded, so row ``b``'s token at position ``p``
lives in slot ``p`` and its positions start at 0 at its first token. A query
at position ``p`` attends to slots ``<= p`` of its row; slots past a row's
last written token hold stale values that this mask never lets through.
Prefill (``[B, P]``, ``P`` a power-of-two bucket) and decode (``[B, 1]``)
are each one ``jax.jit``: the positions and lengths are data, so neither a
new token nor a new prompt length within a bucket recompiles.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from elas_jax import model as model_lib, sharding
from elas_jax.errors import UserError
from elas_jax.ops import sparsity


def sample(logits_BxV: jax.Array, key: jax.Array, *, temperature: float, top_k: int = 0,
           top_p: float = 1.0) -> jax.Array:
  """Next tokens ``[B]``: greedy when ``temperature == 0``, else sampled from
  ``softmax(logits / temperature)`` restricted to the ``top_k`` most likely
  tokens (0: all) and then to the smallest set of most likely tokens whose
  probability reaches ``top_p`` (1.0: all). Ties at a cut-off are kept."""
  if temperature == 0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  z = logits_BxV.astype(jnp.float32) / temperature
  neg = jnp.finfo(jnp.float32).min
  if top_k:
    kth_Bx1 = jax.lax.top_k(z, top_k)[0][:, -1:]
    z = jnp.where(z < kth_Bx1, neg, z)
  if top_p < 1.0:
    sorted_BxV = jnp.sort(z, axis=-1)[:, ::-1]
    p_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    before_BxV = jnp.cumsum(p_BxV, axis=-1) - p_BxV  # mass of the more likely tokens
    n_keep_B = jnp.maximum(jnp.sum(before_BxV < top_p, axis=-1), 1)
    cut_Bx1 = jnp.take_along_axis(sorted_BxV, n_keep_B[:, None] - 1, axis=-1)
    z = jnp.where(z < cut_Bx1, neg, z)
  return jax.random.categorical(key, z, axis=-1).astype(jnp.int32)


def bucket(n: int, max_len: int) -> int:
  """Prefill length for a longest prompt of ``n`` tokens: the next power of two, at most ``max_len``."""
  return min(1 << max(n - 1, 0).bit_length(), max_len)


@dataclasses.dataclass
class Result:
  tokens: list[int]
  stop: str  # eos | stop (``stop_fn``) | max_new_tokens | max_len


class Generator:
  """Batched generation with the compiled prefill and decode steps.

  ``params`` is the model's ``nnx.Param`` state (sharded on ``mesh`` when one
  is given; the batch is then split over its data axes).
  """

  def __init__(self, graphdef, params, model_cfg, *, batch_size: int, max_len: int,
               sparse_on: bool, eos_id: int, pad_id: int, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, mesh: jax.sharding.Mesh | None = None):
    if max_len < 1:
      raise UserError(f"--max_len={max_len}: must be positive")
    if temperature < 0:
      raise UserError(f"--temperature={temperature}: must be >= 0 (0 = greedy)")
    if top_k < 0 or top_k > model_cfg.vocab_size:
      raise UserError(f"--top_k={top_k}: must be in [0, vocab size {model_cfg.vocab_size}] (0 = off)")
    if not 0.0 < top_p <= 1.0:
      raise UserError(f"--top_p={top_p}: must be in (0, 1] (1 = off)")
    self.model_cfg, self.params, self.max_len = model_cfg, params, max_len
    self.eos_id, self.pad_id = eos_id, pad_id
    self.sparse_on = jnp.asarray(bool(sparse_on))
    self.mesh = mesh
    ways = 1
    if mesh is not None:
      ways = int(np.prod([mesh.shape[a] for a in sharding.BATCH_AXES]))
    self.batch = -(-batch_size // ways) * ways  # the mesh's data axes must divide it
    pick = dict(temperature=temperature, top_k=top_k, top_p=top_p)

    def prefill(params, cache, tokens_BxP, lengths_B, sparse_on, key):
      model = nnx.merge(graphdef, params)
      h, cache = model.forward_cached(tokens_BxP, sparse_on, cache, jnp.zeros_like(lengths_B))
      last_BxD = jnp.take_along_axis(h, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
      return sample(model.logits(last_BxD), key, **pick), cache

    def decode(params, cache, tok_B, pos_B, sparse_on, key):
      model = nnx.merge(graphdef, params)
      h, cache = model.forward_cached(tok_B[:, None], sparse_on, cache, pos_B)
      return sample(model.logits(h[:, 0]), key, **pick), cache

    jit = dict(donate_argnums=(1,))
    if mesh is not None:
      rows = NamedSharding(mesh, P(sharding.BATCH_AXES))
      layer_sh = NamedSharding(mesh, P(None, sharding.BATCH_AXES))
      rep = sharding.replicated(mesh)
      p_sh = jax.tree.map(lambda a: a.sharding, params)
      cache_sh = model_lib.KVCache(layer_sh, layer_sh)
      jit.update(in_shardings=(p_sh, cache_sh, rows, rows, rep, rep), out_shardings=(rows, cache_sh))
    make = lambda: model_lib.init_cache(model_cfg, self.batch, max_len)
    self._new_cache = jax.jit(make, **({} if mesh is None else {"out_shardings": cache_sh}))
    self._prefill = jax.jit(prefill, **jit)
    self._decode = jax.jit(decode, **jit)

  def new_cache(self) -> model_lib.KVCache:
    """A zero cache for this generator's batch (compiled once, placed on the mesh)."""
    return self._new_cache()

  def check_prompts(self, prompts: list[list[int]]) -> None:
    if not prompts:
      raise UserError("no prompts given")
    if len(prompts) > self.batch:
      raise UserError(f"{len(prompts)} prompts exceed --batch_size={self.batch}")
    for i, p in enumerate(prompts):
      if not p:
        raise UserError(f"prompt {i} is empty: give at least one token of text")
      if len(p) > self.max_len:
        raise UserError(f"prompt {i} has {len(p)} tokens but the KV cache holds --max_len="
                        f"{self.max_len}; shorten the prompt or raise --max_len")

  def generate(self, prompts: list[list[int]], max_new_tokens: int, seed: int = 0,
               on_step: Callable[[list[int | None]], None] | None = None,
               stop_fn: Callable[[int, list[int]], bool] | None = None) -> list[Result]:
    """Continues each prompt (token ids) by up to ``max_new_tokens`` tokens.

    A row stops at EOS (included in its tokens), when ``stop_fn(row,
    tokens so far)`` is true (e.g. a stop string was produced; the tokens
    are kept), after ``max_new_tokens``, or when the cache is full.
    ``on_step`` gets, after each step, every row's new token (None for
    finished rows). Same seed, same prompts and batch size: same tokens.
    """
    self.check_prompts(prompts)
    if max_new_tokens < 1:
      raise UserError(f"--max_new_tokens={max_new_tokens}: must be positive")
    n = len(prompts)
    lengths = np.ones(self.batch, np.int32)  # rows past n are dummies, finished from the start
    lengths[:n] = [len(p) for p in prompts]
    width = bucket(int(lengths.max()), self.max_len)
    tokens = np.full((self.batch, width), self.pad_id, np.int32)
    for i, p in enumerate(prompts):
      tokens[i, :len(p)] = p
    key = jax.random.key(seed)
    out: list[list[int]] = [[] for _ in range(n)]
    stop: list[str | None] = [None] * n
    tok, cache = self._prefill(self.params, self.new_cache(), tokens, lengths, self.sparse_on,
                               jax.random.fold_in(key, 0))
    pos = lengths.copy()  # where each row's newest token goes
    for step in range(max_new_tokens):
      tok_host = np.asarray(tok)
      new: list[int | None] = [None] * n
      for i in range(n):
        if stop[i] is not None:
          continue
        out[i].append(int(tok_host[i]))
        new[i] = int(tok_host[i])
        if tok_host[i] == self.eos_id:
          stop[i] = "eos"
        elif stop_fn is not None and stop_fn(i, out[i]):
          stop[i] = "stop"
        elif len(out[i]) >= max_new_tokens:
          stop[i] = "max_new_tokens"
        elif pos[i] >= self.max_len:
          stop[i] = "max_len"
      if on_step is not None:
        on_step(new)
      if all(s is not None for s in stop):
        break
      tok, cache = self._decode(self.params, cache, tok, pos, self.sparse_on,
                                jax.random.fold_in(key, step + 1))
      pos = pos + 1
    return [Result(t, s) for t, s in zip(out, stop)]


# --------------------------------------------------------------------------
# Restoring a checkpoint for decoding; prompts and continuations as text.
# --------------------------------------------------------------------------


def load(workdir: str, step: int | None = None, *, mesh_shape: tuple[int, int, int] | None = None,
         kernel: str | None = None, devices=None):
  """``(run, params, step)`` of a checkpoint for decoding, restored onto the local mesh as
  evaluation does (``mesh_shape``: (data, fsdp, tensor) instead of the saved one)."""
  from elas_jax import trainer  # the trainer does not import this module

  run, state = trainer.restore_run(workdir, step, mesh_shape=mesh_shape, kernel=kernel,
                                   devices=devices)
  return run, state.params, int(state.step)


def sparse_on_for(cfg, step: int, dense: bool) -> bool:
  """2:4 FFN after the dense warm-up (as evaluation), unless ``dense``."""
  s = cfg.model.sparsity
  return bool(s.enabled) and not dense and bool(sparsity.sparsity_active(step, s.dense_warmup_steps))


def encode(tok, cfg, text: str) -> list[int]:
  """Prompt ids laid out like the training documents (BOS first when ``data.add_bos``)."""
  ids = tok.encode(text)
  if ids and cfg.data.add_bos and tok.bos_id >= 0:
    ids = [tok.bos_id] + ids
  return ids


def continuation(tok, prompt_ids: list[int], new_ids: list[int]) -> str:
  """Text of ``new_ids`` after the prompt (decoded together: a token's text,
  e.g. a leading space, depends on what precedes it)."""
  new_ids = [t for t in new_ids if t != tok.eos_id]
  return tok.decode(prompt_ids + new_ids)[len(tok.decode(prompt_ids)):]
