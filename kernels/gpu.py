"""What a kernel needs to know of the GPU it is built for, given as an argument.

A kernel never asks ``jax.devices()`` which GPU it runs on: a step may be
compiled for a GPU this process does not have (a deviceless H200 topology),
so the caller that knows the compile target (``elas_jax.ops.ffn``, from the
mesh's devices) passes a :class:`GpuSpec`. ``elas_jax.targets.Target.gpu_spec()``
builds one from the same text proto the compiler reads; :data:`H200` is the
default of a kernel built with no spec (the H100 SXM has the same SM count and
shared memory).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class GpuSpec:
  """One GPU as the kernels plan for it (hashable: a static argument).

  Attributes:
    name: the key of its tile tables (``h200``, ``h100``, ``a100``).
    compute_capability: ``(major, minor)``; Hopper is ``(9, 0)``.
    sm_count: streaming multiprocessors (the grid a kernel aims to fill).
    smem_per_block: opt-in shared memory one thread block may use, bytes.
    bf16_flops_per_s: dense bf16 tensor-core peak (no 2:4).
    hbm_bytes_per_s: peak memory bandwidth.
  """

  name: str
  compute_capability: tuple[int, int]
  sm_count: int
  smem_per_block: int
  bf16_flops_per_s: float
  hbm_bytes_per_s: float

  @property
  def is_hopper(self) -> bool:
    return self.compute_capability[0] == 9


# NVIDIA H200 SXM: 132 SMs, 227 KiB opt-in shared memory per block, 989 TFLOP/s
# dense bf16, 4.8 TB/s HBM3e (the numbers of elas_jax/targets/h200.textproto;
# tests/test_targets.py checks that they agree).
H200 = GpuSpec(name="h200", compute_capability=(9, 0), sm_count=132, smem_per_block=232448,
               bf16_flops_per_s=989e12, hbm_bytes_per_s=4.8e12)
