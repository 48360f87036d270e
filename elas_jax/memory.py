"""Measures what a function keeps for its backward pass (activation memory).

The residuals of ``jax.vjp`` are the arrays autodiff keeps between forward
and backward. They are found by tracing (``jax.make_jaxpr``; nothing is
allocated, so the 1B shapes cost nothing) and de-duplicated by identity, so
an array referenced twice counts once. To keep only token-proportional
*activations* (not parameters or their casted copies), each function is traced
at batch 1 and batch 2 and the difference taken:
``per_token = (bytes(B=2) - bytes(B=1)) / tokens_per_batch_row``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import jax.extend.core as jex_core
import numpy as np


@dataclasses.dataclass(frozen=True)
class Residual:
  shape: tuple[int, ...]
  dtype: str
  bytes_per_token: float
  source: str


def _describe(var, producers, invars) -> str:
  if var in invars:
    return "an input of the function"
  eqn = producers.get(var)
  if eqn is None:
    return "a constant"
  where = ""
  try:  # source locations are a private but long-lived jax utility
    from jax._src import source_info_util
    where = " at " + source_info_util.summarize(eqn.source_info)
  except Exception:  # pragma: no cover
    pass
  return f"output of {eqn.primitive.name}{where}"


def residuals(fn: Callable, *args) -> list[tuple[tuple[int, ...], np.dtype, str]]:
  """``(shape, dtype, source)`` of every distinct array ``fn`` keeps for backward."""

  def vjp_residuals(*args):
    return jax.tree.leaves(jax.vjp(fn, *args)[1])

  jaxpr = jax.make_jaxpr(vjp_residuals)(*args).jaxpr
  producers = {v: e for e in jaxpr.eqns for v in e.outvars}
  invars = set(jaxpr.invars)
  seen, out = set(), []
  for v in jaxpr.outvars:
    if isinstance(v, jex_core.Literal) or v in seen:
      continue  # literals, or an array already counted
    seen.add(v)
    out.append((tuple(v.aval.shape), np.dtype(v.aval.dtype), _describe(v, producers, invars)))
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
    raise RuntimeError("the traced function keeps a different set of arrays at batch 1 and 2")
  out = []
  for (s1, d1, src), (s2, _, _) in zip(r1, r2):
    grow = _nbytes(s2, d1) - _nbytes(s1, d1)
    if grow:
      out.append(Residual(s1, d1.name, grow / tokens_per_batch, src))
  return out


def total_bytes_per_token(res: Sequence[Residual]) -> float:
  return float(sum(r.bytes_per_token for r in res))
