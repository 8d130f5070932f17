"""Measures the input pipeline alone and prints JSON: tokens/s, each source's token share,
padding fraction and mean document length.

  python -m llama_jax.data --config=configs/tiny.py --workdir=runs/tiny --batches=50
"""

import json
import time

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from llama_jax.data import pipeline, tokenizer



def define_flags():
    """Only when run as a program: tests import measure() beside other entry points' flags."""
    config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.")
    flags.DEFINE_string("workdir", None, "Run directory holding (or receiving) the tokenizer.")
    flags.DEFINE_integer("batches", 50, "Batches to measure, after a warm-up of 5.")


def measure(dataset, names, batches, bos_id, warmup=5):
    iterator = dataset.as_numpy_iterator()
    for _ in range(warmup):  # tracing and filling the shuffle buffer are not throughput
        next(iterator)
    tokens_by_source = np.zeros(len(names))
    slots = documents = 0
    start = time.time()
    for _ in range(batches):
        batch = next(iterator)
        real = (batch["segment_ids"] > 0).sum(axis=1)
        np.add.at(tokens_by_source, batch["source"], real)
        slots += batch["segment_ids"].size
        documents += int((batch["inputs"] == bos_id).sum())
    seconds = time.time() - start
    tokens = tokens_by_source.sum()
    return {
        "tokens_per_sec": round(slots / seconds),
        "token_share": {n: round(float(s / tokens), 4) for n, s in zip(names, tokens_by_source)},
        "padding_fraction": round(1 - float(tokens) / slots, 4),
        "mean_document_tokens": round(float(tokens) / max(documents, 1), 1),
        "batches": batches, "seconds": round(seconds, 2),
    }


def main(argv):
    if len(argv) > 1 or flags.FLAGS.config is None or flags.FLAGS.workdir is None:
        raise app.UsageError("usage: python -m llama_jax.data --config=C --workdir=DIR "
                             "[--batches=N]")
    config = flags.FLAGS.config
    sp = tokenizer.get_tokenizer(flags.FLAGS.workdir, config.data, config.model.vocab_size)
    dataset = pipeline.make_dataset("train", config.data, sp, config.data.global_batch_size,
                                    with_source=True)
    names = [entry["name"] for entry in config.data.sources]
    print(json.dumps(measure(dataset, names, flags.FLAGS.batches, sp.bos_id())))


if __name__ == "__main__":
    define_flags()
    app.run(main)
