"""Static performance of the Mosaic GPU ELAS FFN kernels, from deviceless H200 compiles.

    JAX_PLATFORMS=cpu JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 \\
      python -m benchmarks.mosaic_static --sizes 60m,130m,350m,1b --tokens 16384 --out /tmp/mgs

Needs the jax CUDA plugin (``pip install "jax[cuda12]==<jax version>"``), no GPU.
Per paper size, one program holds the forward (evaluation) and
``jax.value_and_grad`` in every backward mode (each with its dense warm-up
branch: ``sparse_on`` is an input), compiled for the H200 by XLA and Mosaic GPU
(ptxas for sm_90a). Per kernel it reports what the compiler made:

  * ``wgmma``: the instructions per program (``m64nNk16`` x count), from the
    kernel plan (``elas_kernels.ffn.mosaic.kernel_specs``); the shapes are
    checked against the instructions in the PTX Mosaic emitted, and the FLOPs
    against the PTX's executed wgmma (``ptx_gflop``);
  * shared memory (Mosaic's own allocation), registers and spill bytes
    (``ptxas -v`` of Mosaic's PTX, via ``MOSAIC_GPU_DUMP_TO``);
  * programs per SM (limited by threads, registers and shared memory,
    ``elas_jax.targets.Target.programs_per_sm``) and waves of the grid;
  * the time of the static kernel model (``elas_kernels.perf_model``: the PTX's
    executed wgmma, SIMT instructions, waits, TMA bytes and warpgroup roles,
    costed with the constants ``benchmarks/calibrate_model.py`` fitted to
    published Hopper measurements) and the term that bounds it;
  * per mode, the XLA kernels an ELAS call runs beside the Mosaic ones (weights
    into kernel order, statistics, casts, zeroed buffers, the dense tail;
    :func:`glue_us`), costed as XLA's dense core's kernels are and added to the
    totals (``--no_glue`` leaves them out);

beside XLA's dense loro_relu2 FFN core at the same size (``benchmarks.xla_static``)
and the roofline lower bound of the whole FFN core (the fused op's minimum FLOPs
and bytes at the H200's dense bf16 peak and HBM bandwidth). Nothing here is a
measurement: the model's error against published kernels is in docs/kernels.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys

from benchmarks.kernel_tiles import SIZES  # the paper sizes' (F, r)
from elas_jax.targets.compile import mosaic_resources  # the parser lives with the report

MODES = ("masked", "ste", "split")


# --impl: the implementations of the table this report compiles, and the tiles that
# make them (kernel_specs takes the same)
IMPLS = {"mosaic": {}, "mosaic_ws": {"warp_specialized": True, "block_f": 64},
         # the 2:4 products on sparse tensor cores; warp-specialized where mosaic_ws serves
         "mosaic_sparse": {"sparse_mma": True, "block_f": 64}}


def impl_tiles(impl: str, r: int) -> dict:
  """The tiles of ``impl`` (a key of :data:`IMPLS`) at rank ``r``: ``mosaic_sparse`` is
  warp-specialized up to rank 256, as ``MosaicSparseFfn`` chooses."""
  tiles = dict(IMPLS[impl])
  if impl == "mosaic_sparse":
    tiles["warp_specialized"] = r <= 256
  return tiles


def gate_program(f: int, r: int, tokens: int, modes=MODES, gpu=None, tiles: dict | None = None):
  """One program: the forward (evaluation) and value_and_grad per mode; its abstract inputs.
  ``gpu``: the :class:`elas_kernels.gpu.GpuSpec` the kernels are built for (default H200);
  ``tiles``: :class:`~elas_kernels.ffn.mosaic.Tiles` fields (one of :data:`IMPLS`)."""
  import jax
  import jax.numpy as jnp

  from elas_kernels.ffn.mosaic import MosaicFfn

  op = MosaicFfn(interpret=False, gpu=gpu, **(tiles or {}))

  def program(h, w_in, w_out, sparse_on):
    out = [op(h, w_in, w_out, sparse_on)[0]]
    for mode in modes:
      def loss(h, w_in, w_out, mode=mode):
        y, st = op(h, w_in, w_out, sparse_on, mode=mode)
        return jnp.sum(y.astype(jnp.float32)) + st["dropped_mass"]
      out.append(jax.value_and_grad(loss, argnums=(0, 1, 2))(h, w_in, w_out))
    return out

  bf16 = jnp.bfloat16
  args = (jax.ShapeDtypeStruct((tokens, r), bf16), jax.ShapeDtypeStruct((f, r), bf16),
          jax.ShapeDtypeStruct((r, f), bf16), jax.ShapeDtypeStruct((), jnp.bool_))
  return program, args


def compile_size(f: int, r: int, tokens: int, target, modes=MODES, tiles: dict | None = None):
  """(XLA compile report, Mosaic per-kernel resources) of :func:`gate_program`."""
  from elas_jax import targets

  program, args = gate_program(f, r, tokens, modes, gpu=target.gpu_spec(), tiles=tiles)
  report = targets.compile_for_target(program, *args, target=target, keep_dump=True)
  try:  # Mosaic's own dump of the compile (PTX, ptxas -v, resources)
    resources = mosaic_resources(os.path.join(report.dump_dir, "mosaic_gpu"))
  finally:
    shutil.rmtree(report.dump_dir, ignore_errors=True)
  return report, resources


def _compile_worker(f: int, r: int, tokens: int, target_name: str, modes, tiles):
  from elas_jax import targets

  report, resources = compile_size(f, r, tokens, targets.get(target_name), modes, tiles)
  return {"compiled": report.compiled, "reason": report.reason}, resources


def compile_size_fresh(f: int, r: int, tokens: int, target, modes=MODES, tiles: dict | None = None):
  """:func:`compile_size` in a fresh process. Mosaic GPU compiles a kernel identical to one
  this process compiled before from a cache, writing no PTX or ptxas dump for it, so a
  process that compiles steps and then reads kernels (the test gate) would find them
  missing. Returns (an object with ``compiled`` and ``reason``, the resources)."""
  import multiprocessing
  import types

  with multiprocessing.get_context("spawn").Pool(1) as pool:
    report, resources = pool.apply(_compile_worker, (f, r, tokens, target.name, tuple(modes), tiles))
  return types.SimpleNamespace(**report), resources


def kernel_rows(f: int, r: int, tokens: int, target, resources: dict, params=None,
                modes=MODES, tiles: dict | None = None) -> list[dict]:
  """One row per (phase, kernel) of every mode's launches, with the static model's time
  (:func:`elas_kernels.perf_model.estimate` of the kernel's PTX at ``params``, default
  the calibrated :class:`~elas_kernels.perf_model.Params`)."""
  from elas_kernels import perf_model as pm
  from elas_kernels.ffn.mosaic import kernel_specs

  gpu = target.gpu_spec()
  rows = []
  for mode in modes:
    for phase, specs in kernel_specs(tokens, f, r, r, mode=mode, gpu=gpu, **(tiles or {})).items():
      for s in specs:
        res = resources.get(s.name, {})
        regs, smem = res.get("registers"), res.get("smem_bytes") or s.smem_bytes
        prof = pm.profile_ptx(res["ptx"]) if res.get("ptx") else None
        threads = prof.threads if prof else 128
        pps = target.programs_per_sm(threads, regs, smem)
        waves = target.waves(s.programs, pps)
        est = pm.estimate(prof, s.programs, pps, s.hbm_bytes, params, gpu) if prof else None
        rows.append({
            "mode": mode, "phase": phase, "kernel": s.name, "grid": list(s.grid),
            "programs": s.programs, "stages": s.stages, "wgmma": s.wgmma,
            "ptx_wgmma": res.get("ptx_wgmma"), "smem_bytes": smem, "registers": regs,
            "spill_bytes": res.get("spill_bytes"), "wgmma_serialized": res.get("wgmma_serialized"),
            "threads": threads, "warpgroups": (prof.consumers, prof.producers) if prof else None,
            "planned_warpgroups": s.warpgroups,
            "programs_per_sm": pps, "waves": waves, "gflop": s.flops / 1e9,
            "ptx_gflop": prof.wgmma_flops * s.programs / 1e9 if prof else None,
            "hbm_mb": s.hbm_bytes / 1e6,
            "est_us": est.time_us if est else float("nan"), "bound": est.bound if est else "-",
            "terms_us": {k: v * 1e6 for k, v in est.terms_s.items()} if est else {}})
  return rows


def glue_us(f: int, r: int, tokens: int, target, mode: str, train: bool, sparse_on: bool,
            tiles: dict | None = None) -> tuple[float, list[dict], int]:
  """(µs, rows, custom calls) of the XLA kernels one ELAS core call runs beside its
  Mosaic kernels (the custom calls: those, left to :func:`kernel_rows`):
  the weights put in kernel feature order and padded, the statistics finished, the
  gradients cast, the reduce-add buffers zeroed, the dense ``F % 4`` tail. The call
  (forward, or with ``train`` forward and the vector-Jacobian product for an upstream
  ``g``, ``sparse_on`` a constant so XLA keeps one branch) is compiled for ``target``
  and every launch that is not a Mosaic kernel (a custom call) is costed as
  :mod:`benchmarks.xla_static` costs XLA's dense core: bytes at HBM bandwidth, plus the
  calibrated per-kernel overhead. The dense core's own such kernels are in its total."""
  import jax
  import jax.numpy as jnp

  from benchmarks import xla_static
  from elas_jax import targets
  from elas_kernels.ffn.mosaic import MosaicFfn

  op = MosaicFfn(interpret=False, gpu=target.gpu_spec(), **(tiles or {}))
  core = lambda h, w_in, w_out: op(h, w_in, w_out, sparse_on, mode=mode)

  def fwd_bwd(h, w_in, w_out, g):
    (out, stats), vjp = jax.vjp(core, h, w_in, w_out)
    return out, stats, vjp((g, jax.tree.map(jnp.zeros_like, stats)))

  fn = fwd_bwd if train else core
  report = targets.compile_for_target(fn, *xla_static.core_args(f, r, tokens, train),
                                      target=target, ptxas=False)
  if not report.compiled:
    raise RuntimeError(f"ELAS core ({mode}, train={train}) did not compile: {report.reason}")
  rows, custom_calls = [], 0
  for k in xla_static.hlo_kernels(report.compiled_object.as_text()):
    if k.opcode == "custom-call":  # a Mosaic kernel: costed from its PTX (kernel_rows)
      custom_calls += 1
      continue
    s, bound = xla_static.cost_s(k, target.bf16_flops_per_s)
    rows.append({"kernel": k.name, "kind": k.kind or k.opcode, "mb": k.bytes / 1e6,
                 "est_us": s * 1e6, "bound": bound})
  return sum(w["est_us"] for w in rows), rows, custom_calls


