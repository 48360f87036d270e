"""The training loop: jitted sharded step, evaluation, metrics, orbax checkpoints.

``train_and_evaluate(config, workdir)`` trains from scratch or resumes from the
latest checkpoint in ``workdir/checkpoints``. Sections:

1. setup: mesh, data, model, optimizer, shardings;
2. restore (or initialise) the train state and the data iterator;
3. the loop: step, metrics (``metrics.jsonl``, TensorBoard, progress bar),
   evaluation every ``eval_every`` steps, checkpoints every ``ckpt_every`` steps,
   at the end, and on SIGTERM / SIGINT;
4. non-finite guard: a step whose loss or gradients are not finite is not
   applied; the run then stops (or, with ``train.skip_nonfinite``, counts it
   and goes on) without writing that state anywhere.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding

from elas_jax import checkpointing, config_lib, model as model_lib, optim, sharding
from elas_jax import attention, loss as loss_lib
from elas_jax.data import pipeline, tokenizer as tokenizer_lib
from elas_jax.errors import UserError

TrainState = dict  # {"step", "params", "opt_state", "rng", "bad_steps", "first_bad_step"}


class NonFiniteError(UserError):
  """The loss or the gradients became NaN/Inf."""


# ---------------------------------------------------------------- the steps


def make_train_step(graphdef, tx: optax.GradientTransformation, schedule, cfg) -> Callable:
  sparse_cfg = cfg.model.sparsity
  warmup = sparse_cfg.dense_warmup_steps

  def train_step(state: TrainState, batch: dict[str, jax.Array]):
    sparse_on = model_lib.sparsity_active(state["step"], warmup) & bool(sparse_cfg.enabled)

    def loss_fn(params):
      total, count, stats = loss_lib.lm_loss(nnx.merge(graphdef, params), batch, sparse_on, cfg.model)
      return total / jnp.maximum(count, 1.0), (stats, count)

    (loss, (stats, count)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # A non-finite step is not applied: the state stays the last good one.
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = {
        "step": state["step"] + 1,
        "params": keep(params, state["params"]),
        "opt_state": keep(opt_state, state["opt_state"]),
        "rng": state["rng"],
        "bad_steps": state["bad_steps"] + jnp.where(finite, 0, 1),
        "first_bad_step": jnp.where((state["first_bad_step"] < 0) & ~finite, state["step"],
                                    state["first_bad_step"]),
    }
    metrics = {
        "loss": loss, "lr": schedule(state["step"]), "grad_norm": grad_norm,
        "param_norm": optax.tree.norm(params), "update_norm": optax.tree.norm(updates),
        "tokens": count, "sparse_on": sparse_on.astype(jnp.float32),
    }
    for name, per_layer in stats.items():
      metrics[f"{name}_mean"] = jnp.mean(per_layer)
      for i in range(per_layer.shape[0]):
        metrics[f"{name}/layer{i}"] = per_layer[i]
    return new_state, metrics

  return train_step


def make_eval_step(graphdef, cfg) -> Callable:
  sparse_cfg = cfg.model.sparsity

  def eval_step(params, step, batch):
    # Evaluation follows the training phase: 2:4 after the dense warm-up.
    sparse_on = model_lib.sparsity_active(step, sparse_cfg.dense_warmup_steps) & bool(sparse_cfg.enabled)
    total, count, _ = loss_lib.lm_loss(nnx.merge(graphdef, params), batch, sparse_on, cfg.model)
    return total, count

  return eval_step


# --------------------------------------------------------------- the run


def new_state(params, tx: optax.GradientTransformation, seed: int) -> TrainState:
  """The train state at step 0 for ``params``."""
  return {"step": jnp.zeros([], jnp.int32), "params": params, "opt_state": tx.init(params),
          "rng": jax.random.key_data(jax.random.key(seed)),
          "bad_steps": jnp.zeros([], jnp.int32), "first_bad_step": jnp.full([], -1, jnp.int32)}


@dataclasses.dataclass
class Run:
  """Everything built from a config, shared by training and evaluation."""

  cfg: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  graphdef: Any
  tokenizer: Any
  spec: pipeline.Spec
  tx: optax.GradientTransformation
  schedule: Callable
  state_shardings: Any
  batch_sharding: NamedSharding
  abstract_state: Any

  def init_state(self) -> TrainState:
    cfg = self.cfg

    def init():
      params = nnx.state(model_lib.build_model(cfg.model, seed=cfg.seed), nnx.Param)
      return new_state(params, self.tx, cfg.seed)

    return jax.jit(init, out_shardings=self.state_shardings)()

  def jit_eval_step(self) -> Callable:
    return jax.jit(make_eval_step(self.graphdef, self.cfg),
                   in_shardings=(self.state_shardings["params"], sharding.replicated(self.mesh),
                                 self.batch_sharding))

  def eval_batches(self):
    docs = pipeline.open_split(self.cfg, "validation")
    pipeline.check_prepared(docs, self.tokenizer)
    return pipeline.eval_batches(docs, self.tokenizer, self.spec)

  def evaluate(self, eval_fn, params, step, batches) -> dict[str, float]:
    total, count = 0.0, 0.0
    for b in batches:
      t, c = eval_fn(params, step, pipeline.global_batch(b, self.batch_sharding))
      total, count = total + float(t), count + float(c)
    loss = total / max(count, 1.0)
    return {"eval_loss": loss, "eval_ppl": float(np.exp(loss)), "eval_tokens": int(count)}


def build(cfg, devices=None) -> Run:
  """Mesh, tokenizer, model structure, optimizer and shardings for ``cfg``."""
  config_lib.validate(cfg)
  attention.check_backend(cfg.model)  # needs the target backend, so here rather than in validate
  mesh = sharding.make_mesh(cfg.mesh, devices)
  sharding.check_batch(cfg.train.batch_size, mesh)
  tok = tokenizer_lib.from_config(cfg.data, cfg.model.vocab_size)
  spec = pipeline.Spec.from_config(cfg)
  abstract_model = nnx.eval_shape(lambda: model_lib.build_model(cfg.model, seed=cfg.seed))
  graphdef, abstract_params = nnx.split(abstract_model, nnx.Param)
  tx, schedule = optim.make_optimizer(cfg)
  p_sh = sharding.param_shardings(abstract_params, mesh)
  rep = sharding.replicated(mesh)

  abstract_state = jax.eval_shape(lambda: new_state(
      jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), abstract_params), tx, cfg.seed))
  # Optimizer moments mirror their parameter's sharding; counters are replicated.
  flat_p = {tuple(map(str, path)): s for path, s in
            jax.tree_util.tree_flatten_with_path(p_sh, is_leaf=lambda x: isinstance(x, NamedSharding))[0]}

  def opt_sharding(path, leaf):
    keys = tuple(map(str, path))
    for n in range(len(keys)):
      s = flat_p.get(keys[n:])
      if s is not None and s.spec and len(s.spec) == len(leaf.shape):
        return s
    return rep

  opt_sh = jax.tree_util.tree_map_with_path(opt_sharding, abstract_state["opt_state"])
  state_sh = {"step": rep, "params": p_sh, "opt_state": opt_sh, "rng": rep, "bad_steps": rep,
              "first_bad_step": rep}
  state_sh = jax.tree.map(lambda s, _: s, state_sh, abstract_state,
                          is_leaf=lambda x: isinstance(x, NamedSharding))
  abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                abstract_state, state_sh)
  return Run(cfg, mesh, graphdef, tok, spec, tx, schedule, state_sh, sharding.batch_sharding(mesh),
             abstract_state)


# ------------------------------------------------------------- metrics


class MetricWriter:
  """``metrics.jsonl`` (one object per logged step) and TensorBoard, on process 0."""

  def __init__(self, workdir: str, start_step: int):
    self.enabled = jax.process_index() == 0
    if not self.enabled:
      return
    from tensorboardX import SummaryWriter

    # Records after the restored step belong to lost progress: drop them, and
    # have TensorBoard discard its events from there on (purge_step).
    checkpointing.truncate_metrics(workdir, start_step)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
    self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=start_step + 1)

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    if not self.enabled:
      return
    self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
    self._jsonl.flush()
    for k, v in metrics.items():
      if isinstance(v, (int, float)):
        self._tb.add_scalar(k, v, step)
    self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


class StopRequested:
  """SIGTERM / SIGINT: finish the current step, checkpoint, exit cleanly."""

  def __init__(self):
    self.signal = None
    self._old = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread: signals stay with the caller
        pass
    return self

  def _handle(self, signum, frame):
    self.signal = signal.Signals(signum).name

  def __exit__(self, *exc):
    for sig, handler in self._old.items():
      signal.signal(sig, handler)


# ------------------------------------------------------------- the loop


def train_and_evaluate(cfg, workdir: str, *, stop_at_step: int | None = None,
                       devices=None) -> dict[str, Any]:
  """Trains (or resumes) ``cfg`` in ``workdir``; returns the final metrics.

  ``stop_at_step`` simulates a pre-emption after that step (checkpoint, then
  return), for tests of resumption. ``devices`` defaults to all devices.
  """
  os.makedirs(workdir, exist_ok=True)
  with checkpointing.WorkdirLock(workdir):
    return _train(cfg, workdir, stop_at_step, devices)


def _train(cfg, workdir: str, stop_at_step: int | None, devices) -> dict[str, Any]:
  from tqdm import tqdm

  run = build(cfg, devices)
  t = cfg.train
  train_docs = pipeline.open_split(cfg, "train")
  pipeline.check_prepared(train_docs, run.tokenizer)
  eval_batches, _ = run.eval_batches()
  data_iter = iter(pipeline.train_dataset(train_docs, run.tokenizer, run.spec))

  mngr = checkpointing.manager(workdir, t.keep_checkpoints)
  restored = checkpointing.restore_latest_intact(mngr, run.abstract_state, data_iter, cfg, workdir)
  if restored is not None:
    start, state = restored
    print(f"resumed from step {start} in {workdir}", file=sys.stderr, flush=True)
  else:
    state, start = run.init_state(), 0
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(cfg.to_json_best_effort(indent=1))

  train_step = jax.jit(make_train_step(run.graphdef, run.tx, run.schedule, cfg),
                       in_shardings=(run.state_shardings, run.batch_sharding),
                       out_shardings=(run.state_shardings, sharding.replicated(run.mesh)),
                       donate_argnums=0)
  eval_step = run.jit_eval_step()

  def save(step: int) -> None:
    checkpointing.save(mngr, step, state, data_iter, cfg)

  def check_finite(step: int) -> None:
    bad = int(state["bad_steps"])
    if bad and not t.skip_nonfinite:
      last = mngr.latest_step()
      raise NonFiniteError(
          f"non-finite loss or gradients at step {int(state['first_bad_step'])}: training stopped "
          f"(that update was not applied). Last good checkpoint: "
          f"{'step ' + str(last) if last is not None else 'none'} in {workdir}. Lower the lr, check "
          f"the data, or set train.skip_nonfinite=True to skip such batches")

  writer = MetricWriter(workdir, start)
  tokens_per_step = t.batch_size * t.seq_len
  final: dict[str, Any] = {}
  bar = tqdm(total=t.steps, initial=start, unit="step", disable=jax.process_index() != 0,
             dynamic_ncols=True)
  last_time, last_step = time.perf_counter(), start
  try:
    with StopRequested() as stop, sharding.kernel_mesh(run.mesh, cfg.model):
      step = start
      while step < t.steps:
        batch = pipeline.global_batch(next(data_iter), run.batch_sharding)
        state, metrics = train_step(state, batch)
        step += 1
        bar.update(1)
        do_log = step % t.log_every == 0 or step == t.steps
        do_eval = step % t.eval_every == 0 or step == t.steps
        if do_log or do_eval:  # one metrics record per step, with "step" and "loss"
          check_finite(step)
          now = time.perf_counter()
          m = {k: float(v) for k, v in jax.device_get(metrics).items()}
          dt = (now - last_time) / max(step - last_step, 1)
          m.update(ppl=float(np.exp(min(m["loss"], 50.0))), step_time=dt,
                   tokens_per_s=tokens_per_step / dt, skipped_nonfinite=int(state["bad_steps"]))
          bar.set_postfix(loss=f"{m['loss']:.3f}", tok_s=f"{m['tokens_per_s']:,.0f}", refresh=False)
          if do_eval:
            ev = run.evaluate(eval_step, state["params"], state["step"], eval_batches)
            m.update(ev)
            final.update(ev)
            bar.write(f"step {step}: loss {m['loss']:.4f}  eval_loss {ev['eval_loss']:.4f}  "
                      f"eval_ppl {ev['eval_ppl']:.2f} ({ev['eval_tokens']:,} tokens)", file=sys.stderr)
          writer.write(step, m)
          last_time, last_step = time.perf_counter(), step  # evaluation time is not step time
        if step % t.ckpt_every == 0 or step == t.steps:
          check_finite(step)
          save(step)
        if stop.signal or (stop_at_step is not None and step >= stop_at_step):
          check_finite(step)
          if mngr.latest_step() != step:
            save(step)
          bar.write(f"{stop.signal or 'stop_at_step'}: checkpointed step {step}; rerun the same "
                    "command to resume", file=sys.stderr)
          break
      if start >= t.steps:  # already finished: report the final evaluation again
        final.update(run.evaluate(eval_step, state["params"], state["step"], eval_batches))
    mngr.wait_until_finished()
  finally:
    bar.close()
    writer.close()
    mngr.close()
  final["step"] = int(state["step"])
  return final
