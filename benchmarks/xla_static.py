"""XLA's dense FFN core (loro_relu2), costed kernel by kernel from its deviceless H200 compile.

    JAX_PLATFORMS=cpu JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 \\
      python -m benchmarks.xla_static --sizes 60m,130m,350m,1b --tokens 16384 --out /tmp/xs

Needs the jax CUDA plugin (``pip install "jax[cuda12]==<jax version>"``), no GPU.
The dense path the ELAS kernels must beat is the loro_relu2 FFN between the rank
spaces: ``y1 = h w_inᵀ``, ``out = relu(y1)² w_outᵀ`` (bf16, fp32 accumulation),
and its backward for an upstream gradient ``g``. Per paper size it is compiled
for the H200 by XLA and the optimized HLO is read kernel by kernel: each launch's
FLOPs (its dots' ``2·M·N·K``) and HBM bytes (its operands and results, once).

The cost is a roofline at *published* ceilings, not at the datasheet's:
GEMM-bearing kernels at ``max(FLOPs / (gemm_efficiency · peak), bytes / HBM)``,
every other kernel at ``bytes / HBM``, each plus the per-kernel overhead the
static kernel model was calibrated to (``elas_kernels.perf_model.Params``,
docs/kernels.md); the kernels run one after another (no overlap). Defaults (docs/hopper_published.md): cuBLAS's 716
TFLOP/s on a 4096³ bf16 GEMM (72% of 989) and the H200's measured 3.89 TB/s DRAM
read. XLA compiled deviceless is not autotuned (no GPU to tune on: its GEMMs come
out as Triton fusions with default tiles); the fusion boundaries are the compile's,
the GEMMs are costed as a tuned library would run them. Skinny GEMMs (K or N of
128-512) run below a 4096³ GEMM's efficiency, so the estimate is optimistic for
XLA: a kernel that beats it beats XLA by at least that much, if the model holds.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import sys

from benchmarks.mosaic_static import SIZES, chosen_sizes, lower_bound_us, write_results
from elas_kernels.perf_model import Params

# docs/hopper_published.md: cuBLAS bf16 4096³ on an H100 (716 TFLOP/s of 989); the HBM
# bandwidth and per-kernel overhead are the static kernel model's (the H200's DRAM read
# measured by te42kyfo/gpu-benches; the overhead calibrated), the same the ELAS kernels get.
GEMM_EFFICIENCY = 716 / 989
HBM_BYTES_PER_S = Params.hbm_bytes_per_s

_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
          "f32": 4, "s64": 8, "u64": 8, "f64": 8, "f8e4m3fn": 1, "f8e5m2": 1}
_SHAPE = re.compile(r"\b(" + "|".join(_BYTES) + r")\[([0-9,]*)\]")
_INSTR = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([\w\-]+)\((.*)$")
_NO_KERNEL = {"parameter", "bitcast", "tuple", "get-tuple-element", "constant", "after-all",
              "partition-id", "replica-id", "opt-barrier"}


@dataclasses.dataclass(frozen=True)
class HloKernel:
  """One launch of the optimized program: what it computes and moves."""

  name: str
  opcode: str  # fusion, custom-call, copy, ...
  kind: str  # the fusion kind (kCustom, kLoop, kInput, kOutput) or ""
  flops: float  # its dots' 2·M·N·K, 0 for none
  bytes: float  # operands read once and results written once
  gemm: str  # "MxNxK" of its (largest) dot, "" for none


def _shapes(type_text: str) -> list[tuple[str, tuple[int, ...]]]:
  return [(dt, tuple(int(d) for d in dims.split(",") if d)) for dt, dims in _SHAPE.findall(type_text)]


def _nbytes(shapes) -> int:
  return sum(_BYTES[dt] * math.prod(dims) for dt, dims in shapes)


def _operand_names(args: str) -> list[str]:
  """The ``%name`` operands of an instruction (its text up to the closing parenthesis)."""
  depth, end = 1, len(args)
  for i, ch in enumerate(args):
    depth += ch == "("
    depth -= ch == ")"
    if depth == 0:
      end = i
      break
  return re.findall(r"%([\w.\-]+)", args[:end])


def _computations(text: str) -> tuple[dict[str, list[str]], str]:
  """The HLO module's computations (name -> instruction lines) and the entry's name."""
  comps, entry, name = {}, None, None
  for line in text.splitlines():
    head = re.match(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
    if head and not line.startswith(" "):
      name = head.group(2)
      comps[name] = []
      if head.group(1):
        entry = name
      continue
    if line.startswith("}"):
      name = None
      continue
    if name is not None and "=" in line:
      comps[name].append(line)
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text")
  return comps, entry


def _dot(rest: str, shapes: dict, out_dims: tuple[int, ...]) -> tuple[float, str]:
  """(FLOPs, "MxNxK") of one dot from its operands' shapes and its dimension numbers."""
  lhs = shapes.get(_operand_names(rest)[0], [("f32", ())])[0][1]
  contracting = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", rest)
  k = math.prod(lhs[int(d)] for d in contracting.group(1).split(",") if d) if contracting else 1
  batch = re.search(r"lhs_batch_dims=\{([0-9,]*)\}", rest)
  nb = len([d for d in batch.group(1).split(",") if d]) if batch else 0
  gemm = "x".join(str(d) for d in (*out_dims[nb:], k))
  if nb:  # a batched dot (XLA splits a long contraction into a batch and a reduce)
    gemm = f"{math.prod(out_dims[:nb])} x {gemm}"
  return 2.0 * math.prod(out_dims) * k, gemm


