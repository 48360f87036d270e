"""The 2:4 FFN dispatch (elas_jax/ops/ffn.py): one table, choices for the compile
target, fall-through on NotImplementedError, the model running what it names."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from benchmarks.harness import rel_err
from elas_jax import config_lib, model as model_lib
from elas_jax.ops import ffn
from elas_kernels.ffn import base
from elas_kernels.ffn.mosaic import compat as mosaic_compat
from elas_kernels.ffn.xla import XlaFfn
from tests.helpers import tiny_train_config


class _Device:
  def __init__(self, platform: str, device_kind: str):
    self.platform, self.device_kind = platform, device_kind


class _Mesh:
  """What the dispatch reads of a mesh: its devices (and no batch axes to split)."""

  def __init__(self, device):
    self.devices = np.array([device], dtype=object)
    self.axis_names, self.shape = (), {}


def test_choices_follow_the_compile_target():
  cpu = _Mesh(_Device("cpu", "cpu"))
  h200 = _Mesh(_Device("gpu", "NVIDIA H200"))  # as a deviceless topology reports it
  assert ffn.resolve_kernel("auto", cpu) == ("xla",)
  assert ffn.resolve_kernel("auto", None) == ("xla",)  # this CPU process
  # mosaic_ws serves ranks up to 256 and falls through to mosaic above
  assert ffn.resolve_kernel("auto", h200) == ("mosaic_ws", "mosaic", "triton", "xla")
  assert ffn.resolve_kernel("pallas", h200) == ("triton",)  # the old name
  for name in ("xla", "triton", "mosaic", "mosaic_ws", "mosaic_sparse"):
    assert ffn.resolve_kernel(name, cpu) == (name,)
  with pytest.raises(ValueError, match="unknown FFN kernel 'cuda'"):
    ffn.resolve_kernel("cuda", cpu)
  assert set(ffn.KERNELS) == {"auto", "xla", "triton", "mosaic", "mosaic_ws", "mosaic_sparse",
                              "pallas"}
  # mosaic_sparse (sparse tensor cores, unverified on a GPU) is chosen only by name
  assert ffn.resolve_kernel("mosaic_sparse", h200) == ("mosaic_sparse",)
  # Saved configs with the old name still validate.
  config_lib.validate(tiny_train_config("elas", **{"model.kernel": "pallas"}))


def test_implementations_are_built_for_the_compile_target():
  # Off GPUs: interpreted, no GPU facts. On a known GPU (a deviceless topology reports its
  # device_kind): compiled, with that GPU's facts, which the kernels never read themselves.
  cpu = ffn.build("triton", _Device("cpu", "cpu"))
  assert cpu.interpret and cpu.gpu is None
  h100 = ffn.build("mosaic", _Device("gpu", "NVIDIA H100 80GB HBM3"))
  assert not h100.interpret and h100.gpu.name == "h100" and h100.gpu.sm_count == 132
  a100 = ffn.build("mosaic", _Device("gpu", "NVIDIA A100-SXM4-80GB"))
  assert a100.gpu.compute_capability == (8, 0)
  h, wi, wo, on = (x.astype(jnp.bfloat16) if x.dtype != bool else x for x in _inputs())
  # (a jax without Mosaic GPU refuses first, for that reason)
  why = "need jax >= 0.11" if mosaic_compat.unavailable_reason() else "need a Hopper GPU"
  with pytest.raises(NotImplementedError, match=why):
    a100(h, wi, wo, on)


def _inputs():
  ks = jax.random.split(jax.random.PRNGKey(0), 3)
  return (jax.random.normal(ks[0], (2, 8, 16)), jax.random.normal(ks[1], (36, 16)) / 4,
          jax.random.normal(ks[2], (16, 36)) / 6, jnp.asarray(True))


def test_auto_falls_through_what_cannot_serve_and_says_why(monkeypatch):
  calls = []

  class Refusing(base.FfnCore):
    name = "refusing"

    def check_servable(self, call):
      calls.append("refused")
      raise NotImplementedError("fp32 inputs on this device")

  monkeypatch.setitem(ffn.IMPLEMENTATIONS, "refusing", Refusing)
  monkeypatch.setattr(ffn, "DEFAULT_ORDER", ("refusing", "xla"))
  monkeypatch.setattr(ffn, "_LOGGED", set())
  logged = []
  monkeypatch.setattr(ffn.logging, "warning", lambda msg, *a: logged.append(msg % a if a else msg))
  h, wi, wo, on = _inputs()
  out, stats = ffn.sparse_ffn(h, wi, wo, on, kernel="auto", mode="masked", dense_fraction=0.05)
  want, want_stats = XlaFfn()(h, wi, wo, on, mode="masked")
  np.testing.assert_array_equal(out, want)
  np.testing.assert_array_equal(stats["dropped_mass"], want_stats["dropped_mass"])
  assert calls == ["refused"]
  assert len(logged) == 1 and "refusing cannot serve this FFN (fp32 inputs on this device); trying xla" in logged[0]
  # An explicit choice does not fall through: the reason is the error.
  with pytest.raises(NotImplementedError, match="fp32 inputs on this device"):
    ffn.sparse_ffn(h, wi, wo, on, kernel="refusing", mode="masked", dense_fraction=0.05)


def test_the_model_runs_the_named_implementation(monkeypatch):
  # The model calls the dispatch with config.model.kernel: a table entry that
  # records its calls proves which implementation the model traced.
  seen = []

  class Recording(XlaFfn):
    name = "recording"

    def _core(self, call, h, w_in, w_out, sparse_on):
      seen.append((call.lead + (call.k,), w_in.shape))
      return super()._core(call, h, w_in, w_out, sparse_on)

  monkeypatch.setitem(ffn.IMPLEMENTATIONS, "recording", Recording)
  cfg = tiny_train_config("elas").model
  cfg.kernel = "recording"
  m = model_lib.build_model(cfg)
  m(jnp.zeros((2, 8), jnp.int32), True)
  assert seen == [((2, 8, cfg.rank), (cfg.ffn_dim, cfg.rank))] * cfg.n_layers


@pytest.mark.slow
@pytest.mark.skipif(mosaic_compat.unavailable_reason() is not None,
                    reason=str(mosaic_compat.unavailable_reason()))
def test_tiny_model_with_mosaic_equals_xla():
  # config.model.kernel = mosaic (the Mosaic GPU kernels through jax's interpreter
  # on CPU): loss and gradients of the 2:4-phase model equal the XLA op's.
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, 4096)

  def loss_and_grads(kernel):
    cfg = tiny_train_config("elas", **{"model.kernel": kernel}).model
    graphdef, params = nnx.split(model_lib.build_model(cfg, seed=3), nnx.Param)

    def loss(p):
      logits, _ = nnx.merge(graphdef, p)(tokens, True)
      return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    return jax.value_and_grad(loss)(params)

  (lx, gx), (lm, gm) = loss_and_grads("xla"), loss_and_grads("mosaic")
  assert rel_err(lm, lx) < 1e-5
  assert rel_err(jax.tree.leaves(gm), jax.tree.leaves(gx)) < 1e-4
