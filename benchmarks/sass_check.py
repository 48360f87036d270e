"""Cross-check the kernel model's SIMT term against the compiler's own schedule (SASS).

    JAX_PLATFORMS=cpu JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 \\
      python -m benchmarks.sass_check --sizes 130m --impl mosaic_ws

Needs the jax CUDA plugin and NVIDIA's ``nvdisasm`` beside the plugin's ``ptxas``
(``pip install nvidia-cuda-nvdisasm`` and copy its ``nvidia/cu13/bin/nvdisasm`` to
``nvidia/cuda_nvcc/bin/``): Mosaic GPU then writes each kernel's SASS with its
control codes, and ``elas_kernels.perf_model.sass_main_loop`` reads the stall
cycles ptxas scheduled in the main loop. The model (``perf_model``) costs a
consumer's SIMT work as PTX statements times a fitted ``cpi``, fitted mostly on
jax's FlashAttention-3-style attention; if the ELAS kernels' PTX becomes more (or
fewer) scheduled cycles per statement than the attention kernel's, the fit
transfers to them with that error. Per kernel, per trip of its main loop (nested
loops at their PTX trip counts): PTX statements, SASS instructions, stall cycles,
and cycles per PTX statement; the attention kernel (D 128, S 2k, block_kv 128) is
the reference row. Static only: stalls on variable-latency results (shared-memory
loads, barriers, special functions) are not in these counts.
"""

from __future__ import annotations

import argparse
import sys

from benchmarks import mosaic_static as ms


def nvdisasm_beside_ptxas() -> str | None:
  """The ``nvdisasm`` Mosaic GPU runs for its SASS dump (beside the CUDA plugin's ptxas,
  in the ``nvidia-cuda-nvcc`` wheel), or None where it is not installed."""
  import importlib.util
  import os

  spec = importlib.util.find_spec("nvidia.cuda_nvcc")
  for root in (spec.submodule_search_locations or []) if spec else []:
    path = os.path.join(root, "bin", "nvdisasm")
    if os.access(path, os.X_OK):
      return path
  return None


def row(name: str, res: dict) -> dict | None:
  """One kernel's counts, or None without SASS or a main loop."""
  from elas_kernels import perf_model as pm

  if not res.get("sass") or not res.get("ptx"):
    return None
  sass, ptx = pm.sass_main_loop(res["sass"]), pm.ptx_main_loop(res["ptx"])
  if sass is None or ptx is None:
    return None
  statements, trips, wgmma = ptx.statements, ptx.nested_trips, ptx.wgmma
  cycles = sass.stall_cycles
  if len(sass.inner) == len(trips):  # the nested loops, at the PTX's trip counts
    cycles += sum((t - 1) * c for (_, c), t in zip(sass.inner, trips))
    instructions = sass.instructions + sum((t - 1) * n for (n, _), t in zip(sass.inner, trips))
  else:  # not matched: one pass each (said in the row)
    instructions = sass.instructions
  return {"kernel": name, "ptx_statements": statements, "sass_instructions": instructions,
          "stall_cycles": cycles, "cycles_per_statement": cycles / statements,
          "nested_matched": len(sass.inner) == len(trips),
          # the same loop read twice: its PTX wgmma and SASS HGMMA, nested loops once
          "ptx_wgmma": wgmma, "sass_hgmma": sass.hgmma}


def attention_row(target) -> dict | None:
  import jax
  import jax.numpy as jnp
  from jax.experimental.pallas.ops.gpu import attention_mgpu as am

  from benchmarks.calibrate_model import _compile

  qkv = [jax.ShapeDtypeStruct((8, 2048, 16, 128), jnp.float16)] * 3
  cfg = am.TuningConfig(block_q=64, block_kv=128, max_concurrent_steps=2)
  res, why = _compile(lambda q, k, v: am.attention(q, k, v, cfg), qkv, target)
  return row("attention_mgpu D128 S2k (calibration)", res) if res else None


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--sizes", default="130m")
  ap.add_argument("--impl", default="mosaic_ws", choices=sorted(ms.IMPLS))
  ap.add_argument("--target", default="h200")
  ap.add_argument("--out", default=None, help="directory for results.json and results.md")
  args = ap.parse_args(argv)
  from elas_jax import targets

  targets.check_environment()
  if nvdisasm_beside_ptxas() is None:
    print("no nvdisasm beside ptxas: see this module's docstring", file=sys.stderr)
    return 2
  target = targets.get(args.target)
  rows = [attention_row(target)]
  if rows[0] is None:
    print("the attention kernel left no SASS", file=sys.stderr)
    return 1
  for size in ms.chosen_sizes(ap, args.sizes):
    f, r = ms.SIZES[size]
    _, resources = ms.compile_size(f, r, 16384, target, modes=("masked",),
                                   tiles=ms.impl_tiles(args.impl, r))
    for name in sorted(resources):
      x = row(f"{size} {name}", resources[name])
      if x:
        rows.append(x)
  ref = rows[0]["cycles_per_statement"]
  md = ["| kernel | PTX statements / trip | SASS instructions / trip | stall cycles / trip | "
        "cycles / PTX statement | vs attention |", "|---|---|---|---|---|---|"]
  for x in rows:
    md.append(f"| {x['kernel']}{'' if x['nested_matched'] else ' (nested loops once)'} | "
              f"{x['ptx_statements']:.0f} | {x['sass_instructions']} | {x['stall_cycles']} | "
              f"{x['cycles_per_statement']:.2f} | {x['cycles_per_statement'] / ref:.2f}x |")
  text = "\n".join(md)
  print(text)
  ms.write_results(args.out, {"rows": rows}, text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
