"""The 2:4-sparse squared-ReLU FFN core, ``sparsify_24(relu(h @ w_inᵀ)²) @ w_outᵀ``.

  ``base``    the contract: argument checks, the plain-jnp reference, the statistics,
              the :class:`~elas_kernels.ffn.base.FfnCore` base class
  ``api``     the table of implementations and :func:`~elas_kernels.ffn.api.elas_ffn`
  ``xla``     XLA ops (any backend)
  ``triton``  Pallas Triton kernels
  ``mosaic``  Pallas Mosaic GPU kernels (Hopper)
"""

from elas_kernels.ffn.api import IMPLEMENTATIONS, elas_ffn
from elas_kernels.ffn.base import (BACKWARD_MODES, SAVED_24_NAME, FfnCore, check_args,
                                   check_options, reference)

__all__ = ["BACKWARD_MODES", "IMPLEMENTATIONS", "SAVED_24_NAME", "FfnCore", "check_args",
           "check_options", "elas_ffn", "reference"]
