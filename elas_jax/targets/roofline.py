"""The static roofline: FLOPs and minimum HBM bytes -> the physical lower bound on time."""

from __future__ import annotations

import dataclasses

from elas_jax.targets import spec


@dataclasses.dataclass(frozen=True)
class Roofline:
  """One computation at one target's peaks.

  ``flops``: the arithmetic the computation must do (2 per multiply-add);
  ``bytes``: the HBM traffic it cannot avoid (every input read once, every
  output written once). ``time_s = max(flops / peak, bytes / bandwidth)``
  is a lower bound no kernel beats.
  """

  name: str
  flops: float
  bytes: float
  target: str
  peak_flops_per_s: float
  bytes_per_s: float

  @property
  def intensity(self) -> float:
    """FLOP per byte."""
    return self.flops / self.bytes if self.bytes else float("inf")

  @property
  def compute_s(self) -> float:
    return self.flops / self.peak_flops_per_s

  @property
  def memory_s(self) -> float:
    return self.bytes / self.bytes_per_s

  @property
  def time_s(self) -> float:
    return max(self.compute_s, self.memory_s)

  @property
  def bound(self) -> str:
    return "compute" if self.compute_s >= self.memory_s else "memory"

  def as_dict(self) -> dict:
    return {"name": self.name, "flops": self.flops, "bytes": self.bytes,
            "intensity": self.intensity, "time_us": self.time_s * 1e6, "bound": self.bound,
            "target": self.target}


def roofline(name: str, flops: float, bytes_: float, target: str | spec.Target = "h200") -> Roofline:
  """A :class:`Roofline` at ``target``'s dense bf16 tensor-core peak and HBM bandwidth."""
  tgt = spec.get(target) if isinstance(target, str) else target
  return Roofline(name, float(flops), float(bytes_), tgt.name, tgt.bf16_flops_per_s,
                  tgt.hbm_bytes_per_s)


def markdown(rows: list[Roofline]) -> str:
  """A markdown table of rooflines."""
  out = ["| computation | GFLOP | MB moved | FLOP/B | lower bound µs | bound |",
         "|---|---|---|---|---|---|"]
  for r in rows:
    out.append(f"| {r.name} | {r.flops / 1e9:.2f} | {r.bytes / 1e6:.1f} | {r.intensity:.0f} "
               f"| {r.time_s * 1e6:.1f} | {r.bound} |")
  return "\n".join(out)
