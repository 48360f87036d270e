"""Tiny LLaMA for the embedded default run: minutes on 2 CPU cores.

The same model family and variants as the paper sizes, shrunk (config_lib.SIZES["tiny"]:
d=128, 4 layers, 4 heads, SwiGLU 344 (ReLU² 516), rank 32, a 4096-token vocabulary,
sequences of 128 tokens), trained on the offline sample corpus; what differs from
the paper sizes is set here. Use as ``--config configs/tiny.py:<variant>`` (default ``elas``).
"""

from elas_jax import config_lib


def get_config(variant: str = "elas"):
  """Tiny model in ``variant``."""
  c = config_lib.llama_config("tiny", variant)
  c.model.dtype = "float32"  # CPU: bf16 matmuls are emulated and slower than fp32
  c.train.log_every = 10  # steps between metric logs
  c.train.eval_every = 200  # steps between evaluations
  c.train.eval_tokens = 65_536  # validation tokens per evaluation
  c.train.ckpt_every = 200  # steps between checkpoints
  c.data.source = "sample"  # the embedded offline Wikipedia sample
  c.data.tokenizer = ""  # its own 4096-piece SentencePiece model, trained on the sample
  c.data.packing = "concat"  # documents joined and cut: no padding in the small batches
  # Memory options: the default chunked attention (auto, on CPU) and loss are also faster
  # here than xla attention + full logits (20 steps, 2:4 phase: 614 vs 754 ms/step); remat
  # and scan_layers stay off (memory is no concern at this size, remat recomputes blocks).
  c.model.remat = "none"  # no recomputation
  c.model.scan_layers = False  # a plain loop over the 4 blocks
  config_lib.validate(c)
  return c
