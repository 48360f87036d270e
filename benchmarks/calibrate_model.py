"""Calibrate the static kernel model against published Hopper measurements.

    JAX_PLATFORMS=cpu JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 \\
      python -m benchmarks.calibrate_model --out /tmp/calib

Needs the jax CUDA plugin, no GPU. The kernels are ones this process can
compile for the H200 and whose speed someone published with the shape
(docs/hopper_published.md):

* jax's Pallas Mosaic GPU Hopper matmul (``hopper_matmul_mgpu``: a TMA producer
  warpgroup, two consumer warpgroups, persistent grid) at the two shapes jax
  published, every configuration of its own tuning sweep compiled and the
  best estimate taken (its benchmark reports the best);
* jax's FlashAttention-3-style attention (``attention_mgpu``: the same
  structure, softmax between the two products) at the shapes of the
  FlashAttention-3 paper's forward figure, compared with FlashAttention-3's
  published speed, and at the one H200 shape published (flash-attention issue
  #1438). jax's kernel is FlashAttention-3's method, not its code: the row says
  what a kernel of this class reaches and how far the model's estimate of jax's
  kernel is from it.

Each kernel is compiled deviceless for the H200 (its PTX read by
:func:`elas_kernels.perf_model.profile_ptx`; executed FLOPs are checked against
``2·M·N·K`` and ``4·B·H·S²·D``), then the model's free constants
(:class:`~elas_kernels.perf_model.Params`: tensor-core efficiency, wgmma wait
latency, cycles per SIMT instruction, special-function cycles, per-kernel
overhead) are fitted by a grid search minimising the RMS of ``log(predicted /
published)``. Reported per point: published, predicted with the fit, and the
leave-one-out prediction (the fit redone without that point), which is the
error to expect on a kernel the fit has not seen. The published numbers are
H100 SXM5 except one (H200); both have 132 SMs at the same tensor-core peak.

XLA's cuBLAS GEMMs cannot be calibrated this way: a deviceless compile is not
autotuned and emits Triton GEMMs, not the library call a GPU process makes;
``benchmarks/xla_static.py`` costs them at cuBLAS's published efficiency instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import os
import shutil
import sys

from benchmarks.mosaic_static import write_results

# (case, M, N, K, published seconds, source); FLOPs 2·M·N·K.
MATMULS = [
    ("Mosaic matmul f16 4096x8192x4096", 4096, 8192, 4096, 2 * 4096 * 8192 * 4096 / (0.836 * 990e12),
     "jax-ml/jax commit 029bfc28: 83.6% of 990 TFLOP/s, H100"),
    ("Mosaic matmul f16 1024x4096x4096", 1024, 4096, 4096, 43e-6,
     "jax docs pallas/gpu/collective_matmul.md: about 43 µs on one H100"),
]
# (case, batch, heads, seq, head_dim, published TFLOP/s or seconds, source); FLOPs 4·B·H·S²·D.
FA3 = "FlashAttention-3 paper figure (flash-attention assets/flash3_fp16_fwd.png), H100 SXM5, fp16"
ATTENTION = [
    ("attention fwd hd64 S512", 32, 32, 512, 64, 333e12, FA3),
    ("attention fwd hd64 S2k", 8, 32, 2048, 64, 460e12, FA3),
    ("attention fwd hd64 S8k", 2, 32, 8192, 64, 496e12, FA3),
    ("attention fwd hd128 S512", 32, 16, 512, 128, 467e12, FA3),
    ("attention fwd hd128 S2k", 8, 16, 2048, 128, 625e12, FA3),
    ("attention fwd hd128 S8k", 2, 16, 8192, 128, 646e12, FA3),
    ("attention fwd hd256 S2k", 8, 8, 2048, 256, 707e12, FA3),
    ("attention fwd hd256 S8k", 2, 8, 8192, 256, 746e12, FA3),
    ("attention fwd hd64 S32k (H200)", 1, 8, 32768, 64, 4.51709e-3,
     "Dao-AILab/flash-attention issue #1438: FA3 bf16 on an H200 (run here in f16)"),
]
# The grid of the fit (Params fields); the bandwidths stay at their published values.
GRID = {
    "tc_efficiency": [0.70, 0.75, 0.80, 0.85, 0.90, 0.95, 1.0],
    "wait_latency": [0.0, 100.0, 200.0, 400.0, 800.0],
    "cpi": [1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 5.5, 6.0],
    "mufu_cycles": [1.0, 2.0, 4.0, 8.0, 16.0],
    "overhead_s": [0.0, 2e-6, 4e-6, 8e-6],
}


@dataclasses.dataclass
class Point:
  """One calibration point: a compiled kernel (or the best of a sweep) and its measurement."""

  case: str
  published_s: float
  source: str
  candidates: list  # (config text, Profile, programs, programs per SM, HBM bytes)
  flops: float


def _compile(fn, args, target):
  """(Profile inputs) of the one Mosaic kernel ``fn`` compiles to, or the compiler's refusal."""
  from elas_jax import targets
  from elas_jax.targets.compile import mosaic_resources

  report = targets.compile_for_target(fn, *args, target=target, keep_dump=True)
  try:
    if not report.compiled:
      return None, report.reason
    res = mosaic_resources(os.path.join(report.dump_dir, "mosaic_gpu"))
  finally:
    shutil.rmtree(report.dump_dir, ignore_errors=True)
  (name, r), = res.items()
  return r, None


