"""GPU targets: the text-proto target configs in this package and their peaks.

A target is one ``*.textproto`` here (``stream_executor.GpuTargetConfigProto``,
the text XLA's deviceless GPU compiler takes) plus what a roofline needs that
the proto does not hold (the dense bf16 tensor-core peak, from
``elas_jax.flops``). The proto is the one source of the hardware numbers: the
:class:`Target` fields are read from it, so the compiler and the reports
cannot disagree.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re

from elas_jax import flops
from elas_kernels.gpu import GpuSpec

HERE = os.path.dirname(os.path.abspath(__file__))
TARGETS = ("h200", "h100", "a100")

# Resident thread blocks per SM (CUDA's "maximum number of resident blocks per
# SM" for compute capability 8.0 and 9.0) and the shared memory the driver
# reserves per block on sm_80+ (both from the CUDA C programming guide's
# table of technical specifications; neither is in the target proto).
MAX_BLOCKS_PER_SM = 32
SMEM_RESERVED_PER_BLOCK = 1024


@dataclasses.dataclass(frozen=True)
class Target:
  """One GPU as the compiler sees it, with its roofline peaks.

  Attributes:
    name: the key (``h200``, ``h100``, ``a100``).
    device_kind: ``jax.Device.device_kind`` of such a GPU (``"NVIDIA H200"``).
    compute_capability: ``(major, minor)``; ptxas targets ``sm_<major><minor>a``
      on Hopper.
    sm_count: streaming multiprocessors.
    smem_per_block: opt-in shared memory one thread block may use, bytes
      (Triton and XLA refuse a kernel above it: "Shared memory size limit exceeded").
    smem_per_sm: shared memory of one SM, bytes.
    registers_per_sm: 32-bit registers of one SM.
    registers_per_block: registers one block may use.
    threads_per_sm: resident threads per SM.
    memory_bytes: device memory.
    hbm_bytes_per_s: peak memory bandwidth.
    bf16_flops_per_s: dense (no 2:4) bf16 tensor-core peak.
    config_text: the ``GpuTargetConfigProto`` text given to the compiler.
  """

  name: str
  device_kind: str
  compute_capability: tuple[int, int]
  sm_count: int
  smem_per_block: int
  smem_per_sm: int
  registers_per_sm: int
  registers_per_block: int
  threads_per_sm: int
  memory_bytes: int
  hbm_bytes_per_s: float
  bf16_flops_per_s: float
  config_text: str = dataclasses.field(repr=False)

  @property
  def ridge_flops_per_byte(self) -> float:
    """Arithmetic intensity above which a kernel is compute-bound at the peaks."""
    return self.bf16_flops_per_s / self.hbm_bytes_per_s

  def gpu_spec(self) -> GpuSpec:
    """What the kernels need of this GPU (they never import this package)."""
    return GpuSpec(name=self.name, compute_capability=self.compute_capability,
                   sm_count=self.sm_count, smem_per_block=self.smem_per_block,
                   bf16_flops_per_s=self.bf16_flops_per_s, hbm_bytes_per_s=self.hbm_bytes_per_s)

  def programs_per_sm(self, threads: int, registers: int | None, smem_bytes: int) -> int:
    """Thread blocks of one kernel resident on one SM at once (its occupancy).

    The minimum over the thread, register, shared-memory and block-count
    limits. Registers are allocated per warp in units of 256 (CUDA's
    occupancy rule for sm_80/sm_90); unknown registers (``None``) leave that
    limit out. Each block also costs the driver's 1 KiB reservation.
    """
    threads = max(int(threads), 1)
    limits = [MAX_BLOCKS_PER_SM, self.threads_per_sm // threads]
    if registers:
      warps = -(-threads // 32)
      regs_per_warp = -(-int(registers) * 32 // 256) * 256
      limits.append((self.registers_per_sm // regs_per_warp) // warps)
    if smem_bytes:
      limits.append(self.smem_per_sm // (int(smem_bytes) + SMEM_RESERVED_PER_BLOCK))
    return max(0, min(limits))

  def waves(self, programs: int, programs_per_sm: int) -> float:
    """``programs / (SMs x programs per SM)``: < 1 leaves SMs idle."""
    return programs / (self.sm_count * max(programs_per_sm, 1))


def _field(text: str, name: str, cast=int, default=None):
  m = re.search(rf"\b{name}\s*:\s*\"?([^\"\s}}]+)\"?", text)
  if m is None:
    if default is not None:
      return default
    raise ValueError(f"target config: no field {name!r}")
  return cast(m.group(1))


def _device_kind(text: str) -> str:
  m = re.search(r'device_description_str\s*:\s*"([^"]*)"', text)
  if m is None:
    raise ValueError("target config: no device_description_str")
  return m.group(1)


def config_path(name: str) -> str:
  """Path of the text proto of target ``name``."""
  return os.path.join(HERE, f"{name}.textproto")


@functools.lru_cache(maxsize=None)
def get(name: str) -> Target:
  """The :class:`Target` called ``name`` (one of :data:`TARGETS`, case-insensitive)."""
  key = name.lower()
  if key not in TARGETS:
    raise ValueError(f"unknown GPU target {name!r}: expected one of {', '.join(TARGETS)}")
  with open(config_path(key)) as fh:
    text = fh.read()
  # Comments are for people; the compiler gets the proto only.
  text = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
  cc = re.search(r"cuda_compute_capability\s*{([^}]*)}", text)
  major = _field(cc.group(1), "major") if cc else 0
  minor = _field(cc.group(1), "minor", default=0) if cc else 0
  kind = _device_kind(text)
  peak = flops.device_peak_tflops("bfloat16", kind)
  if peak is None:
    raise ValueError(f"target {key}: no bf16 peak for {kind!r} in elas_jax.flops.DEVICE_PEAK_TFLOPS")
  return Target(
      name=key, device_kind=kind, compute_capability=(major, minor),
      sm_count=_field(text, "core_count"), smem_per_block=_field(text, "shared_memory_per_block_optin"),
      smem_per_sm=_field(text, "shared_memory_per_core"),
      registers_per_sm=_field(text, "registers_per_core_limit"),
      registers_per_block=_field(text, "registers_per_block_limit"),
      threads_per_sm=_field(text, "threads_per_core_limit"),
      memory_bytes=_field(text, "device_memory_size"),
      hbm_bytes_per_s=float(_field(text, "memory_bandwidth")),
      bf16_flops_per_s=peak * 1e12, config_text=text)


def for_device(device) -> Target | None:
  """The target of a ``jax.Device`` (a real GPU or a deviceless topology's), by its
  ``device_kind`` (``"NVIDIA H100 80GB HBM3"`` is ``h100``); None for other devices."""
  kind = str(getattr(device, "device_kind", "")).lower()
  found = [get(name) for name in TARGETS if kind.startswith(get(name).device_kind.lower())]
  return max(found, key=lambda t: len(t.device_kind)) if found else None
