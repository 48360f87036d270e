"""The FFN core's implementations: the one table, and a call by name.

    from elas_kernels import ffn
    out, stats = ffn.elas_ffn(h, w_in, w_out, sparse_on, mode="masked", implementation="triton")
    op = ffn.IMPLEMENTATIONS["mosaic"](interpret=True, block_f=128)   # an FfnCore
    out, stats = op(h, w_in, w_out, sparse_on, mode="split")

Every implementation subclasses :class:`~elas_kernels.ffn.base.FfnCore` (the
checks, the reference, the statistics) and implements only its kernels. A new
backend: one module with an ``FfnCore`` subclass, one line here; the model's
dispatch, the configs, lm-eval, generation, the benchmarks and the shared test
suite (tests/test_ffn_core.py) read this table.
"""

from __future__ import annotations

import jax

from elas_kernels.ffn import base
from elas_kernels.ffn.mosaic import MosaicFfn, MosaicSparseFfn, MosaicWsFfn
from elas_kernels.ffn.triton import TritonFfn
from elas_kernels.ffn.xla import XlaFfn
from elas_kernels.gpu import GpuSpec

IMPLEMENTATIONS: dict[str, type[base.FfnCore]] = {
    "xla": XlaFfn,  # XLA ops: any backend; the CPU default
    "triton": TritonFfn,  # Pallas Triton kernels: NVIDIA GPUs (Ampere and newer)
    "mosaic": MosaicFfn,  # Pallas Mosaic GPU kernels: Hopper
    "mosaic_ws": MosaicWsFfn,  # the same, forward and dh warp-specialized (ranks <= 256)
    # the 2:4 products on Hopper's sparse tensor cores (inline PTX; opt-in, unverified on a GPU)
    "mosaic_sparse": MosaicSparseFfn,
}


def elas_ffn(h: jax.Array, w_in_FxK: jax.Array, w_out_NxF: jax.Array, sparse_on: jax.Array | bool,
             *, mode: base.BackwardMode = "masked", dense_fraction: float = 0.05,
             implementation: str = "xla", interpret: bool | None = None,
             gpu: GpuSpec | None = None, **options) -> tuple[jax.Array, base.Stats]:
  """``sparsify_24(relu(h @ w_inᵀ)²) @ w_outᵀ`` and its statistics by ``implementation``
  (:mod:`elas_kernels.ffn.base` has the semantics); ``options``: the backend's own (tiles)."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"unknown FFN implementation {implementation!r}; expected one of "
                     f"{', '.join(IMPLEMENTATIONS)}")
  op = IMPLEMENTATIONS[implementation](interpret=interpret, gpu=gpu, **options)
  return op(h, w_in_FxK, w_out_NxF, sparse_on, mode=mode, dense_fraction=dense_fraction)