def matmul_point(case, m, n, k, published_s, source, target) -> Point:
  """jax's Hopper matmul at (M, N, K) over its own tuning sweep (``main()``'s)."""
  import jax
  import jax.numpy as jnp
  from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu as hm

  from elas_kernels import perf_model as pm

  args = (jax.ShapeDtypeStruct((m, k), jnp.float16), jax.ShapeDtypeStruct((k, n), jnp.float16))
  point = Point(case, published_s, source, [], 2.0 * m * n * k)
  D = hm.MatmulDimension
  for tm, tn, minor, width, wg in itertools.product((128, 256), (64, 128), (D.M, D.N), (4, 8, 16), D):
    cfg = hm.TuningConfig(tile_m=tm, tile_n=tn, tile_k=64, max_concurrent_steps=4, epi_tile_n=64,
                          epi_tile_m=64, grid_minor_dim=minor, grid_tile_width=width, wg_dimension=wg)
    res, why = _compile(lambda a, b, cfg=cfg: hm.matmul(a, b, None, cfg), args, target)
    if res is None:
      continue  # shared memory over the limit: the sweep skips it too
    # Two consumer warpgroups split the CTA's tile along wg_dimension; the grid is
    # persistent (one CTA per SM) and walks the tiles.
    cta_m, cta_n = tm * (2 if wg == D.M else 1), tn * (2 if wg == D.N else 1)
    tiles = math.ceil(m / cta_m) * math.ceil(n / cta_n)
    programs = target.sm_count
    trips = math.ceil(tiles / programs)
    prof = pm.profile_ptx(res["ptx"], runtime_trips=trips)
    _check_flops(case, prof.wgmma_flops / trips * tiles, point.flops)
    pps = target.programs_per_sm(prof.threads, res["registers"], res["smem_bytes"])
    text = f"tile {tm}x{tn}x64, wg {wg.name}, minor {minor.name}, width {width}"
    point.candidates.append((text, prof, programs, pps, 2.0 * (m * k + k * n + m * n)))
  return point


