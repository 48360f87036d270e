"""Compile-time tile search for the Pallas kernels on a GPU target (no GPU needed).

    python -m benchmarks.kernel_tiles --target h200                  # search, write the table
    python -m benchmarks.kernel_tiles --target h200 --report         # every kernel, per size (the gate)
    python -m benchmarks.kernel_tiles --target h200 --classes r512 --kernels elas_ffn_fwd

Needs the jax CUDA plugin (``pip install "jax[cuda12]==<jax version>"``) and
runs with ``JAX_PLATFORMS=cpu JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1`` (set here).

Each kernel (the ``triton`` FFN core's four, ``relu2_sparsify``'s and
``sparse_matmul``'s three) is compiled alone, through its module's public
``kernel_program`` (the kernel on operands padded as its op pads them), for every candidate
in a small grid of tiles x ``num_warps`` x ``num_stages``, at the paper shapes
of each shape class (rank 128: 60M; 256: 130M and 350M; 512: 1B) and the
paper's per-GPU micro-batch (``--tokens``, default 16384 = 64 sequences of
256: the 512-sequence batch on 8 GPUs). Every variant a tile must serve is
compiled (the backward kernels run on the compressed activation in
masked/split and recompute it in ste and the dense warm-up; dw_out masks by
ste or by tokens). A candidate is *legal* when every variant compiles, uses
at most the target's shared memory per block, spills no register and its
grid fills at least one wave (programs >= SMs x programs per SM). Among the
legal ones, the first in the candidate order (the recipe, then fallbacks) is
kept, or with ``--wide`` the cheapest by a static cost, a lower bound on time:

    cost = max(flops / (peak · mma_eff(dot shape)), bytes / bandwidth) / min(1, waves)
           x ceil(waves) / waves

with ``flops`` what the kernel executes with these tiles (recomputation of
y1 per output tile included), ``bytes`` what it loads (operands re-read per
program), ``mma_eff`` a tensor-core shape penalty (an M or N below 64
idles part of a Hopper warpgroup MMA: efficiency min(1, M/64) · min(1, N/64)
floored at 1/8) and the tail-wave factor. The kept candidate per (class,
kernel) goes into ``kernels/tiles_<target>.json``. Each compile runs in its
own process: a Triton/LLVM fatal error aborts the process, and makes the
candidate illegal rather than ending the search.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import subprocess
import sys
import threading
import time
from concurrent import futures

from elas_jax import targets

SIZES = {"60m": (2064, 128), "130m": (3072, 256), "350m": (4104, 256), "1b": (8191, 512)}
CLASSES = {"r128": ("60m",), "r256": ("130m", "350m"), "r512": ("1b",)}
FFN = ("elas_ffn_fwd", "elas_ffn_dh", "elas_ffn_dw_in", "elas_ffn_dw_out")
OPS = ("relu2_sparsify_fwd", "relu2_sparsify_dz", "relu2_sparsify_dw", "sparse24_matmul_fwd",
       "sparse24_matmul_dvals", "sparse24_matmul_dw")
ALL = FFN + OPS + ("elas_ffn_dw_out/split",)


# --------------------------------------------------------------------------
# One kernel, one variant, abstract operands.
# --------------------------------------------------------------------------


def _module(kernel: str):
  """The kernel module that builds ``kernel`` (its ``VARIANTS`` and ``kernel_program``)."""
  from elas_kernels import relu2_sparsify, sparse_matmul
  from elas_kernels.ffn import triton

  for module in (triton, relu2_sparsify, sparse_matmul):
    if kernel in module.VARIANTS:
      return module
  raise ValueError(f"unknown kernel {kernel!r}: expected one of {ALL}")


def _variants(kernel: str) -> list[dict]:
  """The code paths one tile must serve (the kernel module's own list)."""
  return _module(kernel).VARIANTS[kernel]


def kernel_fn(kernel: str, variant: dict, t: int, f: int, r: int, blocks):
  """``(fn, args)``: the kernel alone on abstract, padded operands (its module's public
  ``kernel_program``)."""
  return _module(kernel).kernel_program(kernel, variant, t, f, r, blocks)


def _pallas_name(kernel: str) -> str:
  return kernel.split("/")[0]


@dataclasses.dataclass
class Result:
  kernel: str
  size: str
  blocks: dict
  legal: bool
  why: str
  compile_s: float
  info: list  # per variant: grid, threads, smem, regs, spills, programs/SM, waves
  cost_us: float | None = None


def compile_candidate(kernel: str, size: str, blocks, target: str, tokens: int) -> Result:
  """Compile every variant of ``kernel`` with ``blocks`` at ``size``; legal or why not."""
  tgt = targets.get(target)
  f, r = SIZES[size]
  start = time.perf_counter()
  info, why = [], ""
  for variant in _variants(kernel):
    try:
      blocks.check(kernel, interpret=False, split=kernel.endswith("/split"))
      fn, args = kernel_fn(kernel, variant, tokens, f, r, blocks)
    except ValueError as e:
      why = f"tiles: {e}"
      break
    rep = targets.compile_for_target(fn, *args, target=tgt)
    if not rep.compiled:
      why = f"{variant}: {rep.reason}"
      break
    try:
      k = rep.kernel(_pallas_name(kernel))
    except KeyError as e:
      why = str(e)
      break
    info.append({"variant": variant, **k.as_dict()})
    if k.shared_memory_bytes is not None and k.shared_memory_bytes > tgt.smem_per_block:
      why = f"{variant}: shared memory {k.shared_memory_bytes} > {tgt.smem_per_block}"
    elif k.spill_bytes:
      why = f"{variant}: {k.spill_bytes} bytes of register spill"
    elif k.waves is not None and k.waves < 1:
      why = f"{variant}: {k.waves:.2f} waves ({k.programs} programs, {k.programs_per_sm}/SM)"
    if why:
      break
  return Result(kernel, size, blocks.as_dict(), not why, why or "ok",
                time.perf_counter() - start, info)


# --------------------------------------------------------------------------
# Static cost.
# --------------------------------------------------------------------------


def mma_efficiency(m: int, n: int) -> float:
  """Fraction of a Hopper warpgroup MMA (64 x N x 16 per warpgroup) a dot of M x N uses."""
  return max(1 / 8, min(1.0, m / 64) * min(1.0, n / 64))


def static_cost_us(kernel: str, size: str, blocks, info: dict, target: str, tokens: int) -> float:
  """Lower bound on the kernel's time with these tiles (see the module docstring)."""
  tgt = targets.get(target)
  f, r = SIZES[size]
  b = blocks
  gb = b.block_f // 8
  t = tokens
  if kernel == "elas_ffn_fwd":  # y1 recomputed per output tile; y2s @ w_out on its columns
    tiles_n = max(1, r // (b.block_n or r))
    flops = 2 * t * f * r * tiles_n + 2 * t * f * r
    eff = min(mma_efficiency(b.block_t, gb), 1.0)
    moved = 2 * t * r * 2 + t * f * 9 / 16 + (t // b.block_t) * tiles_n * 2 * f * r * 2
  elif kernel in ("elas_ffn_dh", "relu2_sparsify_dz"):
    tiles_k = max(1, r // (b.block_k or r))
    flops = (2 * t * f * r) * tiles_k + 2 * t * f * r
    eff = mma_efficiency(b.block_t, gb)
    moved = 2 * t * r * 2 + t * f * 9 / 16 + (t // b.block_t) * tiles_k * 2 * f * r * 2
  elif kernel in ("elas_ffn_dw_in", "relu2_sparsify_dw"):
    tiles_k = max(1, r // b.block_k)  # dy1 rebuilt per rank block
    flops = 2 * t * f * r * tiles_k + 2 * t * f * r
    eff = mma_efficiency(gb, b.block_k)
    moved = (f // b.block_f) * tiles_k * (2 * t * r * 2 + t * b.block_f * 9 / 16) + f * r * 4
  elif kernel.startswith("elas_ffn_dw_out") or kernel == "sparse24_matmul_dw":
    tiles_n = max(1, r // b.block_n)
    flops = 2 * t * f * r
    eff = mma_efficiency(b.block_n, gb)
    moved = (f // b.block_f) * tiles_n * (t * b.block_n * 2 + t * b.block_f * 9 / 16) + f * r * 4
  elif kernel == "relu2_sparsify_fwd":
    flops = 2 * t * f * r
    eff = mma_efficiency(b.block_t, gb)
    moved = (f // b.block_f) * t * r * 2 + t * f * 9 / 16 + (t // b.block_t) * f * r * 2
  elif kernel == "sparse24_matmul_fwd":
    tiles_n = max(1, r // b.block_n)
    flops = 2 * t * f * r
    eff = mma_efficiency(b.block_t, b.block_n)
    moved = tiles_n * t * f * 9 / 16 + (t // b.block_t) * f * r * 2 + t * r * 2
  elif kernel == "sparse24_matmul_dvals":
    flops = 2 * t * f * r
    eff = mma_efficiency(b.block_t, gb)
    moved = (f // b.block_f) * t * r * 2 + t * f * 9 / 16 + (t // b.block_t) * f * r * 2
  else:
    raise ValueError(kernel)
  time_s = max(flops / (tgt.bf16_flops_per_s * eff), moved / tgt.hbm_bytes_per_s)
  waves = info.get("waves") or 1.0
  return time_s * math.ceil(waves) / waves * 1e6


# --------------------------------------------------------------------------
# Candidates.
# --------------------------------------------------------------------------


# Token splits that give the weight-gradient grids >= 1 wave at every paper width
# of a class (dw_in: F/128 x r/64 programs of 1 per SM; dw_out runs up to 3 per SM).
SPLITS = {128: 8, 256: 4, 512: 1}
SPLITS_OUT = {128: 16, 256: 8, 512: 2}


def recipe(kernel: str, r: int):
  """The tiles the first probes found legal at every rank (docs/kernels.md): 64 tokens,
  128 features, 64-wide output tiles and reduction chunks, 8 warps, no software
  pipelining (``num_stages=1``: with 2 stages the 8 planes' staged tiles cost
  registers and, at rank 512, shared memory)."""
  from elas_kernels.common import Blocks

  # Reduction chunks of 64 at every rank: loading a whole rank-128 operand for
  # the 8 planes at once spills (398 bytes at 60M).
  common = dict(block_t=64, block_f=128, block_r=64, num_warps=8, num_stages=1)
  if kernel in ("elas_ffn_fwd", "sparse24_matmul_fwd"):
    return Blocks(**common, block_n=64)
  if kernel in ("elas_ffn_dh", "relu2_sparsify_dz"):
    return Blocks(**common, block_k=64)
  if kernel in ("elas_ffn_dw_in", "relu2_sparsify_dw"):
    return Blocks(**common, block_k=64, split_t=SPLITS[r])
  if kernel.startswith("elas_ffn_dw_out") or kernel == "sparse24_matmul_dw":
    return Blocks(**common, block_n=64, split_t=SPLITS_OUT[r])
  return Blocks(**common)  # relu2_sparsify_fwd, sparse24_matmul_dvals


def candidates(kernel: str, r: int, wide: bool = False):
  """The recipe, then two fallbacks (4 warps; 32 tokens), and with ``wide`` more
  neighbours: 2 stages, 128 tokens, wider output tiles (less recomputation)."""
  base = recipe(kernel, r)
  yield base
  yield dataclasses.replace(base, num_warps=4)  # the fallbacks when the recipe is refused
  yield dataclasses.replace(base, block_t=32)
  if not wide:
    return
  yield dataclasses.replace(base, num_stages=2)
  yield dataclasses.replace(base, block_t=128)
  if base.block_n not in (None, 1) and base.block_n < r and kernel.endswith("fwd"):
    yield dataclasses.replace(base, block_n=min(r, 2 * base.block_n))
  if base.block_k not in (None, 1) and base.block_k < r and kernel.endswith(("dh", "dz")):
    yield dataclasses.replace(base, block_k=min(r, 2 * base.block_k))


# --------------------------------------------------------------------------
# The whole set of kernels of one size in one program (the CI gate, --report).
# --------------------------------------------------------------------------

MODES = ("masked", "ste", "split")
GATE_KERNELS = {"elas_ffn": {"elas_ffn_fwd", "elas_ffn_dh", "elas_ffn_dw_in", "elas_ffn_dw_out"},
                "relu2_sparsify": {"relu2_sparsify_fwd", "relu2_sparsify_dz", "relu2_sparsify_dw"},
                "sparse24_matmul": {"sparse24_matmul_fwd", "sparse24_matmul_dvals",
                                    "sparse24_matmul_dw"}}


PROGRAMS = ("elas_ffn", "relu2_sparsify", "sparse24_matmul")


def gate_program(f: int, r: int, tokens: int = 16384, target: str = "h200", tiles=None,
                 op: str = "elas_ffn"):
  """``(fn, abstract args)`` of one op's kernels, forward and backward, for ``target``.

  ``elas_ffn``: the forward (evaluation: nothing stored) and ``jax.value_and_grad``
  in every backward mode (each with its dense warm-up branch: ``sparse_on`` is
  an input). ``relu2_sparsify`` / ``sparse24_matmul``: ``value_and_grad`` of
  each stand-alone op (three programs, so one op's refusal leaves the others
  checked)."""
  import jax
  import jax.numpy as jnp

  from elas_kernels import relu2_sparsify, sparse_matmul
  from elas_kernels.ffn.triton import TritonFfn

  bf = jnp.bfloat16
  S = jax.ShapeDtypeStruct
  gpu = (targets.get(target) if isinstance(target, str) else target).gpu_spec()
  if op == "elas_ffn":
    ffn_op = TritonFfn(gpu=gpu, tiles=tiles)

    def program(h, w_in, w_out, sparse_on):
      outs = [ffn_op(h, w_in, w_out, sparse_on)[0]]
      for mode in MODES:
        def loss(h, w_in, w_out, mode=mode):
          out, _ = ffn_op(h, w_in, w_out, sparse_on, mode=mode)
          return jnp.sum(out.astype(jnp.float32))
        outs.append(jax.value_and_grad(loss, argnums=(0, 1, 2))(h, w_in, w_out))
      return outs
    return program, (S((tokens, r), bf), S((f, r), bf), S((r, f), bf), S((), jnp.bool_))
  f8 = f - f % 8
  if op == "relu2_sparsify":
    # The gradients in z and w: a pallas_call whose output is unused is dead code to
    # XLA, so both are needed for dz and dw to be compiled.
    def program(z, w):
      loss = lambda z, w: jnp.sum(relu2_sparsify.relu2_sparsify(z, w, gpu=gpu, tiles=tiles)[0]
                                  .astype(jnp.float32))
      return jax.value_and_grad(loss, argnums=(0, 1))(z, w)
    return program, (S((tokens, r), bf), S((f8, r), bf))
  if op == "sparse24_matmul":
    def program(v, m, w):
      loss = lambda v, w: jnp.sum(sparse_matmul.sparse24_matmul(v, m, w, gpu=gpu,
                                                                 tiles=tiles).astype(jnp.float32))
      return jax.value_and_grad(loss, argnums=(0, 1))(v, w)
    return program, (S((4, tokens, f8 // 8), bf), S((tokens, f8 // 8), jnp.uint8), S((r, f8), bf))
  raise ValueError(f"unknown op {op!r}: expected one of {PROGRAMS}")


# Kernels the gate reports but does not fail on, with why (kept few and explicit;
# tests/test_gpu_compile.py holds a strict xfail for each, so a fix is noticed).
# None now: relu2_sparsify_dw, the last one, fits since its weight-gradient dots
# take the cotangent as the right operand (kernels/common.py,
# accumulate_planes_over_tokens(transposed=True)).
KNOWN: dict[str, str] = {}


def check_gate(report, target, op: str = "elas_ffn", known: dict | None = None) -> list[str]:
  """What fails the gate in a compile report of :func:`gate_program` (empty: pass);
  kernels in ``known`` (default :data:`KNOWN`) are left out."""
  known = KNOWN if known is None else known
  tgt = targets.get(target) if isinstance(target, str) else target
  if not report.compiled:
    return [f"{op} not compiled: {report.reason}"]
  bad = []
  pallas = [k for k in report.kernels if k.kind == "pallas"]
  missing = GATE_KERNELS[op] - {k.name for k in pallas}
  if missing:
    bad.append(f"kernels missing from the program: {sorted(missing)}")
  for k in pallas:
    if k.name in known:
      continue
    if k.shared_memory_bytes > tgt.smem_per_block:
      bad.append(f"{k.name}: shared memory {k.shared_memory_bytes} > {tgt.smem_per_block}")
    if k.spill_bytes is None or k.spill_bytes:
      bad.append(f"{k.name}: register spill {k.spill_bytes} bytes")
    if k.waves < 1:
      bad.append(f"{k.name}: {k.waves:.2f} waves ({k.programs} programs, "
                 f"{k.programs_per_sm} per SM of {tgt.sm_count} SMs)")
  return bad


def report_sizes(target: str, tokens: int, sizes) -> int:
  """Compile :func:`gate_program` per size; print the kernel tables and the gate's verdict."""
  failed = 0
  for size in sizes:
    f, r = SIZES[size]
    for op in PROGRAMS:
      fn, args = gate_program(f, r, tokens, target, op=op)
      rep = targets.compile_for_target(fn, *args, target=target)
      bad = check_gate(rep, target, op)
      failed += bool(bad)
      print(f"## {size} (F {f}, r {r}) {op}, {tokens} tokens, {target}: "
            f"{'PASS' if not bad else 'FAIL: ' + '; '.join(bad)} (compile {rep.compile_s:.0f} s)"
            + ("" if rep.compiled else f"; compiler: {rep.reason}"))
      print(rep.table() + "\n", flush=True)
      print(json.dumps({"size": size, "op": op, **rep.as_dict()}), flush=True)
  return failed


def _run_one(kernel: str, size: str, blocks, target: str, tokens: int) -> Result:
  """:func:`compile_candidate` in a fresh process: a Triton or LLVM fatal error
  aborts the process (seen: a layout assertion in one dw kernel), and that
  makes the candidate illegal, not the search dead."""
  cmd = [sys.executable, "-m", "benchmarks.kernel_tiles", "--one", kernel, size,
         json.dumps(blocks.as_dict()), "--target", target, "--tokens", str(tokens)]
  start = time.perf_counter()
  p = subprocess.run(cmd, capture_output=True, text=True, env=targets.deviceless_env(),
                     cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  lines = p.stdout.strip().splitlines()
  if p.returncode == 0 and lines:
    return Result(**json.loads(lines[-1]))
  err = [l for l in p.stderr.splitlines() if "Error" in l or "error" in l] or p.stderr.splitlines()
  return Result(kernel, size, blocks.as_dict(), False,
                f"compiler crashed (exit {p.returncode}): {(err or ['?'])[0].strip()[:200]}",
                time.perf_counter() - start, [])


def _chain(job) -> Result | None:
  """The candidates of one (class, kernel) in order: the first legal one, or with
  ``wide`` the cheapest legal one; every result is logged."""
  cls, kernel, size, cands, target, tokens, wide, log = job
  best = None
  for blocks in cands:
    res = _run_one(kernel, size, blocks, target, tokens)
    if res.legal:
      res.cost_us = max(static_cost_us(kernel, size, blocks, i, target, tokens) for i in res.info)
    log(cls, res)
    if res.legal and (best is None or res.cost_us < best.cost_us):
      best = res
      if not wide:
        break
  return best


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--target", default="h200", choices=targets.TARGETS)
  p.add_argument("--tokens", type=int, default=16384)
  p.add_argument("--classes", nargs="*", default=list(CLASSES))
  p.add_argument("--kernels", nargs="*", default=list(ALL))
  p.add_argument("--jobs", type=int, default=2, help="compiles in parallel (processes)")
  p.add_argument("--wide", action="store_true", help="also the recipe's neighbours")
  p.add_argument("--report", action="store_true",
                 help="compile every kernel of each size with the table's tiles and report")
  p.add_argument("--sizes", nargs="*", default=list(SIZES), help="sizes for --report")
  p.add_argument("--one", nargs=3, metavar=("KERNEL", "SIZE", "BLOCKS_JSON"),
                 help="compile one candidate, print its result as JSON (used by the search)")
  p.add_argument("--out", default=None, help="table path (default kernels/tiles_<target>.json)")
  p.add_argument("--log", default=None, help="append every candidate's result here (jsonl)")
  a = p.parse_args(argv)
  os.environ.update(targets.ENV)
  targets.check_environment()
  from elas_kernels import tiles as tile_tables

  if a.report:
    return 1 if report_sizes(a.target, a.tokens, a.sizes) else 0
  if a.one:
    from elas_kernels.common import Blocks
    res = compile_candidate(a.one[0], a.one[1], Blocks(**json.loads(a.one[2])), a.target, a.tokens)
    print(json.dumps(dataclasses.asdict(res)))
    return 0
  out = a.out or tile_tables.table_path(a.target)
  table = json.load(open(out)) if os.path.exists(out) else {}  # classes not searched stay
  table = {"target": a.target, "tokens": a.tokens, "classes": dict(table.get("classes", {}))}
  start = time.perf_counter()
  done = [0]
  lock = threading.Lock()

  def log(cls, res):
    with lock:
      done[0] += 1
      print(f"[{done[0]} compiled, {time.perf_counter() - start:.0f}s] {cls} {res.kernel} "
            f"{res.blocks}: {res.why} ({res.compile_s:.0f}s)"
            + (f" cost {res.cost_us:.1f}us" if res.legal else ""), flush=True)
      if a.log:
        with open(a.log, "a") as fh:
          fh.write(json.dumps(dataclasses.asdict(res)) + "\n")

  chains = [(cls, kern, CLASSES[cls][-1], list(candidates(kern, SIZES[CLASSES[cls][-1]][1], a.wide)),
             a.target, a.tokens, a.wide, log) for cls in a.classes for kern in a.kernels]
  print(f"{len(chains)} (class, kernel) searches, {sum(len(c[3]) for c in chains)} candidates at "
        f"most, {a.jobs} compiles at a time", flush=True)
  best: dict[tuple[str, str], Result] = {}
  with futures.ThreadPoolExecutor(max_workers=a.jobs) as pool:
    for chain, res in zip(chains, pool.map(_chain, chains)):
      if res is not None:
        best[(chain[0], chain[1])] = res
  for (cls, kern), res in sorted(best.items()):
    table["classes"].setdefault(cls, {})[kern] = res.blocks
  table["searched"] = datetime.date.today().isoformat()
  with open(out, "w") as fh:
    json.dump(table, fh, indent=1, sort_keys=True)
    fh.write("\n")
  missing = [(c, k) for c in a.classes for k in a.kernels if (c, k) not in best]
  print(f"wrote {out}; no legal candidate for: {missing or 'none'}")
  return 1 if missing else 0


if __name__ == "__main__":
  sys.exit(main())
