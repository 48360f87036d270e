"""LLaMA-60M: d 512, 8 layers, 8 heads, SwiGLU 1376 (ReLU² 2064), rank 128.

Its row is config_lib.SIZES["60m"]; use as
``--config configs/llama_60m.py:<variant>``, variant one of full, loro, loro_relu2, elas (default), cola.
"""
from elas_jax import config_lib

get_config = config_lib.size_config("60m")
