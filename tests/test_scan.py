"""``model.scan_layers``: the scanned model equals the looped one on converted parameters.

References are the unscanned model (per-layer parameters, a Python loop over
blocks) and, for the optimizer, LORO's exact step applied to one layer's
factors at a time.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from elas_jax import checkpointing, model as model_lib, optim, sharding, stacking, trainer
from elas_jax.errors import ConfigError
from tests.helpers import ROOT, step_losses, tiny_train_config, xla_flags

SEQ = 32


def _flat(tree) -> dict[str, np.ndarray]:
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _split(cfg):
  return nnx.split(model_lib.build_model(cfg.model), nnx.Param)


def _axes(state) -> dict[str, tuple]:
  return {jax.tree_util.keystr(p): v.get_metadata().get("logical_axes")
          for p, v in jax.tree_util.tree_flatten_with_path(
              state, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]}


def test_scanned_init_is_the_stacked_unscanned_init_and_converters_round_trip():
  cfg = tiny_train_config("elas")
  _, flat_params = _split(cfg)
  _, scan_params = _split(tiny_train_config("elas", **{"model.scan_layers": True}))
  stacked = stacking.stack_layers(flat_params)
  assert _flat(stacked).keys() == _flat(scan_params).keys()
  for k, v in _flat(scan_params).items():
    np.testing.assert_array_equal(_flat(stacked)[k], v, err_msg=k)
  q_a = scan_params["blocks"]["attn"]["q"]["a"]
  assert q_a.shape == (cfg.model.n_layers, cfg.model.rank, cfg.model.d_model)
  assert _axes(stacked) == _axes(scan_params)
  assert q_a.get_metadata()["logical_axes"] == ("layers", "rank", "embed")
  back = stacking.unstack_layers(scan_params)
  assert _flat(back).keys() == _flat(flat_params).keys()
  for k, v in _flat(flat_params).items():
    np.testing.assert_array_equal(_flat(back)[k], v, err_msg=k)
  assert _axes(back) == _axes(flat_params)
  with pytest.raises(ValueError, match="already stacked"):
    stacking.stack_layers(scan_params)
  with pytest.raises(ValueError, match="already unstacked"):
    stacking.unstack_layers(flat_params)


@pytest.mark.parametrize("variant,remat", [("full", "none"), ("loro", "none"), ("elas", "none"),
                                           ("cola", "none"), ("elas", "lowrank")])
def test_scanned_logits_loss_and_grads_equal_unscanned(variant, remat):
  tokens = jax.random.randint(jax.random.key(2), (2, SEQ), 0, 4096)
  out = {}
  for scanned in (False, True):
    cfg = tiny_train_config(variant, **{"model.scan_layers": scanned, "model.remat": remat})
    graphdef, params = _split(cfg)
    if scanned:  # the unscanned model's parameters, converted
      params = stacking.stack_layers(_split(tiny_train_config(variant))[1])

    def loss(params, graphdef=graphdef):
      logits, stats = nnx.merge(graphdef, params)(tokens, True)
      return optax.softmax_cross_entropy_with_integer_labels(logits, tokens).mean(), (logits, stats)

    (value, (logits, stats)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    out[scanned] = (value, logits, _flat(stats),
                    _flat(stacking.unstack_layers(grads) if scanned else grads))
  (l0, lg0, s0, g0), (l1, lg1, s1, g1) = out[False], out[True]
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  np.testing.assert_allclose(lg1, lg0, rtol=1e-5, atol=1e-5)
  assert s1.keys() == s0.keys()
  for k in s0:  # per-layer statistics: [n_layers] in both layouts
    assert s1[k].shape == (2,)
    np.testing.assert_allclose(s1[k], s0[k], rtol=1e-6, err_msg=k)
  assert g1.keys() == g0.keys()
  for k in g0:
    np.testing.assert_allclose(g1[k], g0[k], rtol=1e-5, atol=1e-6 * np.max(np.abs(g0[k])), err_msg=k)


def test_loro_pairs_stacked_factors_and_steps_each_layer_exactly():
  _, flat_params = _split(tiny_train_config("loro"))
  _, scan_params = _split(tiny_train_config("loro", **{"model.scan_layers": True}))
  flat_pairs, _ = optim.factor_pairs(flat_params)
  scan_pairs, _ = optim.factor_pairs(scan_params)
  assert len(scan_pairs) * 2 == len(flat_pairs) == 2 * 7  # 7 low-rank linears per block
  keys = jax.random.split(jax.random.key(0), 4)
  b, a = (jax.random.normal(keys[0], (3, 40, 6)), jax.random.normal(keys[1], (3, 6, 30)))
  d_b, d_a = (jax.random.normal(keys[2], b.shape), jax.random.normal(keys[3], a.shape))
  got_b, got_a = optim.stacked_exact_step(b, a, d_b, d_a, 0.1)
  for i in range(3):
    want_b, want_a = optim.loro_exact_step(b[i], a[i], d_b[i], d_a[i], 0.1)
    np.testing.assert_allclose(got_b[i], want_b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_a[i], want_a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", ["loro", "cola"])
def test_optimizer_updates_of_stacked_params_are_the_stacked_updates(variant):
  # loro: an Adam step with the r/d scaling, then an exact step (K = 2);
  # cola: AdamW whose weight decay skips the norm scales, stacked or not.
  cfg = tiny_train_config(variant, **{"optimizer.exact_every": 2})
  tx, _ = optim.make_optimizer(cfg)
  params = _split(cfg)[1]
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(3), 2 * len(leaves))
  grads = [treedef.unflatten([jax.random.normal(k, x.shape) for k, x in zip(keys[i::2], leaves)])
           for i in range(2)]
  out = {}
  for scanned in (False, True):
    conv = stacking.stack_layers if scanned else (lambda t: t)
    p, opt_state = conv(params), tx.init(conv(params))
    for g in grads:
      updates, opt_state = tx.update(conv(g), opt_state, p)
      p = optax.apply_updates(p, updates)
    out[scanned] = _flat(p if scanned else stacking.stack_layers(p))
  assert out[True].keys() == out[False].keys()
  for k in out[False]:
    np.testing.assert_allclose(out[True][k], out[False][k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_layers_axis_is_never_sharded():
  mesh = jax.sharding.AbstractMesh((1, 2, 2), sharding.MESH_AXES)
  assert sharding.spec_for((2, 64, 8), ("layers", "heads", "rank"), mesh) == P(None, "tensor", None)
  assert sharding.spec_for((2, 64), ("layers", "embed"), mesh) == P(None, "fsdp")


@pytest.mark.parametrize("variant", ["elas", "cola"])
def test_tiny_training_scanned_equals_unscanned(tmp_path, variant):
  # elas: LORO's exact step at step 5 and the 2:4 switch at step 4; cola:
  # AdamW with weight decay and clipping (too small an effect on 6 losses to
  # check the decay mask: test_optimizer_updates_... does that).
  losses, finals = {}, {}
  for scanned in (False, True):
    cfg = tiny_train_config(variant, **{"model.scan_layers": scanned, "train.steps": 6,
                                        "train.eval_every": 6, "train.ckpt_every": 6})
    finals[scanned] = trainer.train_and_evaluate(cfg, str(tmp_path / str(scanned)))
    losses[scanned] = step_losses(str(tmp_path / str(scanned)))
  assert sorted(losses[True]) == list(range(1, 7))
  np.testing.assert_allclose([losses[True][s] for s in range(1, 7)],
                             [losses[False][s] for s in range(1, 7)], rtol=2e-5)
  # The unscanned run's checkpoint is refused by a scanned config, in one line
  # naming the field, before anything is restored.
  cfg = tiny_train_config(variant, **{"model.scan_layers": True, "train.steps": 8})
  with pytest.raises(ConfigError, match=r"^config\.model\.scan_layers = True [^\n]*stack_layers") as e:
    trainer.train_and_evaluate(cfg, str(tmp_path / "False"))
  assert "\n" not in str(e.value)
  if variant == "elas":
    # A checkpoint whose config has only the fields of the first training system
    # (tests/data: a config saved by commit c1c8086, before remat, scan_layers,
    # attention, loss_chunk, ...) still evaluates, with those fields' old meaning
    # (unscanned, xla attention, full logits): the same loss up to that numerics.
    with open(os.path.join(ROOT, "tests", "data", "config_tiny_elas_c1c8086.json")) as f:
      old = json.load(f)
    meta = tmp_path / "False" / "checkpoints" / "6" / "config" / "metadata"
    saved = json.loads(meta.read_text())
    dropped = [f"{sec}.{k}" for sec in saved if isinstance(saved[sec], dict) for k in list(saved[sec])
               if k not in old.get(sec, {})]
    for name in dropped:
      sec, k = name.split(".")
      del saved[sec][k]
    saved = {sec: v for sec, v in saved.items() if sec in old}  # sections added since (wandb)
    assert {"model.remat", "model.scan_layers", "model.attention", "model.loss_chunk"} <= set(dropped)
    meta.write_text(json.dumps(saved))
    result = trainer.evaluate_checkpoint(str(tmp_path / "False"))
    np.testing.assert_allclose(result["eval_loss"], finals[False]["eval_loss"], rtol=1e-5)


def test_checkpoint_layout_check():
  cfg = tiny_train_config("elas", **{"model.scan_layers": True, "model.remat": "lowrank"})
  saved = tiny_train_config("elas").to_dict()
  with pytest.raises(ConfigError, match=r"config\.model\.scan_layers"):
    checkpointing.check_compatible(saved, cfg, "x")
  del saved["model"]["scan_layers"], saved["model"]["remat"]  # written before the fields existed
  with pytest.raises(ConfigError, match=r"config\.model\.scan_layers"):
    checkpointing.check_compatible(saved, cfg, "x")
  cfg.model.scan_layers = False  # remat alone may change on resume
  checkpointing.check_compatible(saved, cfg, "x")


_MESH_SCRIPT = """
import json, sys
import jax, jax.numpy as jnp
from tests.helpers import tiny_train_config
from elas_jax import trainer
out = {}
for scanned, mesh in ((False, (1, 1, 1)), (True, (1, 2, 2))):
  cfg = tiny_train_config("elas", **{"mesh.data": mesh[0], "mesh.fsdp": mesh[1], "mesh.tensor": mesh[2],
                                     "model.scan_layers": scanned, "model.remat": "lowrank" if scanned else "none",
                                     "optimizer.exact_every": 2})
  run = trainer.build(cfg, jax.devices()[: mesh[0] * mesh[1] * mesh[2]])
  if scanned:
    specs = [str(x.spec) for x in jax.tree.leaves(run.state_shardings.params)]
    out["sharded_params"] = sum("fsdp" in s or "tensor" in s for s in specs)
  step = jax.jit(trainer.make_train_step(run.graphdef, run.tx, run.schedule, cfg),
                 in_shardings=(run.state_shardings, run.batch_sharding))
  batch = {k: jax.device_put(jax.random.randint(jax.random.key(0), (8, 32), 0, 4096) if k != "mask"
                             else jnp.ones((8, 32), jnp.int32), run.batch_sharding)
           for k in ("inputs", "targets", "mask")}
  state, losses = run.init_state(), []
  for _ in range(3):  # the second update is LORO's exact step
    state, m = step(state, batch)
    losses.append(float(m["loss"]))
  out[str(scanned)] = losses
print("RESULT " + json.dumps(out))
"""


def test_scanned_sharded_steps_equal_single_device_unscanned():
  # fsdp x tensor mesh of 4 CPU devices, remat lowrank, LORO exact step: the
  # stacked exact step once hung multi-device steps (vmapped QR/SVD).
  env = dict(os.environ, XLA_FLAGS=xla_flags(4), JAX_PLATFORMS="cpu",
             PYTHONPATH=ROOT)
  proc = subprocess.run([sys.executable, "-c", _MESH_SCRIPT], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=400)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.split("RESULT ")[-1])
  assert out["sharded_params"] >= 2 * 7  # stacked factors really sharded (layers axis aside)
  np.testing.assert_allclose(out["True"], out["False"], rtol=2e-5)
