"""Device memory: what a function keeps for backward, and whether a compiled step fits.

Part 1, activation memory (:func:`token_residuals`, used by the model summary):

The residuals of ``jax.vjp`` are the arrays autodiff keeps between forward
and backward. They are found by tracing (``jax.make_jaxpr``; nothing is
allocated, so the 1B shapes cost nothing) and de-duplicated by identity, so
an array referenced twice counts once. To keep only token-proportional
*activations* (not parameters or their casted copies), each function is traced
at batch 1 and batch 2 and the difference taken:
``per_token = (bytes(B=2) - bytes(B=1)) / tokens_per_batch_row``.

Part 2, whether a compiled step fits (:class:`StepMemory`, :class:`Budget`,
:func:`largest_fitting`, :func:`guard`; used by the trainer): XLA's buffer
assignment of the compiled train step (``memory_analysis()``, per device) is
compared with the memory budget before the step runs; ``train.micro_batch =
auto`` bisects the micro-batches by compiling the step at each; an XLA
RESOURCE_EXHAUSTED at run time becomes the same one-line
:class:`OutOfMemoryError`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Sequence

import jax
import jax.extend.core as jex_core
import numpy as np

from elas_jax.errors import UserError


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


# --------------------------------------------------------------------------
# Does a compiled step fit the device? (``train.memory_budget_gb``, ``train.micro_batch = auto``)
# --------------------------------------------------------------------------

# ``micro_batch = auto`` keeps this fraction of the budget free: XLA's buffer
# assignment is exact for the step itself, but the allocator fragments, and the
# next batch, the evaluation step's temporaries and the runtime's own buffers
# live beside it.
AUTO_MARGIN = 0.10


class OutOfMemoryError(UserError):
  """A step needs more device memory than there is (or than the configured budget)."""


@dataclasses.dataclass(frozen=True)
class StepMemory:
  """XLA's buffer assignment of one compiled program, bytes per device."""

  argument: int  # inputs (the train state and the batch)
  output: int
  alias: int  # outputs written into donated inputs
  temp: int  # everything else live at some point: activations kept for backward, gradients, ...

  @property
  def peak(self) -> int:
    """What the program needs at once (donated outputs reuse their input buffers)."""
    return self.argument + self.output - self.alias + self.temp

  @classmethod
  def of(cls, compiled) -> "StepMemory | None":
    """From ``compiled.memory_analysis()``; None where the backend does not report it."""
    try:
      m = compiled.memory_analysis()
    except Exception:  # not every backend / jax version reports it
      return None
    if m is None:
      return None
    return cls(*(int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias", "temp")))

  def describe(self) -> str:
    return (f"{fmt_bytes(self.peak)} per device (arguments {fmt_bytes(self.argument)} + outputs "
            f"{fmt_bytes(self.output)} - donated {fmt_bytes(self.alias)} + temporaries {fmt_bytes(self.temp)})")


@dataclasses.dataclass(frozen=True)
class Budget:
  """The device memory a step may use, and where that number comes from."""

  bytes: int
  source: str  # e.g. "train.memory_budget_gb = 0.02" or "the memory of NVIDIA H100 80GB HBM3"

  @property
  def usable(self) -> int:
    """What ``micro_batch = auto`` may fill: the budget less :data:`AUTO_MARGIN`."""
    return int(self.bytes * (1.0 - AUTO_MARGIN))


def fmt_bytes(n: float) -> str:
  return f"{n / 1e9:.2f} GB" if abs(n) >= 1e9 else f"{n / 1e6:.2f} MB"


def device_budget(budget_gb: float, devices: Sequence) -> Budget | None:
  """``train.memory_budget_gb`` (GB = 1e9 bytes) when > 0, else the smallest memory of
  ``devices`` as their allocator reports it (``memory_stats()["bytes_limit"]``);
  None where neither is known (CPU reports no memory size)."""
  if budget_gb:
    return Budget(int(budget_gb * 1e9), f"train.memory_budget_gb = {budget_gb:g}")
  limits = []
  for d in devices:
    try:
      stats = d.memory_stats()
    except Exception:  # some backends raise instead of returning None
      stats = None
    if not stats or "bytes_limit" not in stats:
      return None
    limits.append((int(stats["bytes_limit"]), d))
  if not limits:
    return None
  limit, device = min(limits, key=lambda x: x[0])
  return Budget(limit, f"the memory of one {device.device_kind} (its allocator's bytes_limit; "
                       "train.memory_budget_gb overrides)")


def micro_batch_candidates(batch_size: int, ways: int) -> list[int]:
  """The micro-batches a step can run: divisors of ``batch_size`` that are multiples of
  the ``ways`` (data x fsdp devices) the batch is split over, ascending."""
  return [m for m in range(ways, batch_size + 1, ways) if batch_size % m == 0]


def largest_fitting(candidates: Sequence[int], peak_of: Callable[[int], int], capacity: int,
                    known: dict[int, int] | None = None) -> int | None:
  """The largest of the ascending ``candidates`` whose ``peak_of(m) <= capacity``; None when
  even the smallest does not fit.

  The largest is tried first (it often fits), then bisection (a step's memory does not
  fall as its micro-batch grows): at most ``1 + ceil(log2(len(candidates)))`` calls of
  ``peak_of`` (each a compile), fewer with ``known`` peaks (micro-batch -> bytes)
  measured before; ``known`` gets every peak measured.
  """
  known = {} if known is None else known

  def fits(i: int) -> bool:
    m = candidates[i]
    if m not in known:
      known[m] = peak_of(m)
    return known[m] <= capacity

  if fits(len(candidates) - 1):
    return candidates[-1]
  lo, hi = -1, len(candidates) - 1  # candidates[hi] does not fit; all up to lo do (-1: none known)
  while hi - lo > 1:
    mid = (lo + hi) // 2
    lo, hi = (mid, hi) if fits(mid) else (lo, mid)
  return candidates[lo] if lo >= 0 else None


def advice(micro_batch: int, batch_size: int, largest: int | None, remat: str) -> str:
  """What to change, for a step at ``micro_batch`` that does not fit: the largest
  micro-batch that fits with the auto margin (``largest``, None when none does), remat."""
  out = []
  if largest is not None and largest < micro_batch:
    out.append(f"set train.micro_batch={largest} (the largest whose step fits with "
               f"{AUTO_MARGIN:.0%} to spare; or train.micro_batch=auto)")
  elif largest is None:
    out.append(f"no micro-batch fits (tried down to the smallest divisor of train.batch_size = "
               f"{batch_size} that the devices split)")
  if remat != "block":
    out.append("set model.remat=block (recompute each block's activations in the backward pass)")
  out.append("or spread the state over more devices (mesh.fsdp)")
  return "; ".join(out)


_ALLOCATION = re.compile(r"allocat\w*\s+(\d+)\s+bytes")


def is_out_of_memory(e: BaseException) -> bool:
  """Whether ``e`` is XLA's RESOURCE_EXHAUSTED (an allocation that did not fit)."""
  return isinstance(e, jax.errors.JaxRuntimeError) and "RESOURCE_EXHAUSTED" in str(e)


def requested_bytes(e: BaseException) -> int | None:
  """The allocation size XLA's out-of-memory message names, if it names one."""
  m = _ALLOCATION.search(str(e))
  return int(m.group(1)) if m else None


def guard(fn: Callable, describe: Callable[[BaseException], str]) -> Callable:
  """``fn`` whose RESOURCE_EXHAUSTED becomes :class:`OutOfMemoryError` with the one line
  ``describe(error)``; every other exception passes unchanged."""

  def call(*args, **kwargs):
    try:
      return fn(*args, **kwargs)
    except Exception as e:
      if is_out_of_memory(e):
        raise OutOfMemoryError(describe(e)) from e
      raise

  return call
