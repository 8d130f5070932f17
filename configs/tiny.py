"""The default tiny model: trains on the built-in corpus (the Python standard library) on CPU.

Meant for a 2-core laptop or CI machine; about 4 minutes. Launch:
  python -m llama_jax.train --config=configs/tiny.py --workdir=runs/tiny
"""

from llama_jax.config import base_config


def get_config():
    c = base_config(vocab_size=4096, dim=256, n_layers=4, n_heads=4, ffn_dim=704,
                    max_seq_len=256, dtype="float32", remat="none")
    c.data.seq_len = 256
    c.data.global_batch_size = 8
    c.data.tokenizer_vocab_size = 4096
    c.data.tokenizer_sample_lines = 300_000
    c.data.shuffle_buffer = 256
    c.train.steps = 300
    c.train.lr = 3e-3
    # 10% of the run, whatever --config.train.steps says (30 of 300; a 20-step try warms up
    # over 2), as Levanter's fractional warmup; --config.train.warmup_steps=N still fixes it
    c.train.warmup_steps = c.train.get_ref("steps") // 10
    c.train.log_every = 20
    c.train.eval_every = 100
    c.train.eval_batches = 8
    c.checkpoint.every_steps = 50  # ~25 s of training: a Ctrl-C or crash loses little
    return c
