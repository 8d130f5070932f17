"""A ~1B-parameter LLaMA for one GPU benchmark: dim 2048, 16 layers, 16 heads, ffn 5632, vocab
32000, seq 2048, bfloat16 compute (params and AdamW state float32), cuDNN flash attention.

  python -m llama_jax.bench --config=configs/gpu_1b.py
  python -m llama_jax.train --config=configs/gpu_1b.py --workdir=runs/gpu_1b   # trains it
The defaults (batch 48, dots_saveable remat, loss chunks of 512) were the fastest packed-data
setting on an H200 (bench/results/); bench/gpu.sh runs it at several batch sizes and remat
policies.
"""

from llama_jax.config import base_config


def get_config():
    c = base_config(vocab_size=32000, dim=2048, n_layers=16, n_heads=16, max_seq_len=2048,
                    dtype="bfloat16", remat="dots_saveable", attention="auto")
    c.mesh.update(data=1, fsdp=-1, tensor=1)
    c.data.seq_len = 2048
    c.data.global_batch_size = 48
    c.data.tokenizer_vocab_size = 32000
    c.train.update(steps=10_000, lr=3e-4, warmup_steps=500, loss_chunk_size=512)
    return c
