"""Deviceless GPU compiles: topology, mesh, compile, and what the compiler made.

Needs the jax CUDA plugin (``pip install "jax[cuda12]==<jax version>"``), no
GPU and no driver. The process must run with ``JAX_PLATFORMS=cpu`` (no CUDA
client is created) and ``JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1`` (the plugin's
version check calls ``cuInit``, which fails without a driver); set them before
jax starts its backends (:func:`deviceless_env` gives them for a subprocess;
:func:`check_environment` sets them when it still can and says so when not).

What a compile reports (:class:`CompileReport`): whether XLA's GPU pipeline
(Triton and ptxas included) accepted the program, the compiler's reason in
one line when not, the GPU buffer assignment (``memory_analysis()``), and per
kernel the launch XLA recorded in its thunk dump (grid, threads per block,
shared memory) with the registers and spills ptxas reports for the PTX XLA
dumped, the resident programs per SM and the waves the grid makes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import importlib.util
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from concurrent import futures
from typing import Any, Callable, Sequence

from elas_jax.targets import spec

ENV = {"JAX_PLATFORMS": "cpu", "JAX_SKIP_CUDA_CONSTRAINTS_CHECK": "1"}
# Not needed for correctness, only for speed: without it the GPU compile starts
# an llvm-symbolizer process (~0.5 s of CPU each) hundreds of times per step
# (measured: 60M, one block, train+eval+prefill+decode for the H200 in 267 s
# with, 36 s without, on 2 cores). LLVM reads it at each call, so it can be set
# at any time; a value the user set is kept.
FAST_ENV = {"LLVM_DISABLE_SYMBOLIZATION": "1"}


class MissingCudaPlugin(RuntimeError):
  """The jax CUDA plugin is not installed (or cannot register) in this environment."""


# --------------------------------------------------------------------------
# Environment.
# --------------------------------------------------------------------------


def _jax_version() -> str:
  import jax
  return jax.__version__


def install_hint() -> str:
  return f'pip install "jax[cuda12]=={_jax_version()}"'


def plugin_available() -> bool:
  """Whether the jax CUDA plugin is importable here (nothing is initialised)."""
  return (importlib.util.find_spec("jax_cuda12_plugin") is not None
          and importlib.util.find_spec("jax_plugins.xla_cuda12") is not None)


def deviceless_env(base: dict[str, str] | None = None) -> dict[str, str]:
  """``base`` (default ``os.environ``) plus the variables a deviceless compile needs."""
  return {**FAST_ENV, **(os.environ if base is None else base), **ENV}


def _backends_started() -> bool:
  from jax._src import xla_bridge
  return bool(getattr(xla_bridge, "_backends", None))


def check_environment() -> None:
  """Raise :class:`MissingCudaPlugin` (naming the pip command) unless a deviceless
  GPU compile can run in this process; set :data:`ENV` while jax's backends are
  not started yet, else require it to be set already."""
  if not plugin_available():
    raise MissingCudaPlugin(
        f"deviceless GPU compiles need the jax CUDA plugin, which is not installed: {install_hint()}")
  for k, v in FAST_ENV.items():
    os.environ.setdefault(k, v)
  wrong = {k: v for k, v in ENV.items() if os.environ.get(k) != v}
  if wrong:
    if _backends_started():
      raise MissingCudaPlugin(
          "deviceless GPU compiles need " + " ".join(f"{k}={v}" for k, v in ENV.items())
          + " before jax starts its backends; this process started them without")
    os.environ.update(ENV)
    import jax
    jax.config.update("jax_platforms", "cpu")


# --------------------------------------------------------------------------
# Topology and mesh.
# --------------------------------------------------------------------------


def topology(target: str | spec.Target = "h200", *, hosts: int = 1, gpus_per_host: int = 1):
  """Compile-only devices of ``hosts x gpus_per_host`` GPUs of ``target``.

  XLA's GPU topology string is ``slices x hosts x gpus per host``; one slice
  (``"1x2x8"``: 16 GPUs, two processes). The devices report
  ``target.device_kind`` and ``process_index`` per host.
  """
  check_environment()
  from jax.experimental import topologies

  tgt = spec.get(target) if isinstance(target, str) else target
  if hosts < 1 or gpus_per_host < 1:
    raise ValueError(f"topology: hosts={hosts} and gpus_per_host={gpus_per_host} must be >= 1")
  try:
    return topologies.get_topology_desc(platform="cuda", target_config=tgt.config_text,
                                        topology=f"1x{hosts}x{gpus_per_host}")
  except Exception as e:  # the plugin's own errors are long C++ statuses
    raise MissingCudaPlugin(f"the jax CUDA plugin could not make a {tgt.name} topology "
                            f"({one_line(e)}); is it the version of jax? {install_hint()}") from e


def make_mesh(target: str | spec.Target = "h200", axis_shapes: Sequence[int] | None = None,
              axis_names: Sequence[str] = ("x",), *, hosts: int = 1, gpus_per_host: int = 1):
  """A ``jax.sharding.Mesh`` over the compile-only devices of :func:`topology`.

  ``axis_shapes`` defaults to all devices on one axis; their product must be
  ``hosts * gpus_per_host``.
  """
  from jax.experimental import topologies

  topo = topology(target, hosts=hosts, gpus_per_host=gpus_per_host)
  n = hosts * gpus_per_host
  shape = tuple(axis_shapes) if axis_shapes is not None else (n,)
  if len(shape) != len(axis_names):
    raise ValueError(f"make_mesh: {len(shape)} axis sizes for {len(axis_names)} names {tuple(axis_names)}")
  prod = 1
  for s in shape:
    prod *= s
  if prod != n:
    raise ValueError(f"make_mesh: axes {shape} hold {prod} devices, the topology has {n}")
  return topologies.make_mesh(topo, shape, tuple(axis_names))


def abstract_args(mesh, *args):
  """``ShapeDtypeStruct``s (pytrees) without a sharding get a replicated one on ``mesh``
  (a deviceless compile needs every input placed on the target's devices)."""
  import jax

  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def place(x):
    if getattr(x, "sharding", None) is not None:
      return x
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep)

  return jax.tree.map(place, args)


