"""The typed train state: its shardings and checkpoints written before it existed."""

import dataclasses
import os
import subprocess
import sys

import jax

from elas_jax import checkpointing, trainer
from elas_jax.data import pipeline
from tests.helpers import ROOT, step_losses, tiny_train_config, xla_flags


_SHARDING_SCRIPT = """
import jax
from flax import nnx
from elas_jax import trainer
from tests.helpers import tiny_train_config
cfg = tiny_train_config("elas", **{"mesh.data": 1, "mesh.fsdp": 2, "mesh.tensor": 2})
sh = trainer.build(cfg, jax.devices()[:4]).state_shardings
assert isinstance(sh, trainer.TrainState)
specs = {jax.tree_util.keystr(p): s.spec for p, s in jax.tree_util.tree_flatten_with_path(sh.params)[0]}
# Independent expectation from the model's documented layout: attention q.b is
# [d, rank] -> ("heads", "rank") -> ("tensor", None); q.a is [rank, d] ->
# ("rank", "embed") -> (None, "fsdp"); the embedding [vocab, d] -> ("tensor", "fsdp").
assert specs["['blocks'][0]['attn']['q']['b'].value"] == jax.P("tensor", None), specs
assert specs["['blocks'][0]['attn']['q']['a'].value"] == jax.P(None, "fsdp"), specs
assert specs["['embed']['embedding'].value"] == jax.P("tensor", "fsdp"), specs
# Both Adam moments of every parameter have exactly its sharding; counters are replicated.
p_specs = [s.spec for s in jax.tree.leaves(sh.params)]
assert [s.spec for s in jax.tree.leaves(sh.opt_state.mu)] == p_specs
assert [s.spec for s in jax.tree.leaves(sh.opt_state.nu)] == p_specs
assert sh.step.spec == jax.P() and sh.opt_state.count.spec == jax.P()
print("OK")
"""


def test_state_shardings_follow_the_logical_axes_of_params_and_moments():
  env = dict(os.environ, XLA_FLAGS=xla_flags(4), JAX_PLATFORMS="cpu")
  p = subprocess.run([sys.executable, "-c", _SHARDING_SCRIPT], cwd=ROOT, env=env, capture_output=True,
                     text=True, timeout=600)
  assert p.returncode == 0 and p.stdout.strip().endswith("OK"), p.stderr[-4000:]


def test_checkpoint_written_before_the_dataclass_resumes_identically(tmp_path):
  """A pre-dataclass checkpoint (a dict with an unused rng) restores and the run continues bitwise."""
  cfg = tiny_train_config("elas")
  straight, partial, old = tmp_path / "straight", tmp_path / "partial", tmp_path / "old"
  trainer.train_and_evaluate(cfg, str(straight))
  trainer.train_and_evaluate(cfg, str(partial), stop_at_step=5)
  run = trainer.build(cfg)
  state = checkpointing.restore_state(str(partial), 5, run.abstract_state)
  # Exactly what the old trainer saved: the same fields in a dict, plus "rng".
  legacy = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
  legacy["rng"] = jax.random.key_data(jax.random.key(cfg.seed))
  data_iter = iter(pipeline.train_dataset(pipeline.open_split(cfg, "train"), run.tokenizer, run.spec))
  for _ in range(5):  # the data position of step 5 (the order depends only on the seed)
    next(data_iter)
  mngr = checkpointing.manager(str(old))
  checkpointing.save(mngr, 5, legacy, data_iter, cfg)
  mngr.wait_until_finished()
  mngr.close()
  loaded = checkpointing.restore_state(str(old), 5, run.abstract_state)
  assert isinstance(loaded, trainer.TrainState)
  trainer.train_and_evaluate(cfg, str(old))
  want = {s: x for s, x in step_losses(str(straight)).items() if s > 5}
  assert step_losses(str(old)) == want


def test_reading_checkpoints_leaves_a_save_in_progress_alone(tmp_path):
  """evaluate / export / generate on a workdir that is still training must not
  remove orbax's temporary directory of a save in progress."""
  cfg = tiny_train_config("elas", **{"train.steps": 3, "train.eval_every": 3,
                                     "model.sparsity.dense_warmup_steps": 2})
  trainer.train_and_evaluate(cfg, str(tmp_path))
  in_progress = tmp_path / "checkpoints" / "6.orbax-checkpoint-tmp-1700000000"
  in_progress.mkdir()
  _, step = checkpointing.load_config(str(tmp_path))
  checkpointing.restore_state(str(tmp_path), step, trainer.build(cfg).abstract_state)
  assert step == 3 and in_progress.is_dir()
