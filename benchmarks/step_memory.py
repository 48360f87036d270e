"""Whole-train-step memory from XLA's compiled memory analysis (issue 13, item 5).

    python -m benchmarks.step_memory [--sizes 60m,350m,1b] [--variants full,loro,loro_relu2,elas]
        [--settings default,loss,attn,loss+attn,remat_block,remat_lowrank,loss+attn+scan,
                    remat_block+scan,remat_lowrank+scan] [--batches 4,8]
        [--depths 1,2 | --depths full] [--check-fit B] [--check-depth N] [--json out.json] [--gpu-peak]
        [--target h200]
    python -m benchmarks.step_memory --from-json a.json b.json ...   # table of earlier runs
    python -m benchmarks.step_memory --preset smoke

For each model size x variant x memory setting, the real jitted train step
(``trainer.make_train_step``, state donated as in training) is lowered with
abstract inputs and compiled on the local backend (CPU is enough: nothing is
executed), or with ``--target h200|h100|a100`` by XLA's GPU compiler for that
GPU on a deviceless topology (needs the jax CUDA plugin; no GPU: the GPU's own
buffer assignment, fusions and cuDNN attention), and
``compiled.memory_analysis()`` gives XLA's buffer assignment:
argument (the train state and the batch), output, alias (outputs written into
donated arguments) and temp bytes (everything else live at some point of the
step: activations kept for backward, gradients, optimizer temporaries).

Derived figures:
- ``temp B/token`` = temp bytes / (micro-batch x seq_len) at the largest
  micro-batch measured: the activation-ish cost per token (it also holds the
  batch-independent gradients, so it falls slightly with the batch);
- ``peak`` = argument + output - alias + temp: what the step needs at once
  (donated outputs reuse their argument buffers);
- the largest micro-batch fitting in 141 GB (H200) and 80 GB: ``peak`` is
  measured at two micro-batches b1 < b2 and fitted as ``fixed + b x per_seq``
  (per_seq = slope, fixed = state + gradients + optimizer temporaries), then
  ``b_max = floor((capacity - fixed) / per_seq)``. ``--check-fit B`` compiles
  a third micro-batch and prints the fit's error there.

Depth: compiling the 1B step at full depth takes minutes on a small CPU, so
``--depths n1,n2`` compiles every point at n1 and n2 decoder blocks and scales
each byte count linearly to the config's depth (every block has the same
shapes, so each buffer class grows by a fixed amount per block).
``--check-depth N`` compiles one config at depth N and prints the
extrapolation's error there; ``--depths full`` skips the extrapolation.

Settings are config overrides (``SETTINGS``); a setting whose config field or
value does not exist in this checkout is skipped with a note, so the script
runs at every stage of the feature work. "attn" means the memory-efficient
attention of the compile target: ``chunked`` on CPU, ``cudnn`` on a GPU (or
``--target``). ``default`` pins today's step (XLA attention, full logits, no remat) even
after the config defaults change.

``--gpu-peak`` (GPU only) also runs one real step per point at the largest
measured micro-batch and reports the allocator's ``peak_bytes_in_use``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Any

# The CPU backend's LLVM code generation is most of a compile and does not change
# the buffer assignment memory_analysis() reports (checked: identical bytes at
# 1B); skipping its expensive passes halves the benchmark. Set before jax loads.
if "jax" not in sys.modules:
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
                             " --xla_llvm_disable_expensive_passes=true").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import harness  # noqa: E402
from elas_jax import config_lib, deviceless, flops, targets, trainer  # noqa: E402

SIZES = {s: harness.CONFIG_FILES[s] for s in ("60m", "350m", "1b")}  # the sizes of the full preset
CAPACITIES_GB = {"H200": 141, "80GB": 80}
LOSS_CHUNK = 512  # tokens per chunk of the chunked loss: live logits [512, V] fp32 (65 MB at V = 32000)
TODAY = {"model.attention": "xla", "model.loss_chunk": 0, "model.remat": "none", "model.scan_layers": False}


def _attn(target: str | None) -> str:
  """The memory-saving attention of the compile target: cuDNN on a GPU, else chunked."""
  gpu = target is not None or jax.default_backend() == "gpu"
  return "cudnn" if gpu else "chunked"


def settings(loss_chunk: int = LOSS_CHUNK, target: str | None = None) -> dict[str, dict[str, Any]]:
  """Setting name -> config overrides (``default`` = today's step)."""
  attn = _attn(target)
  both = {**TODAY, "model.loss_chunk": loss_chunk, "model.attention": attn}  # every field pinned
  return {
      "default": dict(TODAY),
      "loss": {**TODAY, "model.loss_chunk": loss_chunk},
      "attn": {**TODAY, "model.attention": attn},
      "loss+attn": both,
      "remat_block": {**both, "model.remat": "block"},
      "remat_lowrank": {**both, "model.remat": "lowrank"},
      # The same with the blocks under lax.scan (compiled at full depth): unscanned,
      # XLA's schedule keeps most of each block's activations despite remat (docs).
      "loss+attn+scan": {**both, "model.scan_layers": True},
      "remat_block+scan": {**both, "model.remat": "block", "model.scan_layers": True},
      "remat_lowrank+scan": {**both, "model.remat": "lowrank", "model.scan_layers": True},
  }


@dataclasses.dataclass(frozen=True)
class Point:
  """One compiled step: bytes from ``memory_analysis()``."""

  argument: float
  output: float
  alias: float
  temp: float
  code: float

  @property
  def peak(self) -> float:
    return self.argument + self.output - self.alias + self.temp

  def scaled(self, other: "Point", frac: float) -> "Point":
    """``self + frac x (other - self)`` field by field (linear extrapolation)."""
    f = lambda a, b: a + frac * (b - a)
    return Point(*(f(getattr(self, k), getattr(other, k)) for k in Point.__dataclass_fields__))


def state_bytes(abstract_state) -> dict[str, int]:
  """Bytes of the params and optimizer state in the (abstract) ``trainer.TrainState``."""
  return {"params": harness.nbytes(abstract_state.params),
          "opt_state": harness.nbytes(abstract_state.opt_state), "total": harness.nbytes(abstract_state)}


class UnknownSetting(Exception):
  """A setting's config field or value does not exist in this checkout."""


def _has(cfg, dotted: str) -> bool:
  node = cfg
  for part in dotted.split("."):
    if part not in node:
      return False
    node = node[part]
  return True


def make_config(spec: str, overrides: dict[str, Any], *, layers: int | None, batch: int,
                seq_len: int | None = None):
  """The config ``spec`` with ``overrides``, ``layers`` blocks and micro-batch ``batch``."""
  cfg = config_lib.load(spec)
  # A field this checkout lacks is fine when the override asks for today's behaviour.
  overrides = {k: v for k, v in overrides.items() if not (TODAY.get(k, object()) == v and not _has(cfg, k))}
  try:
    config_lib.override(cfg, overrides)
  except config_lib.ConfigError as e:
    raise UnknownSetting(str(e)) from None
  if layers is not None:
    cfg.model.n_layers = layers
  cfg.train.batch_size = batch
  if seq_len is not None:
    cfg.train.seq_len = seq_len
  try:
    config_lib.validate(cfg)
  except config_lib.ConfigError as e:
    raise UnknownSetting(str(e)) from None
  return cfg


def build(cfg, target: str | None = None) -> trainer.Run:
  """``trainer.build`` without a tokenizer (compiling needs no data, and the paper
  configs name their tokenizer file only at training time) on one device: this
  process's, or with ``target`` one of that GPU's deviceless topology."""
  devices = targets.topology(target).devices if target else jax.devices()[:1]
  return trainer.build(cfg, devices=devices, with_tokenizer=False)


def _step_and_args(cfg, target: str | None):
  run = build(cfg, target)
  step = trainer.make_train_step(run.graphdef, run.tx, run.schedule, cfg, run.mesh)
  shape = (cfg.train.batch_size, cfg.train.seq_len)
  batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=run.batch_sharding)
           for k in ("inputs", "targets", "mask")}
  jitted = jax.jit(step, in_shardings=(run.state_shardings, run.batch_sharding), donate_argnums=0)
  return jitted, (run.abstract_state, batch), run


