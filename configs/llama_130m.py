"""LLaMA-130M: d 768, 12 layers, 12 heads, SwiGLU 2048 (ReLU² 3072), rank 256.

Its row is config_lib.SIZES["130m"]; use as
``--config configs/llama_130m.py:<variant>``, variant one of full, loro, loro_relu2, elas (default), cola.
"""
from elas_jax import config_lib

get_config = config_lib.size_config("130m")
