"""Static roofline of the 2:4 FFN kernels: FLOPs, minimum HBM bytes, intensity, lower bound.

What is counted (per call, ``T`` tokens, width ``F``, ranks ``K = N = r``, bf16):

* FLOPs are dense tensor-core work: the 2:4-sparse activation is decompressed
  in registers and multiplied by dense MMAs, so ``y2s w_outᵀ`` costs
  ``2·T·F·N`` like a dense product (the useful half is ``T·F·N``).
  :func:`ffn_core` is the minimum of the whole core, each product once:
  ``2·T·F·(K+N)`` forward, ``4·T·F·(K+N)`` backward (``dy2 = g w_out``,
  ``dh``, ``dw_in``, ``dw_out``), in every mode; it is *the* lower bound, and
  executed FLOPs are judged against it. The per-kernel rows of
  :func:`ffn_kernels` count what the split into four kernels executes: the
  backward forms ``dy2`` in both ``dh`` and ``dw_in``, and ``ste`` / the dense
  warm-up recompute ``y1 = h w_inᵀ`` in each backward kernel. No recomputation
  from tiling is counted (that is the tiles' cost, ``benchmarks/kernel_tiles.py``).
* Bytes are the compulsory HBM traffic: each input read once, each output
  written once, in its stored dtype (activations bf16; the compressed
  activation ``9/16`` of the dense bf16 bytes, ``9F/8`` per token; the
  kernels' fp32 outputs as fp32, since they are written so; weights once).

Forward, training (masked/split): ``4·T·F·r`` FLOPs for ``T·(2r + 9F/8 + 4r)``
bytes (h in, activation out, fp32 output out): at the paper sizes 300-1,300
FLOP/B, above the H200's ridge of 989/4.8 = 206 FLOP/B: compute-bound.
"""

from __future__ import annotations

import dataclasses

from elas_kernels.gpu import H200, GpuSpec

BF16, F32 = 2, 4


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


def roofline(name: str, flops: float, bytes_: float, gpu: GpuSpec = H200) -> Roofline:
  """A :class:`Roofline` at ``gpu``'s dense bf16 tensor-core peak and HBM bandwidth."""
  return Roofline(name, float(flops), float(bytes_), gpu.name, gpu.bf16_flops_per_s,
                  gpu.hbm_bytes_per_s)


def markdown(rows: list[Roofline]) -> str:
  """A markdown table of rooflines."""
  out = ["| computation | GFLOP | MB moved | FLOP/B | lower bound µs | bound |",
         "|---|---|---|---|---|---|"]
  for r in rows:
    out.append(f"| {r.name} | {r.flops / 1e9:.2f} | {r.bytes / 1e6:.1f} | {r.intensity:.0f} "
               f"| {r.time_s * 1e6:.1f} | {r.bound} |")
  return "\n".join(out)


def _act_bytes(t: int, f: int) -> float:
  """The compressed 2:4 activation: F/2 bf16 values + F/8 metadata bytes per token."""
  return t * f * 9 / 8


def ffn_kernels(t: int, f: int, r: int, *, mode: str = "masked", train: bool = True,
                gpu: GpuSpec = H200) -> list[Roofline]:
  """Rooflines of ``elas_ffn``'s kernels and of the whole FFN core (last row).

  ``train``: forward stores the compressed activation and the backward runs;
  else the forward alone (evaluation). ``mode``: ``ste`` stores nothing and
  recomputes ``y1`` in backward (as the dense warm-up does in every mode).
  """
  w = 2 * f * r * BF16  # w_in and w_out, once
  fwd_bytes = t * r * BF16 + w + t * r * F32 + (_act_bytes(t, f) if train and mode != "ste" else 0)
  rows = [roofline("elas_ffn_fwd", 4 * t * f * r, fwd_bytes, gpu)]
  if not train:
    return rows
  recompute = mode == "ste"
  src_bytes = t * r * BF16 if recompute else _act_bytes(t, f)  # h, or the compressed activation
  y1 = 2 * t * f * r if recompute else 0
  rows += [
      # dh: dy2 = g w_out, dh = dy1 w_in
      roofline("elas_ffn_dh", 4 * t * f * r + y1,
               t * r * BF16 + src_bytes + w + t * r * F32, gpu),
      # dw_in: dy2 again, dw_in = dy1ᵀ h
      roofline("elas_ffn_dw_in", 4 * t * f * r + y1,
               t * r * BF16 + src_bytes + (0 if recompute else t * r * BF16) + w + f * r * F32,
               gpu),
      # dw_out = gᵀ y2s
      roofline("elas_ffn_dw_out", 2 * t * f * r + y1,
               t * r * BF16 + src_bytes + f * r * BF16 + f * r * F32, gpu),
  ]
  rows.append(ffn_core(t, f, r, mode=mode, train=True, gpu=gpu))
  return rows


def ffn_core(t: int, f: int, r: int, *, mode: str = "masked", train: bool = True,
             gpu: GpuSpec = H200) -> Roofline:
  """The lower bound of the whole FFN core (``K = N = r``): each product once
  (``2·T·F·(K+N)`` forward, twice that backward: no ``dy2`` formed twice, no
  ``y1`` recomputed), and the bytes a fused forward and backward cannot avoid:
  ``h`` (and ``g``) in, the fp32 output (and ``dh`` and both weight gradients)
  out, the weights once, and in training the compressed activation out and
  back in unless ``mode`` is ``ste`` (which stores nothing)."""
  flops = 2 * t * f * 2 * r
  bytes_ = t * r * BF16 + 2 * f * r * BF16 + t * r * F32
  if not train:
    return roofline("elas_ffn forward (minimum)", flops, bytes_, gpu)
  act = 0 if mode == "ste" else 2 * _act_bytes(t, f)
  flops += 2 * flops
  bytes_ += t * r * BF16 + act + t * r * F32 + 2 * f * r * F32
  return roofline(f"elas_ffn fwd+bwd ({mode}, minimum)", flops, bytes_, gpu)