def compile_step(cfg):
  """(compiled train step, run) for ``cfg`` on this process's backend, lowered with
  abstract inputs."""
  jitted, args, run = _step_and_args(cfg, None)
  return jitted.lower(*args).compile(), run


def measure(cfg, target: str | None = None) -> Point:
  """The compiled train step's bytes: by this process's backend's compiler, or with
  ``target`` (``h200``, ...) by XLA's GPU compiler for that GPU, no GPU needed."""
  if target:
    jitted, args, run = _step_and_args(cfg, target)
    report = targets.compile_for_target(jitted, *args, target=target, mesh=run.mesh, ptxas=False)
    if not report.compiled:
      raise RuntimeError(f"the {target} train step does not compile: {report.reason}")
    m = report.memory
    return Point(*(float(m[k]) for k in ("argument", "output", "alias", "temp", "generated_code")))
  compiled = compile_step(cfg)[0]
  m = harness.memory_analysis(compiled)
  if m is None:
    raise RuntimeError(f"the {jax.default_backend()} backend reports no memory_analysis()")
  code = compiled.memory_analysis().generated_code_size_in_bytes
  return Point(*(float(m[k]) for k in ("argument", "output", "alias", "temp")), float(code))


def gpu_peak(cfg) -> float:
  """Allocator peak of one real step of ``cfg`` (GPU; fresh process recommended)."""
  compiled, run = compile_step(cfg)
  state = run.init_state()
  shape = (cfg.train.batch_size, cfg.train.seq_len)
  tokens = jax.random.randint(jax.random.key(0), shape, 0, cfg.model.vocab_size, jnp.int32)
  batch = jax.device_put({"inputs": tokens, "targets": tokens, "mask": jnp.ones(shape, jnp.int32)},
                         run.batch_sharding)
  state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  peak = flops.peak_memory_bytes(jax.devices()[0])
  if peak is None:
    raise RuntimeError("--gpu-peak: this device reports no peak_bytes_in_use")
  return float(peak)