# --------------------------------------------------------------------------
# Reports.
# --------------------------------------------------------------------------


@dataclasses.dataclass
class KernelInfo:
  """One GPU kernel of a compiled program.

  ``kind``: ``pallas`` (a Pallas/Triton ``pallas_call``), ``mosaic`` (a Pallas
  Mosaic GPU kernel: no launch in XLA's dump, so no grid), ``triton`` (an XLA
  Triton fusion), ``xla`` (an XLA-emitted fusion) or ``custom`` (another
  custom call: cuDNN, cuBLAS, ...). ``grid``/``threads``/
  ``shared_memory_bytes`` are the launch XLA recorded; ``registers``,
  ``spill_bytes`` (stores + loads) and ``stack_bytes`` come from ``ptxas -v`` on
  the dumped PTX (None where no PTX was found: cuDNN, Mosaic GPU).
  ``programs_per_sm``: resident blocks per SM from threads, registers and
  shared memory; ``waves = programs / (SMs x programs_per_sm)``. One entry per
  distinct launch (name, grid, threads, shared memory); ``launches`` counts
  repeats. XLA does not make kernel names unique across its kernel modules, so
  same-named kernels share the worst registers and spills among their PTX entries.
  """

  name: str
  kind: str
  grid: tuple[int, int, int] | None = None
  threads: tuple[int, int, int] | None = None
  shared_memory_bytes: int | None = None
  registers: int | None = None
  spill_bytes: int | None = None
  stack_bytes: int | None = None
  programs_per_sm: int | None = None
  waves: float | None = None
  launches: int = 1

  @property
  def programs(self) -> int | None:
    return None if self.grid is None else self.grid[0] * self.grid[1] * self.grid[2]

  @property
  def spills(self) -> bool | None:
    return None if self.spill_bytes is None else self.spill_bytes > 0

  def as_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d.update(programs=self.programs, spills=self.spills)
    return d


