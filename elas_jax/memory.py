"""Measures what a function keeps for its backward pass (activation memory).

JAX's ``saved_residuals`` lists every array autodiff saves between forward
and backward, found by tracing (nothing is allocated, so the 1B shapes cost
nothing). To keep only token-proportional *activations* (not parameters or
their casted copies), each function is traced at batch 1 and batch 2 and the
difference is taken: ``per_token = (bytes(B=2) - bytes(B=1)) / tokens``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import numpy as np

try:  # public printing helper; the list form lives in the same module
  from jax._src.ad_checkpoint import saved_residuals as _saved_residuals
except ImportError:  # pragma: no cover - depends on the jax release
  _saved_residuals = None


@dataclasses.dataclass(frozen=True)
class Residual:
  shape: tuple[int, ...]
  dtype: str
  bytes_per_token: float
  source: str


def residuals(fn: Callable, *args) -> list[tuple[tuple[int, ...], np.dtype, str]]:
  """``(shape, dtype, source)`` of every array ``fn`` saves for backward."""
  if _saved_residuals is None:
    raise RuntimeError("this jax release has no jax._src.ad_checkpoint.saved_residuals; "
                       "use jax.ad_checkpoint.print_saved_residuals instead")
  out = []
  for aval, source in _saved_residuals(fn, *args):
    out.append((tuple(aval.shape), np.dtype(aval.dtype), source))
  return out


def _nbytes(shape, dtype) -> int:
  return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def token_residuals(make_args: Callable[[int], Sequence], fn: Callable, tokens_per_batch: int
                    ) -> list[Residual]:
  """Residuals of ``fn(*make_args(batch))`` that grow with the batch.

  Args:
    make_args: batch size -> the arguments of ``fn`` (e.g. abstract arrays).
    fn: a scalar-valued function (the thing to differentiate).
    tokens_per_batch: tokens in one batch row (the sequence length).
  """
  r1 = residuals(fn, *make_args(1))
  r2 = residuals(fn, *make_args(2))
  if len(r1) != len(r2):
    raise RuntimeError("the traced function saves a different set of arrays at batch 1 and 2")
  out = []
  for (s1, d1, src), (s2, _, _) in zip(r1, r2):
    grow = _nbytes(s2, d1) - _nbytes(s1, d1)
    if grow:
      out.append(Residual(s1, d1.name, grow / tokens_per_batch, src))
  return out


def total_bytes_per_token(res: Sequence[Residual]) -> float:
  return float(sum(r.bytes_per_token for r in res))
