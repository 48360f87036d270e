"""LLaMA-1B (brief section 2): d=2048, 24 layers, 32 heads, SwiGLU 5461, rank 512.

Use as ``--config configs/llama_1b.py:<variant>`` with variant one of
full, loro, loro_relu2, elas (default), cola. Batch 512 x 256 tokens, vocab 32000.
"""

from elas_jax import config_lib


def get_config(variant: str = "elas"):
  """LLaMA-1b in ``variant``."""
  return config_lib.llama_config(
      size="1b",
      variant=variant,
      d_model=2048,  # hidden size d
      n_layers=24,  # decoder blocks
      n_heads=32,  # attention heads
      swiglu_ffn=5461,  # SwiGLU FFN width (ReLU² variants use int(1.5x))
      rank=512,  # rank r of every low-rank linear
      exact_every=200,  # LORO exact step every K updates
      lr=0.005,  # peak lr of the LORO variants
      steps=100_000,  # optimizer steps
      warmup_steps=10_000,  # lr warm-up steps (LORO and full)
      cola_lr=0.002,  # peak lr of the CoLA variant
      cola_warmup_steps=10_000,  # lr warm-up steps of the CoLA variant
      lr_adjust_steps=-10_000,  # LORO lr clock shift (official llama_1b.sh: -warmup)
      cola_only_lr_act=True,  # CoLA: no SiLU on the gate (official only_lr_act: default True)
  )
