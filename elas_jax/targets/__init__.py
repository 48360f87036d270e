"""Compile for a GPU without one: targets, deviceless topologies, compile reports.

Independent of the model and trainer: give it a function and abstract inputs.

    from elas_jax import targets

    tgt = targets.get("h200")              # Target: SMs, smem, registers, HBM, peaks
    mesh = targets.make_mesh("h200", (8,), ("data",), hosts=1, gpus_per_host=8)
    rep = targets.compile_for_target(step, *abstract_args, target=tgt, mesh=mesh)
    rep.compiled, rep.reason               # did XLA's GPU pipeline (Triton, ptxas) accept it
    rep.memory                             # memory_analysis(): argument/output/alias/temp/peak
    rep.kernels                            # KernelInfo per kernel: grid, threads, smem,
                                           #   registers, spills, programs/SM, waves
    print(rep.table())                     # the custom kernels (Pallas, cuDNN, Mosaic GPU)

API:
  * :func:`get` (``"h200"``, ``"h100"``, ``"a100"``) -> :class:`Target`, read
    from the ``*.textproto`` beside this file (``GpuTargetConfigProto`` text,
    the numbers of XLA's GPU specs) plus the bf16 peak of ``elas_jax.flops``.
    ``Target.programs_per_sm`` / ``Target.waves`` are the occupancy arithmetic;
    ``Target.ridge_flops_per_byte`` the roofline ridge. :func:`for_device`: the
    target of a device (a mesh's), by its ``device_kind``.
  * :func:`topology` / :func:`make_mesh` (``hosts``, ``gpus_per_host``): compile-only
    devices (``device_kind`` = the target's) and a ``jax.sharding.Mesh`` of them.
  * :func:`compile_for_target` (fn, *ShapeDtypeStructs, target=, mesh=,
    fail_on_spill=, ...) -> :class:`CompileReport`. Lowers under
    ``jax.sharding.use_abstract_mesh(mesh.abstract_mesh)`` and compiles with
    XLA dump options scoped to that compile; never raises for a compiler
    refusal. ``fail_on_spill=True`` adds XLA's own spill gate.
  * :class:`Roofline` / :func:`markdown` (from :mod:`elas_kernels.roofline`, at a
    ``Target.gpu_spec()``'s peaks): FLOPs and bytes -> intensity and the lower-bound time.
  * :func:`check_environment` / :func:`plugin_available` / :func:`deviceless_env`:
    the CUDA plugin must be importable (``pip install "jax[cuda12]==<jax version>"``)
    and the process run with ``JAX_PLATFORMS=cpu JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1``;
    :class:`MissingCudaPlugin` names what is missing.

Importing this package needs only jax; the compile functions need the plugin.
"""

from elas_jax.targets.compile import (ENV, CompileReport, KernelInfo, MissingCudaPlugin,
                                      abstract_args, check_environment, compile_for_target,
                                      deviceless_env, install_hint, make_mesh, one_line,
                                      parse_thunk_metadata, parse_thunk_sequence, plugin_available,
                                      ptxas_resources, target_context, topology)
from elas_jax.targets.spec import TARGETS, Target, config_path, for_device, get
from elas_kernels.roofline import Roofline, markdown

__all__ = [
    "ENV", "TARGETS", "CompileReport", "KernelInfo", "MissingCudaPlugin", "Roofline", "Target", "markdown",
    "abstract_args", "check_environment", "compile_for_target", "config_path", "deviceless_env", "for_device",
    "get", "install_hint", "make_mesh", "one_line", "parse_thunk_metadata", "parse_thunk_sequence",
    "plugin_available", "ptxas_resources", "target_context", "topology",
]
