"""Kernel benchmark: the Pallas 2:4 FFN kernels against XLA, time, bandwidth and memory.

    python -m benchmarks.ffn_kernels --preset gpu --out results/ffn_kernels      # H200
    python -m benchmarks.ffn_kernels --preset cpu --out /tmp/ffnk_smoke          # CPU smoke
    python -m benchmarks.ffn_kernels --sizes 1b --tokens 65536 --modes masked --repeats 50
    python -m benchmarks.ffn_kernels --preset gpu --interpret false --dry_run    # trace only

Times, in one process and side by side, on the low-rank FFN core of each model
size (docs/kernels.md; ``h [T, r]`` is the rank-r code, ``w_in = B_up [F, r]``,
``w_out = A_down [r, F]``, shapes read from ``configs/llama_<size>.py:elas``):

  * ``ffn``: the whole FFN core, forward and forward+backward (``jax.value_and_grad``
    of ``sum(out * cotangent)`` w.r.t. ``h, w_in, w_out``), for
    - ``xla dense``: ``relu(h w_inᵀ)² w_outᵀ`` in plain jnp (the ``loro_relu2`` FFN),
    - ``xla sparse ffn/<mode>``: the ``xla`` implementation of the FFN core (the pure-JAX op),
    - ``<impl> elas_ffn/<mode>``: every other implementation of ``elas_kernels.ffn.IMPLEMENTATIONS``
      chosen by ``--impls`` (default: all of them on a GPU, ``triton`` on CPU, where the
      Mosaic GPU interpreter takes minutes per row);
  * ``sparsify``: ``elas_kernels.relu2_sparsify`` (``z wᵀ -> ReLU² -> 2:4 -> compress``)
    against XLA writing the dense ``relu(z wᵀ)²`` and XLA ``compress_24``;
  * ``spmm``: ``elas_kernels.sparse_matmul.sparse24_matmul`` (compressed 2:4 x dense)
    against an XLA dense matmul of the same (sparsified) activation and XLA
    ``decompress_24`` + matmul.

Timing (``benchmarks/harness.py``): compiled once, warm-up calls, then the
median of ``--repeats`` device-synchronised measurements, each lasting at
least ``--min_time_ms``; ``--timer do_bench`` uses ``triton.testing.do_bench``
when importable.

Bandwidth: kernel rows report bytes of their inputs + outputs (the compulsory
traffic; each array read or written once) / time, and that as a percentage of
the device copy bandwidth measured first (read + write bytes of an
element-wise ``x + 1`` over ``--copy_mib`` MiB). Goal: fused sparsify at >= 80%.
FFN rows report time and speed-ups only (their traffic depends on the algorithm).

Memory: per size, the bytes per token each FFN keeps for its backward pass
(``jax.vjp`` residuals, traced with ``elas_jax.memory``; ideal 2:4: 9/16 of
one dense bf16 activation); per (size, T), XLA's buffer assignment of one
forward+backward step (``compiled.memory_analysis()``: arguments + outputs +
temporaries) and, with ``--peak_memory`` (default on a GPU), the allocator's
``peak_bytes_in_use`` of one step measured in a fresh child process per (size, T).

Every row is guarded: a failing kernel or a config
that does not fit in memory is reported in the row's status, never a crash.
Writes ``results.json`` and ``results.md`` to ``--out`` and prints the tables.
No timed assertions: the goals are reported, not enforced.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import subprocess
import sys
import time
from typing import Callable

# One step's peak memory is measured in child processes; with XLA's default
# preallocation of 75% of the GPU in this process, they would find the GPU full.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import harness  # noqa: E402
from benchmarks.harness import Bench, Row, Timer, fmt, is_oom, markdown_table, short_error  # noqa: E402
from elas_jax import memory  # noqa: E402
from elas_kernels import common as cm  # noqa: E402
from elas_kernels import relu2_sparsify, sparse24, sparse_matmul  # noqa: E402
from elas_kernels.ffn import BACKWARD_MODES, IMPLEMENTATIONS  # noqa: E402

F32 = jnp.float32
DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}

# (d_model, ffn_dim, rank). Used when the configs cannot be loaded (the H200
# image may lack ml_collections) and for the synthetic ``smoke`` size, whose
# F = 259 exercises the dense F % 4 tail and the trim to a multiple of 8.
BUILTIN_SHAPES = {"60m": (512, 2064, 128), "130m": (768, 3072, 256), "350m": (1024, 4104, 256),
                  "1b": (2048, 8191, 512), "smoke": (64, 259, 32)}

PRESETS = {
    "gpu": {"sizes": "60m,350m,1b", "tokens": "16384,65536,131072", "modes": "masked,ste,split",
            "repeats": 20, "warmup": 3, "min_time_ms": 10.0, "copy_mib": 1024, "peak_memory": True},
    # Interpret-mode kernels on 2 busy cores: one tiny shape, few repeats.
    "cpu": {"sizes": "smoke", "tokens": "256", "modes": "masked,ste,split", "repeats": 3,
            "warmup": 1, "min_time_ms": 20.0, "copy_mib": 64, "peak_memory": False},
}


@dataclasses.dataclass(frozen=True)
class Shape:
  size: str
  d: int
  f: int
  r: int
  source: str  # where the numbers came from


# --------------------------------------------------------------------------
# Shapes and inputs.
# --------------------------------------------------------------------------


def load_shape(size: str) -> Shape:
  """FFN shapes from the size's ELAS config, so the benchmark follows the configs."""
  if size in harness.CONFIG_FILES:
    try:
      from elas_jax import config_lib

      m = config_lib.load(f"{harness.CONFIG_FILES[size]}:elas").model
      return Shape(size, int(m.d_model), int(m.ffn_dim), int(m.rank), harness.CONFIG_FILES[size])
    except Exception as e:  # e.g. no ml_collections on the benchmark machine
      if size not in BUILTIN_SHAPES:
        raise
      print(f"note: {size}: config not loadable ({type(e).__name__}: {e}); built-in shapes")
  if size not in BUILTIN_SHAPES:
    known = sorted(set(harness.CONFIG_FILES) | set(BUILTIN_SHAPES))
    raise SystemExit(f"unknown size {size!r}; expected one of {known}")
  return Shape(size, *BUILTIN_SHAPES[size], "built-in")


