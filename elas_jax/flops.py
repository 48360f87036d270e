"""Throughput accounting: model FLOPs per token, device peaks, MFU, peak memory.

Model FLOPs (the convention of PaLM's MFU, appendix B), per training token:

* every matmul costs 2 FLOPs per multiply-accumulate (MAC) forward and twice
  that backward (input and weight gradients), so ``6 · MACs`` in all;
* linears, per token forward: ``full`` ``d_in·d_out`` MACs, ``lowrank`` and
  ``cola`` ``r·(d_in + d_out)`` (two thin matmuls; CoLA's SiLU is not a
  matmul); per layer q, k, v, o (``d -> d``) and the FFN (SwiGLU: gate, up,
  down; ReLU²: up, down, at its own width ``ffn_dim``); plus the full
  ``lm_head`` (``d·vocab``); embeddings (a gather) are excluded;
* attention scores ``QKᵀ`` and ``PV``: ``L·d`` MACs each per token and layer
  forward, i.e. ``12 · n_layers · L · d`` FLOPs per token for training,
  **without** causal halving (PaLM's choice; XLA's dense attention computes
  the full ``L x L`` anyway);
* the 2:4-sparse FFN of ``elas`` counts as dense: these are model FLOPs, not
  the FLOPs the hardware executes, so MFU compares variants on equal terms;
* not counted: norms, rotary, activations, softmax, the loss, the optimizer
  (incl. LORO's exact step every K updates).
"""

from __future__ import annotations

from typing import Any

# Dense (no structured-sparsity) tensor-core peak TFLOP/s per device, by the
# compute dtype (``model.dtype``). "float32" is the TF32 tensor-core peak: XLA's
# default matmul precision runs fp32 matmuls in TF32 on these GPUs (with
# ``jax_default_matmul_precision=highest`` the real peak is far lower). bf16 is
# the rate with fp32 accumulation (what XLA's bf16 matmuls use): on GeForce cards
# it is half the fp16-accumulate rate the marketing tables lead with. Datasheets
# list 2:4-sparse rates as well (twice the dense ones, marked "with sparsity"):
# the dense rate is the one here.
# Keys are matched against ``jax.Device.device_kind`` (longest key contained,
# case-insensitive): "NVIDIA GH200 480GB" is GH200, not H200; "NVIDIA H200" is
# H200, not H20.
DEVICE_PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H200": {"bfloat16": 989.0, "float32": 495.0},  # same SXM compute as H100 SXM
    "H100": {"bfloat16": 989.0, "float32": 495.0},  # SXM ("NVIDIA H100 80GB HBM3")
    "H100 PCIe": {"bfloat16": 756.0, "float32": 378.0},
    "A100": {"bfloat16": 312.0, "float32": 156.0},  # SXM and PCIe alike
    # NVIDIA GH200 Grace Hopper Superchip datasheet: the H100 GPU (BF16 1,979 TFLOPS and
    # TF32 989 with sparsity, i.e. the H100 SXM's rates); device kind "NVIDIA GH200 480GB".
    "GH200": {"bfloat16": 989.0, "float32": 495.0},
    # NVIDIA H20 (China-market Hopper) product brief: FP16/BF16 148 TFLOPS, TF32 74, dense.
    # It is given to partners, not posted on nvidia.com; these are the figures they publish.
    "H20": {"bfloat16": 148.0, "float32": 74.0},
    # NVIDIA HGX B200 datasheet, per GPU (1,000 W): FP16/BF16 4.5 PFLOPS and TF32 2.2
    # PFLOPS with sparsity -> 2,250 and 1,100 dense.
    "B200": {"bfloat16": 2250.0, "float32": 1100.0},
    # NVIDIA GB200 NVL72 datasheet, per GPU (1,200 W): FP16/BF16 5 PFLOPS, TF32 2.5 with
    # sparsity. Here so that "NVIDIA GB200" does not fall to the B200 row.
    "GB200": {"bfloat16": 2500.0, "float32": 1250.0},
    # NVIDIA L40S datasheet: BF16 Tensor Core 362.05 TFLOPS, TF32 183 (733 / 366 with sparsity).
    "L40S": {"bfloat16": 362.05, "float32": 183.0},
    # NVIDIA RTX A6000 datasheet / Ampere GA102 whitepaper (appendix table): peak BF16 tensor
    # with FP32 accumulate 154.8 TFLOPS, TF32 77.4 (309.7 / 154.8 with sparsity).
    "RTX A6000": {"bfloat16": 154.8, "float32": 77.4},
    # NVIDIA Ada GPU architecture whitepaper (appendix table), GeForce RTX 4090: peak BF16
    # tensor with FP32 accumulate 165.2 TFLOPS, TF32 82.6 (330.4 / 165.2 with sparsity;
    # 330.3 is the FP16-accumulate rate).
    "RTX 4090": {"bfloat16": 165.2, "float32": 82.6},
    # A10G (AWS G5 only): NVIDIA posts no A10G datasheet; the figures quoted for it (e.g.
    # Baseten's "NVIDIA A10 vs A10G" spec table) are BF16 tensor 70 TFLOPS and TF32 35,
    # dense. (The A10's datasheet says 125 / 62.5; the A10G trades tensor for CUDA-core rate.)
    "A10G": {"bfloat16": 70.0, "float32": 35.0},
    "TPU v4": {"bfloat16": 275.0},
    "TPU v5 lite": {"bfloat16": 197.0},  # v5e
    "TPU v5": {"bfloat16": 459.0},  # v5p
    "TPU v6 lite": {"bfloat16": 918.0},  # v6e (Trillium)
}


