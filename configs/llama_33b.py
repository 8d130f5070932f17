"""LLaMA-33B (paper Table 2): dim 6656, 52 heads, 60 layers, lr 1.5e-04, 1.4T tokens.

Meant for a TPU v5p-256 slice or 32x8 H100. Launch (on every host):
  python -m llama_jax.train --config=configs/llama_33b.py --workdir=gs://BUCKET/llama_33b
"""

from llama_jax.config import base_config


def get_config():
    c = base_config(dim=6656, n_heads=52, n_layers=60)
    c.train.lr = 0.00015
    c.train.steps = 333786  # 1.4T tokens / (2048 x 2048 tokens a step)
    return c
