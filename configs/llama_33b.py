"""LLaMA-33B (paper Table 2): dim 6656, 52 heads, 60 layers, lr 1.5e-04, 1.4T tokens.

The paper's batch (2048 x 2048 tokens, the default) on a TPU v5p-32 (16 chips): 4 sequences per chip per
microbatch, 32 microbatches, remat full; compiled for `v5p:2x2x4` it takes 57.18 GiB of the 95 GiB
per chip (docs/distributed.md, "Measured plans"). Launch (on every host):
  python -m llama_jax.train --config=configs/llama_33b.py --workdir=gs://BUCKET/llama_33b \
      --config.train.microbatches=32 --config.model.remat=full --config.train.loss_chunk_size=512
Check or re-plan a slice first: python -m llama_jax.compile --plan --config=configs/llama_33b.py --topology=v5p:2x2x4
"""

from llama_jax.config import base_config


def get_config():
    c = base_config(dim=6656, n_heads=52, n_layers=60)
    c.train.lr = 0.00015
    c.train.steps = 333786  # 1.4T tokens / (2048 x 2048 tokens a step)
    return c