@dataclasses.dataclass
class CompileReport:
  """What :func:`compile_for_target` found.

  ``memory``: ``memory_analysis()`` bytes (``argument``, ``output``, ``alias``,
  ``temp``, ``generated_code`` and ``peak = argument + output - alias + temp``,
  the buffer assignment's total); None when not compiled.
  """

  target: str
  compiled: bool
  reason: str | None = None
  memory: dict[str, int] | None = None
  kernels: list[KernelInfo] = dataclasses.field(default_factory=list)
  compile_s: float = 0.0
  compiled_object: Any = dataclasses.field(default=None, repr=False)
  dump_dir: str | None = None

  @property
  def peak_bytes(self) -> int | None:
    return None if self.memory is None else self.memory["peak"]

  def kernel(self, name: str) -> KernelInfo:
    """The (first) kernel called ``name``; KeyError listing the names otherwise."""
    for k in self.kernels:
      if k.name == name:
        return k
    raise KeyError(f"no kernel {name!r} in the compiled program; kernels: "
                   f"{', '.join(k.name for k in self.kernels)}")

  def custom_kernels(self) -> list[KernelInfo]:
    """The kernels that are not XLA's own fusions (Pallas, cuDNN, Mosaic GPU). Unnamed
    custom calls (``kCustomCall``: library calls such as cuBLAS, and Mosaic GPU
    kernels, listed by name from Mosaic's dump) are left out."""
    return [k for k in self.kernels if k.kind in ("pallas", "mosaic", "custom") and k.name != "kCustomCall"]

  def as_dict(self) -> dict[str, Any]:
    return {"target": self.target, "compiled": self.compiled, "reason": self.reason,
            "memory": self.memory, "peak_bytes": self.peak_bytes, "compile_s": self.compile_s,
            "kernels": [k.as_dict() for k in self.kernels]}

  def to_json(self) -> str:
    return json.dumps(self.as_dict())

  def table(self, custom_only: bool = True) -> str:
    """Markdown table of the kernels (the custom ones by default)."""
    rows = ["| kernel | kind | grid | threads | smem KiB | regs | spill B | programs/SM | waves |",
            "|---|---|---|---|---|---|---|---|---|"]
    for k in (self.custom_kernels() if custom_only else self.kernels):
      grid = "x".join(map(str, k.grid)) if k.grid else "-"
      smem = "-" if k.shared_memory_bytes is None else f"{k.shared_memory_bytes / 1024:.1f}"
      rows.append(f"| {k.name} | {k.kind} | {grid} | {k.threads[0] if k.threads else '-'} | {smem} "
                  f"| {_dash(k.registers)} | {_dash(k.spill_bytes)} | {_dash(k.programs_per_sm)} "
                  f"| {'-' if k.waves is None else f'{k.waves:.2f}'} |")
    return "\n".join(rows)


def _dash(v) -> str:
  return "-" if v is None else str(v)


def one_line(e: BaseException | str, limit: int = 300) -> str:
  """The compiler's reason in one line: the first meaningful line of an error."""
  text = str(e)
  lines = [l.strip() for l in text.splitlines() if l.strip()]
  first = lines[0] if lines else type(e).__name__ if isinstance(e, BaseException) else ""
  # XLA statuses read "INTERNAL: ...: <reason>"; keep them whole but short.
  return first[:limit]


# --------------------------------------------------------------------------
# Dump parsing.
# --------------------------------------------------------------------------

_THUNK = re.compile(
    r"^\s*(?P<id>\d+):\s+(?P<kind>k\w+)\s+\[[^\]]*\]\s+(?P<name>\S+)"
    r"(?:\s+grid:\s+\[(?P<grid>[\d, ]+)\]\s+threads:\s+\[(?P<threads>[\d, ]+)\]"
    r"\s+shared_memory:\s+(?P<smem>\d+)\s+bytes)?")


def parse_thunk_sequence(text: str) -> list[dict[str, Any]]:
  """Thunks of XLA's ``*thunk_sequence.txt`` dump: kind, name and (for kernels)
  grid, threads per block and shared memory bytes."""
  out = []
  for line in text.splitlines():
    m = _THUNK.match(line)
    if not m:
      continue
    d: dict[str, Any] = {"id": int(m["id"]), "thunk": m["kind"], "name": m["name"]}
    if m["grid"]:
      d["grid"] = tuple(int(x) for x in m["grid"].split(","))
      d["threads"] = tuple(int(x) for x in m["threads"].split(","))
      d["shared_memory_bytes"] = int(m["smem"])
    out.append(d)
  return out


