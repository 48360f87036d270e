"""Compiles a config's train, eval and decode steps for a GPU that is not here.

    python -m elas_jax.aot --config configs/llama_1b.py:elas --target h200 \\
        [--config.<field>=...] [--hosts H --gpus-per-host G] [--micro-batch B] \\
        [--mesh d,f,t] [--json]

Needs the jax CUDA plugin (``pip install "jax[cuda12]==<the installed jax>"``;
no GPU, no driver). Prints, per program (:mod:`elas_jax.deviceless`): whether
XLA's GPU compiler accepted it, its memory per device (argument, output,
alias, temp, peak), the largest micro-batch whose train step fits one device,
and per custom kernel (Pallas, cuDNN, Mosaic GPU) the grid, threads, shared
memory, registers, spills, programs per SM and waves. ``--json``: one JSON
object last (``compiled``, ``peak_bytes``, ``max_micro_batch``, ``kernels``,
...). Exit status 1, with the compiler's reason in one line, when a program
does not compile.
"""

from __future__ import annotations

import json
import sys

from absl import flags

from elas_jax import sharding, targets
from elas_jax.cli import common

_TARGET = flags.DEFINE_enum("target", "h200", list(targets.TARGETS), "The GPU to compile for.")
_HOSTS = flags.DEFINE_integer("hosts", 1, "Hosts (processes) of the topology.")
_GPUS = flags.DEFINE_integer("gpus-per-host", 1, "GPUs per host.")
_MICRO = flags.DEFINE_integer("micro-batch", None, "Sequences per forward/backward pass "
                              "(train.micro_batch); default: the config's.")
_MESH = flags.DEFINE_string("mesh", None, "data,fsdp,tensor over the topology's GPUs (e.g. 1,-1,1); "
                            "default: the config's.")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object last.")
_NO_FIT = flags.DEFINE_bool("no-fit", False, "Skip the second train-step compile of the memory fit.")


def _gb(n) -> str:
  return "-" if n is None else f"{n / 1e9:.2f}"


def main(argv) -> None:
  del argv
  try:  # before anything starts jax's backends
    targets.check_environment()
  except targets.MissingCudaPlugin as e:
    common.fail(str(e))
  from elas_jax import deviceless

  cfg = flags.FLAGS.config
  deviceless.check_micro_batch(cfg, _MICRO.value)
  tgt = targets.get(_TARGET.value)
  log = lambda s: print(s, file=sys.stderr, flush=True)
  report = deviceless.compile_steps(cfg, tgt, hosts=_HOSTS.value, gpus_per_host=_GPUS.value,
                                    micro_batch=_MICRO.value, mesh=sharding.parse_mesh(_MESH.value),
                                    fit=not _NO_FIT.value, log=log)
  d, f, t = report.mesh
  print(f"# {cfg.size} {cfg.variant} on {report.devices} x {tgt.device_kind} ({_HOSTS.value} host(s)); "
        f"mesh data {d} x fsdp {f} x tensor {t}; micro-batch {report.micro_batch} of "
        f"{cfg.train.batch_size} x {cfg.train.seq_len} tokens; model.kernel {cfg.model.kernel}, "
        f"attention {cfg.model.attention}")
  print("\n| program | compiled | argument GB | output GB | alias GB | temp GB | peak GB | compile s |")
  print("|---|---|---:|---:|---:|---:|---:|---:|")
  for name, r in report.programs.items():
    m = r.memory or {}
    print(f"| {name} | {'yes' if r.compiled else 'no'} | {_gb(m.get('argument'))} | {_gb(m.get('output'))} "
          f"| {_gb(m.get('alias'))} | {_gb(m.get('temp'))} | {_gb(m.get('peak'))} | {r.compile_s:.0f} |")
  fit = report.fit
  if fit is not None:
    print(f"\ntrain step memory per device = {fit[0] / 1e9:.2f} GB + {fit[1] / 1e6:.1f} MB per sequence of "
          f"micro-batch (from micro-batches {sorted(report.fit_points)}); the largest micro-batch that "
          f"fits {tgt.memory_bytes / 1e9:.0f} GB: {report.max_micro_batch}")
  for name, r in report.programs.items():
    if r.custom_kernels():
      print(f"\n{name}: custom kernels\n{r.table()}")
  if _JSON.value:
    print(json.dumps(report.as_dict()))
  if not report.compiled:
    common.fail(f"does not compile for {tgt.name}: " + "; ".join(report.failures), status=1)


def run() -> None:
  """Console-script entry point (``elas-aot``)."""
  common.define_config_flag()
  common.run(main)


if __name__ == "__main__":
  run()