def make_inputs(key: jax.Array, t: int, f: int, r: int, dtype) -> dict[str, jax.Array]:
  """Random operands scaled so that y1 = h w_inᵀ is O(1) (a realistic ReLU² range)."""
  kh, ki, ko, kc = jax.random.split(key, 4)
  return {
      "h": jax.random.normal(kh, (t, r), F32).astype(dtype),
      "w_in": (jax.random.normal(ki, (f, r), F32) / np.sqrt(r)).astype(dtype),
      "w_out": (jax.random.normal(ko, (r, f), F32) / np.sqrt(f)).astype(dtype),
      "ct": jax.random.normal(kc, (t, r), F32).astype(dtype),  # output cotangent
      "on": jnp.bool_(True),  # traced sparse_on, as in training
  }


def build_inputs(fn: Callable, *args, dry_run: bool):
  """Materialise on device, or only shapes for ``--dry_run``."""
  return jax.eval_shape(fn, *args) if dry_run else jax.jit(fn)(*args)


# --------------------------------------------------------------------------
# The functions compared.
# --------------------------------------------------------------------------


def dense_ffn(h, w_in, w_out, on):
  """XLA dense low-rank ReLU² FFN core (what ``loro_relu2`` computes)."""
  del on
  y1 = jnp.einsum("tk,fk->tf", h, w_in, preferred_element_type=F32).astype(h.dtype)
  r = jnp.maximum(y1, 0)
  return jnp.einsum("tf,nf->tn", r * r, w_out, preferred_element_type=F32).astype(h.dtype)


def xla_sparse_ffn(mode: str) -> Callable:
  return kernel_ffn("xla", mode, interpret=False)


def kernel_ffn(name: str, mode: str, interpret: bool, blocks: tuple[int, int] | None = None
               ) -> Callable:
  """Implementation ``name`` of the FFN core in ``mode``; ``blocks`` (``block_t``,
  ``block_f``): the Triton kernels' tile sweep."""
  options = {} if blocks is None else dict(block_t=blocks[0], block_f=blocks[1])
  op = IMPLEMENTATIONS[name](interpret=interpret, **options)
  return lambda h, w_in, w_out, on: op(h, w_in, w_out, on, mode=mode)


