"""Tiny LLaMA for the embedded default run: minutes on 2 CPU cores.

The same model family and variants as the paper sizes, shrunk: d=128, 4 layers,
4 heads, SwiGLU 344 (ReLU² 516), rank 32, on the offline sample corpus with a
4096-token subword vocabulary, sequences of 128 tokens.
Use as ``--config configs/tiny.py:<variant>`` (default ``elas``).
"""

from elas_jax import config_lib


def get_config(variant: str = "elas"):
  """Tiny model in ``variant``."""
  c = config_lib.llama_config(
      size="tiny",
      variant=variant,
      d_model=128,  # hidden size d
      n_layers=4,  # decoder blocks
      n_heads=4,  # attention heads
      swiglu_ffn=344,  # SwiGLU FFN width (ReLU² variants use int(1.5x) = 516)
      rank=32,  # rank r of every low-rank linear (r/d = 0.25 as in the paper)
      exact_every=100,  # LORO exact step every K updates
      lr=0.01,  # peak lr of the LORO variants
      steps=600,  # optimizer steps
      warmup_steps=60,  # lr warm-up steps (LORO and full)
      cola_lr=0.002,  # peak lr of the CoLA variant (CPU sweep 0.002-0.006, docs/results.md)
      cola_warmup_steps=60,  # lr warm-up steps of the CoLA variant
      vocab_size=4096,  # subword vocabulary trained on the sample corpus
      seq_len=128,  # tokens per sequence
      batch_size=16,  # sequences per step
      dense_warmup_steps=100,  # dense ReLU² steps before 2:4 starts
      full_lr=1e-3,  # peak lr of the full-rank variant (CPU sweep 5e-4-6e-3, docs/results.md)
  )
  c.model.dtype = "float32"  # CPU: bf16 matmuls are emulated and slower than fp32
  c.train.log_every = 10  # steps between metric logs
  c.train.eval_every = 200  # steps between evaluations
  c.train.eval_tokens = 65_536  # validation tokens per evaluation
  c.train.ckpt_every = 200  # steps between checkpoints
  c.data.source = "sample"  # the embedded offline Wikipedia sample
  # Memory options: the default chunked attention (auto, on CPU) and loss are also faster
  # here than xla attention + full logits (20 steps, 2:4 phase: 614 vs 754 ms/step); remat
  # and scan_layers stay off (memory is no concern at this size, remat recomputes blocks).
  c.model.remat = "none"  # no recomputation
  c.model.scan_layers = False  # a plain loop over the 4 blocks
  config_lib.validate(c)
  return c
