"""Causal self-attention implementations, chosen by ``config.model.attention``.

  ``xla``      ``jax.nn.dot_product_attention`` (XLA): keeps the ``[B, N, L, L]``
               probabilities for backward.
  ``cudnn``    the same call with ``implementation="cudnn"`` (cuDNN flash
               attention, NVIDIA GPUs, bf16/fp16): keeps the output and the
               softmax statistics.
  ``chunked``  :func:`chunked_attention`, a pure-JAX flash-style attention
               (query/key blocks, online softmax, custom VJP keeping only the
               output and the per-row logsumexp), on any backend.
  ``auto``     ``cudnn`` where :func:`cudnn_unsupported` finds nothing against
               it (a CUDA GPU, bf16 compute); else ``chunked`` on CPU (measured
               faster than ``xla`` there, and 4-6x fewer residual bytes: see
               ``benchmarks/attention_loss.py`` and the README); else ``xla``
               (other backends: not measured).

All take and return ``[B, L, N, H]`` (``jax.nn.dot_product_attention``'s
layout) and scale the logits by ``1/sqrt(H)``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from elas_jax import sharding
from elas_jax.errors import ConfigError

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "chunked")
DEFAULT_BLOCK = 64  # query/key positions per block of the chunked attention (fastest on CPU at seq 256)


# ------------------------------------------------------------- selection


def cudnn_unsupported(model_cfg, device=None) -> str | None:
  """Why cuDNN flash attention cannot run ``model_cfg`` on ``device`` (None when it can).

  ``device`` is a device of the compile target (:func:`elas_jax.sharding.target_device`:
  the mesh's, which may be a deviceless GPU topology's; default this process's).
  Checks what is knowable before compiling: an NVIDIA (CUDA) GPU, a
  half-precision compute dtype (cuDNN's flash kernels have no fp32 path) and
  a head size it supports (a multiple of 8, at most 256 in cuDNN >= 9).
  """
  device = device if device is not None else jax.devices()[0]
  if sharding.platform_of(device) != "gpu":
    return f"cuDNN attention needs a CUDA GPU; the JAX backend here is {device.platform!r}"
  if not device.device_kind.upper().startswith("NVIDIA"):  # e.g. ROCm: no cuDNN
    return f"cuDNN attention needs a CUDA GPU; this GPU is {device.device_kind!r}"
  if model_cfg.dtype not in ("bfloat16", "float16"):
    return f"cuDNN flash attention needs model.dtype = bfloat16, not {model_cfg.dtype}"
  head = model_cfg.d_model // model_cfg.n_heads
  if head % 8 or head > 256:
    return f"cuDNN flash attention needs a head size that is a multiple of 8 and <= 256, not {head}"
  return None


def resolve(model_cfg, device=None) -> str:
  """The implementation ``config.model.attention`` runs on ``device`` (``auto`` resolved;
  ``device`` as in :func:`cudnn_unsupported`)."""
  impl = model_cfg.attention
  if impl == "auto":
    if cudnn_unsupported(model_cfg, device) is None:
      return "cudnn"
    device = device if device is not None else jax.devices()[0]
    return "chunked" if device.platform == "cpu" else "xla"
  return impl


def check_backend(model_cfg, device=None) -> None:
  """ConfigError when ``model.attention = cudnn`` cannot run on ``device``.

  Called when the trainer is built (for the devices that will compile the
  step), not in ``config_lib.validate``: configs are also validated where the
  target backend is absent (a laptop writing a GPU config, the CPU tests).
  """
  if model_cfg.attention == "cudnn":
    why = cudnn_unsupported(model_cfg, device)
    if why:
      raise ConfigError(f"config.model.attention = 'cudnn': {why}; use auto, xla or chunked")


def qkv_sharding(mesh: jax.sharding.Mesh, n_heads: int) -> jax.sharding.NamedSharding:
  """``[B, L, N, H]`` split like the batch (data x fsdp) and, where they divide, the
  heads over ``tensor``: the one layout the cuDNN call gets for q, k and v."""
  from jax.sharding import NamedSharding, PartitionSpec as P

  tensor = mesh.shape.get("tensor", 1)
  heads = "tensor" if tensor > 1 and n_heads % tensor == 0 else None
  return NamedSharding(mesh, P(sharding.BATCH_AXES, None, heads, None))


def attend(q_BxLxNxH: jax.Array, k_BxLxNxH: jax.Array, v_BxLxNxH: jax.Array, *,
           impl: str, block: int = DEFAULT_BLOCK, mesh: jax.sharding.Mesh | None = None) -> jax.Array:
  """Causal attention with the resolved implementation ``impl`` (``mesh``: the
  step's, for the cuDNN call's operand layout)."""
  if impl == "xla":
    return jax.nn.dot_product_attention(q_BxLxNxH, k_BxLxNxH, v_BxLxNxH, is_causal=True)
  if impl == "cudnn":
    if mesh is not None and mesh.size > 1:
      # cuDNN's custom partitioner refuses q, k and v sharded differently ("Query,
      # key and value should have same sharding"), which XLA's propagation makes
      # of FSDP-sharded projections in the backward pass; pin one layout.
      qkv = qkv_sharding(mesh, q_BxLxNxH.shape[2])
      q_BxLxNxH, k_BxLxNxH, v_BxLxNxH = (jax.lax.with_sharding_constraint(t, qkv)
                                         for t in (q_BxLxNxH, k_BxLxNxH, v_BxLxNxH))
    return jax.nn.dot_product_attention(q_BxLxNxH, k_BxLxNxH, v_BxLxNxH, is_causal=True,
                                        implementation="cudnn")
  if impl == "chunked":
    return chunked_attention(q_BxLxNxH, k_BxLxNxH, v_BxLxNxH, block=block)
  raise ValueError(f"unknown attention implementation {impl!r} (resolve 'auto' first)")


# ------------------------------------------------------- chunked attention
#
# Inside, arrays are [B, N, Lp, H] (heads before positions, so a block is a
# contiguous slice) with Lp the length padded up to a multiple of the block.
# Padding needs no mask of its own: padded keys sit after every real query, so
# the causal mask already hides them, and padded query rows are cut off.


def _to_blocks(x_BxLxNxH: jax.Array, lp: int) -> jax.Array:
  x = jnp.transpose(x_BxLxNxH, (0, 2, 1, 3))
  return jnp.pad(x, ((0, 0), (0, 0), (0, lp - x.shape[2]), (0, 0)))


def _from_blocks(x_BxNxLpxH: jax.Array, l: int) -> jax.Array:
  return jnp.transpose(x_BxNxLpxH[:, :, :l], (0, 2, 1, 3))


def _scores(q_blk, k_blk, i, j, block: int, scale: float):
  """Scaled fp32 logits of query block i against key block j, causally masked."""
  s = jnp.einsum("bnqh,bnkh->bnqk", q_blk, k_blk, preferred_element_type=jnp.float32) * scale
  rows = i * block + jnp.arange(block)
  cols = j * block + jnp.arange(block)
  return jnp.where(cols[None, :] <= rows[:, None], s, -jnp.inf)


def _block(x, i, block: int):
  return jax.lax.dynamic_slice_in_dim(x, i * block, block, axis=2)


def _forward(q, k, v, block: int):
  """Output ``[B, N, Lp, H]`` (fp32) and logsumexp ``[B, N, Lp]`` (fp32)."""
  b, n, lp, h = q.shape
  scale = 1.0 / math.sqrt(h)

  def q_block(i):
    q_i = _block(q, i, block)

    def k_step(j, carry):  # online softmax over key blocks 0..i (causal: none after i)
      m, l, acc = carry
      s = _scores(q_i, _block(k, j, block), i, j, block, scale)
      m_new = jnp.maximum(m, s.max(-1))
      p = jnp.exp(s - m_new[..., None])
      corr = jnp.exp(m - m_new)
      acc = acc * corr[..., None] + jnp.einsum(
          "bnqk,bnkh->bnqh", p.astype(v.dtype), _block(v, j, block), preferred_element_type=jnp.float32)
      return m_new, l * corr + p.sum(-1), acc

    init = (jnp.full((b, n, block), -jnp.inf, jnp.float32), jnp.zeros((b, n, block), jnp.float32),
            jnp.zeros((b, n, block, h), jnp.float32))
    # Every row sees key 0 in block 0, so m is finite and l > 0 after the first step.
    m, l, acc = jax.lax.fori_loop(0, i + 1, k_step, init)
    return acc / l[..., None], m + jnp.log(l)

  out, lse = jax.lax.map(q_block, jnp.arange(lp // block))  # [nq, B, N, blk, (H)]
  out = jnp.moveaxis(out, 0, 2).reshape(b, n, lp, h)
  lse = jnp.moveaxis(lse, 0, 2).reshape(b, n, lp)
  return out, lse


def _backward(q, k, v, out, lse, dout, block: int):
  """FlashAttention-2 backward: dq by query block, dk/dv by key block, in fp32."""
  b, n, lp, h = q.shape
  nb = lp // block
  scale = 1.0 / math.sqrt(h)
  delta = jnp.sum(dout.astype(jnp.float32) * out, axis=-1)  # rowsum(dO * O): [B, N, Lp]

  def probs_and_ds(i, j):
    """P and dS of block (i, j), recomputed from q, k and the saved logsumexp."""
    s = _scores(_block(q, i, block), _block(k, j, block), i, j, block, scale)
    p = jnp.exp(s - _block(lse[..., None], i, block))
    do_i = _block(dout, i, block)
    dp = jnp.einsum("bnqh,bnkh->bnqk", do_i, _block(v, j, block), preferred_element_type=jnp.float32)
    ds = p * (dp - _block(delta[..., None], i, block))
    return p, ds, do_i

  def dq_block(i):
    def step(j, dq):
      _, ds, _ = probs_and_ds(i, j)
      return dq + jnp.einsum("bnqk,bnkh->bnqh", ds.astype(k.dtype), _block(k, j, block),
                             preferred_element_type=jnp.float32)
    return jax.lax.fori_loop(0, i + 1, step, jnp.zeros((b, n, block, h), jnp.float32)) * scale

  def dkv_block(j):
    def step(i, carry):  # query blocks j..nb-1 see key block j
      dk, dv = carry
      p, ds, do_i = probs_and_ds(i, j)
      dv = dv + jnp.einsum("bnqk,bnqh->bnkh", p.astype(dout.dtype), do_i,
                           preferred_element_type=jnp.float32)
      dk = dk + jnp.einsum("bnqk,bnqh->bnkh", ds.astype(q.dtype), _block(q, i, block),
                           preferred_element_type=jnp.float32)
      return dk, dv
    zero = jnp.zeros((b, n, block, h), jnp.float32)
    dk, dv = jax.lax.fori_loop(j, nb, step, (zero, zero))
    return dk * scale, dv

  blocks = jnp.arange(nb)
  join = lambda x: jnp.moveaxis(x, 0, 2).reshape(b, n, lp, h)
  dq = join(jax.lax.map(dq_block, blocks))
  dk, dv = jax.lax.map(dkv_block, blocks)
  return dq, join(dk), join(dv)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _chunked(q_BxLxNxH, k_BxLxNxH, v_BxLxNxH, block: int):
  return _chunked_fwd(q_BxLxNxH, k_BxLxNxH, v_BxLxNxH, block)[0]


def _padded_len(l: int, block: int) -> int:
  return -(-l // block) * block


def _chunked_fwd(q_BxLxNxH, k_BxLxNxH, v_BxLxNxH, block: int):
  l = q_BxLxNxH.shape[1]
  lp = _padded_len(l, block)
  q, k, v = (_to_blocks(x, lp) for x in (q_BxLxNxH, k_BxLxNxH, v_BxLxNxH))
  out, lse_BxNxLp = _forward(q, k, v, block)
  out_BxLxNxH = _from_blocks(out, l).astype(q_BxLxNxH.dtype)
  # Kept for backward: the inputs (alive anyway), the output and one fp32 scalar per row.
  return out_BxLxNxH, (q_BxLxNxH, k_BxLxNxH, v_BxLxNxH, out_BxLxNxH, lse_BxNxLp)


def _chunked_bwd(block: int, res, dout_BxLxNxH):
  q_BxLxNxH, k_BxLxNxH, v_BxLxNxH, out_BxLxNxH, lse = res
  l = q_BxLxNxH.shape[1]
  lp = lse.shape[-1]
  q, k, v, out, dout = (_to_blocks(x, lp) for x in
                        (q_BxLxNxH, k_BxLxNxH, v_BxLxNxH, out_BxLxNxH, dout_BxLxNxH))
  dq, dk, dv = _backward(q, k, v, out.astype(jnp.float32), lse, dout, block)
  return tuple(_from_blocks(g, l).astype(x.dtype) for g, x in
               ((dq, q_BxLxNxH), (dk, k_BxLxNxH), (dv, v_BxLxNxH)))


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def chunked_attention(q_BxLxNxH: jax.Array, k_BxLxNxH: jax.Array, v_BxLxNxH: jax.Array, *,
                      block: int = DEFAULT_BLOCK) -> jax.Array:
  """Causal flash-style attention in pure JAX; no ``[L, L]`` array is kept for backward.

  ``block`` query/key positions per block (clipped to the sequence length; a
  length that is not a multiple is padded). Logits, softmax statistics and
  accumulators are fp32; probabilities are cast to the value dtype for the
  ``P @ V`` matmul, as ``jax.nn.dot_product_attention`` does. Key blocks after
  the query block are skipped (forward and backward), so causal attention
  costs about half the FLOPs of the full ``L x L`` product.
  """
  l = q_BxLxNxH.shape[1]
  if k_BxLxNxH.shape != q_BxLxNxH.shape or v_BxLxNxH.shape != q_BxLxNxH.shape:
    raise ValueError("chunked_attention: q, k and v must have one shape [B, L, N, H] "
                     f"(got {q_BxLxNxH.shape}, {k_BxLxNxH.shape}, {v_BxLxNxH.shape})")
  return _chunked(q_BxLxNxH, k_BxLxNxH, v_BxLxNxH, max(1, min(int(block), l)))