_ENTRY = re.compile(r"^\.(?:visible\s+)?\.entry\s+([A-Za-z_$][\w$]*)", re.M)
_TARGET = re.compile(r"^\.target\s+(sm_\w+)", re.M)
_PTXAS_FN = re.compile(r"Compiling entry function '([^']+)'")
_PTXAS_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")


def ptxas_path() -> str:
  """ptxas of the ``nvidia-cuda-nvcc`` wheel jax[cuda12] installs (the one XLA uses), else PATH's."""
  spec_ = importlib.util.find_spec("nvidia.cuda_nvcc")
  for base in list(spec_.submodule_search_locations or []) if spec_ else []:
    p = os.path.join(base, "bin", "ptxas")
    if os.access(p, os.X_OK):
      return p
  p = shutil.which("ptxas")
  if p is None:
    raise MissingCudaPlugin(f"no ptxas found (it comes with jax[cuda12]): {install_hint()}")
  return p


def ptxas_resources(ptx_file: str) -> dict[str, dict[str, int]]:
  """``ptxas -v`` of one PTX file: per entry function, ``registers``,
  ``spill_bytes`` (stores + loads) and ``stack_bytes``."""
  with open(ptx_file) as fh:
    ptx = fh.read()
  tgt = _TARGET.search(ptx)
  if tgt is None or not _ENTRY.search(ptx):
    return {}
  p = subprocess.run([ptxas_path(), "-v", f"-arch={tgt.group(1)}", "-O3", ptx_file,
                      "-o", os.devnull], capture_output=True, text=True)
  out: dict[str, dict[str, int]] = {}
  fn = None
  for line in (p.stdout + p.stderr).splitlines():
    if m := _PTXAS_FN.search(line):
      fn = m.group(1)
      out[fn] = {}
    elif fn and (m := _PTXAS_PROPS.search(line)):
      out[fn].update(stack_bytes=int(m[1]), spill_bytes=int(m[2]) + int(m[3]))
    elif fn and (m := _PTXAS_REGS.search(line)):
      out[fn]["registers"] = int(m[1])
  return out


def parse_thunk_metadata(text: str) -> dict[int, str]:
  """Thunk id -> profile annotation (the HLO instruction: ``pallas_call.3``,
  ``loop_fusion``, ...) of XLA's ``*thunk_metadata.txt`` dump."""
  out = {}
  for m in re.finditer(r'profile_annotation:\s*"([^"]*)"\s*thunk_id:\s*(\d+)', text):
    out[int(m.group(2))] = m.group(1)
  return out


def _read(paths: list[str]) -> str:
  text = []
  for path in paths:
    with open(path) as fh:
      text.append(fh.read())
  return "\n".join(text)


def _collect_kernels(dump_dir: str, target: spec.Target, ptxas: bool) -> list[KernelInfo]:
  thunks = parse_thunk_sequence(_read(sorted(glob.glob(os.path.join(dump_dir, "*thunk_sequence.txt")))))
  annotations = parse_thunk_metadata(
      _read(sorted(glob.glob(os.path.join(dump_dir, "*thunk_metadata.txt")))))
  # Entry names are not unique across XLA's kernel modules (a cond's two branches
  # each launch an "elas_ffn_dh"): a name gets the worst registers and spills of its entries.
  resources: dict[str, dict[str, int]] = {}
  if ptxas:
    ptx_files = sorted(glob.glob(os.path.join(dump_dir, "*.ptx")))
    with futures.ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
      for res in pool.map(ptxas_resources, ptx_files):
        for name, r in res.items():
          old = resources.setdefault(name, {})
          for key, v in r.items():
            old[key] = max(old.get(key, v), v)
  by_launch: dict[tuple, KernelInfo] = {}
  for th in thunks:
    name = th["name"]
    if th["thunk"] not in ("kKernel", "kCustomKernel") and "grid" not in th:
      if th["thunk"] in ("kCustomCall", "kCuDnn", "kConvolution"):
        kind = "custom"
      else:
        continue  # copies, collectives, control flow, gemms: not kernels we report
    elif annotations.get(th["id"], "").startswith("pallas_call"):
      kind = "pallas"
    elif "triton" in name or "gemm_fusion" in name:
      kind = "triton"
    else:
      kind = "xla"
    launch = (name, th.get("grid"), th.get("threads"), th.get("shared_memory_bytes"))
    if launch in by_launch:
      by_launch[launch].launches += 1
      continue
    k = KernelInfo(name=name, kind=kind, grid=th.get("grid"), threads=th.get("threads"),
                   shared_memory_bytes=th.get("shared_memory_bytes"))
    r = resources.get(name)
    if r:
      k.registers, k.spill_bytes, k.stack_bytes = (r.get("registers"), r.get("spill_bytes"),
                                                   r.get("stack_bytes"))
    if k.grid is not None:
      threads = k.threads[0] * k.threads[1] * k.threads[2]
      k.programs_per_sm = target.programs_per_sm(threads, k.registers, k.shared_memory_bytes or 0)
      k.waves = target.waves(k.programs, k.programs_per_sm)
    by_launch[launch] = k
  return list(by_launch.values())