def attention_point(case, b, h, s, d, published, source, target) -> Point:
  """jax's FlashAttention-3-style forward, block_q 64, the first block_kv of (256, 128, 64)
  that fits (as its ``main()`` does), 2 stages."""
  import jax
  import jax.numpy as jnp
  from jax.experimental.pallas.ops.gpu import attention_mgpu as am

  from elas_kernels import perf_model as pm

  flops = 4.0 * b * h * s * s * d
  published_s = published if published < 1 else flops / published
  point = Point(case, published_s, source, [], flops)
  qkv = [jax.ShapeDtypeStruct((b, s, h, d), jnp.float16)] * 3
  for block_kv in (256, 128, 64):
    cfg = am.TuningConfig(block_q=64, block_kv=block_kv, max_concurrent_steps=2)
    res, why = _compile(lambda q, k, v, cfg=cfg: am.attention(q, k, v, cfg), qkv, target)
    if res is None:
      continue
    # the kv loop's bound is a constant LLVM may fold into flags: give it (checked below)
    prof = pm.profile_ptx(res["ptx"], runtime_trips=s // block_kv)
    programs = h * (s // 128) * b
    _check_flops(case, prof.wgmma_flops * programs, flops)
    pps = target.programs_per_sm(prof.threads, res["registers"], res["smem_bytes"])
    point.candidates.append((f"block_kv {block_kv}", prof, programs, pps, 2.0 * 4 * b * s * h * d))
    break
  return point


def _check_flops(case: str, counted: float, expected: float) -> None:
  """The PTX reading (loops, trip counts, roles) must find the kernel's known work."""
  if abs(counted / expected - 1) > 1e-6:
    raise AssertionError(f"{case}: the PTX's wgmma FLOPs {counted:.4g} != {expected:.4g}: "
                         "the model's reading of this kernel is wrong")


def predict(point: Point, params, gpu):
  """(seconds, configuration, :class:`~elas_kernels.perf_model.Estimate`) of the best
  candidate under ``params``."""
  from elas_kernels import perf_model as pm

  ests = [(pm.estimate(p, n, k, hbm, params, gpu), text) for text, p, n, k, hbm in point.candidates]
  est, text = min(ests, key=lambda e: e[0].time_s)
  return est.time_s, text, est


def fit(points: list[Point], gpu, grid=GRID):
  """(Params, RMS log error) minimising the RMS of log(predicted / published)."""
  from elas_kernels import perf_model as pm

  best = (float("inf"), None)
  keys = list(grid)
  for values in itertools.product(*(grid[k] for k in keys)):
    prm = pm.Params(**dict(zip(keys, values)))
    err = [math.log(predict(p, prm, gpu)[0] / p.published_s) for p in points]
    rms = math.sqrt(sum(e * e for e in err) / len(err))
    if rms < best[0]:
      best = (rms, prm)
  return best[1], best[0]


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--target", default="h200")
  ap.add_argument("--out", default=None, help="directory for results.json and results.md")
  ap.add_argument("--quick", action="store_true",
                  help="one matmul and three attention points, a coarse grid (a smoke test)")
  ap.add_argument("--closed_chain", action="store_true",
                  help="fit the closed-form chain (perf_model.CLOSED_FORM) instead of the default, "
                       "the chain played in program order")
  args = ap.parse_args(argv)
  from elas_jax import targets
  from elas_kernels import perf_model as pm

  targets.check_environment()
  target = targets.get(args.target)
  gpu = target.gpu_spec()
  mm, att = (MATMULS[:1], ATTENTION[::3]) if args.quick else (MATMULS, ATTENTION)
  points = []
  for i, c in enumerate(mm + att):
    print(f"[{i + 1}/{len(mm) + len(att)}] compiling {c[0]} ...", file=sys.stderr, flush=True)
    p = matmul_point(*c, target) if c in mm else attention_point(*c, target)
    if not p.candidates:
      print(f"    no configuration compiled: left out", file=sys.stderr)
      continue
    points.append(p)
  grid = {k: v[::3] for k, v in GRID.items()} if args.quick else dict(GRID)
  grid["ordered_chain"] = [not args.closed_chain]
  params, rms = fit(points, gpu, grid)
  peak = pm.Params(tc_efficiency=1.0, wait_latency=0.0, cpi=1.0, mufu_cycles=1.0, overhead_s=0.0,
                   ordered_chain=not args.closed_chain)
  rows = []
  for i, p in enumerate(points):
    rest = points[:i] + points[i + 1:]
    loo_params, _ = fit(rest, gpu, grid)
    t_fit, cfg, est = predict(p, params, gpu)
    t_loo, _, _ = predict(p, loo_params, gpu)
    t_peak, _, _ = predict(p, peak, gpu)
    rows.append({"case": p.case, "source": p.source, "published_us": p.published_s * 1e6,
                 "published_tflops": p.flops / p.published_s / 1e12, "configuration": cfg,
                 "configurations": len(p.candidates), "peak_model_us": t_peak * 1e6,
                 "fit_us": t_fit * 1e6, "fit_error": t_fit / p.published_s - 1,
                 "loo_us": t_loo * 1e6, "loo_error": t_loo / p.published_s - 1, "bound": est.bound})
  text = markdown(rows, params, rms)
  print(text)
  write_results(args.out, {"params": dataclasses.asdict(params), "rms_log_error": rms, "points": rows}, text)
  return 0


def markdown(rows: list[dict], params, rms: float) -> str:
  out = ["| kernel and shape | published | µs published | model at peak µs | fitted µs (error) "
         "| leave-one-out µs (error) | bound | configuration |", "|---|---|---|---|---|---|---|---|"]
  for w in rows:
    out.append(f"| {w['case']} | {w['published_tflops']:.0f} TFLOP/s: {w['source']} | {w['published_us']:.1f} "
               f"| {w['peak_model_us']:.1f} | {w['fit_us']:.1f} ({w['fit_error']:+.0%}) "
               f"| {w['loo_us']:.1f} ({w['loo_error']:+.0%}) | {w['bound']} "
               f"| {w['configuration']} (of {w['configurations']}) |")
  p = params
  out += ["", f"Fit: tensor-core efficiency {p.tc_efficiency:.2f}, wgmma wait {p.wait_latency:.0f} cycles, "
          f"{p.cpi:g} cycles per SIMT instruction, {p.mufu_cycles:g} per special function, "
          f"{p.overhead_s * 1e6:.0f} µs per kernel; RMS log error {rms:.3f} "
          f"(x{math.exp(rms):.2f})."]
  return "\n".join(out)


if __name__ == "__main__":
  sys.exit(main())
