"""``model.remat``: same gradients as no remat, and a residual set that really shrinks.

The reference is the model with ``remat = none`` (plain autodiff keeps every
intermediate); what a remat mode keeps is read from the traced vjp residuals
(:mod:`elas_jax.memory`) and compared with the set the policy promises,
computed here from the config's shapes.
"""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from elas_jax import config_lib, memory, model as model_lib
from elas_jax.errors import ConfigError
from tests.helpers import tiny_train_config

SEQ = 32


def _cfg(variant: str, **overrides):
  # rank 8 differs from the head size 16 and d 64, so codes are recognisable by shape.
  return tiny_train_config(variant, **{"model.rank": 8, **overrides})


def _loss_fn(cfg, sparse_on):
  graphdef, params = nnx.split(model_lib.build_model(cfg.model), nnx.Param)

  def loss(params, tokens):
    logits, stats = nnx.merge(graphdef, params)(tokens, sparse_on)
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens).mean(), stats

  return params, loss


def _flat(tree) -> dict[str, np.ndarray]:
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _grads(cfg, sparse_on=True):
  params, loss = _loss_fn(cfg, sparse_on)
  tokens = jax.random.randint(jax.random.key(1), (2, SEQ), 0, cfg.model.vocab_size)
  (value, stats), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params, tokens)
  return float(value), _flat(stats), _flat(grads)


# (variant, sparse_on): elas before (dense warm-up) and after the 2:4 switch.
CASES = [("full", True), ("loro", True), ("loro_relu2", True), ("elas", False), ("elas", True),
         ("cola", True)]


@pytest.mark.parametrize("variant,sparse_on", CASES)
def test_remat_gradients_equal_no_remat(variant, sparse_on):
  want_loss, want_stats, want = _grads(_cfg(variant), sparse_on)
  for remat in ("block", "lowrank"):
    loss, stats, got = _grads(_cfg(variant, **{"model.remat": remat}), sparse_on)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    assert stats.keys() == want_stats.keys()
    for k in stats:
      np.testing.assert_allclose(stats[k], want_stats[k], rtol=1e-6, err_msg=k)
    assert got.keys() == want.keys()
    for k in got:
      scale = np.max(np.abs(want[k]))
      np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-6 * scale, err_msg=f"{remat} {k}")


def _residuals(cfg) -> list[memory.Residual]:
  """Token-proportional residuals of the whole model's loss (abstract: nothing runs)."""
  model = nnx.eval_shape(lambda: model_lib.build_model(cfg.model))
  graphdef, params = nnx.split(model, nnx.Param)
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)

  def loss(params, tokens):
    logits, _ = nnx.merge(graphdef, params)(tokens, True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens).mean()

  return memory.token_residuals(lambda b: (params, jax.ShapeDtypeStruct((b, SEQ), jnp.int32)),
                                loss, SEQ)


def _multiset(res) -> collections.Counter:
  return collections.Counter((r.shape, r.dtype) for r in res)


def _promised_by_lowrank(cfg, scanned: bool) -> collections.Counter:
  """What remat = lowrank keeps beyond remat = block, per the policy, from the shapes."""
  m = cfg.model
  n, r, d, f = m.n_layers, m.rank, m.d_model, m.ffn_dim
  dt = "float32"  # tiny configs compute in fp32
  per_layer = collections.Counter()
  if m.linear_kind != "full":
    linears = 4 + (3 if m.ffn_kind == "swiglu" else 2)  # q k v o + gate up down / up down
    per_layer[((1, SEQ, r), dt)] += linears
  per_layer[((1, SEQ, m.n_heads, d // m.n_heads), dt)] += 1  # attention output
  if m.sparsity.enabled:  # the compressed activation, its metadata and the dense f % 4 tail
    f_main = f - f % 4
    per_layer[((SEQ, f_main // 2), dt)] += 1
    per_layer[((SEQ, -(-f_main // 8)), "uint8")] += 1
    if f % 4:
      per_layer[((SEQ, f % 4), dt)] += 1
  if scanned:  # one stacked array per kind
    return collections.Counter({((n, *shape), dt_): c for (shape, dt_), c in per_layer.items()})
  return collections.Counter({k: c * n for k, c in per_layer.items()})


@pytest.mark.parametrize("variant", ["loro", "elas", "full"])
@pytest.mark.parametrize("scanned", [False, True])
def test_residuals_shrink_and_lowrank_keeps_exactly_what_it_names(variant, scanned):
  res = {remat: _residuals(_cfg(variant, **{"model.remat": remat, "model.scan_layers": scanned}))
         for remat in ("none", "block", "lowrank")}
  per_token = {k: memory.total_bytes_per_token(v) for k, v in res.items()}
  assert per_token["block"] < per_token["lowrank"] < per_token["none"], per_token
  # lowrank keeps what block keeps (block inputs and the model-level arrays
  # outside the blocks) plus exactly the named arrays: no other [T, d] or [T, f].
  extra = _multiset(res["lowrank"]) - _multiset(res["block"])
  assert extra == _promised_by_lowrank(_cfg(variant), scanned)
  assert not _multiset(res["block"]) - _multiset(res["lowrank"])


def test_lowrank_saves_the_compressed_activation_of_the_custom_vjp_op():
  # Without its checkpoint_name inside the op's fwd rule, the policy would
  # drop the compressed activation and backward would re-run the whole FFN op
  # (two matmuls and the 2:4 selection).
  cfg = _cfg("elas", **{"model.remat": "lowrank"})
  f_main = cfg.model.ffn_dim - cfg.model.ffn_dim % 4
  shapes = [(r.shape, r.dtype) for r in _residuals(cfg)]
  assert shapes.count(((SEQ, f_main // 2), "float32")) == cfg.model.n_layers
  assert shapes.count(((SEQ, f_main // 8), "uint8")) == cfg.model.n_layers


def test_pallas_kernel_composes_with_remat():
  # kernel=triton (interpreted on CPU) under remat = lowrank: the XLA op's
  # gradients without remat, and the kernel's compressed activation is kept.
  small = {"model.n_layers": 1, "model.ffn_dim": 130}
  _, _, want = _grads(_cfg("elas", **small, **{"model.kernel": "xla"}))
  cfg = _cfg("elas", **small, **{"model.kernel": "triton", "model.remat": "lowrank"})
  _, _, got = _grads(cfg)
  for k in got:
    np.testing.assert_allclose(got[k], want[k], rtol=2e-5, atol=2e-6 * np.max(np.abs(want[k])), err_msg=k)
  extra = _multiset(_residuals(cfg)) - _multiset(_residuals(_cfg("elas", **small, **{
      "model.kernel": "triton", "model.remat": "block"})))
  assert any(dtype == "uint8" for (_, dtype) in extra), extra  # the kernel's 2:4 metadata


def test_unknown_remat_is_a_config_error():
  cfg = _cfg("elas")
  cfg.model.remat = "everything"
  with pytest.raises(ConfigError, match=r"config\.model\.remat"):
    config_lib.validate(cfg)
  cfg.model.remat = "none"
  with pytest.raises(ConfigError, match=r"config\.model\.scan_layers"):
    config_lib.override(cfg, {"model.scan_layers": "sometimes"})