def _dots(comps: dict[str, list[str]], comp: str, seen=()) -> list[tuple[float, str]]:
  """(FLOPs, "MxNxK") of every dot in ``comp`` and the computations it calls."""
  out, shapes = [], {}
  for line in comps.get(comp, []):
    m = _INSTR.match(line)
    if not m:
      continue
    _, name, type_text, opcode, rest = m.groups()
    shapes[name] = _shapes(type_text)
    if opcode == "dot":
      out.append(_dot(rest, shapes, shapes[name][0][1]))
    for callee in re.findall(r"(?:calls|to_apply)=%?([\w.\-]+)", rest):
      if callee not in seen and callee != comp:
        out += _dots(comps, callee, seen + (comp,))
  return out


def hlo_kernels(text: str) -> list[HloKernel]:
  """The launches of an optimized HLO module's entry computation, in order.

  Every entry instruction except parameters, bitcasts, tuples and constants is
  taken as one kernel; its FLOPs are those of the dots it (or what it calls)
  contains, its bytes its operands' and results' sizes.
  """
  comps, entry = _computations(text)
  shapes, out = {}, []
  for line in comps[entry]:
    m = _INSTR.match(line)
    if not m:
      continue
    _, name, type_text, opcode, rest = m.groups()
    shapes[name] = _shapes(type_text)
    if opcode in _NO_KERNEL:
      continue
    kind = re.search(r"kind=(k\w+)", rest)
    dots = [_dot(rest, shapes, shapes[name][0][1])] if opcode == "dot" else []
    for callee in re.findall(r"calls=%?([\w.\-]+)", rest):
      dots += _dots(comps, callee)
    nbytes = _nbytes(shapes[name]) + sum(_nbytes(shapes.get(o, [])) for o in _operand_names(rest))
    flops = sum(f for f, _ in dots)
    gemm = max(dots)[1] if dots else ""
    out.append(HloKernel(name, opcode, kind.group(1) if kind else "", flops, float(nbytes), gemm))
  return out


def cost_s(k: HloKernel, peak_flops_per_s: float, gemm_efficiency: float = GEMM_EFFICIENCY,
           hbm_bytes_per_s: float = HBM_BYTES_PER_S,
           overhead_s: float = Params.overhead_s) -> tuple[float, str]:
  """(seconds, bound) of one kernel under the module docstring's model."""
  mem = k.bytes / hbm_bytes_per_s
  if not k.flops:
    return mem + overhead_s, "bytes"
  comp = k.flops / (gemm_efficiency * peak_flops_per_s)
  return max(comp, mem) + overhead_s, "flops" if comp >= mem else "bytes"


def dense_core(train: bool):
  """The loro_relu2 FFN core between the rank spaces (as ``elas_jax.model.FFN`` computes it
  when not sparse: bf16 matmuls accumulated in fp32, ``maximum`` then ``r * r``); with
  ``train`` the forward and the vector-Jacobian product for an upstream ``g``."""
  import jax
  import jax.numpy as jnp

  from elas_kernels.ffn.base import matmul_t

  def core(h, w_in, w_out):
    r = jnp.maximum(matmul_t(h, w_in), 0)
    return matmul_t(r * r, w_out)

  if not train:
    return core

  def fwd_bwd(h, w_in, w_out, g):
    out, vjp = jax.vjp(core, h, w_in, w_out)
    return out, vjp(g)

  return fwd_bwd


