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
   and goes on) without writing that state anywhere;
5. memory fit: ``train.micro_batch = auto`` is resolved by compiling the step
   (:func:`fit_micro_batch`); a compiled step over the memory budget, or XLA's
   RESOURCE_EXHAUSTED, stops the run with one line (:mod:`elas_jax.memory`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import sys
import time
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding

from elas_jax import checkpointing, compile_cache, config_lib, flops, memory, model as model_lib
from elas_jax import optim, preemption, profiling, sharding, stacking, storage, wandb_log
from elas_jax.ops import attention, loss as loss_lib, sparsity
from elas_jax.data import pipeline, tokenizer as tokenizer_lib
from elas_jax.errors import UserError


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes; what a checkpoint holds (with the data iterator).

  Saved on disk as a mapping of these field names. Checkpoints written before
  this class (a dict with an extra, unused ``rng``) still restore: see
  :func:`checkpointing.restore_state`.
  """

  step: jax.Array  # optimizer steps taken (int32 scalar)
  params: nnx.State  # model parameters (nnx.Param variables with logical-axis metadata)
  opt_state: optax.OptState
  bad_steps: jax.Array  # non-finite steps skipped so far (int32)
  first_bad_step: jax.Array  # step of the first non-finite step, -1 if none (int32)

  @classmethod
  def create(cls, params: nnx.State, tx: optax.GradientTransformation) -> "TrainState":
    """The state at step 0 for ``params``."""
    return cls(step=jnp.zeros([], jnp.int32), params=params, opt_state=tx.init(params),
               bad_steps=jnp.zeros([], jnp.int32), first_bad_step=jnp.full([], -1, jnp.int32))


class NonFiniteError(UserError):
  """The loss or the gradients became NaN/Inf."""


# ---------------------------------------------------------------- the steps


def micro_batches(batch: dict[str, jax.Array], k: int, mesh: jax.sharding.Mesh | None = None
                  ) -> dict[str, jax.Array]:
  """``[B, ...]`` -> ``[k, B/k, ...]``: micro-batch ``i`` holds rows ``i, i+k, i+2k, ...``.

  Strided, not contiguous, so that each micro-batch is spread over all the
  devices of the data x fsdp split exactly like the global batch (every device
  holds ``B/(k·n)`` rows of every micro-batch) and no rows move between devices.
  """

  def split(x):
    x = x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)
    if mesh is not None:
      x = jax.lax.with_sharding_constraint(x, sharding.micro_batch_sharding(mesh))
    return x

  return jax.tree.map(split, batch)


def make_grad_fn(graphdef, cfg, mesh: jax.sharding.Mesh | None = None) -> Callable:
  """``(params, batch, sparse_on) -> (loss, stats, count, grads)`` of one optimizer step.

  The forward/backward runs over ``train.micro_batch``-sized micro-batches
  (:func:`micro_batches`) under ``lax.scan``, gradients accumulated in fp32;
  the loss is the mean over the batch's real (unmasked) tokens and the
  gradient is that loss's, exactly as for one big batch. Split backward mode
  permutes tokens within each micro-batch (its 2:4 groups along tokens are
  formed per micro-batch, as they are per device shard).
  """
  k = cfg.train.batch_size // (cfg.train.micro_batch or cfg.train.batch_size)

  def loss_sum(params, mb, sparse_on):
    """Summed per-token loss of one (micro-)batch, its per-layer stats and token count."""
    total, count, stats = loss_lib.lm_loss(nnx.merge(graphdef, params), mb, sparse_on, cfg.model)
    return total, (stats, count)

  def grad_fn(params, batch, sparse_on):
    if k == 1:
      def loss_fn(params):
        total, (stats, count) = loss_sum(params, batch, sparse_on)
        return total / jnp.maximum(count, 1.0), (stats, count)

      (loss, (stats, count)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      return loss, stats, count, grads

    # Gradients of the summed loss, accumulated in fp32 over the micro-batches
    # and divided once by the real-token count of the whole batch: the same
    # weighting as one big batch, whatever each micro-batch's padding.
    grad_sum = jax.value_and_grad(loss_sum, has_aux=True)

    def accumulate(carry, mb):
      g_acc, total_acc, count_acc, stats_acc = carry
      (total, (stats, count)), g = grad_sum(params, mb, sparse_on)
      g_acc = jax.tree.map(lambda a, x: a + x.astype(jnp.float32), g_acc, g)
      stats_acc = jax.tree.map(jnp.add, stats_acc, stats)
      return (g_acc, total_acc + total, count_acc + count, stats_acc), None

    mbs = micro_batches(batch, k, mesh)
    first = jax.tree.map(lambda x: x[0], mbs)
    stats_shape = jax.eval_shape(lambda p: loss_sum(p, first, sparse_on)[1][0], params)
    zeros = lambda tree, dtype=None: jax.tree.map(lambda x: jnp.zeros(x.shape, dtype or x.dtype), tree)
    init = (zeros(params, jnp.float32), jnp.zeros([], jnp.float32), jnp.zeros([], jnp.float32),
            zeros(stats_shape))
    (g_sum, total, count, stats_sum), _ = jax.lax.scan(accumulate, init, mbs)
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), g_sum, params)
    # Equal-sized micro-batches: the mean of means is the batch mean (zero_frac);
    # ratios (dropped_mass) are logged as the mean of the micro-batches' ratios.
    stats = jax.tree.map(lambda x: x / k, stats_sum)
    return total / denom, stats, count, grads

  return grad_fn


def make_train_step(graphdef, tx: optax.GradientTransformation, schedule, cfg,
                    mesh: jax.sharding.Mesh | None = None) -> Callable:
  """The step to jit: gradients (:func:`make_grad_fn`), one optimizer update,
  the non-finite guard, metrics."""
  grad_fn = make_grad_fn(graphdef, cfg, mesh)

  def train_step(state: TrainState, batch: dict[str, jax.Array]):
    sparse_on = sparsity.sparse_phase(cfg.model, state.step)
    loss, stats, count, grads = grad_fn(state.params, batch, sparse_on)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # A non-finite step is not applied: the state stays the last good one.
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    next_state = state.replace(
        step=state.step + 1,
        params=keep(params, state.params),
        opt_state=keep(opt_state, state.opt_state),
        bad_steps=state.bad_steps + jnp.where(finite, 0, 1),
        first_bad_step=jnp.where((state.first_bad_step < 0) & ~finite, state.step,
                                 state.first_bad_step),
    )
    metrics = {
        "loss": loss, "lr": schedule(state.step), "grad_norm": grad_norm,
        "param_norm": optax.tree.norm(params), "update_norm": optax.tree.norm(updates),
        "tokens": count, "sparse_on": sparse_on.astype(jnp.float32),
    }
    for name, per_layer in stats.items():
      metrics[f"{name}_mean"] = jnp.mean(per_layer)
      for i in range(per_layer.shape[0]):
        metrics[f"{name}/layer{i}"] = per_layer[i]
    return next_state, metrics

  return train_step


def make_eval_step(graphdef, cfg) -> Callable:

  def eval_step(params, step, batch):
    # Evaluation follows the training phase: 2:4 after the dense warm-up.
    sparse_on = sparsity.sparse_phase(cfg.model, step)
    total, count, _ = loss_lib.lm_loss(nnx.merge(graphdef, params), batch, sparse_on, cfg.model)
    return total, count

  return eval_step


# --------------------------------------------------------------- the run


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
  state_shardings: TrainState  # a NamedSharding per leaf
  batch_sharding: NamedSharding
  abstract_state: TrainState  # ShapeDtypeStructs carrying their shardings

  def init_state(self) -> TrainState:
    cfg = self.cfg

    def init():
      params = nnx.state(model_lib.build_model(cfg.model, seed=cfg.seed, mesh=self.mesh), nnx.Param)
      return TrainState.create(params, self.tx)

    return jax.jit(init, out_shardings=self.state_shardings)()

  def jit_eval_step(self) -> Callable:
    return jax.jit(make_eval_step(self.graphdef, self.cfg),
                   in_shardings=(self.state_shardings.params, sharding.replicated(self.mesh),
                                 self.batch_sharding))

  def eval_batches(self):
    docs = pipeline.open_split(self.cfg, "validation")
    pipeline.check_prepared(docs, self.tokenizer)
    return pipeline.eval_batches(docs, self.tokenizer, self.spec)

  def evaluate(self, eval_fn, params, step, batches) -> dict[str, float]:
    """``eval_loss`` (mean per-token loss over unmasked targets), ``eval_ppl``, ``eval_tokens``.

    The per-batch sums stay on the device while the batches are dispatched (no
    synchronisation per batch); they are fetched once at the end and added in
    float64, in batch order.
    """
    sums = [eval_fn(params, step, pipeline.global_batch(b, self.batch_sharding)) for b in batches]
    total, count = 0.0, 0.0
    for t, c in jax.device_get(sums):
      total, count = total + float(t), count + float(c)
    loss = total / max(count, 1.0)
    return {"eval_loss": loss, "eval_ppl": float(np.exp(loss)), "eval_tokens": int(count)}


def restore_run(workdir: str, step: int | None = None, *,
                mesh_shape: tuple[int, int, int] | None = None, kernel: str | None = None,
                devices=None) -> tuple[Run, TrainState]:
  """The run (with the config saved in the checkpoint) and train state of checkpoint
  ``step`` (default: the latest) of ``workdir``, restored onto this machine's mesh
  (``mesh_shape`` = data, fsdp, tensor overrides the saved one; ``kernel`` the FFN kernel)."""
  cfg, step = checkpointing.load_config(workdir, step)
  if mesh_shape is not None:
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = mesh_shape
  if kernel is not None:
    cfg.model.kernel = kernel
  run = build(cfg, devices)
  return run, checkpointing.restore_state(workdir, step, run.abstract_state)


def evaluate_checkpoint(workdir: str, step: int | None = None,
                        mesh_shape: tuple[int, int, int] | None = None, devices=None) -> dict:
  """``{"step", "eval_loss", "eval_ppl", "eval_tokens"}`` of checkpoint ``step`` (default:
  the latest) of ``workdir`` on its validation stream, restored onto this machine's mesh
  (``mesh_shape``: data, fsdp, tensor instead of the saved one)."""
  run, state = restore_run(workdir, step, mesh_shape=mesh_shape, devices=devices)
  batches, _ = run.eval_batches()
  return {"step": int(state.step), **run.evaluate(run.jit_eval_step(), state.params, state.step, batches)}


def with_unscanned_layers(run: Run, params: nnx.State) -> tuple[Run, nnx.State]:
  """A ``scan_layers`` run and its params in the per-layer layout (for export, which
  writes the blocks one by one); other runs are returned as they are."""
  if not run.cfg.model.scan_layers:
    return run, params
  cfg = run.cfg.copy_and_resolve_references()
  cfg.model.scan_layers = False
  graphdef, _ = nnx.split(
      nnx.eval_shape(lambda: model_lib.build_model(cfg.model, seed=cfg.seed, mesh=run.mesh)), nnx.Param)
  return dataclasses.replace(run, cfg=cfg, graphdef=graphdef), stacking.unstack_layers(params)


def build(cfg, devices=None, *, with_tokenizer: bool = True) -> Run:
  """Mesh, tokenizer, model structure, optimizer and shardings for ``cfg``.

  ``with_tokenizer=False`` skips the tokenizer (``Run.tokenizer`` is None), for
  benchmarks and tools that feed synthetic token ids.
  """
  config_lib.validate(cfg)
  devices = list(devices if devices is not None else jax.devices())
  # needs the target devices, so here rather than in validate
  attention.check_backend(cfg.model, devices[0])
  mesh = sharding.make_mesh(cfg.mesh, devices)
  sharding.check_batch(cfg.train, mesh)
  tok = tokenizer_lib.from_config(cfg.data, cfg.model.vocab_size) if with_tokenizer else None
  spec = pipeline.Spec.from_config(cfg)
  abstract_model = nnx.eval_shape(lambda: model_lib.build_model(cfg.model, seed=cfg.seed, mesh=mesh))
  graphdef, abstract_params = nnx.split(abstract_model, nnx.Param)
  tx, schedule = optim.make_optimizer(cfg)
  abstract_state = jax.eval_shape(lambda p: TrainState.create(p, tx), abstract_params)
  state_sh = sharding.state_shardings(abstract_state, mesh)
  abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                abstract_state, state_sh)
  return Run(cfg, mesh, graphdef, tok, spec, tx, schedule, state_sh, sharding.batch_sharding(mesh),
             abstract_state)


# ------------------------------------------------------------- memory fit


def jit_train_step(run: Run) -> Callable:
  """The jitted train step of ``run`` at its ``train.micro_batch``, state donated."""
  return jax.jit(make_train_step(run.graphdef, run.tx, run.schedule, run.cfg, run.mesh),
                 in_shardings=(run.state_shardings, run.batch_sharding),
                 out_shardings=(run.state_shardings, sharding.replicated(run.mesh)),
                 donate_argnums=0)


def with_micro_batch(run: Run, micro_batch: int) -> Run:
  cfg = copy.deepcopy(run.cfg)  # keeps micro_batch an untyped field (int or "auto")
  cfg.train.micro_batch = micro_batch
  return dataclasses.replace(run, cfg=cfg)


def train_step_memory(run: Run, micro_batch: int) -> memory.StepMemory:
  """XLA's memory analysis of the train step compiled at ``micro_batch`` (nothing runs)."""
  shape = (run.cfg.train.batch_size, run.cfg.train.seq_len)
  batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=run.batch_sharding)
           for k in ("inputs", "targets", "mask")}
  compiled = jit_train_step(with_micro_batch(run, micro_batch)).lower(run.abstract_state, batch).compile()
  mem = memory.StepMemory.of(compiled)
  if mem is None:
    raise UserError(f"the {jax.default_backend()} backend reports no memory analysis of a compiled "
                    "step, so train.micro_batch = auto cannot choose; set train.micro_batch to a number")
  return mem


