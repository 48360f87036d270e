"""LLaMA-130M (brief section 2): d=768, 12 layers, 12 heads, SwiGLU 2048, rank 256.

Use as ``--config configs/llama_130m.py:<variant>`` with variant one of
full, loro, loro_relu2, elas (default), cola. Batch 512 x 256 tokens, vocab 32000.
"""

from elas_jax import config_lib


def get_config(variant: str = "elas"):
  """LLaMA-130m in ``variant``."""
  c = config_lib.llama_config(
      size="130m",
      variant=variant,
      d_model=768,  # hidden size d
      n_layers=12,  # decoder blocks
      n_heads=12,  # attention heads
      swiglu_ffn=2048,  # SwiGLU FFN width (ReLU² variants use int(1.5x))
      rank=256,  # rank r of every low-rank linear
      exact_every=500,  # LORO exact step every K updates
      lr=0.01,  # peak lr of the LORO variants
      steps=20_000,  # optimizer steps
      warmup_steps=2000,  # lr warm-up steps (LORO and full)
      cola_lr=0.003,  # peak lr of the CoLA variant
      cola_warmup_steps=2000,  # lr warm-up steps of the CoLA variant
      lr_adjust_steps=-2000,  # LORO lr clock shift (official llama_130m.sh: -warmup)
      cola_only_lr_act=False,  # CoLA: no SiLU on the gate (official only_lr_act: false)
  )
  # Step memory (docs/benchmarks.md, "Whole train step memory"): at 1B these cut the
  # activation bytes per token of the step to 0.08x and fit the paper's 512-sequence
  # batch on one H200 (micro-batch up to ~1000 instead of 79).
  c.model.attention = "auto"  # cuDNN flash attention on GPUs, the chunked one elsewhere
  c.model.loss_chunk = 512  # lm_head + cross-entropy over 512-token chunks: no [B, L, V] logits
  c.model.remat = "block"  # keep each block's input only, recompute the rest in backward
  c.model.scan_layers = True  # blocks under lax.scan: compile 0.2x, and remat effective in XLA
  config_lib.validate(c)
  return c