def core_args(f: int, r: int, tokens: int, train: bool):
  import jax
  import jax.numpy as jnp

  bf16 = jnp.bfloat16
  args = [jax.ShapeDtypeStruct((tokens, r), bf16), jax.ShapeDtypeStruct((f, r), bf16),
          jax.ShapeDtypeStruct((r, f), bf16)]
  return args + [jax.ShapeDtypeStruct((tokens, r), bf16)] if train else args


def compile_rows(f: int, r: int, tokens: int, target, train: bool, **model) -> tuple[object, list[dict]]:
  """(compile report, one row per kernel with its cost) of the dense core at one size."""
  from elas_jax import targets

  report = targets.compile_for_target(dense_core(train), *core_args(f, r, tokens, train),
                                      target=target, ptxas=False)
  if not report.compiled:
    return report, []
  rows = []
  for k in hlo_kernels(report.compiled_object.as_text()):
    s, bound = cost_s(k, target.bf16_flops_per_s, **model)
    rows.append({"kernel": k.name, "kind": k.kind or k.opcode, "gemm": k.gemm,
                 "gflop": k.flops / 1e9, "mb": k.bytes / 1e6, "est_us": s * 1e6, "bound": bound})
  return report, rows


def markdown(size: str, tokens: int, fwd: list[dict], train: list[dict], lower: tuple[float, float]) -> str:
  f, r = SIZES[size]
  out = [f"### {size} (F {f}, r {r}), {tokens} tokens, fwd+bwd", "",
         "| kernel | kind | GEMM M x N x K | GFLOP | MB | est. µs | bound |", "|---|---|---|---|---|---|---|"]
  for w in train:
    out.append(f"| `{w['kernel']}` | {w['kind']} | {w['gemm'] or '-'} | {w['gflop']:.1f} | {w['mb']:.0f} "
               f"| {w['est_us']:.1f} | {w['bound']} |")
  tf, tt = sum(w["est_us"] for w in fwd), sum(w["est_us"] for w in train)
  out += ["", f"forward {tf:.0f} µs ({len(fwd)} kernels), fwd+bwd {tt:.0f} µs ({len(train)} kernels); "
          f"the ELAS core's lower bound {lower[0]:.0f} / {lower[1]:.0f} µs."]
  return "\n".join(out)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--sizes", default="60m,130m,350m,1b")
  ap.add_argument("--tokens", type=int, default=16384)
  ap.add_argument("--target", default="h200")
  ap.add_argument("--gemm_efficiency", type=float, default=GEMM_EFFICIENCY,
                  help="fraction of the dense bf16 peak a GEMM kernel reaches")
  ap.add_argument("--hbm_tb_s", type=float, default=HBM_BYTES_PER_S / 1e12,
                  help="HBM bandwidth a kernel reaches, TB/s")
  ap.add_argument("--out", default=None, help="directory for results.json and results.md")
  args = ap.parse_args(argv)
  from elas_jax import targets

  targets.check_environment()
  target = targets.get(args.target)
  sizes = chosen_sizes(ap, args.sizes)
  model = {"gemm_efficiency": args.gemm_efficiency, "hbm_bytes_per_s": args.hbm_tb_s * 1e12}
  results, md, ok = {}, [], True
  for i, size in enumerate(sizes):
    f, r = SIZES[size]
    print(f"[{i + 1}/{len(sizes)}] compiling {size} (F {f}, r {r}, {args.tokens} tokens) ...",
          file=sys.stderr, flush=True)
    rep_f, fwd = compile_rows(f, r, args.tokens, target, False, **model)
    rep_t, train = compile_rows(f, r, args.tokens, target, True, **model)
    ok &= rep_f.compiled and rep_t.compiled
    lower = tuple(lower_bound_us(f, r, args.tokens, target, train) for train in (False, True))
    results[size] = {"forward": fwd, "fwd_bwd": train, "forward_us": sum(w["est_us"] for w in fwd),
                     "fwd_bwd_us": sum(w["est_us"] for w in train), "elas_lower_bound_us": lower,
                     "model": model}
    md.append(markdown(size, args.tokens, fwd, train, lower))
  text = "\n\n".join(md) + (f"\n\nGEMMs at {args.gemm_efficiency:.0%} of {target.bf16_flops_per_s / 1e12:.0f}"
                            f" TFLOP/s, bytes at {args.hbm_tb_s:.2f} TB/s.")
  print(text)
  write_results(args.out, results, text)
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
