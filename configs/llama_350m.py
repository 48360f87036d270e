"""LLaMA-350M: d 1024, 24 layers, 16 heads, SwiGLU 2736 (ReLU² 4104), rank 256.

Its row is config_lib.SIZES["350m"]; use as
``--config configs/llama_350m.py:<variant>``, variant one of full, loro, loro_relu2, elas (default), cola.
"""
from elas_jax import config_lib

get_config = config_lib.size_config("350m")