def kernel_impls(spec: str, interpret: bool) -> list[str]:
  """``--impls``: the FFN implementations timed beside XLA (``auto``: every one but xla on a
  GPU, ``triton`` interpreted); each must be in the table."""
  names = [n for n in IMPLEMENTATIONS if n != "xla"] if spec == "auto" else spec.split(",")
  if spec == "auto" and interpret:
    names = ["triton"]
  unknown = sorted(set(names) - set(IMPLEMENTATIONS) - {""})
  if unknown:
    raise SystemExit(f"--impls: unknown {unknown}; expected some of {sorted(IMPLEMENTATIONS)}")
  return [n for n in names if n and n != "xla"]


def parse_blocks(spec: str | None) -> list[tuple[int, int] | None]:
  """``"32x128,64x256"`` -> [(32, 128), (64, 256)]; None: the kernel's defaults only."""
  if not spec:
    return [None]
  out = []
  for item in spec.split(","):
    bt, _, bf = item.partition("x")
    out.append((int(bt), int(bf)))
  return out


def fwd_only(ffn: Callable) -> Callable:
  return lambda h, w_in, w_out, ct, on: ffn(h, w_in, w_out, on)


def fwd_bwd(ffn: Callable) -> Callable:
  """Loss and gradients w.r.t. h, w_in, w_out.

  value_and_grad, not grad: with grad alone XLA would drop the dense
  forward's second matmul (the loss is linear in ``out``), which a training
  step cannot do.
  """

  def loss(h, w_in, w_out, ct, on):
    out = ffn(h, w_in, w_out, on)
    out = out[0] if isinstance(out, tuple) else out  # the sparse ops also return stats
    return jnp.sum(out.astype(F32) * ct.astype(F32))

  return jax.value_and_grad(loss, argnums=(0, 1, 2))


def relu2_dense(z, w):
  """XLA: the dense activation the sparsify kernel never writes."""
  y = jnp.maximum(jnp.einsum("tk,fk->tf", z, w, preferred_element_type=F32).astype(z.dtype), 0)
  return y * y


def relu2_compress_xla(z, w):
  """XLA: relu(z wᵀ)² -> 2:4 -> compress, in the kernels' plane layout."""
  vals, meta = sparse24.compress_24(relu2_dense(z, w))
  return cm.to_planes(vals), meta


def decompress_matmul_xla(vals, meta, w):
  y = sparse24.decompress_24(cm.from_planes(vals), meta)
  return jnp.einsum("tf,nf->tn", y, w, preferred_element_type=F32).astype(y.dtype)


def dense_matmul_xla(y, w):
  return jnp.einsum("tf,nf->tn", y, w, preferred_element_type=F32).astype(y.dtype)


# --------------------------------------------------------------------------
# Sections.
# --------------------------------------------------------------------------


def copy_bandwidth(bench: Bench, mib: int) -> float | None:
  """Device copy bandwidth, GB/s: read + write bytes of an element-wise ``x + 1``.

  ``x + 1`` rather than ``jnp.copy``: XLA may alias or elide a plain copy.
  """
  n = mib * 2**20 // 4
  x = build_inputs(lambda: jnp.zeros((n,), F32), dry_run=bench.dry_run)
  row = Row("-", 0, "copy", "xla", f"copy {mib} MiB (x + 1)")
  bench.run(row, lambda x: x + jnp.ones((), x.dtype), (x,), io_bytes=True)
  del x
  if row.time_ms is None:
    return None
  row.gbps = row.bytes / row.time_ms / 1e6
  row.pct_copy = 100.0
  return row.gbps