def glue_totals(f: int, r: int, tokens: int, target, tiles: dict | None = None,
                modes=MODES) -> dict[str, dict[str, float]]:
  """:func:`glue_us` per mode for the columns of :func:`totals`: the forward (evaluation,
  2:4), fwd+bwd of the 2:4 phase and of the dense warm-up."""
  fwd = glue_us(f, r, tokens, target, "masked", False, True, tiles)[0]
  return {mode: {"forward": fwd,
                 "fwd_bwd": glue_us(f, r, tokens, target, mode, True, True, tiles)[0],
                 "warm_up": glue_us(f, r, tokens, target, mode, True, False, tiles)[0]}
          for mode in modes}


def lower_bound_us(f: int, r: int, tokens: int, target, train: bool) -> float:
  """The FFN core's lower bound (:func:`elas_kernels.roofline.ffn_core`: each product once,
  the compulsory bytes) at ``target``'s peaks. The physical limit, not an estimate."""
  from elas_kernels import roofline

  return roofline.ffn_core(tokens, f, r, train=train, gpu=target.gpu_spec()).time_s * 1e6


def _phase_sums(rows: list[dict], mode: str, value) -> tuple[float, float, float, float]:
  """Per mode: the 2:4 forward, its backward, the warm-up's forward (the 2:4 one unless
  the plan gives the warm-up its own, ``dense warm-up forward``) and the warm-up backward."""
  sel = [w for w in rows if w["mode"] == mode]
  fwd, bwd, warm_fwd, warm = (sum(value(w) for w in sel if w["phase"] == ph)
                              for ph in ("forward", "backward", "dense warm-up forward",
                                         "dense warm-up"))
  if not any(w["phase"] == "dense warm-up forward" for w in sel):
    warm_fwd = fwd
  return fwd, bwd, warm_fwd, warm