def linear_macs(d_in: int, d_out: int, kind: str, rank: int) -> int:
  """Forward multiply-accumulates per token of one ``d_in -> d_out`` linear."""
  if kind == "full":
    return d_in * d_out
  if kind in ("lowrank", "cola"):
    return rank * (d_in + d_out)
  raise ValueError(f"unknown linear kind {kind!r}")


def flops_per_token(model_cfg, seq_len: int) -> dict[str, int]:
  """Training (forward + backward) model FLOPs per token of ``config.model``.

  Returns ``linear`` (6 · linear MACs, lm_head included), ``attention``
  (``12 · n_layers · seq_len · d``), ``total`` (their sum) and ``forward``
  (a third of ``total``).
  """
  m = model_cfg
  d, f, kind, r = m.d_model, m.ffn_dim, m.linear_kind, m.rank
  ffn_linears = 3 if m.ffn_kind == "swiglu" else 2  # (gate,) up, down: all d<->f
  per_layer = 4 * linear_macs(d, d, kind, r) + ffn_linears * linear_macs(d, f, kind, r)
  lin = m.n_layers * per_layer + d * m.vocab_size  # + lm_head (always full)
  attn = m.n_layers * 2 * seq_len * d  # QKᵀ and PV, all heads together
  total = 6 * (lin + attn)
  return {"linear": 6 * lin, "attention": 6 * attn, "total": total, "forward": total // 3}


def device_peak_tflops(dtype: str, device_kind: str | None = None) -> float | None:
  """Peak TFLOP/s of one device for ``dtype``; None when unknown (e.g. CPU)."""
  if device_kind is None:
    import jax
    device_kind = jax.devices()[0].device_kind
  kind = device_kind.lower()
  matches = [k for k in DEVICE_PEAK_TFLOPS if k.lower() in kind]
  if not matches:
    return None
  return DEVICE_PEAK_TFLOPS[max(matches, key=len)].get(dtype)


def peak_tflops(cfg, mesh=None) -> float | None:
  """Aggregate peak TFLOP/s of a run on ``mesh`` (default: this process's devices): per
  device (``train.peak_tflops``, or the table for the mesh's device kind when 0)
  times the device count; None when unknown (e.g. CPU)."""
  import jax

  device = mesh.devices.flat[0] if mesh is not None else jax.devices()[0]
  per_device = float(cfg.train.peak_tflops) or device_peak_tflops(cfg.model.dtype, device.device_kind)
  if not per_device:
    return None
  return per_device * (mesh.size if mesh is not None else jax.device_count())


def mfu(tokens_per_s: float, flops_per_token: float, peak: float | None) -> float | None:
  """Model FLOPs utilisation in [0, 1]: achieved TFLOP/s over ``peak`` (TFLOP/s,
  aggregate over the devices the tokens ran on); None when the peak is unknown."""
  if not peak:
    return None
  return tokens_per_s * flops_per_token / (peak * 1e12)


def peak_memory_bytes(device: Any = None) -> int | None:
  """Peak bytes in use on ``device`` (default: the first local device) since
  start, from ``memory_stats()``; None where unsupported (e.g. CPU)."""
  if device is None:
    import jax
    device = jax.local_devices()[0]
  try:
    stats = device.memory_stats()
  except Exception:  # some backends raise instead of returning None
    return None
  if not stats or "peak_bytes_in_use" not in stats:
    return None
  return int(stats["peak_bytes_in_use"])
