"""LLaMA-60M (brief section 2): d=512, 8 layers, 8 heads, SwiGLU 1376, rank 128.

Use as ``--config configs/llama_60m.py:<variant>`` with variant one of
full, loro, loro_relu2, elas (default), cola. Batch 512 x 256 tokens, vocab 32000.
"""

from elas_jax import config_lib


def get_config(variant: str = "elas"):
  """LLaMA-60m in ``variant``."""
  return config_lib.llama_config(
      size="60m",
      variant=variant,
      d_model=512,  # hidden size d
      n_layers=8,  # decoder blocks
      n_heads=8,  # attention heads
      swiglu_ffn=1376,  # SwiGLU FFN width (ReLU² variants use int(1.5x))
      rank=128,  # rank r of every low-rank linear
      exact_every=500,  # LORO exact step every K updates
      lr=0.01,  # peak lr of the LORO variants
      steps=10_000,  # optimizer steps
      warmup_steps=1000,  # lr warm-up steps (LORO and full)
      cola_lr=0.006,  # peak lr of the CoLA variant
      cola_warmup_steps=2000,  # lr warm-up steps of the CoLA variant
      lr_adjust_steps=-1000,  # LORO lr clock shift (official llama_60m.sh: -warmup)
      cola_only_lr_act=False,  # CoLA: no SiLU on the gate (official only_lr_act: false)
  )
