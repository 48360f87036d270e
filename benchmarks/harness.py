"""What the benchmarks share: result rows, timing, error measure, memory analysis, tables.

    from benchmarks import harness
    timer = harness.Timer(repeats=20, warmup=3, min_time_s=0.01)
    bench = harness.Bench(timer, dry_run=False)
    out = bench.run(harness.Row("1b", 65536, "ffn", "pallas", "elas_ffn"), fn, args)
    print("\\n".join(harness.markdown_table(["op", "ms"], [[r.op, harness.fmt(r.time_ms)]
                                                           for r in bench.rows], "lr")))

Timing: compiled once (``jit(...).lower().compile()``), warm-up calls, then
the median of ``repeats`` device-synchronised measurements; each measurement
runs enough back-to-back calls to last ``min_time_s`` so that dispatch
overhead does not dominate small kernels. ``kind="do_bench"`` uses
``triton.testing.do_bench`` when importable (falls back to wall clock).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
# The config file of each model size (paths relative to ROOT; plain strings, so that
# benchmarks also run where ml_collections is missing, e.g. the H200 image).
CONFIG_FILES = {"tiny": "configs/tiny.py", "60m": "configs/llama_60m.py", "130m": "configs/llama_130m.py",
                "350m": "configs/llama_350m.py", "1b": "configs/llama_1b.py"}
# The variants the speed and memory benchmarks compare (CoLA is a quality baseline).
VARIANTS = ("full", "loro", "loro_relu2", "elas")


@dataclasses.dataclass
class Row:
  """One measured row of a benchmark (``results.json`` keeps them as dicts)."""

  size: str
  tokens: int
  group: str  # ffn | sparsify | spmm | copy
  impl: str  # pallas | xla_dense | xla_sparse | xla
  op: str
  pass_: str = ""  # fwd | fwd+bwd | "" (kernels)
  mode: str = ""
  status: str = "ok"
  time_ms: float | None = None
  min_ms: float | None = None
  samples_ms: list[float] = dataclasses.field(default_factory=list)
  compile_s: float | None = None
  bytes: int | None = None  # compulsory traffic (kernel rows)
  gbps: float | None = None
  pct_copy: float | None = None
  vs_dense: float | None = None  # time(XLA dense) / time(this)
  vs_sparse: float | None = None  # time(XLA sparse) / time(this)
  max_rel_err: float | None = None  # pallas vs XLA sparse: max |Δ| / max |ref|
  xla_buffers: dict[str, int] | None = None  # compiled.memory_analysis()


# --------------------------------------------------------------------------
# Timing.
# --------------------------------------------------------------------------


def seconds_per_call(call: Callable[[], Any], n: int) -> float:
  """Wall time of ``n`` back-to-back (asynchronous) calls, synchronised once at the end."""
  start = time.perf_counter()
  out = None
  for _ in range(n):
    out = call()
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / n


@dataclasses.dataclass
class Timer:
  repeats: int
  warmup: int
  min_time_s: float
  kind: str = "wall"  # wall | do_bench

  def __post_init__(self):
    if self.kind == "do_bench":
      try:
        from triton.testing import do_bench  # noqa: F401
      except Exception as e:  # not on the H200 image (no jax-triton / torch): wall clock
        print(f"note: triton.testing.do_bench unavailable ({type(e).__name__}); timing by wall clock")
        self.kind = "wall"

  def measure(self, call: Callable[..., Any], setup: Callable[[], Any] | None = None
              ) -> tuple[list[float], Any]:
    """Seconds per call (one or more samples) and the last output.

    With ``setup``, every call is ``call(setup())`` and every sample one call, the
    setup untimed and finished first: for calls that consume their argument (a
    donated buffer, e.g. a KV cache) and so cannot run back to back.
    """
    if setup is not None:
      return self._measure_each(call, setup)
    out = None
    for _ in range(self.warmup):
      out = call()
    jax.block_until_ready(out)
    if self.kind == "do_bench":
      try:
        return self._do_bench(call), out
      except Exception as e:  # e.g. triton without torch: its events need a torch stream
        print(f"note: do_bench failed ({short_error(e)}); timing by wall clock from here on")
        self.kind = "wall"
    one = seconds_per_call(call, 1)
    inner = int(min(1000, max(1, round(self.min_time_s / max(one, 1e-9)))))
    return [seconds_per_call(call, inner) for _ in range(self.repeats)], out

  def _measure_each(self, call: Callable[[Any], Any], setup: Callable[[], Any]) -> tuple[list[float], Any]:
    out = None
    for _ in range(self.warmup):
      out = jax.block_until_ready(call(setup()))
    samples = []
    for _ in range(self.repeats):
      arg = jax.block_until_ready(setup())
      start = time.perf_counter()
      out = jax.block_until_ready(call(arg))
      samples.append(time.perf_counter() - start)
    return samples, out

  def _do_bench(self, call) -> list[float]:
    from triton.testing import do_bench

    # The block inside makes the measurement synchronous whatever stream JAX uses.
    fn = lambda: jax.block_until_ready(call())
    try:
      ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
    except TypeError:  # older triton: quantiles instead of return_mode
      ms = do_bench(fn, warmup=25, rep=100, quantiles=[0.5])
      ms = ms[0] if isinstance(ms, (list, tuple)) else ms
    return [ms / 1e3]


def is_oom(e: BaseException) -> bool:
  msg = str(e)
  return "RESOURCE_EXHAUSTED" in msg or "out of memory" in msg.lower()


def short_error(e: BaseException) -> str:
  first = (str(e).strip().splitlines() or [""])[0]
  return f"{type(e).__name__}: {first[:160]}"


def nbytes(tree) -> int:
  """Bytes of all array leaves (arrays or ``ShapeDtypeStruct``)."""
  return int(sum(np.prod(x.shape, dtype=np.int64) * np.dtype(x.dtype).itemsize
                 for x in jax.tree.leaves(tree)))


def memory_analysis(compiled) -> dict[str, int] | None:
  """XLA's buffer assignment of a compiled function: argument, output, temp, alias, total bytes."""
  try:
    m = compiled.memory_analysis()
    out = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "output", "temp", "alias")}
    out["total"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
    return out
  except Exception:  # not every backend / jax version reports it
    return None


class Bench:
  """Runs and records the rows of one process."""

  def __init__(self, timer: Timer, dry_run: bool):
    self.timer, self.dry_run = timer, dry_run
    self.rows: list[Row] = []

  def run(self, row: Row, fn: Callable, args: tuple, io_bytes: bool = False) -> Any:
    """Compile, time and record ``fn(*args)``; returns its output (None on failure)."""
    self.rows.append(row)
    try:
      if self.dry_run:  # trace only: checks shapes and plumbing, allocates nothing
        out = jax.eval_shape(fn, *args)
        row.status = "traced"
      else:
        start = time.perf_counter()
        compiled = jax.jit(fn).lower(*args).compile()
        row.compile_s = time.perf_counter() - start
        row.xla_buffers = memory_analysis(compiled)
        samples, out = self.timer.measure(lambda: compiled(*args))
        row.samples_ms = [s * 1e3 for s in samples]
        row.time_ms, row.min_ms = statistics.median(row.samples_ms), min(row.samples_ms)
      if io_bytes:
        row.bytes = nbytes(args) + nbytes(out)
      return out
    except Exception as e:  # a missing module, a kernel that fails, an OOM: report, go on
      row.status = ("skipped: out of memory " if is_oom(e) else "error: ") + short_error(e)
      print(f"  {row.size} T={row.tokens} {row.op} {row.pass_}: {row.status}")
      return None

  def error(self, out, ref) -> float | None:
    """:func:`rel_err` of a row's output, None when there is none to compare (dry run, failure)."""
    if self.dry_run or out is None or ref is None:
      return None
    try:
      return rel_err(out, ref, strict=False)
    except Exception:
      return None


# --------------------------------------------------------------------------
# Error measure.
# --------------------------------------------------------------------------


def rel_err(out, ref, *, strict: bool = True) -> float:
  """``max |out - ref| / max |ref|`` over the matching leaves of two pytrees (worst leaf).

  The one error measure of the tests and the benchmarks (a wrong kernel's speed
  means nothing). ``strict`` (the tests): the trees must have the same leaves and
  shapes, and uint8 leaves (2:4 metadata) must be equal (else ``inf``). Non-finite
  entries must be equal (NaN to NaN, inf to inf; else ``inf``) and the rest is measured.
  ``strict=False`` (benchmark rows): leaves whose shapes differ and uint8 leaves
  are skipped.
  """
  outs, refs = jax.tree.leaves(out), jax.tree.leaves(ref)
  if strict and len(outs) != len(refs):
    raise ValueError(f"rel_err: {len(outs)} leaves against {len(refs)}")
  worst = 0.0
  for o, r in zip(outs, refs):
    if o.shape != r.shape:
      if strict:
        raise ValueError(f"rel_err: shape {o.shape} against {r.shape}")
      continue
    if o.dtype == jnp.uint8 or r.dtype == jnp.uint8:
      if strict and not np.array_equal(np.asarray(o), np.asarray(r)):
        return float("inf")
      continue
    o, r = np.asarray(o, np.float32), np.asarray(r, np.float32)
    bad = ~(np.isfinite(o) & np.isfinite(r))
    if bad.any():  # NaN / inf must match exactly: a NaN would vanish in max() below
      if not np.array_equal(o[bad], r[bad], equal_nan=True):
        return float("inf")
      o, r = o[~bad], r[~bad]
    scale = max(float(np.max(np.abs(r), initial=0.0)), 1e-30)
    worst = max(worst, float(np.max(np.abs(o - r), initial=0.0)) / scale)
  return worst


# --------------------------------------------------------------------------
# Tables.
# --------------------------------------------------------------------------


def fmt(v, spec: str = ".3f", suffix: str = "") -> str:
  """A number for a table cell; ``-`` for a missing one."""
  return "-" if v is None else f"{v:{spec}}{suffix}"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], align: str) -> list[str]:
  """Lines of a markdown table; ``align`` has one letter per column, ``l`` or ``r``."""
  if len(align) != len(headers) or set(align) - {"l", "r"}:
    raise ValueError(f"markdown_table: align {align!r} must be one l/r per column of {list(headers)}")
  lines = ["| " + " | ".join(headers) + " |",
           "|" + "".join("---|" if a == "l" else "---:|" for a in align)]
  for row in rows:
    if len(row) != len(headers):
      raise ValueError(f"markdown_table: row {list(row)} has {len(row)} cells, not {len(headers)}")
    lines.append("| " + " | ".join(str(c) for c in row) + " |")
  return lines


def config_overrides(ap: argparse.ArgumentParser, args: list[str]) -> dict[str, str]:
  """``--config.a.b=v`` (or ``--config.a.b v``) -> ``{"a.b": "v"}``, the CLI's override
  form, for :func:`elas_jax.config_lib.override`; anything else is an error."""
  out, i = {}, 0
  while i < len(args):
    arg = args[i]
    if not arg.startswith("--config."):
      ap.error(f"unrecognized argument {arg!r} (config fields go as --config.<field>=<value>)")
    key, eq, value = arg[len("--config."):].partition("=")
    if not eq:
      if i + 1 == len(args):
        ap.error(f"{arg}: no value (use --config.{key}=<value>)")
      i, value = i + 1, args[i + 1]
    out[key] = value
    i += 1
  return out
