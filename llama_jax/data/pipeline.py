"""The input pipeline, all inside the tf.data graph: documents -> token ids with BOS/EOS ->
packed rows per source -> weighted mixture -> shuffled batches, plus the checkpointable iterator.

Packing concatenates a source's documents into rows of seq_len + 1 tokens with no padding. Each
row carries segment ids (1, 2, ... per document piece) and positions that restart at each
document, so the model never attends across documents and the loss never predicts one document
from another. Sources are mixed row by row, so each source's token share is its weight.
"""

import os
import re

import jax
import numpy as np
from absl import logging

from llama_jax import quiet

tf = quiet.import_tensorflow()

from llama_jax.data import sources as sources_lib  # noqa: E402

MIX_BLOCK = 1000  # rows per block of the mixture schedule: shares are exact within a block


def tokenize(docs, tokenizer):
    """Dataset of strings -> dataset of int32 [n] ids, BOS and EOS around each document, with
    either kind of data/tokenizer.py's tokenizers."""
    docs = docs.filter(lambda text: tf.strings.length(tf.strings.strip(text)) > 0)
    return docs.map(tokenizer.graph_encoder(), num_parallel_calls=tf.data.AUTOTUNE)


def pack(token_docs, seq_len):
    """Dataset of [n] id vectors -> dataset of (tokens, doc_ids), int32 [seq_len + 1] each.

    A scan carries the unfinished row (its state is part of the iterator checkpoint); a document
    longer than what is left of a row continues in the next row. doc_ids only need to differ
    between neighbouring documents, so the counter wraps.
    """
    row_len = seq_len + 1

    def step(state, doc):
        doc_index, tokens, doc_ids = state
        tokens = tf.concat([tokens, doc], 0)
        doc_ids = tf.concat([doc_ids, tf.fill(tf.shape(doc), doc_index)], 0)
        full = tf.size(tokens) // row_len * row_len
        rows = (tf.reshape(tokens[:full], [-1, row_len]), tf.reshape(doc_ids[:full], [-1, row_len]))
        return (tf.math.floormod(doc_index + 1, 2**30), tokens[full:], doc_ids[full:]), rows

    empty = tf.zeros([0], tf.int32)
    return token_docs.scan((tf.constant(0), empty, empty), step).unbatch()


def row_features(tokens, doc_ids):
    """(tokens, doc_ids) [seq_len + 1] -> tokens, segment ids (1, 2, ... in the row), positions."""
    new_doc = tf.concat([[True], doc_ids[1:] != doc_ids[:-1]], 0)
    segments = tf.cumsum(tf.cast(new_doc, tf.int32))
    index = tf.range(tf.size(tokens))
    starts = tf.gather(tf.math.segment_min(index, segments - 1), segments - 1)
    return tokens, segments, index - starts


def to_example(tokens, segments, positions):
    """A packed row of seq_len + 1 -> the model's inputs and next-token targets of seq_len."""
    inputs_seg, target_seg = segments[:-1], segments[1:]
    return {
        "inputs": tokens[:-1], "targets": tokens[1:], "positions": positions[:-1],
        "segment_ids": inputs_seg,
        # a target from the next document (or padding, segment 0) is not a prediction to learn
        "loss_mask": tf.cast((inputs_seg == target_seg) & (inputs_seg > 0), tf.float32),
    }


def mixture_weights(entries):
    """Normalized weights; one-line errors for negative or all-zero weights."""
    weights = np.array([float(e.get("weight", 1.0)) for e in entries])
    for entry, weight in zip(entries, weights):
        if weight < 0:
            raise ValueError(f"source {entry['name']!r} has weight {weight} < 0: weights must "
                             "be >= 0")
    if weights.sum() <= 0:
        raise ValueError(f"data.sources weights are all zero ({[e['name'] for e in entries]}): "
                         "give at least one source a positive weight")
    return weights / weights.sum()


def mixture_schedule(weights, seed):
    """Endless dataset of source indices: each block of MIX_BLOCK rows holds each source's share
    rounded by largest remainder, in a seeded random order that differs per block. Unlike
    independent draws, the shares cannot drift (over 2,000 rows they are exact to 0.1 point)."""
    exact = np.asarray(weights) * MIX_BLOCK
    counts = np.floor(exact).astype(np.int64)
    counts[np.argsort(counts - exact)[:MIX_BLOCK - counts.sum()]] += 1
    block = tf.constant(np.repeat(np.arange(len(weights), dtype=np.int64), counts))
    blocks = tf.data.Dataset.counter().map(
        lambda i: tf.random.experimental.stateless_shuffle(block, seed=tf.stack([seed, i])))
    return blocks.unbatch()


