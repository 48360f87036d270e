"""What the Mosaic GPU kernels need from jax, across versions and the interpreter.

The ELAS Mosaic GPU kernels (this package) are written
against the Pallas Mosaic GPU API that jax 0.11.2 (the H200 benchmark machine)
and 0.12 (the CPU tests) share. This module holds the few places where they
differ, and the workarounds for what jax's Mosaic GPU *interpreter* (CPU,
``interpret=True``) cannot run yet. Measured on jax 0.10.2, 0.11.2 and
0.12.0.1 (interpreter on CPU; deviceless lowering + ptxas for sm_90a with
jax[cuda12] 0.11.2 and 0.12.0.1):

- ``plgpu.load``: 0.11 takes ``(src, idx, *, layout)``, 0.12 ``(src, *,
  layout)``; :func:`load` indexes the ref first (``src.at[...]``), which both accept.
- The interpreter's ``wgmma`` reads its A operand from shared memory only: a
  register A operand (``wgmma(acc, value, b_smem)``, FlashAttention-3's P
  tile) fails with "Expected shape (6,)" (jax 0.11.2, 0.12.0.1 and jax main
  of 2026-08). :func:`wgmma_a` stages the value through a shared-memory
  buffer when interpreting and passes registers on the GPU.
- The interpreter refuses TMA reduce-add (``copy_smem_to_gmem(...,
  reduction_op="add")``: "reduction_op not supported", jax 0.12.0.1):
  :func:`reduce_add_zeros`, :func:`copy_smem_to_gmem_add` and
  :func:`reduce_add_total` give each split its own slab when interpreting and
  sum the slabs in XLA.
- The interpreter has no ref reshapes (``ReshapeTransform``):
  :func:`store_as` / :func:`load_as` reshape the value instead.
- The interpreter cannot run a predicated ``copy_smem_to_gmem`` (what
  ``plgpu.emit_pipeline``'s ``out_specs`` issue), nor a functional ``wgmma``
  (what ``pl.run_state`` + ``plgpu.ACC.init`` lower to): the kernels write
  their pipelined outputs with plain copies and accumulate into
  ``pl.run_scoped`` accumulators. No shim needed; noted so they stay that way.
- Mosaic GPU (0.11.2 and 0.12) converts a 2-element register vector of bools
  (2 bits) to no wider type, and lowers a boolean ``not`` through such a
  conversion: the kernels count with selects and write selection without ``not``.
- jax 0.10.2 (Python 3.11): the interpreter lacks transposed wgmma operands
  (``TransposeTransform`` has no ``indices``), which the kernels need (and
  nothing was checked on that version's GPU lowering): :func:`unavailable_reason`
  says so and the op raises ``NotImplementedError``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

MIN_JAX = (0, 11)


def _jax_version() -> tuple[int, int]:
  major, minor = jax.__version__.split(".")[:2]
  return int(major), int(minor)


@functools.cache
def unavailable_reason() -> str | None:
  """Why the Mosaic GPU kernels cannot run with this jax, or None if they can."""
  if _jax_version() < MIN_JAX:
    return (f"the Mosaic GPU kernels need jax >= {MIN_JAX[0]}.{MIN_JAX[1]} (installed: "
            f"{jax.__version__}; its Mosaic GPU interpreter lacks transposed wgmma operands)")
  try:
    from jax.experimental.pallas import mosaic_gpu as plgpu
  except ImportError as e:  # pragma: no cover - a jaxlib without Mosaic GPU
    return f"jax.experimental.pallas.mosaic_gpu does not import: {e}"
  missing = [n for n in ("kernel", "emit_pipeline", "wgmma", "InterpretGPUParams", "layout_cast")
             if not hasattr(plgpu, n)]
  if missing:
    return f"this jax's Mosaic GPU API lacks {', '.join(missing)}"
  return None


def require() -> None:
  """Raise ``NotImplementedError`` with the reason when Mosaic GPU is unusable."""
  reason = unavailable_reason()
  if reason:
    raise NotImplementedError(reason)


def plgpu():
  """The ``jax.experimental.pallas.mosaic_gpu`` module (imported lazily)."""
  from jax.experimental.pallas import mosaic_gpu

  return mosaic_gpu


def kernel(body, *, out_shape, scratch, grid, grid_names, interpret: bool,
           num_threads: int | None = None, thread_name: str | None = None,
           cluster: tuple[int, ...] = (), cluster_names: tuple[str, ...] = (),
           compiler_params=None, detect_races: bool = False):
  """``plgpu.kernel`` with the interpreter when asked.

  One warpgroup per program by default. ``num_threads`` warpgroups per program,
  indexed by the axis ``thread_name`` (warp specialization: a producer and its
  consumers); ``cluster`` CTAs per cluster on the axes ``cluster_names`` (TMA
  multicast through ``BlockSpec(collective_axes=...)``); ``compiler_params`` a
  ``plgpu.CompilerParams`` (its default lowering semantics is Warpgroup since jax
  0.11: pass it explicitly where it matters). ``detect_races``: the interpreter's
  race detector (a real synchronization checker: barriers, ``commit_smem``, TMA
  completion); ignored when compiling, so one call serves both."""
  mg = plgpu()
  kw = {}
  if interpret:
    kw["interpret"] = (mg.InterpretGPUParams(detect_races=True) if detect_races
                       else mg.InterpretGPUParams())
  if num_threads is not None:
    kw.update(num_threads=num_threads, thread_name=thread_name)
  if cluster:
    kw.update(cluster=cluster, cluster_names=cluster_names)
  if compiler_params is not None:
    kw["compiler_params"] = compiler_params
  return mg.kernel(body, out_type=out_shape, scratch_types=scratch, grid=grid,
                   grid_names=grid_names, **kw)


def swizzle_transforms(dtype, minor: int) -> tuple:
  """Tiling + swizzle for a shared-memory tile whose minor dimension has ``minor``
  elements: the layout TMA writes and ``wgmma`` reads (swizzle = min(128, row bytes))."""
  mg = plgpu()
  itemsize = jnp.dtype(dtype).itemsize
  swizzle = mg.find_swizzle(minor * itemsize * 8)
  return (mg.TilingTransform((8, swizzle // itemsize)), mg.SwizzleTransform(swizzle))


def smem(shape, dtype, swizzled: bool = True):
  """A shared-memory scratch buffer; ``swizzled`` for tiles that TMA or wgmma touch."""
  mg = plgpu()
  tr = swizzle_transforms(dtype, shape[-1]) if swizzled else ()
  return mg.SMEM(tuple(shape), dtype, transforms=tr)


def load(ref, layout=None):
  """Load a (sliced) shared-memory ref into registers, in ``layout`` (WGMMA by default)."""
  mg = plgpu()
  return mg.load(ref, layout=mg.Layout.WGMMA if layout is None else layout)


def wgmma_a(acc_ref, a: jax.Array, b_ref, stage_ref, interpret: bool) -> None:
  """``acc += a @ b`` with ``a`` in registers (GPU) or staged through ``stage_ref``
  (a shared-memory buffer of ``a``'s shape, allocated only when interpreting)."""
  mg = plgpu()
  if interpret:
    stage_ref[...] = a
    mg.wgmma(acc_ref, stage_ref, b_ref)
  else:
    mg.wgmma(acc_ref, a, b_ref)


def reduce_add_zeros(shape, dtype, splits: int, interpret: bool):
  """The zeroed fp32 buffer (a mutable ``jax.Ref``, passed to the kernel as an input)
  that ``splits`` programs add their partial sums into with
  :func:`copy_smem_to_gmem_add`: ``shape``, or one slab per split (``[splits,
  *shape]``) when interpreting. :func:`reduce_add_total` reads the sum."""
  return jax.new_ref(jnp.zeros((splits, *shape) if interpret else tuple(shape), dtype))


def copy_smem_to_gmem_add(src_ref, out_ref, idx, split, interpret: bool) -> None:
  """``out[idx] += src`` by TMA reduce-add (``copy_smem_to_gmem(reduction_op="add")``),
  for split ``split``. The interpreter refuses ``reduction_op`` ("reduction_op not
  supported", jax 0.12.0.1): there each split writes its own slab instead."""
  mg = plgpu()
  if interpret:
    mg.copy_smem_to_gmem(src_ref, out_ref.at[split].at[idx])
  else:
    mg.copy_smem_to_gmem(src_ref, out_ref.at[idx], reduction_op="add")


def reduce_add_total(out_ref, interpret: bool) -> jax.Array:
  """The sum of the partial sums in a :func:`reduce_add_zeros` buffer (the slabs
  summed in XLA when interpreting)."""
  out = out_ref[...]
  return out.sum(0) if interpret else out


def store_as(ref, value: jax.Array, interpret: bool) -> None:
  """Store ``value`` into ``ref`` of another shape with the same bytes (row-major)."""
  if interpret:
    ref[...] = value.reshape(ref.shape)
  else:
    ref.reshape(*value.shape)[...] = value


def load_as(ref, shape: tuple[int, ...], interpret: bool) -> jax.Array:
  """Load ``ref`` viewed as ``shape`` (same bytes, row-major) in the WGMMA layout."""
  if interpret:
    return ref[...].reshape(shape)
  return load(ref.reshape(*shape))


def zeros(shape, dtype, layout) -> jax.Array:
  """Zeros in a given register layout (loop carries must have one)."""
  return plgpu().layout_cast(jnp.zeros(shape, dtype), layout)