def ffn_rows(bench: Bench, shape: Shape, t: int, x: dict, modes: list[str], interpret: bool,
             impls: list[str], block_list: list[tuple[int, int] | None] = (None,)) -> None:
  """The whole FFN core, fwd and fwd+bwd: XLA dense, XLA sparse and each of ``impls``
  (Triton per tile of ``block_list``), per mode. A shape an implementation cannot serve
  is a row with its NotImplementedError."""
  args = (x["h"], x["w_in"], x["w_out"], x["ct"], x["on"])
  for pass_, wrap in (("fwd", fwd_only), ("fwd+bwd", fwd_bwd)):
    bench.run(Row(shape.size, t, "ffn", "xla_dense", "xla dense ffn", pass_), wrap(dense_ffn), args)
    for mode in modes:
      ref = bench.run(Row(shape.size, t, "ffn", "xla_sparse", f"xla sparse ffn/{mode}", pass_, mode),
                      wrap(xla_sparse_ffn(mode)), args)
      for name in impls:
        for blocks in (block_list if name == "triton" else [None]):
          tiles = f" {blocks[0]}x{blocks[1]}" if blocks else ""
          row = Row(shape.size, t, "ffn", name, f"{name} elas_ffn/{mode}{tiles}", pass_, mode)
          out = bench.run(row, wrap(kernel_ffn(name, mode, interpret, blocks)), args)
          row.max_rel_err = bench.error(out, ref)
          del out
      del ref


def kernel_rows(bench: Bench, shape: Shape, t: int, x: dict, interpret: bool) -> None:
  """The two stand-alone kernels and their XLA equivalents.

  The kernels take F as a multiple of 8 (one metadata byte = 8 features):
  F is trimmed to that (8191 -> 8184 at 1B); the rows say so.
  """
  f8 = shape.f - shape.f % 8
  z = x["h"]
  w_up, w_down = build_inputs(lambda a, b: (a[:f8], b[:, :f8]), x["w_in"], x["w_out"],
                              dry_run=bench.dry_run)
  tag = "" if f8 == shape.f else f" (F={f8})"

  # Fused z wᵀ -> ReLU² -> 2:4 -> compress.
  y2 = bench.run(Row(shape.size, t, "sparsify", "xla_dense", "xla relu2 dense" + tag),
                 relu2_dense, (z, w_up), io_bytes=True)
  ref = bench.run(Row(shape.size, t, "sparsify", "xla_sparse", "xla relu2+compress_24" + tag),
                  relu2_compress_xla, (z, w_up), io_bytes=True)
  row = Row(shape.size, t, "sparsify", "triton", "triton relu2_sparsify" + tag)
  out = bench.run(row, lambda z, w: relu2_sparsify.relu2_sparsify(z, w, interpret=interpret),
                  (z, w_up), io_bytes=True)
  row.max_rel_err = bench.error(out, ref)
  del out

  # Compressed 2:4 x dense. Inputs come from XLA so this row does not depend on the
  # sparsify kernel; the dense baseline multiplies the same activation, 2:4-zeroed.
  if ref is None or y2 is None:
    bench.rows.append(Row(shape.size, t, "spmm", "triton", "triton sparse24_matmul" + tag,
                          status="error: no XLA-compressed input (see the sparsify rows)"))
    return
  vals, meta = ref
  y2s = build_inputs(sparse24.sparsify_24, y2, dry_run=bench.dry_run)
  del y2
  bench.run(Row(shape.size, t, "spmm", "xla_dense", "xla dense matmul" + tag), dense_matmul_xla,
            (y2s, w_down), io_bytes=True)
  del y2s
  ref = bench.run(Row(shape.size, t, "spmm", "xla_sparse", "xla decompress_24+matmul" + tag),
                  decompress_matmul_xla, (vals, meta, w_down), io_bytes=True)
  row = Row(shape.size, t, "spmm", "triton", "triton sparse24_matmul" + tag)
  out = bench.run(row, lambda v, m, w: sparse_matmul.sparse24_matmul(v, m, w, interpret=interpret),
                  (vals, meta, w_down), io_bytes=True)
  row.max_rel_err = bench.error(out, ref)