def _local_devices(run: Run) -> list:
  return [d for d in run.mesh.devices.flat if d.process_index == jax.process_index()]


def largest_micro_batch(run: Run, capacity: int, known: dict[int, int] | None = None) -> int | None:
  """The largest micro-batch whose compiled train step needs at most ``capacity`` bytes per
  device (None if none does), by bisection over the divisors of the batch."""
  ways = int(np.prod([run.mesh.shape[a] for a in sharding.BATCH_AXES]))
  candidates = memory.micro_batch_candidates(run.cfg.train.batch_size, ways)
  return memory.largest_fitting(candidates, lambda m: train_step_memory(run, m).peak, capacity, known)


def fit_micro_batch(run: Run) -> Run:
  """``train.micro_batch = auto``: the run at the largest micro-batch whose compiled train
  step leaves :data:`memory.AUTO_MARGIN` of the memory budget free (logged); other runs as
  they are."""
  t = run.cfg.train
  if t.micro_batch != config_lib.AUTO:
    return run
  budget = memory.device_budget(t.memory_budget_gb, _local_devices(run))
  if budget is None:
    raise config_lib.ConfigError(
        f"config.train.micro_batch = 'auto' needs the device memory, which the {jax.default_backend()} "
        "devices do not report: set train.memory_budget_gb (GB per device) or a micro-batch")
  t0, known = time.perf_counter(), {}
  best = largest_micro_batch(run, budget.usable, known)
  if best is None:
    smallest = min(known)
    raise memory.OutOfMemoryError(
        f"train.micro_batch = auto: even micro-batch {smallest} does not fit: the train step needs "
        f"{memory.fmt_bytes(known[smallest])} per device, {memory.fmt_bytes(budget.usable)} usable "
        f"({budget.source}, less {memory.AUTO_MARGIN:.0%}); "
        + memory.advice(smallest, t.batch_size, None, run.cfg.model.remat))
  print(f"train.micro_batch = auto: {best} of {t.batch_size} (the train step needs "
        f"{memory.fmt_bytes(known[best])} per device; usable {memory.fmt_bytes(budget.usable)} = "
        f"{budget.source} less {memory.AUTO_MARGIN:.0%}; compiled at {sorted(known)} in "
        f"{time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
  return with_micro_batch(run, best)


def check_step_memory(run: Run, compiled) -> None:
  """Stops with one line (:class:`memory.OutOfMemoryError`) when the compiled train step
  needs more memory per device than the budget, naming the largest micro-batch that fits."""
  t = run.cfg.train
  budget = memory.device_budget(t.memory_budget_gb, _local_devices(run))
  need = memory.StepMemory.of(compiled) if budget is not None else None
  if need is None or need.peak <= budget.bytes:
    return
  micro = t.micro_batch or t.batch_size
  largest = largest_micro_batch(run, budget.usable, {micro: need.peak})
  raise memory.OutOfMemoryError(
      f"the train step does not fit: at micro-batch {micro} it needs {need.describe()}, but "
      f"{memory.fmt_bytes(budget.bytes)} are available ({budget.source}): "
      + memory.advice(micro, t.batch_size, largest, run.cfg.model.remat))


def guard_out_of_memory(run: Run, step_fn: Callable, compiled) -> Callable:
  """``step_fn`` whose XLA RESOURCE_EXHAUSTED at run time ends in one line, as
  :func:`check_step_memory`'s: what XLA asked for, what the compiled step needs, what
  there is, and what to change."""
  t = run.cfg.train

  def describe(e: BaseException) -> str:
    asked = memory.requested_bytes(e)
    need = memory.StepMemory.of(compiled)
    budget = memory.device_budget(t.memory_budget_gb, _local_devices(run))
    micro = t.micro_batch or t.batch_size
    if budget is not None and need is not None and need.peak <= budget.usable:
      todo = (f"the compiled step fits with {memory.AUTO_MARGIN:.0%} to spare, so other buffers hold "
              f"the memory: set train.memory_budget_gb below {budget.bytes / 1e9:.1f} (auto then leaves "
              f"room for them) or train.micro_batch below {micro}")
    else:
      largest = largest_micro_batch(run, budget.usable, {}) if budget is not None else None
      todo = memory.advice(micro, t.batch_size, largest, run.cfg.model.remat)
    return (f"the train step ran out of device memory at micro-batch {micro} (XLA RESOURCE_EXHAUSTED"
            + (f" allocating {memory.fmt_bytes(asked)}" if asked is not None else "") + ")"
            + (f"; the compiled step needs {need.describe()}" if need is not None else "")
            + (f"; {memory.fmt_bytes(budget.bytes)} available ({budget.source})" if budget is not None else "")
            + ": " + todo)

  return memory.guard(step_fn, describe)


def _out_of_memory_elsewhere(e: BaseException) -> str:
  """The one line for a RESOURCE_EXHAUSTED outside the train step call (evaluation, or
  surfacing later from an asynchronous step)."""
  first = str(e).strip().splitlines()[0] if str(e).strip() else "RESOURCE_EXHAUSTED"
  return (f"out of device memory ({first}): lower train.micro_batch (or set it to auto), set "
          "model.remat=block, or spread the state over more devices (mesh.fsdp)")


# ------------------------------------------------------------- metrics


def throughput_metrics(tokens_per_s: float, flops_per_token: float, peak_tflops: float | None
                       ) -> dict[str, float]:
  """``tflops_per_s`` (model FLOPs, :mod:`elas_jax.flops`), ``mfu`` where the device
  peak is known, and the first local device's peak memory where it reports it."""
  out = {"tflops_per_s": tokens_per_s * flops_per_token / 1e12}
  util = flops.mfu(tokens_per_s, flops_per_token, peak_tflops)
  if util is not None:
    out["mfu"] = util
  peak = flops.peak_memory_bytes()
  if peak is not None:
    out["peak_memory_bytes"] = peak
    out["peak_memory_gb"] = peak / 1e9
  return out


class ScalarEvents:
  """TensorBoard scalars written in the calling thread.

  The events of ``tensorboardX.SummaryWriter`` (same file name and records,
  including its ``purge_step``), through tensorboardX's synchronous
  ``EventsWriter``: SummaryWriter's background thread dies on a write error
  (a full disk) and the next writes then block forever on its full queue.
  """

  def __init__(self, logdir: str, purge_step: int):
    from tensorboardX.event_file_writer import EventsWriter
    from tensorboardX.proto.event_pb2 import Event, SessionLog

    os.makedirs(logdir, exist_ok=True)
    self.logdir = logdir
    self._events = EventsWriter(os.path.join(logdir, "events"))
    # TensorBoard discards the events from purge_step on (progress that was lost).
    self._events.write_event(Event(step=purge_step, file_version="brain.Event:2"))
    self._events.write_event(Event(step=purge_step, session_log=SessionLog(status=SessionLog.START)))
    self._events.flush()

  def write(self, step: int, scalars: dict[str, float]) -> None:
    from tensorboardX.proto.event_pb2 import Event
    from tensorboardX.summary import scalar

    now = time.time()
    for k, v in scalars.items():
      self._events.write_event(Event(wall_time=now, step=step, summary=scalar(k, v)))
    self._events.flush()

  def close(self) -> None:
    self._events.close()


class MetricWriter:
  """``metrics.jsonl`` (one object per logged step) and TensorBoard, on process 0.

  Both are flushed after every record; a write that fails raises here, naming
  the file (reported by :func:`storage.reported`).
  """

  def __init__(self, workdir: str, start_step: int):
    self.enabled = jax.process_index() == 0
    if not self.enabled:
      return
    # Records after the restored step belong to lost progress: drop them, and
    # have TensorBoard discard its events from there on (purge_step).
    checkpointing.truncate_metrics(workdir, start_step)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
    self._tb = ScalarEvents(os.path.join(workdir, "tensorboard"), purge_step=start_step + 1)

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    if not self.enabled:
      return
    with storage.naming(self._jsonl.name):
      self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
      self._jsonl.flush()
    with storage.naming(self._tb.logdir):
      self._tb.write(step, {k: v for k, v in metrics.items() if isinstance(v, (int, float))})

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


# ------------------------------------------------------------- the loop


def train_and_evaluate(cfg, workdir: str, *, stop_at_step: int | None = None,
                       devices=None) -> dict[str, Any]:
  """Trains (or resumes) ``cfg`` in ``workdir``; returns the final metrics.

  ``stop_at_step`` simulates a pre-emption after that step (checkpoint, then
  return), for tests of resumption. ``devices`` defaults to all devices. A full,
  read-only or vanished workdir raises :class:`storage.StorageError` (one line).
  """
  wandb_log.check_available(cfg)
  with storage.reported(workdir) as watch:  # creates the workdir
    compile_cache.configure(cfg.train.compile_cache, workdir)  # before anything compiles
    with checkpointing.WorkdirLock(workdir):
      return memory.guard(_train, _out_of_memory_elsewhere)(cfg, workdir, stop_at_step, devices,
                                                             watch)


def _train(cfg, workdir: str, stop_at_step: int | None, devices, watch: storage.Watch
           ) -> dict[str, Any]:
  from tqdm import tqdm

  run = fit_micro_batch(build(cfg, devices))  # train.micro_batch = auto -> a number
  cfg = run.cfg
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

  train_step = jit_train_step(run)
  eval_step = run.jit_eval_step()

  def save(step: int) -> None:
    checkpointing.save(mngr, step, state, data_iter, cfg)

  def check_finite(step: int) -> None:
    bad = int(state.bad_steps)
    if bad and not t.skip_nonfinite:
      last = mngr.latest_step()
      raise NonFiniteError(
          f"non-finite loss or gradients at step {int(state.first_bad_step)}: training stopped "
          f"(that update was not applied). Last good checkpoint: "
          f"{'step ' + str(last) if last is not None else 'none'} in {workdir}. Lower the lr, check "
          f"the data, or set train.skip_nonfinite=True to skip such batches")

  writer = wandb_log.with_wandb(MetricWriter(workdir, start), cfg, workdir)
  # tokens_per_s counts real (unmasked target) tokens: each step's count stays on the
  # device until the next record (no sync per step); with truncate_pad padding is not work done.
  interval_tokens: list[jax.Array] = []
  flops_per_token = flops.flops_per_token(cfg.model, t.seq_len)["total"]
  peak_tflops = flops.peak_tflops(cfg, run.mesh)  # None where unknown (CPU)
  profiler = profiling.StepProfiler(t.profile_steps, workdir)
  final: dict[str, Any] = {}
  bar = tqdm(total=t.steps, initial=start, unit="step", disable=jax.process_index() != 0,
             dynamic_ncols=True)
  compiled, compile_s = None, None
  failing = True  # until the loop completes: then closing errors are the ones to report
  try:
    with preemption.StopRequested(run.mesh) as stop:
      step = start
      while step < t.steps:
        batch = pipeline.global_batch(next(data_iter), run.batch_sharding)
        if compiled is None:  # compile explicitly, to report its time apart from step time
          t0, hits = time.perf_counter(), compile_cache.hits()
          compiled = train_step.lower(state, batch).compile()
          compile_s = time.perf_counter() - t0
          bar.write(f"train step compiled in {compile_s:.1f} s"
                    + (" (from the persistent compilation cache)" if compile_cache.hits() > hits else ""),
                    file=sys.stderr)
          check_step_memory(run, compiled)  # before it runs: one line if it cannot fit
          compiled = guard_out_of_memory(run, compiled, compiled)
          last_time, last_step = time.perf_counter(), step
        profiler.maybe_start(step)
        state, metrics = compiled(state, batch)
        interval_tokens.append(metrics["tokens"])
        profiler.maybe_stop(step, metrics)
        step += 1
        bar.update(1)
        watch.check()  # the workdir still there (writes to open files would go nowhere)
        checkpointing.raise_failed_save(mngr)  # a save that failed in orbax's background thread
        do_log = step % t.log_every == 0 or step == t.steps
        do_eval = step % t.eval_every == 0 or step == t.steps
        if do_log or do_eval:  # one metrics record per step, with "step" and "loss"
          check_finite(step)
          now = time.perf_counter()
          m = {k: float(v) for k, v in jax.device_get(metrics).items()}
          dt = (now - last_time) / max(step - last_step, 1)
          real_tokens = float(np.sum(jax.device_get(interval_tokens), dtype=np.float64))
          m.update(ppl=float(np.exp(min(m["loss"], 50.0))), step_time=dt,
                   tokens_per_s=real_tokens / max(now - last_time, 1e-9),
                   skipped_nonfinite=int(state.bad_steps))
          m.update(throughput_metrics(m["tokens_per_s"], flops_per_token, peak_tflops))
          if compile_s is not None:  # in the first record after (re)starting
            m["compile_s"], compile_s = compile_s, None
          postfix = {"loss": f"{m['loss']:.3f}", "tok_s": f"{m['tokens_per_s']:,.0f}"}
          if "mfu" in m:
            postfix["mfu"] = f"{100 * m['mfu']:.1f}%"
          if "peak_memory_gb" in m:
            postfix["mem"] = f"{m['peak_memory_gb']:.1f}GB"
          bar.set_postfix(postfix, refresh=False)
          if do_eval:
            ev = run.evaluate(eval_step, state.params, state.step, eval_batches)
            m.update(ev)
            final.update(ev)
            bar.write(f"step {step}: loss {m['loss']:.4f}  eval_loss {ev['eval_loss']:.4f}  "
                      f"eval_ppl {ev['eval_ppl']:.2f} ({ev['eval_tokens']:,} tokens)", file=sys.stderr)
          writer.write(step, m)
          last_time, last_step = time.perf_counter(), step  # evaluation time is not step time
          interval_tokens = []
        if step % t.ckpt_every == 0 or step == t.steps:
          check_finite(step)
          save(step)
        stop_signal = stop.agreed()  # every step, on every process: all stop after the same one
        if stop_signal or (stop_at_step is not None and step >= stop_at_step):
          check_finite(step)
          if mngr.latest_step() != step:
            save(step)
          bar.write(f"{stop_signal or 'stop_at_step'}: checkpointed step {step}; rerun the same "
                    "command to resume", file=sys.stderr)
          break
      if start >= t.steps:  # already finished: report the final evaluation again
        final.update(run.evaluate(eval_step, state.params, state.step, eval_batches))
    mngr.wait_until_finished()
    failing = False
  finally:
    storage.close_all(profiler.close, bar.close, writer.close, mngr.close, failing=failing)
  final["step"] = int(state.step)
  return final
