"""The 2:4-sparse FFN core and its implementations: one table, one entry point.

``sparse_ffn(h, w_in, w_out, sparse_on, kernel=..., mesh=...)`` computes
``sparsify_24(relu(h @ w_inᵀ)²) @ w_outᵀ`` (and its statistics) with the
implementation ``config.model.kernel`` names:

  ``xla``     :func:`elas_jax.ops.sparsity.relu2_sparse_ffn`, pure JAX (the ground truth)
  ``triton``  the Pallas kernels of ``kernels/elas_ffn.py`` (Pallas' Triton lowering;
              interpreted on CPU); ``pallas`` is its old name and still accepted
  ``mosaic``  the Pallas Mosaic GPU kernels of ``kernels/elas_ffn_mosaic.py`` (Hopper:
              TMA, wgmma; jax >= 0.11; interpreted on CPU)
  ``auto``    for the devices the step is compiled for (the mesh's, not this
              process's): on a GPU the first of :data:`AUTO_ORDER` that serves the
              call, elsewhere ``xla``

An implementation that cannot serve a call (a dtype, a shape, a GPU, a jax
version) raises ``NotImplementedError`` with the reason when it is traced;
``auto`` then logs the reason and falls through to the next one (tokamax's
pattern); an explicit choice fails with that reason.

Every implementation has the same arguments, results and gradients. A Pallas
call is opaque to XLA's SPMD partitioner, which would gather the whole batch
onto every device; on a mesh whose batch axes split the tokens, such an
implementation runs in ``shard_map`` over those axes with the (small,
low-rank) weights whole on every device, and its statistics are averaged over
the shards (split mode then permutes tokens within a shard). The mesh is an
argument, never read from ambient state.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
from absl import logging
from jax.sharding import PartitionSpec as P

from elas_jax import sharding
from elas_jax.ops import sparsity
from elas_jax.targets import spec

FfnFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


@dataclasses.dataclass(frozen=True)
class Implementation:
  """One way to compute the FFN core.

  ``make(device)`` returns the function ``(h, w_in, w_out, sparse_on, *,
  mode, dense_fraction) -> (out, stats)`` compiled for devices like ``device``
  (one of the mesh's, perhaps of a deviceless GPU topology), e.g. a kernel in
  interpret mode off GPUs, with the tile table of its GPU on one.
  ``per_device``: an opaque custom call, run per device under ``shard_map``.
  """

  make: Callable[[str], FfnFn]
  per_device: bool


def _xla(device) -> FfnFn:
  del device  # XLA compiles it for any backend
  return sparsity.relu2_sparse_ffn


def _gpu_target(device) -> str | None:
  """The name of ``device``'s GPU target (its tile table), None off GPUs or for an
  unknown GPU (the kernels then take the H200's table)."""
  if sharding.platform_of(device) != "gpu":
    return None
  target = spec.for_device(device)
  return None if target is None else target.name


def _triton(device) -> FfnFn:
  from kernels import elas_ffn  # the repository's kernels package (see kernels/__init__.py)

  interpret = sharding.platform_of(device) != "gpu"
  target = _gpu_target(device)

  def fn(h, w_in, w_out, sparse_on, *, mode, dense_fraction):
    return elas_ffn.elas_ffn(h, w_in, w_out, sparse_on, mode=mode, dense_fraction=dense_fraction,
                             interpret=interpret, target=target)

  return fn


def _mosaic(device) -> FfnFn:
  from kernels import elas_ffn_mosaic

  interpret = sharding.platform_of(device) != "gpu"
  if not interpret:
    target = spec.for_device(device)
    if target is not None and target.compute_capability[0] != 9:
      raise NotImplementedError(f"the Mosaic GPU kernels need a Hopper GPU (sm_90); "
                                f"{device.device_kind} is sm_{''.join(map(str, target.compute_capability))}")

  def fn(h, w_in, w_out, sparse_on, *, mode, dense_fraction):
    return elas_ffn_mosaic.elas_ffn(h, w_in, w_out, sparse_on, mode=mode,
                                    dense_fraction=dense_fraction, interpret=interpret)

  return fn


IMPLEMENTATIONS: dict[str, Implementation] = {
    "xla": Implementation(_xla, per_device=False),
    "triton": Implementation(_triton, per_device=True),
    "mosaic": Implementation(_mosaic, per_device=True),
}
ALIASES = {"pallas": "triton"}  # names saved configs may hold
# What ``auto`` tries, in order, by the compile target's platform.
AUTO_ORDER = {"gpu": ("mosaic", "triton", "xla")}
DEFAULT_ORDER = ("xla",)
KERNELS = ("auto", *IMPLEMENTATIONS, *ALIASES)  # the values of config.model.kernel
_LOGGED: set[str] = set()


def platform(mesh: jax.sharding.Mesh | None) -> str:
  """The platform of the devices a step on ``mesh`` is compiled for (None: this
  process's devices)."""
  return sharding.platform_of(sharding.target_device(mesh))


def resolve_kernel(kernel: str, mesh: jax.sharding.Mesh | None) -> tuple[str, ...]:
  """The implementations ``kernel`` (a ``config.model.kernel`` value) may run on ``mesh``,
  in the order tried: one for an explicit choice, :data:`AUTO_ORDER`'s for ``auto``."""
  kernel = ALIASES.get(kernel, kernel)
  if kernel == "auto":
    return AUTO_ORDER.get(platform(mesh), DEFAULT_ORDER)
  if kernel not in IMPLEMENTATIONS:
    raise ValueError(f"unknown FFN kernel {kernel!r}; expected one of {', '.join(KERNELS)}")
  return (kernel,)


def _batch_axes(mesh: jax.sharding.Mesh | None) -> tuple[str, ...]:
  """The mesh axes that split the tokens (those of size > 1)."""
  if mesh is None:
    return ()
  return tuple(a for a in sharding.BATCH_AXES if a in mesh.axis_names and mesh.shape[a] > 1)


def sparse_ffn(h: jax.Array, w_in_FxK: jax.Array, w_out_NxF: jax.Array, sparse_on: jax.Array, *,
               kernel: str, mode: str, dense_fraction: float,
               mesh: jax.sharding.Mesh | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """``sparsify_24(relu(h @ w_inᵀ)²) @ w_outᵀ`` and its statistics, by ``kernel``.

  Arguments and results as :func:`elas_jax.ops.sparsity.relu2_sparse_ffn`
  (``h`` is ``[B, L, K]`` in the model, split over the mesh's batch axes);
  ``mesh`` is the mesh the step is compiled for (None: one device).
  """
  names = resolve_kernel(kernel, mesh)
  for i, name in enumerate(names):
    try:
      return _run(name, h, w_in_FxK, w_out_NxF, sparse_on, mode=mode, dense_fraction=dense_fraction,
                  mesh=mesh)
    except NotImplementedError as e:
      if i == len(names) - 1:
        raise
      why = f"model.kernel = {kernel}: {name} cannot serve this FFN ({e}); trying {names[i + 1]}"
      if why not in _LOGGED:  # once per reason, not per traced layer
        _LOGGED.add(why)
        logging.warning(why)
  raise AssertionError("unreachable")


def _run(name: str, h, w_in_FxK, w_out_NxF, sparse_on, *, mode, dense_fraction, mesh):
  impl = IMPLEMENTATIONS[name]
  fn = impl.make(sharding.target_device(mesh))

  def local(h, w_in, w_out, sparse_on):
    return fn(h, w_in, w_out, sparse_on, mode=mode, dense_fraction=dense_fraction)

  batch = _batch_axes(mesh) if impl.per_device else ()
  if not batch:
    return local(h, w_in_FxK, w_out_NxF, sparse_on)

  def sharded(h, w_in, w_out, sparse_on):
    out, stats = local(h, w_in, w_out, sparse_on)
    return out, jax.tree.map(lambda s: jax.lax.pmean(s, batch), stats)

  return jax.shard_map(sharded, mesh=mesh, in_specs=(P(batch), P(), P(), P()),
                       out_specs=(P(batch), P()), check_vma=False)(h, w_in_FxK, w_out_NxF, sparse_on)
