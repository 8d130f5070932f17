"""LLaMA-7B (paper Table 2): dim 4096, 32 heads, 32 layers, lr 3.0e-04, 1.0T tokens.

Meant for a TPU v5p-64 slice or 8x8 H100. Launch (on every host):
  python -m llama_jax.train --config=configs/llama_7b.py --workdir=gs://BUCKET/llama_7b
"""

from llama_jax.config import base_config


def get_config():
    c = base_config(dim=4096, n_heads=32, n_layers=32)
    c.train.lr = 0.0003
    c.train.steps = 238418  # 1.0T tokens / (2048 x 2048 tokens a step)
    return c
