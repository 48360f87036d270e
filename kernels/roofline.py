"""Static roofline of the 2:4 FFN kernels: FLOPs, minimum HBM bytes, intensity, lower bound.

What is counted (per call, ``T`` tokens, width ``F``, ranks ``K = N = r``, bf16):

* FLOPs are the dense tensor-core work the kernels execute: the 2:4-sparse
  activation is decompressed in registers and multiplied by dense MMAs, so
  ``y2s w_outᵀ`` costs ``2·T·F·N`` like a dense product (the useful half is
  ``T·F·N``). No recomputation from tiling is counted (that is the tiles'
  cost, ``benchmarks/kernel_tiles.py``), but the algorithm's own is: the
  backward forms ``dy2 = g w_out`` in both ``dh`` and ``dw_in``, and ``ste`` /
  the dense warm-up recompute ``y1 = h w_inᵀ`` in each backward kernel.
* Bytes are the compulsory HBM traffic: each input read once, each output
  written once, in its stored dtype (activations bf16; the compressed
  activation ``9/16`` of the dense bf16 bytes, ``9F/8`` per token; the
  kernels' fp32 outputs as fp32, since they are written so; weights once).

Forward, training (masked/split): ``4·T·F·r`` FLOPs for ``T·(2r + 9F/8 + 4r)``
bytes (h in, activation out, fp32 output out): at the paper sizes 300-1,300
FLOP/B, above the H200's ridge of 989/4.8 = 206 FLOP/B: compute-bound.
"""

from __future__ import annotations

from elas_jax.targets import bounds as rl
from elas_jax.targets import spec

BF16, F32 = 2, 4


def _act_bytes(t: int, f: int) -> float:
  """The compressed 2:4 activation: F/2 bf16 values + F/8 metadata bytes per token."""
  return t * f * 9 / 8


def ffn_kernels(t: int, f: int, r: int, *, mode: str = "masked", train: bool = True,
                target: str | spec.Target = "h200") -> list[rl.Roofline]:
  """Rooflines of ``elas_ffn``'s kernels and of the whole FFN core (last row).

  ``train``: forward stores the compressed activation and the backward runs;
  else the forward alone (evaluation). ``mode``: ``ste`` stores nothing and
  recomputes ``y1`` in backward (as the dense warm-up does in every mode).
  """
  w = 2 * f * r * BF16  # w_in and w_out, once
  fwd_bytes = t * r * BF16 + w + t * r * F32 + (_act_bytes(t, f) if train and mode != "ste" else 0)
  rows = [rl.roofline("elas_ffn_fwd", 4 * t * f * r, fwd_bytes, target)]
  if not train:
    return rows
  recompute = mode == "ste"
  src_bytes = t * r * BF16 if recompute else _act_bytes(t, f)  # h, or the compressed activation
  y1 = 2 * t * f * r if recompute else 0
  rows += [
      # dh: dy2 = g w_out, dh = dy1 w_in
      rl.roofline("elas_ffn_dh", 4 * t * f * r + y1,
                  t * r * BF16 + src_bytes + w + t * r * F32, target),
      # dw_in: dy2 again, dw_in = dy1ᵀ h
      rl.roofline("elas_ffn_dw_in", 4 * t * f * r + y1,
                  t * r * BF16 + src_bytes + (0 if recompute else t * r * BF16) + w + f * r * F32,
                  target),
      # dw_out = gᵀ y2s
      rl.roofline("elas_ffn_dw_out", 2 * t * f * r + y1,
                  t * r * BF16 + src_bytes + f * r * BF16 + f * r * F32, target),
  ]
  total_flops = sum(x.flops for x in rows)
  # The core as a whole: h, g in; the activation out and back in; out, dh, dW out.
  total_bytes = (2 * t * r * BF16 + (0 if recompute else 2 * _act_bytes(t, f)) + w
                 + 2 * t * r * F32 + 2 * f * r * F32)
  rows.append(rl.roofline(f"elas_ffn fwd+bwd ({mode})", total_flops, total_bytes, target))
  return rows


def op_kernels(t: int, f: int, r: int, target: str | spec.Target = "h200") -> list[rl.Roofline]:
  """Rooflines of ``relu2_sparsify`` and ``sparse24_matmul``, forward and backward."""
  act = _act_bytes(t, f)
  return [
      rl.roofline("relu2_sparsify_fwd", 2 * t * f * r, t * r * BF16 + f * r * BF16 + act, target),
      rl.roofline("relu2_sparsify_dz", 4 * t * f * r,
                  t * r * BF16 + f * r * BF16 + t * f / 2 * BF16 + t * r * F32, target),
      rl.roofline("relu2_sparsify_dw", 4 * t * f * r,
                  t * r * BF16 + f * r * BF16 + t * f / 2 * BF16 + f * r * F32, target),
      rl.roofline("sparse24_matmul_fwd", 2 * t * f * r, act + f * r * BF16 + t * r * BF16, target),
      rl.roofline("sparse24_matmul_dvals", 2 * t * f * r,
                  t * r * BF16 + t * f / 8 + f * r * BF16 + t * f / 2 * BF16, target),
      rl.roofline("sparse24_matmul_dw", 2 * t * f * r, t * r * BF16 + act + f * r * F32, target),
  ]
