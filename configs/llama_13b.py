"""LLaMA-13B (paper Table 2): dim 5120, 40 heads, 40 layers, lr 3.0e-04, 1.0T tokens.

The paper's batch (2048 x 2048 tokens, the default) on a TPU v5p-16 (8 chips): 4 sequences per chip per
microbatch, 64 microbatches, remat full; compiled for `v5p:2x2x2` it takes 42.34 GiB of the 95 GiB
per chip (docs/distributed.md, "Measured plans"). Launch (on every host):
  python -m llama_jax.train --config=configs/llama_13b.py --workdir=gs://BUCKET/llama_13b \
      --config.train.microbatches=64 --config.model.remat=full --config.train.loss_chunk_size=512
Check or re-plan a slice first: python -m llama_jax.compile --plan --config=configs/llama_13b.py --topology=v5p:2x2x2
"""

from llama_jax.config import base_config


def get_config():
    c = base_config(dim=5120, n_heads=40, n_layers=40)
    c.train.lr = 0.0003
    c.train.steps = 238418  # 1.0T tokens / (2048 x 2048 tokens a step)
    return c