def residual_memory(shape: Shape, modes: list[str], dtype, interpret: bool, impls: list[str],
                    seq: int = 1024) -> list[dict]:
  """Bytes per token each FFN keeps for backward (traced: nothing allocated).

  ``elas_jax.memory.token_residuals`` traces at 1 and 2 rows of ``seq`` tokens
  and keeps what grows. ``h`` (an input here) is kept by the preceding matmul
  anyway, so ``activation`` excludes the function's inputs.
  """
  w_in = jax.ShapeDtypeStruct((shape.f, shape.r), dtype)
  w_out = jax.ShapeDtypeStruct((shape.r, shape.f), dtype)
  make = lambda b: (jax.ShapeDtypeStruct((b * seq, shape.r), dtype), w_in, w_out)
  ops = [("xla dense ffn", dense_ffn)] + [(f"xla sparse ffn/{m}", xla_sparse_ffn(m)) for m in modes]
  ops += [(f"{name} elas_ffn/{m}", (name, m)) for name in impls for m in modes]
  one_copy = shape.f * np.dtype(dtype).itemsize  # one dense f-wide activation per token
  out = []
  for name, op in ops:
    entry = {"size": shape.size, "op": name}
    try:
      ffn = kernel_ffn(*op, interpret) if isinstance(op, tuple) else op

      def loss(h, w_in, w_out, ffn=ffn):
        y = ffn(h, w_in, w_out, jnp.bool_(True))
        return jnp.sum((y[0] if isinstance(y, tuple) else y).astype(F32))

      res = memory.token_residuals(make, loss, seq)
      act = [x for x in res if x.source != "an input of the function"]
      entry.update(all=memory.total_bytes_per_token(res), activation=memory.total_bytes_per_token(act),
                   vs_one_dense_copy=memory.total_bytes_per_token(act) / one_copy,
                   residuals=[dataclasses.asdict(x) for x in res])
    except Exception as e:
      entry["status"] = "error: " + short_error(e)
    out.append(entry)
  dense = out[0].get("activation")
  for e in out:
    if dense and "activation" in e:
      e["vs_dense"] = e["activation"] / dense
  return out


def step_peak(size: str, t: int, dtype_name: str, interpret: bool, mode: str, impl: str) -> dict:
  """Allocator peak of one fwd+bwd step, implementation ``impl`` first then dense (child process).

  The allocator's peak only grows, so a fresh process per (size, T) measures
  the smaller (sparse) step first; dense is reported only if it raised the peak.
  """
  dev = jax.devices()[0]
  if not hasattr(dev, "memory_stats") or dev.memory_stats() is None:
    return {"status": "device.memory_stats() unavailable"}
  shape = load_shape(size)
  x = jax.jit(functools.partial(make_inputs, t=t, f=shape.f, r=shape.r, dtype=DTYPES[dtype_name]))(
      jax.random.key(0))
  args = (x["h"], x["w_in"], x["w_out"], x["ct"], x["on"])
  base = dev.memory_stats().get("bytes_in_use", 0)
  out = {"inputs_bytes": int(base)}
  for name, ffn in ((f"{impl} elas_ffn/{mode}", kernel_ffn(impl, mode, interpret)),
                    ("xla dense ffn", dense_ffn)):
    try:
      before = dev.memory_stats().get("peak_bytes_in_use", 0)
      compiled = jax.jit(fwd_bwd(ffn)).lower(*args).compile()
      jax.block_until_ready(compiled(*args))
      peak = dev.memory_stats().get("peak_bytes_in_use", 0)
      out[name] = int(peak) if peak > before else None  # None: not above the earlier peak
    except Exception as e:
      out[name] = None
      out[f"{name} status"] = ("out of memory: " if is_oom(e) else "error: ") + short_error(e)
  return out