def mosaic_resources(dump_dir: str) -> dict[str, dict]:
  """Per Mosaic kernel name (without Mosaic's ``_<n>`` suffix): registers, spill bytes
  (stores + loads), shared memory, the wgmma instruction shapes of its PTX, the
  PTX itself (``ptx``), its SASS with control codes where Mosaic could disassemble it
  (``sass``, else None) and whether ptxas serialized its wgmma (``wgmma_serialized``,
  warning C7512); the maximum over kernels of one name (a name compiled twice
  is the same kernel).

  The files of one kernel do not share a suffix: ``<name>_<i>.resources.txt``
  (shared memory) is written when the kernel is lowered, ``<name>_<j>.ptx`` and
  ``.ptxas`` when it is compiled, each with its own counter; so they are joined
  by name."""
  out: dict[str, dict] = {}

  def row(name: str) -> dict:
    return out.setdefault(name, {"registers": None, "spill_bytes": None, "smem_bytes": None, "ptx_wgmma": [],
                                 "ptx": None, "sass": None, "wgmma_serialized": False})

  def bump(r: dict, key: str, value: int) -> None:
    r[key] = max(r[key] or 0, value)

  for fn in sorted(os.listdir(dump_dir)):
    base, _, ext = fn.partition(".")
    if ext not in ("ptxas", "resources.txt", "ptx", "sass_ctrl"):
      continue
    name = re.sub(r"_\d+$", "", base)
    with open(os.path.join(dump_dir, fn), errors="replace") as fh:
      txt = fh.read()
    r = row(name)
    if ext == "ptxas":
      regs = re.search(r"Used (\d+) registers", txt)
      spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", txt)
      if regs:
        bump(r, "registers", int(regs.group(1)))
      if spill:
        bump(r, "spill_bytes", int(spill.group(1)) + int(spill.group(2)))
      # C7512: "wgmma.mma_async instructions are serialized due to insufficient register
      # resources": every wgmma then waits for the one before it
      r["wgmma_serialized"] = r.get("wgmma_serialized", False) or "(C7512)" in txt
    elif ext == "sass_ctrl":  # written where nvdisasm is installed beside ptxas (docs/kernels.md)
      r["sass"] = txt  # for elas_kernels.perf_model.sass_main_loop
    elif ext == "resources.txt":
      m = re.search(r"smem_scratch_bytes=(\d+)", txt)
      if m:
        bump(r, "smem_bytes", int(m.group(1)))
    else:
      shapes = set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)", txt))
      # the 2:4 sparse wgmma (kernels/ffn/mosaic/sparse_mma.py) as the plan names it
      shapes |= {s + "sp" for s in
                 re.findall(r"wgmma\.mma_async\.sp\.sync\.aligned\.(m\d+n\d+k\d+)", txt)}
      r["ptx_wgmma"] = sorted(set(r["ptx_wgmma"]) | shapes)
      r["ptx"] = txt  # for elas_kernels.perf_model.profile_ptx
  return out


