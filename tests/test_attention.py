"""Attention implementations (elas_jax/attention.py) against XLA's dot_product_attention.

The reference is ``jax.nn.dot_product_attention(..., is_causal=True)`` (XLA),
independent of the chunked code. fp32 must agree to rounding (2e-5 of the
largest magnitude: the chunked version sums in another order); bf16 within 2%
of the largest magnitude of the fp32 result (bf16 has 8 mantissa bits, and the
probabilities are rounded to bf16 before ``P @ V`` in both implementations).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.harness import rel_err
from elas_jax import config_lib, memory, model as model_lib
from elas_jax.ops import attention
from tests.helpers import tiny_train_config

TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}


def qkv(seed, b, l, n, h, dtype=jnp.float32):
  ks = jax.random.split(jax.random.PRNGKey(seed), 4)
  q, k, v, dout = (jax.random.normal(kk, (b, l, n, h), jnp.float32) for kk in ks)
  return q.astype(dtype), k.astype(dtype), v.astype(dtype), dout


def xla(q, k, v):
  return jax.nn.dot_product_attention(q, k, v, is_causal=True)


def value_and_grads(fn, q, k, v, dout):
  """Output and d<out, dout>/d(q, k, v): the vjp of a random cotangent."""
  loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * dout)
  return fn(q, k, v), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)


@pytest.mark.parametrize("l,block", [(37, 16), (64, 16), (16, 16), (5, 128), (33, 1)])
def test_chunked_matches_xla_fp32(l, block):
  # 37 / 16 and 5 / 128: lengths that do not divide the block (padded path).
  q, k, v, dout = qkv(l, 2, l, 3, 8)
  chunked = lambda q, k, v: attention.chunked_attention(q, k, v, block=block)
  out, grads = value_and_grads(chunked, q, k, v, dout)
  ref_out, ref_grads = value_and_grads(xla, q, k, v, dout)
  assert rel_err(out, ref_out) < TOL[jnp.float32]
  for name, g, r in zip("qkv", grads, ref_grads):
    assert rel_err(g, r) < TOL[jnp.float32], name


def test_chunked_matches_xla_bf16():
  q, k, v, dout = qkv(1, 2, 37, 3, 16, jnp.bfloat16)
  chunked = lambda q, k, v: attention.chunked_attention(q, k, v, block=16)
  out, grads = value_and_grads(chunked, q, k, v, dout)
  assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
  # Against fp32 XLA on the same (bf16-rounded) inputs.
  f32 = lambda x: x.astype(jnp.float32)
  ref_out, ref_grads = value_and_grads(xla, f32(q), f32(k), f32(v), dout)
  assert rel_err(out, ref_out) < TOL[jnp.bfloat16]
  for name, g, r in zip("qkv", grads, ref_grads):
    assert rel_err(g, r) < TOL[jnp.bfloat16], name


@pytest.mark.parametrize("impl", ["chunked", "xla"])
def test_causal(impl):
  # Changing keys/values at positions > t leaves outputs at positions <= t unchanged.
  l, t = 37, 20
  q, k, v, _ = qkv(2, 1, l, 2, 8)
  k2 = k.at[:, t + 1:].set(jax.random.normal(jax.random.PRNGKey(9), k[:, t + 1:].shape))
  v2 = v.at[:, t + 1:].set(7.0)
  run = lambda k, v: attention.attend(q, k, v, impl=impl, block=16)
  a, b = run(k, v), run(k2, v2)
  np.testing.assert_array_equal(np.asarray(a[:, :t + 1]), np.asarray(b[:, :t + 1]))
  assert not np.allclose(np.asarray(a[:, t + 1:]), np.asarray(b[:, t + 1:]))


def _has_lxl(residuals, l):
  return any(list(shape).count(l) >= 2 for shape, _, _ in residuals)


def test_chunked_keeps_no_lxl_array_for_backward():
  l = 64  # distinct from B, N, H and the block
  q, k, v, _ = qkv(3, 2, l, 3, 8)
  loss = lambda fn: (lambda q, k, v: jnp.sum(fn(q, k, v)))
  kept_xla = memory.residuals(loss(xla), q, k, v)
  kept_chunked = memory.residuals(loss(lambda q, k, v: attention.chunked_attention(q, k, v, block=16)),
                                  q, k, v)
  assert _has_lxl(kept_xla, l)  # the probabilities: the check can see an L x L array
  assert not _has_lxl(kept_chunked, l), kept_chunked
  nbytes = lambda res: sum(int(np.prod(s)) * d.itemsize for s, d, _ in res)
  # q, k, v, the output (4 x B L N H fp32) and one fp32 logsumexp per row and head.
  assert nbytes(kept_chunked) == 4 * q.size * 4 + 2 * 3 * 64 * 4


def _tiny_model_cfg(**changes):
  c = tiny_train_config("loro", **changes)
  return c.model


def test_model_with_chunked_attention_matches_xla():
  tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 37), 0, 100)
  out = {}
  for impl in ("xla", "chunked"):
    m = model_lib.build_model(_tiny_model_cfg(**{"model.attention": impl, "model.attention_block": 16}),
                              seed=1)
    assert m.blocks[0].attn.impl == impl
    out[impl] = m(tokens, False)[0]
    # The model really runs the chunked op (its custom VJP shows in the jaxpr).
    uses_custom_vjp = "custom_vjp_call" in str(jax.make_jaxpr(lambda t: m(t, False)[0])(tokens))
    assert uses_custom_vjp == (impl == "chunked")
  assert rel_err(out["chunked"], out["xla"]) < 1e-5


class _Device:
  """The two device facts attention's choice reads (a real, or deviceless topology, device)."""

  def __init__(self, platform: str, device_kind: str):
    self.platform, self.device_kind = platform, device_kind