@dataclasses.dataclass
class Row:
  size: str
  variant: str
  setting: str
  seq_len: int
  batches: tuple[int, ...]
  depths: str
  points: dict[int, Point]  # micro-batch -> bytes at the config's depth
  state: dict[str, int]
  note: str = ""
  gpu_peak: float | None = None

  def at(self, b: int | None = None) -> Point:
    return self.points[b or max(self.points)]

  @property
  def temp_per_token(self) -> float:
    b = max(self.points)
    return self.points[b].temp / (b * self.seq_len)

  @property
  def act_per_token(self) -> float | None:
    """Bytes per extra token of micro-batch (the fit's slope / seq_len): activations only."""
    fit = self.fit()
    return None if fit is None else fit[1] / self.seq_len

  def fit(self) -> tuple[float, float] | None:
    """(fixed bytes, bytes per sequence) of ``peak = fixed + b x per_seq``."""
    fit = deviceless.linear_fit({b: p.peak for b, p in self.points.items()})
    b2 = sorted(self.points)[1] if len(self.points) > 1 else None
    if fit is None or fit[1] < 1e-3 * self.points[b2].peak / b2:
      # The peak is not where activations live (e.g. the optimizer update) at
      # either micro-batch: no slope to fit; compile larger micro-batches.
      return None
    return fit

  def max_batch(self, capacity_gb: float) -> int | None:
    fit = self.fit()
    return None if fit is None else deviceless.max_fitting(*fit, capacity_gb * 1e9)


def measure_row(size: str, spec: str, variant: str, setting: str, overrides: dict[str, Any],
                batches: tuple[int, ...], depths: tuple[int, int] | None,
                seq_len: int | None, log=print, target: str | None = None) -> Row:
  """All compiles of one table row (raises :class:`UnknownSetting`)."""
  full_cfg = make_config(f"{spec}:{variant}", overrides, layers=None, batch=batches[0], seq_len=seq_len)
  n_layers = full_cfg.model.n_layers
  if overrides.get("model.scan_layers"):
    depths = None  # a scanned step compiles in the same time at any depth
  state = state_bytes(build(full_cfg, target).abstract_state)
  points = {}
  for b in batches:
    t0 = time.perf_counter()
    if depths is None or depths[1] >= n_layers:
      points[b] = measure(make_config(f"{spec}:{variant}", overrides, layers=None, batch=b,
                                      seq_len=seq_len), target)
    else:
      n1, n2 = depths
      p1, p2 = (measure(make_config(f"{spec}:{variant}", overrides, layers=n, batch=b, seq_len=seq_len),
                        target)
                for n in (n1, n2))
      points[b] = p1.scaled(p2, (n_layers - n1) / (n2 - n1))
    log(f"  {size} {variant} {setting} b={b}: temp {points[b].temp / 1e9:.3f} GB, "
        f"argument {points[b].argument / 1e9:.3f} GB ({time.perf_counter() - t0:.0f} s)")
  return Row(size, variant, setting, full_cfg.train.seq_len, tuple(batches),
             "full" if depths is None or depths[1] >= n_layers else f"{depths[0]},{depths[1]}->{n_layers}",
             points, state)