def _hlo_text(compiled) -> str:
  try:
    return compiled.as_text() or ""
  except Exception:  # some executables cannot print themselves; the dump still names kernels
    return ""


def _memory(compiled) -> dict[str, int] | None:
  try:
    m = compiled.memory_analysis()
  except Exception:
    return None
  if m is None:
    return None
  out = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in
         ("argument", "output", "alias", "temp", "generated_code")}
  out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
  return out


# --------------------------------------------------------------------------
# Compile.
# --------------------------------------------------------------------------


@contextlib.contextmanager
def target_context(mesh):
  """Enter the abstract mesh of ``mesh`` (Pallas' Triton lowering reads the GPU
  kind from it: without it "No supported GPU devices found")."""
  import jax

  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    yield


_MOSAIC_ENV = {"MOSAIC_GPU_DUMP_TO": None, "MOSAIC_GPU_DUMP_PTXAS": "1", "MOSAIC_GPU_DUMP_PTX": "1"}


@contextlib.contextmanager
def _mosaic_dump_env(dump_dir: str):
  """Mosaic GPU kernels compile in their own pipeline, outside XLA's dump: its
  environment switches make it write each kernel's PTX, ``ptxas -v`` output and
  resources (shared memory) to ``dump_dir``, for this compile only."""
  saved = {k: os.environ.get(k) for k in _MOSAIC_ENV}
  os.environ.update({k: v or dump_dir for k, v in _MOSAIC_ENV.items()})
  try:
    yield
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v


# Mosaic GPU compiles each distinct kernel once per process and dumps it only
# then; a later compile holding the same kernel reuses it silently. Resources
# seen in a dump are kept here, per (kernel name, types of its custom call), for
# the reports of those later compiles.
_MOSAIC_SEEN: dict[tuple[str, str], list[dict]] = {}
_MOSAIC_CALL = re.compile(r'custom_call_target="mosaic_gpu[^"]*"')
_MOSAIC_NAME = re.compile(r"(?<=\\00)([A-Za-z_]\w*?)_mosaic_gpu\\00")


def _mosaic_calls(hlo_text: str) -> list[tuple[str, str]]:
  """(kernel name, signature) of every Mosaic GPU custom call in compiled HLO; the
  signature is the call's result and operand types (the serialized module itself
  differs between compiles of one kernel: it carries source locations)."""
  calls = []
  for m in _MOSAIC_CALL.finditer(hlo_text):
    line = hlo_text[hlo_text.rfind("\n", 0, m.start()) + 1: hlo_text.find("\n", m.end())]
    # The kernel's LLVM entry symbol, "<name>_mosaic_gpu", in the serialized module
    # ("stable_mosaic_gpu" is the dialect's version attribute, not a kernel).
    names = [n for n in _MOSAIC_NAME.findall(line) if n != "stable"]
    result = re.search(r"=\s*(.*?)\s+custom-call\(", line)
    operands = re.search(r"operand_layout_constraints=(\{.*?\})(?:,|$)", line)
    calls.append((names[-1] if names else "mosaic_gpu",
                  f"{result.group(1) if result else ''} <- {operands.group(1) if operands else ''}"))
  return calls


def _mosaic_kernels(dump_dir: str, hlo_text: str) -> list[KernelInfo]:
  """One row per Mosaic GPU kernel (XLA's thunk dump names it only ``kCustomCall``,
  without a launch): registers, spills and shared memory from Mosaic's own dump,
  or, for a kernel this process built before, from the dump of that build."""
  fields = ("registers", "spill_bytes", "smem_bytes")
  fresh = mosaic_resources(dump_dir) if os.path.isdir(dump_dir) else {}
  rows: dict[str, dict] = {}
  for name, signature in _mosaic_calls(hlo_text):
    now = fresh.get(name, dict.fromkeys(fields))
    builds = _MOSAIC_SEEN.setdefault((name, signature), [])
    if now["registers"] is not None:  # built by this compile
      entry = {f: now[f] for f in fields}
      if entry not in builds:
        builds.append(entry)
      value = entry
    else:  # built before: the build of the same signature (and the same shared memory
      # when this lowering dumped it: it tells tile plans apart); none if ambiguous
      match = [b for b in builds if now["smem_bytes"] in (None, b["smem_bytes"])]
      value = match[0] if len(match) == 1 else now
    row = rows.setdefault(name, dict.fromkeys(fields))
    for f in fields:  # the maximum over the calls of one name
      if value[f] is not None:
        row[f] = max(row[f] or 0, value[f])
  for name, r in fresh.items():  # a dumped kernel the HLO scan did not name
    rows.setdefault(name, {f: r[f] for f in fields})
  return [KernelInfo(name=name, kind="mosaic", shared_memory_bytes=r["smem_bytes"], registers=r["registers"],
                     spill_bytes=r["spill_bytes"]) for name, r in sorted(rows.items())]


