"""The input pipeline: documents -> tokens with BOS/EOS -> packed rows -> shuffled batches.

Packing concatenates documents into rows of seq_len + 1 tokens with no padding. Each row carries
segment ids (1, 2, ... per document piece) and positions that restart at each document, so the
model never attends across documents and the loss never predicts one document from another.
Each process reads its own slice of the files and yields its share of the global batch.
"""

import random

import jax
import numpy as np
import tensorflow as tf

from llama_jax.data import corpus
from llama_jax.data.tokenizer import BOS_ID, EOS_ID


def pack_documents(token_docs, seq_len):
    """Yields (tokens, segment_ids, positions), each int32 [seq_len + 1], from token lists."""
    row_len = seq_len + 1
    tokens, segments, positions = [], [], []
    segment = 0
    for doc in token_docs:
        start = 0
        while start < len(doc):
            segment += 1
            piece = doc[start:start + row_len - len(tokens)]
            tokens.extend(piece)
            segments.extend([segment] * len(piece))
            positions.extend(range(len(piece)))
            start += len(piece)
            if len(tokens) == row_len:
                yield (np.asarray(tokens, np.int32), np.asarray(segments, np.int32),
                       np.asarray(positions, np.int32))
                tokens, segments, positions, segment = [], [], [], 0


def to_example(tokens, segments, positions):
    """A packed row of seq_len + 1 -> the model's inputs and next-token targets of seq_len."""
    inputs_seg, target_seg = segments[:-1], segments[1:]
    return {
        "inputs": tokens[:-1], "targets": tokens[1:], "positions": positions[:-1],
        "segment_ids": inputs_seg,
        # a target from the next document (or padding) is not a prediction to learn
        "loss_mask": tf.cast((inputs_seg == target_seg) & (inputs_seg > 0), tf.float32),
    }


def _documents(files, tokenizer, seed, repeat):
    epoch = 0
    while True:
        order = list(files)
        if seed is not None:
            random.Random(seed + epoch).shuffle(order)
        for path in order:
            text = corpus.read_text(path)
            if text.strip():
                yield [BOS_ID] + tokenizer.encode(text) + [EOS_ID]
        epoch += 1
        if not repeat:
            return


def make_dataset(split, data_config, tokenizer, local_batch_size, *, process_index=0,
                 process_count=1, repeat=None):
    """tf.data.Dataset of numpy-ready dicts of int32/float32 [local_batch_size, seq_len].

    Training shuffles files (per epoch) and rows and repeats forever; validation reads in a
    fixed order once, so every evaluation sees the same batches.
    """
    train = split == "train"
    repeat = train if repeat is None else repeat
    files = corpus.stdlib_files(split, data_config.validation_fraction)
    files = files[process_index::process_count]  # disjoint files per process
    if not files:
        raise ValueError(f"split {split!r} has fewer files than the {process_count} processes")
    seq_len = data_config.seq_len
    seed = data_config.seed + 1000 * process_index if train else None

    def rows():
        return pack_documents(_documents(files, tokenizer, seed, repeat), seq_len)

    spec = tf.TensorSpec([seq_len + 1], tf.int32)
    ds = tf.data.Dataset.from_generator(rows, output_signature=(spec, spec, spec))
    if train:
        ds = ds.shuffle(data_config.shuffle_buffer, seed=seed)
    ds = ds.map(to_example, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(local_batch_size, drop_remainder=True)
    return ds.prefetch(2)


def global_batches(dataset, sharding):
    """Iterates a per-process dataset as global jax.Arrays laid out by `sharding`."""
    for batch in dataset.as_numpy_iterator():
        yield {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