@pytest.mark.parametrize("device,dtype,want", [
    (_Device("cpu", "cpu"), "float32", "chunked"),
    (_Device("cpu", "cpu"), "bfloat16", "chunked"),
    (_Device("gpu", "NVIDIA H200"), "bfloat16", "cudnn"),
    (_Device("gpu", "NVIDIA H200"), "float32", "xla"),  # cuDNN flash has no fp32 path
    (_Device("gpu", "AMD Instinct MI300X"), "bfloat16", "xla"),  # no cuDNN on ROCm
    (_Device("tpu", "TPU v5 lite"), "bfloat16", "xla"),
])
def test_auto_follows_the_target_device(device, dtype, want):
  # The choice is made for the devices the step is compiled for, whatever this
  # process runs on (a CPU process compiling for an H200 picks cuDNN).
  mc = _tiny_model_cfg(**{"model.attention": "auto", "model.dtype": dtype})
  assert attention.resolve(mc, device) == want
  for impl in ("xla", "cudnn", "chunked"):  # explicit choices are kept
    assert attention.resolve(_tiny_model_cfg(**{"model.attention": impl}), device) == impl
  if want != "cudnn":
    with pytest.raises(config_lib.ConfigError, match=r"^config\.model\.attention = 'cudnn': "):
      attention.check_backend(_tiny_model_cfg(**{"model.attention": "cudnn", "model.dtype": dtype}), device)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="cuDNN may be available here")
def test_cudnn_without_cudnn_is_a_config_error_before_compiling(monkeypatch):
  from elas_jax import trainer

  cfg = tiny_train_config("loro", **{"model.attention": "cudnn"})
  config_lib.validate(cfg)  # valid as a config: the target machine may have a GPU
  # trainer.build refuses it before building anything that compiles.
  monkeypatch.setattr(trainer.sharding, "make_mesh",
                      lambda *a, **k: pytest.fail("build went past the backend check"))
  with pytest.raises(config_lib.ConfigError, match=re.escape("config.model.attention = 'cudnn': ")) as e:
    trainer.build(cfg)
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("changes,field", [
    ({"model.attention": "flash"}, "model.attention"),
    ({"model.attention_block": 0}, "model.attention_block"),
    ({"model.attention_block": True}, "model.attention_block"),  # not an int (ConfigDict refuses floats itself)
])
def test_bad_attention_config_names_the_field(changes, field):
  c = tiny_train_config("loro")
  config_lib.override(c, changes)
  with pytest.raises(config_lib.ConfigError, match=re.escape(f"config.{field} ")):
    config_lib.validate(c)
