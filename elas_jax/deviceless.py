"""The project's steps compiled for a GPU without one: train, eval and decode.

:func:`compile_steps` builds a config's run on a deviceless topology of a GPU
target (:mod:`elas_jax.targets`: ``hosts x gpus_per_host`` GPUs, the config's
data / fsdp / tensor mesh over them), and compiles with XLA's GPU pipeline
(Triton and ptxas included) what training, evaluation and generation run:

  ``train``    the jitted train step (forward, backward, optimizer, guard) at the
               config's micro-batch (``train.micro_batch``; 0 = the whole batch)
  ``eval``     the jitted evaluation step on one batch
  ``prefill``  / ``decode``  the KV-cache steps of :class:`elas_jax.decode.Generator`

Every choice that depends on the hardware (``model.kernel`` and
``model.attention`` = ``auto``, the kernels' interpret switch and tile table)
is made for the target's devices, so the programs are those a process on such
GPUs compiles. Memory is XLA's buffer assignment per device
(``memory_analysis()``); the largest micro-batch that fits is fitted, as
``benchmarks/step_memory.py`` does, from a second train-step compile at twice
(or half) the micro-batch: ``peak = fixed + micro_batch x per_sequence``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any

from elas_jax import config_lib
from elas_jax.errors import ConfigError
from elas_jax.targets import compile as tc, spec

PROGRAMS = ("train", "eval", "prefill", "decode")


def linear_fit(points: dict[int, float]) -> tuple[float, float] | None:
  """``(fixed, per_unit)`` of ``value = fixed + x * per_unit`` through the two smallest
  ``x`` of ``points`` (None with fewer than two, or no growth)."""
  if len(points) < 2:
    return None
  x1, x2 = sorted(points)[:2]
  slope = (points[x2] - points[x1]) / (x2 - x1)
  if slope <= 0:
    return None
  return points[x1] - slope * x1, slope


def max_fitting(fixed: float, per_unit: float, capacity: float, multiple: int = 1) -> int:
  """The largest multiple of ``multiple`` with ``fixed + x * per_unit <= capacity`` (>= 0)."""
  x = math.floor((capacity - fixed) / per_unit) if per_unit > 0 else 0
  return max(0, x - x % multiple)


@dataclasses.dataclass
class StepsReport:
  """What :func:`compile_steps` found (memory is per device)."""

  target: str
  devices: int
  mesh: tuple[int, int, int]  # data, fsdp, tensor
  micro_batch: int  # sequences per forward/backward pass, over all devices
  programs: dict[str, tc.CompileReport]
  fit_points: dict[int, int] = dataclasses.field(default_factory=dict)  # micro-batch -> train peak
  memory_bytes: int = 0  # one device's memory

  @property
  def compiled(self) -> bool:
    return all(r.compiled for r in self.programs.values())

  @property
  def failures(self) -> list[str]:
    return [f"{name}: {r.reason}" for name, r in self.programs.items() if not r.compiled]

  @property
  def peak_bytes(self) -> int | None:
    return self.programs["train"].peak_bytes if "train" in self.programs else None

  @property
  def fit(self) -> tuple[float, float] | None:
    return linear_fit({b: float(p) for b, p in self.fit_points.items()})

  @property
  def max_micro_batch(self) -> int | None:
    """The largest micro-batch (a multiple of data x fsdp) whose train step fits one device."""
    fit = self.fit
    if fit is None:
      return None
    return max_fitting(*fit, self.memory_bytes, multiple=self.mesh[0] * self.mesh[1])

  def kernels(self) -> list[dict[str, Any]]:
    """The custom kernels (Pallas, cuDNN, Mosaic GPU) of every program."""
    out = []
    for name, r in self.programs.items():
      for k in r.custom_kernels():
        out.append({"program": name, **k.as_dict()})
    return out

  def as_dict(self) -> dict[str, Any]:
    return {"compiled": self.compiled, "target": self.target, "devices": self.devices,
            "mesh": list(self.mesh), "micro_batch": self.micro_batch,
            "peak_bytes": self.peak_bytes, "max_micro_batch": self.max_micro_batch,
            "memory_bytes": self.memory_bytes, "fit_points": self.fit_points,
            "failures": self.failures,
            "programs": {n: {"compiled": r.compiled, "reason": r.reason, "memory": r.memory,
                             "compile_s": round(r.compile_s, 1)} for n, r in self.programs.items()},
            "kernels": self.kernels()}


def _train_program(run, cfg):
  import jax
  import jax.numpy as jnp

  from elas_jax import trainer

  step = jax.jit(trainer.make_train_step(run.graphdef, run.tx, run.schedule, cfg, run.mesh),
                 in_shardings=(run.state_shardings, run.batch_sharding), donate_argnums=0)
  shape = (cfg.train.batch_size, cfg.train.seq_len)
  batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=run.batch_sharding)
           for k in ("inputs", "targets", "mask")}
  return step, (run.abstract_state, batch)


def _eval_program(run, cfg):
  import jax
  import jax.numpy as jnp

  step = run.jit_eval_step()
  shape = (cfg.train.batch_size, cfg.train.seq_len)
  batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=run.batch_sharding)
           for k in ("inputs", "targets", "mask")}
  return step, (run.abstract_state.params, run.abstract_state.step, batch)


def _decode_programs(cfg, devices, batch: int):
  """The Generator's prefill (a prompt bucket of half the sequence) and decode step."""
  import jax
  import jax.numpy as jnp

  from elas_jax import decode, model as model_lib, sharding, trainer

  flat = cfg.copy_and_resolve_references()
  run = trainer.build(flat, devices, with_tokenizer=False)
  params = run.abstract_state.params
  max_len = flat.train.seq_len
  gen = decode.Generator(run.graphdef, params, flat.model, batch_size=batch, max_len=max_len,
                         sparse_on=True, eos_id=1, pad_id=0, mesh=run.mesh)
  rows = jax.sharding.NamedSharding(run.mesh, jax.sharding.PartitionSpec(sharding.BATCH_AXES))
  rep = sharding.replicated(run.mesh)
  cache = jax.eval_shape(lambda: model_lib.init_cache(flat.model, gen.batch, max_len))
  layer = jax.sharding.NamedSharding(run.mesh, jax.sharding.PartitionSpec(None, sharding.BATCH_AXES))
  cache = jax.tree.map(lambda c: jax.ShapeDtypeStruct(c.shape, c.dtype, sharding=layer), cache)
  S = jax.ShapeDtypeStruct
  key = jax.eval_shape(lambda: jax.random.key(0))
  key = S(key.shape, key.dtype, sharding=rep)
  on = S((), jnp.bool_, sharding=rep)
  prompt = S((gen.batch, decode.bucket(max_len // 2, max_len)), jnp.int32, sharding=rows)
  vec = S((gen.batch,), jnp.int32, sharding=rows)
  return {"prefill": (gen._prefill, (params, cache, prompt, vec, on, key)),
          "decode": (gen._decode, (params, cache, vec, vec, on, key))}


def compile_steps(cfg, target: str | spec.Target = "h200", *, hosts: int = 1, gpus_per_host: int = 1,
                  micro_batch: int | None = None, mesh: tuple[int, int, int] | None = None,
                  programs=PROGRAMS, fit: bool = True, decode_batch: int | None = None,
                  log=lambda s: None) -> StepsReport:
  """Compile ``cfg``'s programs for ``hosts x gpus_per_host`` GPUs of ``target``.

  ``micro_batch`` overrides ``train.micro_batch`` (it must divide the batch),
  ``mesh`` the config's ``(data, fsdp, tensor)`` (one may be -1). ``fit``: one
  more train-step compile for the largest fitting micro-batch. ``decode_batch``:
  the generation batch (default: 8 rows per data x fsdp way). Needs the jax CUDA
  plugin (:func:`elas_jax.targets.check_environment`); a compiler refusal is a
  result (``report.compiled`` False, the reason per program), never an exception.
  """
  from elas_jax import sharding, trainer

  tgt = spec.get(target) if isinstance(target, str) else target
  if micro_batch is None and cfg.train.micro_batch == config_lib.AUTO:
    raise ConfigError("config.train.micro_batch = 'auto' is chosen on the training devices; give a "
                      "micro-batch to compile (--micro-batch N); the report names the largest that fits")
  cfg = copy.deepcopy(cfg)  # not copy_and_resolve_references: micro_batch stays an untyped field
  if mesh is not None:
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = mesh
  if micro_batch is not None:
    cfg.train.micro_batch = int(micro_batch)
  config_lib.validate(cfg)
  devices = list(tc.topology(tgt, hosts=hosts, gpus_per_host=gpus_per_host).devices)
  sizes = sharding.mesh_shape(cfg.mesh, len(devices))
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = sizes
  run = trainer.build(cfg, devices, with_tokenizer=False)
  micro = cfg.train.micro_batch or cfg.train.batch_size
  report = StepsReport(tgt.name, len(devices), tuple(sizes), micro, {}, memory_bytes=tgt.memory_bytes)

  def one(name, fn, args):
    log(f"compiling {name} for {len(devices)} x {tgt.device_kind} (mesh data {sizes[0]} x fsdp "
        f"{sizes[1]} x tensor {sizes[2]}) ...")
    r = tc.compile_for_target(fn, *args, target=tgt, mesh=run.mesh)
    log(f"  {name}: {'compiled' if r.compiled else 'NOT compiled: ' + str(r.reason)} "
        f"in {r.compile_s:.0f} s" + (f", peak {r.peak_bytes / 1e9:.2f} GB per device" if r.compiled else ""))
    return r

  if "train" in programs:
    report.programs["train"] = one("train", *_train_program(run, cfg))
    if report.programs["train"].compiled:
      report.fit_points[micro] = report.programs["train"].peak_bytes
  if "eval" in programs:
    report.programs["eval"] = one("eval", *_eval_program(run, cfg))
  if "prefill" in programs or "decode" in programs:
    ways = sizes[0] * sizes[1]
    for name, (fn, args) in _decode_programs(cfg, devices, decode_batch or 8 * ways).items():
      if name in programs:
        report.programs[name] = one(name, fn, args)
  if fit and report.fit_points:
    other = _other_micro_batch(cfg, micro, sizes[0] * sizes[1])
    if other is not None:
      cfg2 = cfg.copy_and_resolve_references()
      cfg2.train.micro_batch = other
      r = one(f"train at micro-batch {other} (for the fit)",
              *_train_program(trainer.build(cfg2, devices, with_tokenizer=False), cfg2))
      if r.compiled:
        report.fit_points[other] = r.peak_bytes
  return report


def _other_micro_batch(cfg, micro: int, ways: int) -> int | None:
  """A second micro-batch for the memory fit: twice ``micro`` when that divides the
  batch, else half (a multiple of the data x fsdp ways), else none."""
  for other in (2 * micro, micro // 2):
    if other and other % ways == 0 and cfg.train.batch_size % other == 0 and other != micro:
      return other
  return None


def check_micro_batch(cfg, micro_batch: int | None) -> None:
  """A ``--micro-batch`` that cannot work, named before anything compiles."""
  if micro_batch is None:
    return
  if micro_batch <= 0 or cfg.train.batch_size % micro_batch:
    raise ConfigError(f"--micro-batch={micro_batch}: must be a positive divisor of train.batch_size = "
                      f"{cfg.train.batch_size}")