def peak_in_child(args, size: str, t: int, mode: str, impl: str) -> dict:
  cmd = [sys.executable, "-m", "benchmarks.ffn_kernels", "--_peak_child", f"{size}:{t}:{mode}:{impl}",
         "--dtype", args.dtype, "--interpret", args.interpret]
  try:
    p = subprocess.run(cmd, cwd=harness.ROOT, capture_output=True, text=True, timeout=args.peak_timeout_s,
                       env={**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"})
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode or not lines:
      return {"status": f"child failed (rc {p.returncode}): {p.stderr.strip()[-300:]}"}
    return json.loads(lines[-1])
  except subprocess.TimeoutExpired:
    return {"status": f"child timed out after {args.peak_timeout_s} s"}


# --------------------------------------------------------------------------
# Ratios and report.
# --------------------------------------------------------------------------


def add_ratios(rows: list[Row], copy_gbps: float | None) -> None:
  """Speed-ups against the XLA rows of the same (size, T, group, pass[, mode])."""
  timed = {(r.size, r.tokens, r.group, r.pass_, r.impl, r.mode): r.time_ms for r in rows if r.time_ms}
  for r in rows:
    if r.bytes and r.time_ms and r.group != "copy":
      r.gbps = r.bytes / r.time_ms / 1e6
      r.pct_copy = 100 * r.gbps / copy_gbps if copy_gbps else None
    if not r.time_ms or r.impl in ("xla_dense", "xla"):
      continue
    dense = timed.get((r.size, r.tokens, r.group, r.pass_, "xla_dense", ""))
    sparse = timed.get((r.size, r.tokens, r.group, r.pass_, "xla_sparse", r.mode))
    r.vs_dense = dense / r.time_ms if dense else None
    r.vs_sparse = sparse / r.time_ms if sparse and r.impl in IMPLEMENTATIONS else None


def markdown(meta: dict, rows: list[Row], resid: list[dict], steps: list[dict]) -> str:
  lines = [f"# ELAS FFN kernel benchmark ({meta['date']})", "",
           f"jax {meta['jax']}, backend {meta['backend']}, device {meta['device_kind']}, "
           f"{meta['dtype']}, interpret={meta['interpret']}, timer {meta['timer']}, "
           f"median of {meta['repeats']}; copy bandwidth {fmt(meta['copy_gbps'], '.1f')} GB/s"
           + (" (dry run: traced only)" if meta["dry_run"] else ""), ""]
  lines += markdown_table(
      ["size", "T", "op", "pass", "ms", "GB/s", "% copy BW", "x XLA dense", "x XLA sparse",
       "max rel err", "status"],
      [[r.size, r.tokens or "-", r.op, r.pass_ or "-", fmt(r.time_ms), fmt(r.gbps, ".1f"),
        fmt(r.pct_copy, ".0f", "%"), fmt(r.vs_dense, ".2f", "x"), fmt(r.vs_sparse, ".2f", "x"),
        fmt(r.max_rel_err, ".1e"), r.status] for r in rows], "lrllrrrrrrl")
  lines += ["", "## Kept for backward, bytes per token (traced; activation excludes the input h)", ""]
  lines += markdown_table(
      ["size", "op", "all", "activation", "vs XLA dense", "vs one dense f-wide copy", "status"],
      [[e["size"], e["op"], fmt(e.get("all"), ".0f"), fmt(e.get("activation"), ".0f"),
        fmt(e.get("vs_dense"), ".4f"), fmt(e.get("vs_one_dense_copy"), ".4f"), e.get("status", "ok")]
       for e in resid], "llrrrrl")
  lines += ["", "## One fwd+bwd step, device memory (MiB)", ""]
  lines += markdown_table(
      ["size", "T", "op", "XLA buffers (args+outs+temps)", "allocator peak",
       "ratio to dense (buffers / peak)"],
      [[s["size"], s["tokens"], s["op"], fmt(s.get("buffers_mib"), ",.1f"), fmt(s.get("peak_mib"), ",.1f"),
        f"{fmt(s.get('buffers_ratio'), '.3f')} / {fmt(s.get('peak_ratio'), '.3f')}"] for s in steps],
      "lrlrrr")
  notes = dict.fromkeys(f"{s['size']} T={s['tokens']}: {s['peak_status']}" for s in steps if s["peak_status"])
  lines += [f"\nallocator peak: {n}" for n in notes]
  lines += ["", "## Goals (reported, not enforced)", ""] + [f"- {g}" for g in meta["goals"]]
  return "\n".join(lines) + "\n"


def step_memory(rows: list[Row], peaks: dict, mode: str, impls: list[str]) -> list[dict]:
  """Dense vs the kernels' fwd+bwd memory per (size, T): XLA buffers and allocator peak."""
  out = []
  mib = 2.0**20
  by = {(r.size, r.tokens, r.op): r for r in rows if r.pass_ == "fwd+bwd"}
  for (size, t) in dict.fromkeys((r.size, r.tokens) for r in rows if r.group == "ffn"):  # run order
    peak = peaks.get(f"{size}:{t}", {})
    dense = by.get((size, t, "xla dense ffn"))
    dense_buf = dense.xla_buffers["total"] if dense and dense.xla_buffers else None
    for op in ("xla dense ffn", f"xla sparse ffn/{mode}", *(f"{n} elas_ffn/{mode}" for n in impls)):
      r = by.get((size, t, op))
      if r is None:
        continue
      buf = r.xla_buffers["total"] if r.xla_buffers else None
      p = peak.get(op)
      dp = peak.get("xla dense ffn")
      out.append({"size": size, "tokens": t, "op": op,
                  "buffers_mib": buf / mib if buf else None,
                  "buffers_ratio": buf / dense_buf if buf and dense_buf else None,
                  "peak_mib": p / mib if p else None,
                  "peak_ratio": p / dp if p and dp else None,
                  "peak_status": peak.get("status")})
  return out


def goals(rows: list[Row], copy_gbps: float | None) -> list[str]:
  out = []
  hit = [r for r in rows if r.op.endswith(" elas_ffn/masked") and r.pass_ == "fwd+bwd"
         and r.size == "1b" and r.tokens == 65536]
  for r in hit:
    out.append(f"{r.op} fwd+bwd at 1b / 64K tokens: {fmt(r.vs_dense, '.2f', 'x')} vs XLA "
               f"dense (goal >= 1.2x), {fmt(r.vs_sparse, '.2f', 'x')} vs XLA sparse")
  if not hit:
    out.append("1b / 64K tokens not in this run (goal: elas fwd+bwd >= 1.2x XLA dense)")
  for r in rows:
    if r.op.startswith("triton relu2_sparsify"):
      out.append(f"relu2_sparsify {r.size} T={r.tokens}: {fmt(r.pct_copy, '.0f', '%')} of copy "
                 f"bandwidth {fmt(copy_gbps, '.1f')} GB/s (goal >= 80%)")
  return out


# --------------------------------------------------------------------------
# Main.
# --------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--preset", choices=sorted(PRESETS), default=None,
                  help="gpu: 60m/350m/1b x 16K/64K/128K tokens; cpu: interpret-mode smoke "
                       "(default: gpu on a GPU backend, else cpu)")
  ap.add_argument("--sizes", help=f"comma list of {sorted(set(harness.CONFIG_FILES) | set(BUILTIN_SHAPES))}")
  ap.add_argument("--tokens", help="comma list of token counts T")
  ap.add_argument("--modes", help="comma list of backward modes (masked, ste, split)")
  ap.add_argument("--repeats", type=int, help="timed measurements per row (median reported)")
  ap.add_argument("--warmup", type=int, help="untimed calls after compilation")
  ap.add_argument("--min_time_ms", type=float,
                  help="each measurement repeats the call back to back until it lasts this long")
  ap.add_argument("--timer", choices=("wall", "do_bench"), default="wall")
  ap.add_argument("--blocks", default=None,
                  help="tile sweep for the Triton FFN rows: comma list of block_t x block_f, "
                       "e.g. 32x128,64x128,64x256 (default: the kernel's per-shape defaults)")
  ap.add_argument("--copy_mib", type=int, help="size of the copy-bandwidth array")
  ap.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
  ap.add_argument("--interpret", choices=("auto", "true", "false"), default="auto",
                  help="Pallas interpret mode (auto: unless the backend is a GPU)")
  ap.add_argument("--impls", default="auto",
                  help="comma list of FFN implementations (elas_kernels.ffn.IMPLEMENTATIONS) timed "
                       "beside XLA; auto: all on a GPU, triton interpreted (the Mosaic GPU "
                       "interpreter takes minutes per row)")
  ap.add_argument("--peak_memory", action=argparse.BooleanOptionalAction, default=None,
                  help="allocator peak of one fwd+bwd step in a child process per (size, T)")
  ap.add_argument("--peak_timeout_s", type=int, default=300)
  ap.add_argument("--dry_run", action="store_true",
                  help="trace every function (jax.eval_shape) without compiling or allocating")
  ap.add_argument("--out", help="directory for results.json and results.md")
  ap.add_argument("--_peak_child", help=argparse.SUPPRESS)
  args = ap.parse_args()
  preset = PRESETS[args.preset or ("gpu" if jax.default_backend() == "gpu" else "cpu")]
  for k, v in preset.items():
    if getattr(args, k, None) is None:
      setattr(args, k, v)
  args.preset = args.preset or ("gpu" if jax.default_backend() == "gpu" else "cpu")
  return args


def main() -> None:
  args = parse_args()
  interpret = {"true": True, "false": False, "auto": jax.default_backend() != "gpu"}[args.interpret]
  impls = kernel_impls(args.impls, interpret)
  if args._peak_child:
    size, t, mode, impl = args._peak_child.split(":")
    print(json.dumps(step_peak(size, int(t), args.dtype, interpret, mode, impl)))
    return

  dtype = DTYPES[args.dtype]
  sizes = [s for s in args.sizes.split(",") if s]
  tokens = [int(t) for t in str(args.tokens).split(",") if t]
  modes = [m for m in args.modes.split(",") if m]
  bad = set(modes) - set(BACKWARD_MODES)
  if bad:
    raise SystemExit(f"unknown modes {sorted(bad)}; expected {BACKWARD_MODES}")
  main_mode = "masked" if "masked" in modes else modes[0]
  timer = Timer(args.repeats, args.warmup, args.min_time_ms / 1e3, args.timer)
  bench = Bench(timer, args.dry_run)
  dev = jax.devices()[0]
  meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "jax": jax.__version__,
          "backend": jax.default_backend(), "device_kind": dev.device_kind, "dtype": args.dtype,
          "interpret": interpret, "impls": impls, "timer": timer.kind, "repeats": args.repeats, "warmup": args.warmup,
          "preset": args.preset, "dry_run": args.dry_run}
  print(f"# {meta['date']}  jax {meta['jax']}  {meta['backend']} / {meta['device_kind']}  "
        f"interpret={interpret}  sizes {sizes}  T {tokens}  modes {modes}", flush=True)

  copy_gbps = copy_bandwidth(bench, args.copy_mib)
  print(f"copy bandwidth: {fmt(copy_gbps, '.1f')} GB/s", flush=True)
  shapes, resid, peaks = {}, [], {}
  for size in sizes:
    shape = shapes[size] = load_shape(size)
    print(f"## {size}: d={shape.d} F={shape.f} r={shape.r} ({shape.source})", flush=True)
    resid += residual_memory(shape, modes, dtype, interpret, impls)
    for t in tokens:
      start = time.perf_counter()
      try:
        x = build_inputs(functools.partial(make_inputs, t=t, f=shape.f, r=shape.r, dtype=dtype),
                         jax.random.key(0), dry_run=args.dry_run)
      except Exception as e:
        why = ("out of memory: " if is_oom(e) else "error: ") + short_error(e)
        print(f"  skip {size} T={t}: inputs: {why}")
        bench.rows.append(Row(size, t, "ffn", "-", "inputs", status="skipped: " + why))
        continue
      ffn_rows(bench, shape, t, x, modes, interpret, impls, parse_blocks(args.blocks))
      kernel_rows(bench, shape, t, x, interpret)
      del x
      if args.peak_memory and not args.dry_run and impls:
        peaks[f"{size}:{t}"] = peak_in_child(args, size, t, main_mode, impls[0])
      print(f"  T={t}: {time.perf_counter() - start:.1f} s", flush=True)

  add_ratios(bench.rows, copy_gbps)
  meta.update(copy_gbps=copy_gbps, shapes={k: dataclasses.asdict(v) for k, v in shapes.items()},
              goals=goals(bench.rows, copy_gbps))
  steps = step_memory(bench.rows, peaks, main_mode, impls)
  md = markdown(meta, bench.rows, resid, steps)
  print("\n" + md)
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as fh:
      json.dump({"meta": meta, "rows": [dataclasses.asdict(r) for r in bench.rows],
                 "kept_for_backward": resid, "step_memory": steps, "peaks": peaks}, fh, indent=1)
    with open(os.path.join(args.out, "results.md"), "w") as fh:
      fh.write(md)
    print(f"wrote {args.out}/results.json and results.md")


if __name__ == "__main__":
  main()
