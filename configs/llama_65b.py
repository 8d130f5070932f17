"""LLaMA-65B (paper Table 2): dim 8192, 64 heads, 80 layers, lr 1.5e-04, 1.4T tokens.

Meant for a TPU v5p-512 slice or 2048 A100-80GB as in the paper. Launch (on every host):
  python -m llama_jax.train --config=configs/llama_65b.py --workdir=gs://BUCKET/llama_65b
"""

from llama_jax.config import base_config


def get_config():
    c = base_config(dim=8192, n_heads=64, n_layers=80)
    c.train.lr = 0.00015
    c.train.steps = 333786  # 1.4T tokens / (2048 x 2048 tokens a step)
    return c
