"""LLaMA-65B (paper Table 2): dim 8192, 64 heads, 80 layers, lr 1.5e-04, 1.4T tokens.

The paper's batch (2048 x 2048 tokens, the default) on a TPU v5p-64 (32 chips): 2 sequences per chip per
microbatch, 32 microbatches, remat full; compiled for `v5p:4x4x2` it takes 53.16 GiB of the 95 GiB
per chip (docs/distributed.md, "Measured plans"). Launch (on every host):
  python -m llama_jax.train --config=configs/llama_65b.py --workdir=gs://BUCKET/llama_65b \
      --config.train.microbatches=32 --config.model.remat=full --config.train.loss_chunk_size=512
Check or re-plan a slice first: python -m llama_jax.compile --plan --config=configs/llama_65b.py --topology=v5p:4x4x2
"""

from llama_jax.config import base_config


def get_config():
    c = base_config(dim=8192, n_heads=64, n_layers=80)
    c.train.lr = 0.00015
    c.train.steps = 333786  # 1.4T tokens / (2048 x 2048 tokens a step)
    return c