def compile_for_target(fn: Callable, *args, target: str | spec.Target = "h200", mesh=None,
                       static_argnums: Sequence[int] = (), fail_on_spill: bool = False,
                       ptxas: bool = True, keep_dump: bool = False,
                       compiler_options: dict[str, Any] | None = None) -> CompileReport:
  """Lower and compile ``fn(*args)`` for ``target`` with no GPU present; never raises
  for a compiler refusal (``report.compiled`` is False and ``report.reason`` says why).

  Args:
    fn: a function or a ``jax.jit``-wrapped one (wrapped with ``jax.jit`` if not).
    *args: ``jax.ShapeDtypeStruct`` pytrees (those without a sharding are
      replicated on ``mesh``) or static Python values at ``static_argnums``.
    target: a :data:`spec.TARGETS` name or a :class:`spec.Target`.
    mesh: from :func:`make_mesh` (default: one GPU of ``target``).
    fail_on_spill: also pass ``--xla_gpu_fail_ptx_compilation_on_register_spilling``
      (then a kernel that spills fails the compile, as the CI gate wants).
    ptxas: run ``ptxas -v`` on the dumped PTX for registers and spills.
    keep_dump: keep XLA's dump directory (``report.dump_dir``) instead of deleting it.
    compiler_options: more XLA options for this compile only.

  XLA's dump flags are scoped to this compile (``compile(compiler_options=...)``,
  a fresh temporary ``xla_dump_to``): nothing global changes.
  """
  import jax

  tgt = spec.get(target) if isinstance(target, str) else target
  if mesh is None:
    mesh = make_mesh(tgt)
  else:
    check_environment()
  jitted = fn if hasattr(fn, "trace") else jax.jit(fn, static_argnums=tuple(static_argnums))
  placed = list(args)
  for i, a in enumerate(args):
    if i not in static_argnums:
      placed[i] = abstract_args(mesh, a)[0]
  dump = tempfile.mkdtemp(prefix=f"elas-{tgt.name}-")
  opts = {"xla_dump_to": dump, "xla_dump_emitter_re": ".*", "xla_gpu_dump_llvmir": True}
  if fail_on_spill:
    opts["xla_gpu_fail_ptx_compilation_on_register_spilling"] = True
  opts.update(compiler_options or {})
  report = CompileReport(target=tgt.name, compiled=False, dump_dir=dump if keep_dump else None)
  mosaic_dump = os.path.join(dump, "mosaic_gpu")
  os.makedirs(mosaic_dump)  # Mosaic prints its dumps to stdout when the directory is missing
  start = time.perf_counter()
  try:
    with target_context(mesh), _mosaic_dump_env(mosaic_dump):
      lowered = jitted.trace(*placed).lower()
      compiled = lowered.compile(compiler_options=opts)
  except Exception as e:  # a refusal of the GPU compiler is a result, not a crash
    report.reason = one_line(e)
    report.compile_s = time.perf_counter() - start
    report.kernels = _collect_kernels(dump, tgt, ptxas=False)
    if not keep_dump:
      shutil.rmtree(dump, ignore_errors=True)
    return report
  report.compile_s = time.perf_counter() - start
  report.compiled = True
  report.compiled_object = compiled
  report.memory = _memory(compiled)
  report.kernels = _collect_kernels(dump, tgt, ptxas=ptxas) + _mosaic_kernels(mosaic_dump, _hlo_text(compiled))
  if not keep_dump:
    shutil.rmtree(dump, ignore_errors=True)
  return report