# ------------------------------------------------------------------ reporting

def _gb(x: float) -> str:
  return f"{x / 1e9:.2f}"


def _metric(r: Row) -> float:
  """What ratios compare: activation bytes/token (the fit's slope) where measured, else temp/token."""
  return r.act_per_token if r.fit() else r.temp_per_token


def table(rows: list[Row]) -> str:
  """Markdown table of the rows; ``vs default`` and ``elas / loro_relu2`` compare :func:`_metric`."""
  by_key = {(r.size, r.variant, r.setting): r for r in rows}
  headers = ["size", "variant", "setting", "temp KB/token", "act KB/token", "vs default", "argument GB",
             "output GB", "alias GB", "peak GB @b", "fixed GB", "MB/seq", "max b 141 GB", "max b 80 GB",
             "elas / loro_relu2"]
  cells = []
  for r in rows:
    p = r.at()
    base = by_key.get((r.size, r.variant, "default"))
    vs = f"{_metric(r) / _metric(base):.3f}" if base else ""
    fit = r.fit()
    fixed, per_seq = (f"{_gb(fit[0])}", f"{fit[1] / 1e6:.1f}") if fit else ("", "")
    mb = [str(r.max_batch(c)) if fit else "" for c in CAPACITIES_GB.values()]
    ratio = ""
    if r.variant == "elas" and (r.size, "loro_relu2", r.setting) in by_key:
      ratio = f"{_metric(r) / _metric(by_key[(r.size, 'loro_relu2', r.setting)]):.3f}"
    act = f"{r.act_per_token / 1e3:.1f}" if r.fit() else ""
    cells.append([r.size, r.variant, r.setting, f"{r.temp_per_token / 1e3:.1f}", act, vs, _gb(p.argument),
                  _gb(p.output), _gb(p.alias), f"{_gb(p.peak)} @{max(r.points)}", fixed, per_seq, mb[0], mb[1],
                  ratio])
  return "\n".join(harness.markdown_table(headers, cells, "lll" + "r" * 12))


def summary(rows: list[Row]) -> list[str]:
  """ELAS best vs today's default, per size."""
  lines = []
  for size in dict.fromkeys(r.size for r in rows):
    elas = [r for r in rows if r.size == size and r.variant == "elas"]
    base = next((r for r in elas if r.setting == "default"), None)
    if not elas or base is None:
      continue
    best = min(elas, key=_metric)
    what = "activation" if best.fit() and base.fit() else "temp"
    line = (f"{size}: ELAS best setting {best.setting}: {_metric(best) / 1e3:.1f} KB/token ({what}) = "
            f"{_metric(best) / _metric(base):.3f} x today's default "
            f"({_metric(base) / 1e3:.1f} KB/token); temp/token {best.temp_per_token / base.temp_per_token:.3f} x")
    if best.fit() and base.fit():
      line += (f"; max micro-batch on one H200 {best.max_batch(141)} vs {base.max_batch(141)} "
               f"({best.max_batch(141) / max(base.max_batch(141), 1):.1f}x)")
    lines.append(line)
  return lines


def check_fit(row: Row, spec: str, overrides, b3: int, depths, seq_len, log=print,
              target: str | None = None) -> float:
  """Relative error of the linear-in-batch fit at a third micro-batch ``b3``."""
  third = measure_row(row.size, spec, row.variant, row.setting, overrides, (b3,), depths, seq_len, log,
                      target)
  fixed, per_seq = row.fit()
  predicted = fixed + b3 * per_seq
  return (predicted - third.at(b3).peak) / third.at(b3).peak


