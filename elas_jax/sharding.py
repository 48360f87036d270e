"""Device mesh and parameter / batch shardings.

The mesh has three axes: ``data`` (pure data parallelism), ``fsdp`` (data
parallel with parameters and optimizer state sharded) and ``tensor`` (tensor
parallelism inside a layer). Parameters carry logical axis names
(``logical_axes`` metadata, see :mod:`elas_jax.model`); :data:`RULES` maps
them to mesh axes. A dimension that a mesh axis does not divide stays
replicated along it (e.g. the 1B FFN width 8191). Batches are split over
``data x fsdp``; XLA's sharding propagation places the activations.
"""

from __future__ import annotations

import collections
import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from elas_jax.errors import ConfigError, UserError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
RULES = {
    "embed": "fsdp",     # d_model
    "vocab": "tensor",   # vocabulary rows of embed / lm_head
    "mlp": "tensor",     # FFN width
    "heads": "tensor",   # attention projection outputs (heads x head_dim)
    "rank": None,        # the low-rank dimension: small, kept whole
    "layers": None,      # the stacked-layer axis of scan_layers: scanned over, never sharded
}


def mesh_shape(mesh_cfg, n_devices: int) -> tuple[int, int, int]:
  """Sizes of (data, fsdp, tensor); one of them may be -1 (= the rest)."""
  sizes = [mesh_cfg[a] for a in MESH_AXES]  # each a positive int or -1 (config_lib.validate)
  if sizes.count(-1) > 1:
    raise ConfigError("config.mesh: at most one of data, fsdp, tensor may be -1")
  fixed = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if n_devices % fixed:
      raise ConfigError(f"config.mesh: the fixed axes ({fixed} devices) do not divide the "
                        f"{n_devices} available devices")
    sizes[sizes.index(-1)] = n_devices // fixed
  if math.prod(sizes) != n_devices:
    raise ConfigError(f"config.mesh = data {sizes[0]} x fsdp {sizes[1]} x tensor {sizes[2]} needs "
                      f"{math.prod(sizes)} devices but {n_devices} are available")
  return tuple(sizes)


def parse_mesh(text: str | None, flag: str = "--mesh") -> tuple[int, int, int] | None:
  """``"data,fsdp,tensor"`` (e.g. ``-1,1,1``) -> a tuple; None for an empty flag."""
  if not text:
    return None
  try:
    mesh = tuple(int(x) for x in text.split(","))
  except ValueError:
    mesh = ()
  if len(mesh) != 3:
    raise UserError(f"{flag}={text!r}: expected three integers data,fsdp,tensor")
  return mesh


def _device_count_phrase(devices) -> str:
  """How ``devices`` spread over processes, when more than one: what to check
  when a multi-host job sees fewer devices than its mesh needs."""
  per_process = collections.Counter(d.process_index for d in devices)
  if len(per_process) < 2:
    return ""
  low, high = min(per_process.values()), max(per_process.values())
  each = f"{low}" if low == high else f"{low} to {high}"
  return (f" ({len(per_process)} processes with {each} local device(s) each; under SLURM see the "
          "README, 'Devices, meshes and clusters')")


def make_mesh(mesh_cfg, devices=None) -> jax.sharding.Mesh:
  """The (data, fsdp, tensor) mesh over ``devices`` (default: all of the job's).

  Checks the job's device count against the config's mesh first: a one-line
  :class:`ConfigError` naming both numbers (and, on a multi-process job, the
  devices per process), before anything is compiled.
  """
  devices = list(devices if devices is not None else jax.devices())
  try:
    shape = mesh_shape(mesh_cfg, len(devices))
  except ConfigError as e:
    raise ConfigError(f"{e}{_device_count_phrase(devices)}") from None
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


def spec_for(shape: tuple[int, ...], logical_axes, mesh: jax.sharding.Mesh) -> P:
  """PartitionSpec of one parameter: its logical axes mapped by :data:`RULES`."""
  if not logical_axes:
    return P()
  parts = []
  for dim, name in zip(shape, logical_axes):
    axis = RULES.get(name)
    if axis is not None and (mesh.shape[axis] == 1 or dim % mesh.shape[axis]):
      axis = None  # a size-1 axis adds nothing; a non-dividing one cannot shard
    parts.append(axis)
  return P(*parts)


def state_shardings(abstract_state, mesh: jax.sharding.Mesh):
  """NamedShardings for a (possibly abstract) train state or parameter state, same structure.

  Every array inside an ``nnx.Variable`` (the parameters, and the optimizer
  moments, which optax builds by mapping over the parameters and so carry the
  same logical-axis metadata) is sharded by :data:`RULES`; everything else
  (step counters, Adam counts) is replicated.
  """
  rep = replicated(mesh)

  def one(leaf):
    if not isinstance(leaf, nnx.Variable):
      return rep
    shape = jax.tree.leaves(leaf)[0].shape
    spec = spec_for(tuple(shape), getattr(leaf, "logical_axes", None), mesh)
    # Keep the Variable wrapper so the result flattens exactly like the state.
    return leaf.replace(value=NamedSharding(mesh, spec))

  return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def micro_batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """``[k, B/k, ...]`` micro-batches: each one split over data x fsdp like a batch."""
  return NamedSharding(mesh, P(None, BATCH_AXES))


def check_batch(train_cfg, mesh: jax.sharding.Mesh) -> None:
  """The global batch and each micro-batch must split evenly over data x fsdp."""
  ways = int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
  if train_cfg.batch_size % ways:
    raise ConfigError(f"config.train.batch_size = {train_cfg.batch_size} is not divisible by the "
                      f"{ways}-way data x fsdp split of the mesh")
  micro = train_cfg.micro_batch or train_cfg.batch_size
  if isinstance(micro, int) and micro % ways:  # "auto" picks among the multiples of ways
    raise ConfigError(f"config.train.micro_batch = {micro} is not divisible by the {ways}-way "
                      f"data x fsdp split of the mesh; use a multiple of {ways}")


def target_device(mesh: jax.sharding.Mesh | None = None):
  """A device of the compile target: the mesh's first device (a deviceless GPU
  topology's included), or this process's first device without a mesh. Choices
  that depend on the hardware (kernels, attention, peak FLOP/s) read this, not
  ``jax.default_backend()``, so a CPU process compiling for a GPU takes the GPU's paths."""
  return mesh.devices.flat[0] if mesh is not None else jax.devices()[0]


def platform_of(device) -> str:
  """``"gpu"`` for CUDA / ROCm devices (deviceless topologies report ``gpu`` too), else
  the device's platform (``"cpu"``, ``"tpu"``)."""
  return "gpu" if device.platform in ("gpu", "cuda", "rocm") else device.platform