def flops_ratios(rows: list[dict], f: int, r: int, tokens: int) -> dict[str, dict[str, float]]:
  """Executed wgmma FLOPs over the FFN core's minimum (:func:`elas_kernels.roofline.ffn_core`:
  each product once), per mode: the forward, fwd+bwd of the 2:4 phase and of the dense warm-up.
  Padding, recomputation (``y1``, ``dy2``) and whatever else the kernels repeat count."""
  from elas_kernels import roofline

  fwd_min = roofline.ffn_core(tokens, f, r, train=False).flops
  train_min = roofline.ffn_core(tokens, f, r, train=True).flops
  out = {}
  for mode in sorted({w["mode"] for w in rows}):
    fwd, bwd, warm_fwd, warm = _phase_sums(rows, mode, lambda w: w["gflop"] * 1e9)
    out[mode] = {"forward": fwd / fwd_min, "fwd_bwd": (fwd + bwd) / train_min,
                 "warm_up": (warm_fwd + warm) / train_min}
  return out


def totals(rows: list[dict], glue: dict | None = None) -> dict[str, dict[str, float]]:
  """Modelled µs per mode: forward, fwd+bwd of the 2:4 phase and of the dense warm-up;
  with ``glue`` (:func:`glue_totals`) the XLA kernels beside the Mosaic ones added."""
  out = {}
  for mode in sorted({w["mode"] for w in rows}):
    fwd, bwd, warm_fwd, warm = _phase_sums(rows, mode, lambda w: w["est_us"])
    out[mode] = {"forward": fwd, "fwd_bwd": fwd + bwd, "warm_up": warm_fwd + warm}
    if glue:
      out[mode] = {k: v + glue[mode][k] for k, v in out[mode].items()}
  return out


