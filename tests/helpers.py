"""Small shared pieces for the tests: a micro config and random batches."""

import pathlib

import jax
import jax.numpy as jnp

from llama_jax import config as config_lib
from llama_jax.config import base_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_config(path):
    return config_lib.load_config(ROOT / path)


def micro_config(**model):
    """A model small enough that a train step takes milliseconds on CPU."""
    fields = dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128,
                  max_seq_len=64, dtype="float32", remat="none")
    fields.update(model)
    c = base_config(**fields)
    c.data.seq_len = 32
    c.data.global_batch_size = 8
    c.data.tokenizer_vocab_size = 512
    c.data.tokenizer_sample_lines = 20_000
    c.data.shuffle_buffer = 16
    c.train.update(steps=20, lr=3e-3, warmup_steps=2, log_every=5, eval_every=10,
                   eval_batches=2)
    return c


def random_batch(key, batch, seq_len, vocab):
    tokens = jax.random.randint(key, (batch, seq_len + 1), 0, vocab)
    return {
        "inputs": tokens[:, :-1], "targets": tokens[:, 1:],
        "positions": jnp.broadcast_to(jnp.arange(seq_len), (batch, seq_len)),
        "segment_ids": jnp.ones((batch, seq_len), jnp.int32),
        "loss_mask": jnp.ones((batch, seq_len), jnp.float32),
    }


def train_tokenizer(files, vocab_size, out_path, sample_lines):
    """A SentencePiece model trained on a few stdlib files: quicker than a config's mixture."""
    from llama_jax.data import corpus, tokenizer
    tokenizer.train_on_texts((corpus.read_text(f) for f in files), vocab_size, out_path,
                             sample_lines)