def make_dataset(split, data_config, tokenizer, local_batch_size, *, process_index=0,
                 process_count=1, repeat=None, with_source=False):
    """tf.data.Dataset of dicts of int32/float32 [local_batch_size, seq_len].

    Training shuffles and repeats every source forever; validation reads each source that has a
    validation split in a fixed order once and stops when the first runs out, so every
    evaluation sees the same batches. with_source adds "source" [B]: each row's source index.
    """
    train = split == "train"
    repeat = train if repeat is None else repeat
    entries = [dict(e) for e in data_config.sources]
    if not entries:
        raise ValueError("data.sources is empty: add e.g. dict(name='code', builtin='code')")
    weights = mixture_weights(entries)
    seed = data_config.seed + 1000 * process_index
    rows, kept = [], []
    for index, (entry, weight) in enumerate(zip(entries, weights)):
        docs = sources_lib.documents(
            entry, split, train=train, seed=seed + index,
            validation_fraction=data_config.validation_fraction,
            process_index=process_index, process_count=process_count)
        if docs is None or weight == 0:
            continue
        token_docs = tokenize(docs, tokenizer)
        if repeat:  # after the blank-document filter: an all-blank source ends instead of spinning
            token_docs = token_docs.repeat()
        packed = pack(token_docs, data_config.seq_len)
        rows.append(packed.map(lambda t, d, i=index: (t, d, tf.constant(i))))
        kept.append(weight)
    if not rows:
        raise ValueError(f"no source has a {split} split: set eval_files=/eval_split= on a source")
    if len(rows) == 1:
        ds = rows[0]
    else:
        # the schedule is the same on every process: each local batch has the same mix
        choice = mixture_schedule(np.asarray(kept) / sum(kept), data_config.seed)
        ds = tf.data.Dataset.choose_from_datasets(rows, choice, stop_on_empty_dataset=True)
    if train:
        ds = ds.shuffle(data_config.shuffle_buffer, seed=seed)

    def example(tokens, doc_ids, source):
        out = to_example(*row_features(tokens, doc_ids))
        if with_source:
            out["source"] = source
        return out

    ds = ds.map(example, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(local_batch_size, drop_remainder=True)
    options = tf.data.Options()
    # the one external state is a Hugging Face tokenizer's Python call, a pure function: the
    # iterator checkpoint need not (and cannot) save it
    options.experimental_external_state_policy = tf.data.experimental.ExternalStatePolicy.IGNORE
    return ds.prefetch(tf.data.AUTOTUNE).with_options(options)


class DataIterator:
    """Iterates one data shard's dataset as numpy dicts; save/restore its exact position (tf.data
    iterator checkpoint: shuffle buffers, the unfinished packed row, file offsets)."""

    def __init__(self, dataset, shard=None):
        self._iterator = iter(dataset)
        self._checkpoint = tf.train.Checkpoint(iterator=self._iterator)
        self._shard = jax.process_index() if shard is None else shard

    def __iter__(self):
        return self

    def __next__(self):
        return {k: v.numpy() for k, v in next(self._iterator).items()}

    def _prefix(self, directory):
        # one file set per shard, so a process that owns other shards finds only its own
        return os.path.join(os.fspath(directory), f"shard_{self._shard}", "iterator")

    def save(self, directory):
        return self._checkpoint.write(self._prefix(directory))

    def restore(self, directory):
        prefix = self._prefix(directory)
        if not tf.io.gfile.exists(prefix + ".index"):
            raise FileNotFoundError(f"no data iterator state at {prefix}: save() it first or "
                                    "start without restore")
        self._checkpoint.read(prefix).assert_consumed()


def process_shards(data_config, reader, readers):
    """(this reader's data shard indices, the number of shards); a reader is a process, or the
    processes of one context group (sharding.Reader). data.shards (0: one per reader) fixes the
    stream independently of the process count, so a run resumes its data exactly on any process
    count that divides it."""
    shards = data_config.shards or readers
    if shards % readers or data_config.global_batch_size % shards:
        raise ValueError(f"data.shards={shards} must be a multiple of the process count "
                         f"{readers} (a context group's processes count once) and divide "
                         f"data.global_batch_size={data_config.global_batch_size}: change "
                         "data.shards (0 = one per process)")
    per_reader = shards // readers
    return list(range(reader * per_reader, (reader + 1) * per_reader)), shards


def process_datasets(split, data_config, tokenizer, reader, readers):
    """{shard: dataset of global_batch_size / shards rows} for this reader's shards."""
    mine, shards = process_shards(data_config, reader, readers)
    rows = data_config.global_batch_size // shards
    return {s: make_dataset(split, data_config, tokenizer, rows, process_index=s,
                            process_count=shards) for s in mine}


def restarted_stream(data_config, tokenizer, reader, saved_shards, step):
    """A new train iterator for a checkpoint whose data state belongs to another shard count
    (no saved state fits these shards), reseeded so it does not replay the run's first batches."""
    shards = process_shards(data_config, reader.index, reader.count)[1]
    logging.warning(
        "the checkpoint's data stream has %d shards but this run reads %d (the process count or "
        "data.shards changed): the data iterator restarts with seed data.seed + %d. Set "
        "data.shards to a multiple of every process count you use to resume the stream exactly",
        saved_shards, shards, step)
    reseeded = data_config.copy_and_resolve_references()
    reseeded.seed = data_config.seed + step
    return ShardedIterator(process_datasets("train", reseeded, tokenizer, reader.index,
                                            reader.count), reader.saves)


class TrainStream:
    """The tf.data training input as train.py reads it (a store's is store.TrainData): this
    reader's shards (sharding.Reader) through one ShardedIterator, whose position a checkpoint
    saves."""

    def __init__(self, data_config, tokenizer, reader):
        self._data_config, self._tokenizer, self._reader = data_config, tokenizer, reader
        self._iterator = ShardedIterator(process_datasets(
            "train", data_config, tokenizer, reader.index, reader.count), reader.saves)

    def batches(self, first_step, windows):
        """The batches of the steps after first_step from the iterator, which has yielded the
        batches up to first_step's; those in the data windows a loss-spike rewind skipped
        (spikes.py) are read and dropped."""
        from llama_jax import spikes
        return spikes.skipping(self._iterator, windows, first_step)

    def state(self):
        return self._iterator  # saved beside each checkpoint (checkpoint.Checkpointer.save)

    def resume(self, saved_shards, step):
        """What a checkpoint's saved data state is restored into: the iterator, or None when the
        checkpoint was written with another shard count, whose saved state fits no shard here;
        the stream then restarts (restarted_stream)."""
        shards = process_shards(self._data_config, self._reader.index, self._reader.count)[1]
        if saved_shards == shards:
            return self._iterator
        self._iterator = restarted_stream(self._data_config, self._tokenizer, self._reader,
                                          saved_shards, step)
        return None


def concat_shards(datasets):
    """One dataset whose batches are the shards' batches side by side (in shard order)."""
    if len(datasets) == 1:
        return next(iter(datasets.values()))
    zipped = tf.data.Dataset.zip(tuple(datasets[s] for s in sorted(datasets)))
    return zipped.map(
        lambda *parts: {k: tf.concat([p[k] for p in parts], 0) for k in parts[0]})


class ShardedIterator:
    """A reader's shards read side by side: each batch is one batch of every shard,
    concatenated in shard order; save/restore keep one state per shard. Of a context group's
    processes, which read the same shards, only the first saves (saves=False: save writes
    nothing), so no two write one file."""

    def __init__(self, datasets, saves=True):
        self._iterators = [DataIterator(datasets[s], s) for s in sorted(datasets)]
        self._saves = saves

    def __iter__(self):
        return self

    def __next__(self):
        parts = [next(it) for it in self._iterators]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def save(self, directory):
        for it in self._iterators if self._saves else ():
            it.save(directory)

    def restore(self, directory):
        for it in self._iterators:
            it.restore(directory)


def graph_check_message(error):
    """The message of a tf.debugging check that failed inside the input graph (e.g. a JSONL
    line without the text field), without TensorFlow's node names around it."""
    found = re.search(r"assertion failed: \[(.*?)\]", error.message)
    return found.group(1) if found else error.message.splitlines()[0][:300]


def global_batches(batches, sharding, global_batch_size):
    """Iterates per-process batches (a Dataset or numpy dicts of this process's rows, whole)
    as global jax.Arrays. The global shape is given, not inferred: where a context group spans
    processes, each holds whole rows and its devices take their part of each row."""
    if isinstance(batches, tf.data.Dataset):
        batches = batches.as_numpy_iterator()
    for batch in batches:
        yield {k: jax.make_array_from_process_local_data(sharding, v, (global_batch_size,
                                                                       *v.shape[1:]))
               for k, v in batch.items()}
