"""LLaMA-13B (paper Table 2): dim 5120, 40 heads, 40 layers, lr 3.0e-04, 1.0T tokens.

Meant for a TPU v5p-128 slice or 16x8 H100. Launch (on every host):
  python -m llama_jax.train --config=configs/llama_13b.py --workdir=gs://BUCKET/llama_13b
"""

from llama_jax.config import base_config


def get_config():
    c = base_config(dim=5120, n_heads=40, n_layers=40)
    c.train.lr = 0.0003
    c.train.steps = 238418  # 1.0T tokens / (2048 x 2048 tokens a step)
    return c
