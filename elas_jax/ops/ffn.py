"""The 2:4-sparse FFN core in the model: an implementation chosen for the compile target.

``sparse_ffn(h, w_in, w_out, sparse_on, kernel=..., mesh=...)`` computes
``sparsify_24(relu(h @ w_inᵀ)²) @ w_outᵀ`` (and its statistics) with the
implementation ``config.model.kernel`` names, from the one table of
implementations, :data:`elas_kernels.ffn.IMPLEMENTATIONS` (``xla``, ``triton``,
``mosaic``, ``mosaic_ws``, ``mosaic_sparse``; ``pallas`` is ``triton``'s old name and still
accepted), or
``auto``: for the devices the step is compiled for (the mesh's, not this
process's), on a GPU the first of :data:`AUTO_ORDER` that serves the call,
elsewhere ``xla``.

Each implementation is built for the mesh's devices: Pallas kernels interpreted
off GPUs, and on a GPU given that GPU's facts (tile tables, SMs, shared memory:
:class:`elas_kernels.gpu.GpuSpec` from :mod:`elas_jax.targets`). One that cannot
serve a call (a dtype, a shape, a GPU, a jax version) raises
``NotImplementedError`` with the reason when it is traced; ``auto`` then logs
the reason and falls through to the next one (tokamax's pattern); an explicit
choice fails with that reason.

Every implementation has the same arguments, results and gradients. A Pallas
call is opaque to XLA's SPMD partitioner, which would gather the whole batch
onto every device; on a mesh whose batch axes split the tokens, such an
implementation (``per_device``) runs in ``shard_map`` over those axes with the
(small, low-rank) weights whole on every device, and its statistics are
averaged over the shards (split mode then permutes tokens within a shard). The
mesh is an argument, never read from ambient state.
"""

from __future__ import annotations

import jax
from absl import logging
from jax.sharding import PartitionSpec as P

from elas_jax import sharding
from elas_jax.targets import spec
from elas_kernels import ffn as kernel_ffn

IMPLEMENTATIONS = kernel_ffn.IMPLEMENTATIONS  # name -> FfnCore subclass: the one table
ALIASES = {"pallas": "triton"}  # names saved configs may hold
# What ``auto`` tries, in order, by the compile target's platform.
# mosaic_ws first: where it serves (ranks <= 256) the static model puts it at 0.6-0.75x
# mosaic's time (docs/kernels.md); both are unverified on a GPU so far. mosaic_sparse (sparse
# tensor cores by inline PTX) stays out until its gpu tests pass on an H100 / H200.
AUTO_ORDER = {"gpu": ("mosaic_ws", "mosaic", "triton", "xla")}
DEFAULT_ORDER = ("xla",)
KERNELS = ("auto", *IMPLEMENTATIONS, *ALIASES)  # the values of config.model.kernel
_LOGGED: set[str] = set()


def build(name: str, device) -> kernel_ffn.FfnCore:
  """Implementation ``name`` built for devices like ``device`` (one of the mesh's, perhaps
  of a deviceless GPU topology): interpreted off GPUs, given the GPU's facts on one (an
  unknown GPU: the kernels' defaults)."""
  on_gpu = sharding.platform_of(device) == "gpu"
  target = spec.for_device(device) if on_gpu else None
  return IMPLEMENTATIONS[name](interpret=not on_gpu,
                               gpu=None if target is None else target.gpu_spec())


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

  Arguments and results as :class:`elas_kernels.ffn.FfnCore`
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
  op = build(name, sharding.target_device(mesh))

  def local(h, w_in, w_out, sparse_on):
    return op(h, w_in, w_out, sparse_on, mode=mode, dense_fraction=dense_fraction)

  batch = _batch_axes(mesh) if op.per_device else ()
  if not batch:
    return local(h, w_in_FxK, w_out_NxF, sparse_on)

  def sharded(h, w_in, w_out, sparse_on):
    out, stats = local(h, w_in, w_out, sparse_on)
    return out, jax.tree.map(lambda s: jax.lax.pmean(s, batch), stats)

  return jax.shard_map(sharded, mesh=mesh, in_specs=(P(batch), P(), P(), P()),
                       out_specs=(P(batch), P()), check_vma=False)(h, w_in_FxK, w_out_NxF, sparse_on)
