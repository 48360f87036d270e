"""Sharded training equals single-device training; checkpoints move between meshes."""

import json
import os
import subprocess
import sys

import pytest

from elas_jax import config_lib, sharding
from elas_jax.errors import ConfigError
from tests.helpers import ROOT, load_config, xla_flags

MESHES = {"single": (1, 1, 1), "data": (8, 1, 1), "fsdp": (1, 8, 1), "tensor": (1, 1, 8),
          "mixed": (2, 2, 2)}

_SCRIPT = """
import json, sys
import jax
from tests.helpers import tiny_train_config, step_losses
from elas_jax import trainer
root, meshes = sys.argv[1], json.loads(sys.argv[2])
out = {}
for name, (d, f, t) in meshes.items():
  cfg = tiny_train_config(**{"mesh.data": d, "mesh.fsdp": f, "mesh.tensor": t, "train.steps": 6,
                             "train.eval_every": 6, "train.ckpt_every": 6})
  devices = jax.devices()[: d * f * t]
  if name == "fsdp":  # parameters and their Adam moments are really sharded
    sh = trainer.build(cfg, devices).state_shardings
    specs = [x.spec for x in jax.tree.leaves(sh.params) + jax.tree.leaves(sh.opt_state)]
    assert sum("fsdp" in str(sp) for sp in specs) >= 3 * 2 * 6, specs
  final = trainer.train_and_evaluate(cfg, f"{root}/{name}", devices=devices)
  out[name] = {"losses": step_losses(f"{root}/{name}"), "eval_loss": final["eval_loss"]}
# the single-device checkpoint, restored onto 8 devices (fsdp) and onto 4 (tensor x data)
out["restored_fsdp8"] = trainer.evaluate_checkpoint(f"{root}/single", mesh_shape=(1, 8, 1))["eval_loss"]
out["restored_2x2"] = trainer.evaluate_checkpoint(f"{root}/single", mesh_shape=(2, 1, 2),
                                                   devices=jax.devices()[:4])["eval_loss"]
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
def test_meshes_match_one_device_and_checkpoints_reshard(tmp_path):
  env = dict(os.environ, XLA_FLAGS=xla_flags(8), JAX_PLATFORMS="cpu")
  p = subprocess.run([sys.executable, "-c", _SCRIPT, str(tmp_path), json.dumps(MESHES)], cwd=ROOT,
                     env=env, capture_output=True, text=True, timeout=900)
  assert p.returncode == 0, p.stderr[-4000:]
  out = json.loads(p.stdout.split("RESULT ", 1)[1])
  ref = out["single"]
  assert sorted(ref["losses"], key=int) == [str(s) for s in range(1, 7)]
  for name in MESHES:
    for step, loss in out[name]["losses"].items():
      assert loss == pytest.approx(ref["losses"][step], rel=2e-5), (name, step)
    assert out[name]["eval_loss"] == pytest.approx(ref["eval_loss"], rel=2e-5), name
  assert out["restored_fsdp8"] == pytest.approx(ref["eval_loss"], rel=1e-5)
  assert out["restored_2x2"] == pytest.approx(ref["eval_loss"], rel=1e-5)


def test_mesh_shape_and_errors():
  cfg = load_config("configs/tiny.py", "elas")
  assert sharding.mesh_shape(cfg.mesh, 8) == (8, 1, 1)
  cfg.mesh.fsdp, cfg.mesh.tensor = 2, 2
  assert sharding.mesh_shape(cfg.mesh, 8) == (2, 2, 2)
  cfg.mesh.data = 4
  with pytest.raises(ConfigError, match="needs 16 devices but 8 are available"):
    sharding.mesh_shape(cfg.mesh, 8)
  cfg.mesh.data = 0
  with pytest.raises(ConfigError, match="config.mesh.data = 0"):
    config_lib.validate(cfg)


def test_logical_axes_map_to_mesh_axes():
  import jax
  mesh = jax.make_mesh((1, 1, 1), sharding.MESH_AXES)
  assert sharding.spec_for((512, 128), ("embed", "rank"), mesh) == jax.sharding.PartitionSpec(None, None)
  fake = type("M", (), {"shape": {"data": 2, "fsdp": 4, "tensor": 2}})()
  P = jax.sharding.PartitionSpec
  assert sharding.spec_for((512, 128), ("embed", "rank"), fake) == P("fsdp", None)
  assert sharding.spec_for((8191, 512), ("mlp", "rank"), fake) == P(None, None)  # 8191 is odd
  assert sharding.spec_for((32000, 2048), ("vocab", "embed"), fake) == P("tensor", "fsdp")
