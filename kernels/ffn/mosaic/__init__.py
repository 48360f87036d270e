"""The ``mosaic`` FFN core: Pallas Mosaic GPU kernels for Hopper (TMA, wgmma).

  ``plan``    tiles, the static plan of a call, kernel specs and shared-memory budgets
  ``bodies``  the kernel bodies and :func:`~elas_kernels.ffn.mosaic.bodies.launch`
  ``vjp``     the op: operands padded and permuted, kernels launched, ``jax.custom_vjp``;
              :class:`~elas_kernels.ffn.mosaic.vjp.MosaicFfn` and ``MosaicWsFfn`` (the
              warp-specialized forward), ``MosaicSparseFfn`` (sparse tensor cores)
  ``sparse_mma`` Hopper's ``wgmma.mma_async.sp`` by inline PTX, and its CPU emulator
  ``compat``  what jax versions and the CPU interpreter need
"""

from elas_kernels.ffn.mosaic.plan import KernelSpec, Tiles, default_tiles, kernel_specs
from elas_kernels.ffn.mosaic.vjp import MosaicFfn, MosaicSparseFfn, MosaicWsFfn

__all__ = ["KernelSpec", "MosaicFfn", "MosaicSparseFfn", "MosaicWsFfn", "Tiles", "default_tiles", "kernel_specs"]
