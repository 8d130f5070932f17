"""LLaMA-7B (paper Table 2): dim 4096, 32 heads, 32 layers, lr 3.0e-04, 1.0T tokens.

The paper's batch (2048 x 2048 tokens, the default) on a TPU v5p-8 (4 chips): 4 sequences per chip per
microbatch, 128 microbatches, remat full; compiled for `v5p:2x2x1` it takes 38.47 GiB of the 95 GiB
per chip (2026-12-02, docs/distributed.md, "Measured plans"). Launch (on every host):
  python -m llama_jax.train --config=configs/llama_7b.py --workdir=gs://BUCKET/llama_7b \
      --config.train.microbatches=128 --config.model.remat=full --config.train.loss_chunk_size=512
Check or re-plan a slice first: python -m llama_jax.compile --plan --config=configs/llama_7b.py --topology=v5p:2x2x1
"""

from llama_jax.config import base_config


def get_config():
    c = base_config(dim=4096, n_heads=32, n_layers=32)
    c.train.lr = 0.0003
    c.train.steps = 238418  # 1.0T tokens / (2048 x 2048 tokens a step)
    return c