def markdown(size: str, tokens: int, rows: list[dict], target, xla: dict | None = None,
             glue: dict | None = None) -> str:
  """Per-kernel table, then per mode the totals (with ``glue``, the XLA kernels beside the
  Mosaic ones included: :func:`glue_totals`) beside XLA's dense core and the bound."""
  f, r = SIZES[size]
  out = [f"### {size} (F {f}, r {r}), {tokens} tokens",
         "",
         "| mode | phase | kernel | grid | wgmma per program | smem KiB | regs | spill B "
         "| programs/SM | waves | GFLOP | MB | est. µs | bound |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for w in rows:
    mma = ", ".join(f"{k} x{v}" for k, v in sorted(w["wgmma"].items()))
    smem = "-" if w["smem_bytes"] is None else f"{w['smem_bytes'] / 1024:.0f}"
    out.append(f"| {w['mode']} | {w['phase']} | `{w['kernel']}` | {'x'.join(map(str, w['grid']))} "
               f"| {mma} | {smem} | {w['registers']} | {w['spill_bytes']} | {w['programs_per_sm']} "
               f"| {w['waves']:.2f} | {w['gflop']:.1f} | {w['hbm_mb']:.0f} | {w['est_us']:.0f} | {w['bound']} |")
  lb_f, lb_t = lower_bound_us(f, r, tokens, target, False), lower_bound_us(f, r, tokens, target, True)
  ratios, tot = flops_ratios(rows, f, r, tokens), totals(rows, glue)
  head = "| mode | forward µs | fwd+bwd µs (2:4) | fwd+bwd µs (warm-up) "
  if glue:
    head += "| of which XLA glue: fwd, fwd+bwd, warm-up "
  if xla:
    head += "| XLA dense fwd / fwd+bwd µs | ELAS / XLA: fwd, fwd+bwd (2:4), warm-up "
  out += ["", head + "| lower bound fwd / fwd+bwd µs | fwd+bwd / lower bound "
          "| executed / minimum FLOPs: fwd, fwd+bwd (2:4), warm-up |",
          "|---|---|---|---|" + ("---|" if glue else "") + ("---|---|" if xla else "")
          + "---|---|---|"]
  for mode in MODES:
    t, x = tot[mode], ratios[mode]
    line = f"| {mode} | {t['forward']:.0f} | {t['fwd_bwd']:.0f} | {t['warm_up']:.0f} "
    if glue:
      gl = glue[mode]
      line += f"| {gl['forward']:.0f}, {gl['fwd_bwd']:.0f}, {gl['warm_up']:.0f} "
    if xla:
      xf, xt = xla["forward_us"], xla["fwd_bwd_us"]
      line += (f"| {xf:.0f} / {xt:.0f} | {t['forward'] / xf:.2f}, {t['fwd_bwd'] / xt:.2f}, "
               f"{t['warm_up'] / xt:.2f} ")
    out.append(line + f"| {lb_f:.0f} / {lb_t:.0f} | {t['fwd_bwd'] / lb_t:.2f} "
               f"| {x['forward']:.2f}, {x['fwd_bwd']:.2f}, {x['warm_up']:.2f} |")
  return "\n".join(out)


def chosen_sizes(ap: argparse.ArgumentParser, text: str) -> list[str]:
  """``--sizes`` (comma-separated) checked against :data:`SIZES`: ``ap.error`` names the unknown."""
  sizes = [s.strip() for s in text.split(",") if s.strip()]
  bad = [s for s in sizes if s not in SIZES]
  if bad:
    ap.error(f"--sizes: unknown {bad}; choose from {sorted(SIZES)}")
  return sizes


def write_results(out: str | None, results: dict, text: str) -> None:
  """``results.json`` and ``results.md`` in directory ``out`` (nothing when None)."""
  if out:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as fh:
      json.dump(results, fh, indent=1)
    with open(os.path.join(out, "results.md"), "w") as fh:
      fh.write(text + "\n")


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--sizes", default="60m,130m,350m,1b")
  ap.add_argument("--tokens", type=int, default=16384)
  ap.add_argument("--target", default="h200")
  ap.add_argument("--no_xla", action="store_true", help="leave out XLA's dense core")
  ap.add_argument("--impl", default="mosaic", choices=sorted(IMPLS),
                  help="mosaic, mosaic_ws (the warp-specialized kernels; ranks <= 256) or "
                       "mosaic_sparse (sparse tensor cores in the 2:4 phase)")
  ap.add_argument("--no_glue", action="store_true",
                  help="leave out the XLA kernels beside the Mosaic ones (kernels only)")
  ap.add_argument("--closed_chain", action="store_true",
                  help="the kernel model's closed-form chain and its fit (perf_model.CLOSED_FORM)")
  ap.add_argument("--out", default=None, help="directory for results.json and results.md")
  args = ap.parse_args(argv)
  from benchmarks import xla_static
  from elas_jax import targets
  from elas_kernels import perf_model as pm

  targets.check_environment()
  target = targets.get(args.target)
  params = pm.CLOSED_FORM if args.closed_chain else None
  sizes = chosen_sizes(ap, args.sizes)
  results, md = {}, []
  for i, size in enumerate(sizes):
    f, r = SIZES[size]
    print(f"[{i + 1}/{len(sizes)}] compiling {size} (F {f}, r {r}, {args.tokens} tokens) ...",
          file=sys.stderr, flush=True)
    tiles = impl_tiles(args.impl, r)
    report, resources = compile_size(f, r, args.tokens, target, tiles=tiles)
    if not report.compiled:
      print(f"    not compiled: {report.reason}", file=sys.stderr, flush=True)
      results[size] = {"compiled": False, "reason": report.reason}
      continue
    rows = kernel_rows(f, r, args.tokens, target, resources, tiles=tiles, params=params)
    xla = None
    if not args.no_xla:
      xla = {}
      for key, train in (("forward_us", False), ("fwd_bwd_us", True)):
        _, xrows = xla_static.compile_rows(f, r, args.tokens, target, train)
        xla[key] = sum(w["est_us"] for w in xrows)
    glue = None if args.no_glue else glue_totals(f, r, args.tokens, target, tiles)
    results[size] = {"compiled": report.compiled, "reason": report.reason,
                     "compile_s": report.compile_s, "kernels": rows, "totals_us": totals(rows, glue),
                     "kernels_only_us": totals(rows), "glue_us": glue,
                     "xla_dense_us": xla, "executed_flops_ratio": flops_ratios(rows, f, r, args.tokens),
                     "lower_bound_us": [lower_bound_us(f, r, args.tokens, target, t) for t in (False, True)]}
    print(f"    compiled={report.compiled} in {report.compile_s:.0f} s"
          + (f": {report.reason}" if report.reason else ""), file=sys.stderr, flush=True)
    md.append(markdown(size, args.tokens, rows, target, xla, glue))
  text = "\n\n".join(md)
  print(text)
  write_results(args.out, results, text)
  return 0 if all(v["compiled"] for v in results.values()) else 1


if __name__ == "__main__":
  sys.exit(main())
