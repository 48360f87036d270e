"""CoLA's ``only_lr_act`` (``model.cola_only_lr_act``) against a hand-written FFN."""

import jax.numpy as jnp
import numpy as np
import pytest

from elas_jax import config_lib
from elas_jax import model as model_lib
from tests.helpers import load_config


def _silu(z):
  return z / (1.0 + np.exp(-z))


def _cola(x, lin):
  # CoLA linear (official cola_layer.py): silu(x · cola_a) · cola_b, here with a [r, in], b [out, r]
  a, b = (np.asarray(lin.a[...], np.float64), np.asarray(lin.b[...], np.float64))
  return _silu(x @ a.T) @ b.T


@pytest.mark.parametrize("only_lr_act", [False, True])
def test_cola_ffn_matches_hand_formula(only_lr_act):
  c = load_config("configs/tiny.py", "cola")
  c.model.n_layers, c.model.cola_only_lr_act = 1, only_lr_act
  config_lib.validate(c)
  ffn = model_lib.build_model(c.model).blocks[0].ffn
  x = np.random.default_rng(0).normal(size=(2, 5, c.model.d_model))
  got = np.asarray(ffn(jnp.asarray(x, jnp.float32), jnp.asarray(False))[0], np.float64)
  gate = _cola(x, ffn.gate)
  gate = gate if only_lr_act else _silu(gate)  # official ColaMLP: act_fn only when not only_lr_act
  want = _cola(gate * _cola(x, ffn.up), ffn.down)
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-6)


def test_sizes_set_only_lr_act_as_the_official_cola_configs():
  # alvin-zyl/CoLA cola_configs/cola_{60m,130m}.json set only_lr_act false; 350m and 1b
  # leave it at ColaConfig's default, True.
  want = {"tiny": False, "llama_60m": False, "llama_130m": False, "llama_350m": True, "llama_1b": True}
  for name, value in want.items():
    assert load_config(f"configs/{name}.py", "cola").model.cola_only_lr_act is value
    assert load_config(f"configs/{name}.py", "loro").model.cola_only_lr_act is False


def test_only_lr_act_needs_cola():
  c = load_config("configs/tiny.py", "loro")
  c.model.cola_only_lr_act = True
  with pytest.raises(config_lib.ConfigError, match=r"config\.model\.cola_only_lr_act"):
    config_lib.validate(c)
