"""LLaMA-350M (brief section 2): d=1024, 24 layers, 16 heads, SwiGLU 2736, rank 256.

Use as ``--config configs/llama_350m.py:<variant>`` with variant one of
full, loro, loro_relu2, elas (default), cola. Batch 512 x 256 tokens, vocab 32000.
"""

from elas_jax import config_lib


def get_config(variant: str = "elas"):
  """LLaMA-350m in ``variant``."""
  return config_lib.llama_config(
      size="350m",
      variant=variant,
      d_model=1024,  # hidden size d
      n_layers=24,  # decoder blocks
      n_heads=16,  # attention heads
      swiglu_ffn=2736,  # SwiGLU FFN width (ReLU² variants use int(1.5x))
      rank=256,  # rank r of every low-rank linear
      exact_every=500,  # LORO exact step every K updates
      lr=0.01,  # peak lr of the LORO variants
      steps=60_000,  # optimizer steps
      warmup_steps=2000,  # lr warm-up steps (LORO and full)
      cola_lr=0.003,  # peak lr of the CoLA variant
      cola_warmup_steps=6000,  # lr warm-up steps of the CoLA variant
      lr_adjust_steps=-6000,  # LORO lr clock shift (official llama_350m.sh: -6000)
      cola_only_lr_act=True,  # CoLA: no SiLU on the gate (official only_lr_act: default True)
  )
