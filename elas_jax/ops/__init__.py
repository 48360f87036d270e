"""The numerical building blocks the model is made of.

  ``attention``  causal attention implementations (xla, cudnn, chunked)
  ``loss``       the language-model loss, with or without the full logits
  ``sparsity``   2:4 selection, compression and the XLA 2:4 FFN op (the ground truth)
  ``ffn``        the 2:4 FFN dispatch: one table of implementations (XLA, Pallas
                 kernels), resolved for the devices the step is compiled for and
                 placed per device under ``shard_map`` on a mesh

Nothing here imports the model, the trainer or the command-line tools.
"""