def check_depth(spec: str, variant: str, overrides, batch: int, depths, n_check: int,
                seq_len, target: str | None = None) -> float:
  """Relative error of the depth extrapolation (temp bytes) at ``n_check`` blocks."""
  cfg = lambda n: make_config(f"{spec}:{variant}", overrides, layers=n, batch=batch, seq_len=seq_len)
  p1, p2 = measure(cfg(depths[0]), target), measure(cfg(depths[1]), target)
  actual = measure(cfg(n_check), target)
  predicted = p1.scaled(p2, (n_check - depths[0]) / (depths[1] - depths[0]))
  return (predicted.temp - actual.temp) / actual.temp


PRESETS = {
    # Tiny shapes (d 64, 2 blocks, vocab 4096, seq 64) and two settings, a few
    # seconds per compile: used by tests/test_step_memory.py. Loss chunks of 32
    # tokens: several per micro-batch, as 512 are at the paper shapes.
    "smoke": dict(sizes={"tiny": "configs/tiny.py"}, variants=("elas",), settings=("default", "loss"),
                  batches=(2, 4), depths=None, seq_len=64, loss_chunk=32,
                  base={"model.d_model": 64, "model.n_heads": 4, "model.n_layers": 2,
                        "model.rank": 16, "model.ffn_dim": 256}),
}


def sort_rows(rows: list[Row], size_order, setting_order) -> list[Row]:
  order = {s: i for i, s in enumerate(setting_order)}
  return sorted(rows, key=lambda r: (list(size_order).index(r.size),
                                     harness.VARIANTS.index(r.variant) if r.variant in harness.VARIANTS else 0,
                                     order.get(r.setting, len(order))))


def load_rows(paths: list[str]) -> list[Row]:
  """Rows written by ``--json`` (later files replace equal size/variant/setting)."""
  rows = {}
  for path in paths:
    with open(path) as f:
      for d in json.load(f)["rows"]:
        r = Row(d["size"], d["variant"], d["setting"], d["seq_len"], tuple(d["batches"]), d["depths"],
                {int(b): Point(**p) for b, p in d["points"].items()}, d["state"], d.get("note", ""),
                d.get("gpu_peak"))
        rows[(r.size, r.variant, r.setting)] = r
  return list(rows.values())


