"""LLaMA-1B: d 2048, 24 layers, 32 heads, SwiGLU 5461 (ReLU² 8191), rank 512.

Its row is config_lib.SIZES["1b"]; use as
``--config configs/llama_1b.py:<variant>``, variant one of full, loro, loro_relu2, elas (default), cola.
"""
from elas_jax import config_lib

get_config = config_lib.size_config("1b")