def run(sizes: dict[str, str], variants, setting_names, batches, depths, seq_len=None,
        log=print, base: dict[str, Any] | None = None, loss_chunk: int = LOSS_CHUNK,
        target: str | None = None) -> tuple[list[Row], list[str]]:
  """Measures every row; returns (rows, notes on skipped settings).

  ``base``: config overrides applied to every row before the setting's.
  """
  all_settings = settings(loss_chunk, target)
  rows, notes = [], []
  for size, path in sizes.items():
    spec = path if os.path.isabs(path) else os.path.join(harness.ROOT, path)
    for setting in setting_names:
      for variant in variants:
        try:
          rows.append(measure_row(size, spec, variant, setting, {**(base or {}), **all_settings[setting]},
                                  tuple(batches), depths, seq_len, log, target))
        except UnknownSetting as e:
          note = f"setting {setting} skipped: {e}"
          if note not in notes:
            notes.append(note)
            log(note)
          break
  return sort_rows(rows, sizes, setting_names), notes


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--preset", choices=sorted(PRESETS))
  ap.add_argument("--sizes", default="60m,350m,1b")
  ap.add_argument("--variants", default=",".join(harness.VARIANTS))
  ap.add_argument("--settings", default="", help="comma-separated (default: all; see settings())")
  ap.add_argument("--batches", default="4,8", help="micro-batches (sequences) to compile; two give the fit")
  ap.add_argument("--depths", default="1,2", help="'n1,n2' blocks to compile and extrapolate, or 'full'")
  ap.add_argument("--check-fit", type=int, default=0, help="third micro-batch to verify the fit (first row)")
  ap.add_argument("--check-depth", type=int, default=0, help="depth to verify the extrapolation (first row)")
  ap.add_argument("--gpu-peak", action="store_true",
                  help="GPU: allocator peak of a real step per row (process-wide peak: run one row per process)")
  ap.add_argument("--target", choices=("h200", "h100", "a100"), default=None,
                  help="compile with XLA's GPU compiler for this GPU, deviceless (needs the jax CUDA "
                       "plugin); default: this process's backend")
  ap.add_argument("--json", default="", help="write the rows here")
  ap.add_argument("--from-json", nargs="+", default=[], help="--json files: print their table, no compiling")
  a = ap.parse_args(argv)
  if a.target:  # before anything starts jax's backends (settings() reads the backend)
    targets.check_environment()
  a.settings = a.settings or ",".join(settings(target=a.target))
  if a.from_json:
    rows = sort_rows(load_rows(a.from_json), SIZES, settings())
    print(table(rows) + "\n")
    for line in summary(rows):
      print(f"- {line}")
    return
  base, loss_chunk = None, LOSS_CHUNK
  if a.preset:
    p = PRESETS[a.preset]
    sizes, variants, names = p["sizes"], p["variants"], p["settings"]
    batches, depths, seq_len, base = p["batches"], p["depths"], p["seq_len"], p["base"]
    loss_chunk = p["loss_chunk"]
  else:
    sizes = {s: SIZES[s] for s in a.sizes.split(",")}
    variants, names = a.variants.split(","), a.settings.split(",")
    batches = tuple(int(b) for b in a.batches.split(","))
    depths = None if a.depths == "full" else tuple(int(n) for n in a.depths.split(","))
    seq_len = None
  unknown = [n for n in names if n not in settings()]
  if unknown:
    raise SystemExit(f"--settings: unknown {unknown}; choose from {', '.join(settings())}")
  log = lambda s: print(s, file=sys.stderr, flush=True)
  t0 = time.perf_counter()
  rows, notes = run(sizes, variants, names, batches, depths, seq_len, log, base, loss_chunk, a.target)
  first_spec = next(iter(sizes.values()))
  first_spec = first_spec if os.path.isabs(first_spec) else os.path.join(harness.ROOT, first_spec)
  over = lambda r: {**(base or {}), **settings(loss_chunk, a.target)[r.setting]}
  checks = []
  if rows and a.check_fit:
    r = rows[0]
    err = check_fit(r, first_spec, over(r), a.check_fit, depths, seq_len, log, a.target)
    checks.append(f"fit check ({r.size} {r.variant} {r.setting}): predicted peak at b={a.check_fit} "
                  f"off by {100 * err:+.2f}%")
  if rows and a.check_depth and depths:
    r = rows[0]
    err = check_depth(first_spec, r.variant, over(r), max(batches), depths, a.check_depth, seq_len, a.target)
    checks.append(f"depth check ({r.size} {r.variant} {r.setting} b={max(batches)}): temp extrapolated "
                  f"from {depths} to {a.check_depth} blocks off by {100 * err:+.2f}%")
  if a.gpu_peak:
    for r in rows:
      r.gpu_peak = gpu_peak(make_config(f"{os.path.join(harness.ROOT, sizes[r.size])}:{r.variant}", over(r),
                                        layers=None, batch=max(r.points), seq_len=seq_len))
  compiler = f"{a.target} (deviceless GPU)" if a.target else jax.default_backend()
  print(f"# Whole train step memory (XLA memory_analysis, {compiler} compile), "
        f"jax {jax.__version__}, seq_len {rows[0].seq_len if rows else '?'}, micro-batches {batches}, "
        f"depths {a.depths if not a.preset else 'full'}, {time.perf_counter() - t0:.0f} s\n")
  print(table(rows))
  print()
  for line in summary(rows) + checks + notes:
    print(f"- {line}")
  if a.gpu_peak:
    for r in rows:
      print(f"- GPU peak_bytes_in_use {r.size} {r.variant} {r.setting} b={max(r.points)}: "
            f"{_gb(r.gpu_peak)} GB (XLA estimate {_gb(r.at().peak)} GB)")
  if a.json:
    with open(a.json, "w") as f:
      json.dump({"jax": jax.__version__, "backend": compiler, "notes": notes, "checks": checks,
                 "rows": [{**dataclasses.asdict(r), "temp_per_token": r.temp_per_token,
                           "fit": r.fit(), "max_batch": {k: r.max_batch(c) for k, c in CAPACITIES_GB.items()}}
                          for r in rows]}, f, indent=1, default=str)


if __name__ == "__main__":
  main()
