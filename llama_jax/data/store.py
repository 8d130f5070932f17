"""The token store: documents tokenized once (`python -m llama_jax.data prepare`) into flat shards,
and the reader whose training batch for step s is a pure function of (data.seed, s, the mixture
weights, the stores' manifests), so a checkpoint's step is the whole data position.

Layout of one source's store, per split (train/, validation/), all through tf.io.gfile (gs:// too):
  shard_00000.tokens  token ids, BOS ... EOS per document, concatenated (uint16, or uint32 if the
                      vocabulary needs it)
  shard_00000.index   int64 end offset of each document in the shard's tokens
  shard_00000.json    counts and sha256 of both files; written last, so it marks a whole shard
  manifest.json       format version, source entry, tokenizer fingerprint, counts, every shard
"""

import functools
import hashlib
import json
import queue
import threading

import numpy as np

from llama_jax import quiet

tf = quiet.import_tensorflow()

FORMAT_VERSION = 1
MIX_BLOCK = 1000  # slots per block of the mixture schedule: shares are exact within a block


def token_dtype(vocab_size):
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def fingerprint(model_bytes: bytes) -> str:
    """The tokenizer's identity (the same value as checkpoint.fingerprint of its file)."""
    return hashlib.sha256(model_bytes).hexdigest()[:16]


def write_atomic(path, data: bytes):
    """Complete or absent: a killed writer leaves only a .tmp name no reader opens."""
    tmp = path + ".tmp"
    with tf.io.gfile.GFile(tmp, "wb") as f:
        f.write(data)
    tf.io.gfile.rename(tmp, path, overwrite=True)


def shard_name(index):
    return f"shard_{index:05d}"


def write_shard(directory, index, tokens: np.ndarray, lengths: np.ndarray, extra: dict):
    """Writes one shard's three files, the .json (its commit mark) last; returns that record."""
    base = f"{directory}/{shard_name(index)}"
    ends = np.cumsum(lengths, dtype=np.int64)
    token_bytes, index_bytes = tokens.tobytes(), ends.tobytes()
    write_atomic(base + ".tokens", token_bytes)
    write_atomic(base + ".index", index_bytes)
    record = {"name": shard_name(index), "tokens": int(tokens.size),
              "documents": int(lengths.size),
              "sha256": hashlib.sha256(token_bytes).hexdigest(),
              "index_sha256": hashlib.sha256(index_bytes).hexdigest(), **extra}
    write_atomic(base + ".json", json.dumps(record).encode())
    return record


def read_done_shard(directory, index):
    """The record of a finished shard, or None (never written, or killed before its .json)."""
    path = f"{directory}/{shard_name(index)}.json"
    if not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path, "rb") as f:
        return json.loads(f.read())


def check_done_shard(directory, index, dtype):
    """(record, None) for a finished shard whose files are the ones its .json records,
    (None, None) for a shard never finished, (None, what is wrong) for one damaged since:
    prepare redoes a damaged shard rather than trusting its .json."""
    try:
        record = read_done_shard(directory, index)
    except json.JSONDecodeError:  # a .json is renamed into place whole: this one was altered
        return None, f"{directory}/{shard_name(index)}.json is not JSON"
    if record is None:
        return None, None
    base = f"{directory}/{record['name']}"
    for path, size, sha256, file_dtype in (
            (base + ".tokens", record["tokens"] * np.dtype(dtype).itemsize, record["sha256"],
             dtype),
            (base + ".index", 8 * record["documents"], record["index_sha256"], np.int64)):
        problem = _verified(path, size, sha256, file_dtype)[1]
        if problem:
            return None, f"{path} {problem}"
    return record, None


class StoreError(ValueError):
    """A store that cannot be read as its manifest says; the message names the file."""


def _verified(path, size, sha256, dtype):
    """(the file's contents as a numpy array, None), or (None, what is wrong) when its size or
    checksum is not the recorded one. A local file is memory-mapped (the page cache holds it,
    not this process); gs:// is read into memory."""
    if not tf.io.gfile.exists(path):
        return None, "is missing"
    actual = tf.io.gfile.stat(path).length
    if actual != size:
        return None, f"has {actual} bytes, not the {size} recorded (truncated or overwritten)"
    if size == 0:
        return np.zeros(0, dtype), None
    if "://" in path:
        with tf.io.gfile.GFile(path, "rb") as f:
            data = np.frombuffer(f.read(), dtype)
    else:
        data = np.memmap(path, dtype, mode="r")
    digest = hashlib.sha256()
    flat = data.view(np.uint8)
    for start in range(0, flat.size, 2**26):  # hashlib releases the GIL on large chunks
        digest.update(flat[start:start + 2**26])
    if digest.hexdigest() != sha256:
        return None, "fails its sha256 checksum (corrupt)"
    return data, None


def _read_verified(path, size, sha256, dtype):
    """The file's contents, refused if its size or checksum is not the one the manifest
    recorded (a truncated or corrupt shard is never read silently)."""
    data, problem = _verified(path, size, sha256, dtype)
    if problem:
        raise StoreError(f"store shard {path} {problem}: rerun prepare for this store (it "
                         "redoes the damaged shards)")
    return data


class Store:
    """One split of one source's store: document lengths at open, shard tokens read (and
    verified) the first time a batch touches them."""

    def __init__(self, path, name="store"):
        self.path, self.name = path.rstrip("/"), name
        manifest_path = f"{self.path}/manifest.json"
        if not tf.io.gfile.exists(manifest_path):
            raise StoreError(f"source {name!r}: {manifest_path} does not exist: run python -m "
                             "llama_jax.data prepare to completion for it (or fix store=)")
        with tf.io.gfile.GFile(manifest_path, "rb") as f:
            self.manifest = json.loads(f.read())
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise StoreError(f"store {self.path} has format version "
                             f"{self.manifest.get('format_version')}, this reader reads "
                             f"{FORMAT_VERSION}: prepare it again")
        self.dtype = np.dtype(self.manifest["dtype"])
        shards = self.manifest["shards"]
        ends = [_read_verified(f"{self.path}/{s['name']}.index", 8 * s["documents"],
                               s["index_sha256"], np.int64) for s in shards]
        lengths = [np.diff(e, prepend=0) for e in ends]
        self.lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
        shard_tokens = np.array([s["tokens"] for s in shards], np.int64)
        self.shard_starts = np.concatenate([[0], np.cumsum(shard_tokens)])
        # global token offset of each document's first token
        self.doc_starts = np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64)
        self.total_tokens = int(self.lengths.sum())
        if self.total_tokens == 0:
            raise StoreError(f"source {name!r}: store {self.path} holds no tokens")
        self._tokens = {}

    def shard_tokens(self, index):
        if index not in self._tokens:
            s = self.manifest["shards"][index]
            self._tokens[index] = _read_verified(
                f"{self.path}/{s['name']}.tokens", s["tokens"] * self.dtype.itemsize,
                s["sha256"], self.dtype)
        return self._tokens[index]

    def gather(self, offsets):
        """Token ids at global token offsets (any shape)."""
        shard = np.searchsorted(self.shard_starts, offsets, side="right") - 1
        out = np.empty(offsets.shape, np.int32)
        for index in np.unique(shard):
            mask = shard == index
            out[mask] = self.shard_tokens(int(index))[offsets[mask] - self.shard_starts[index]]
        return out


def load_manifests(entries, split):
    return [Store(f"{e['store'].rstrip('/')}/{split}", e["name"]) for e in entries]


def block_counts(weights):
    """Each source's slots per MIX_BLOCK, rounded by largest remainder (they sum to MIX_BLOCK)."""
    exact = np.asarray(weights, np.float64) * MIX_BLOCK
    counts = np.floor(exact).astype(np.int64)
    counts[np.argsort(counts - exact, kind="stable")[:MIX_BLOCK - counts.sum()]] += 1
    return counts


class Mixture:
    """Sequence slot g of the stream (global batch row b of step s is g = (s - 1) * B + b) ->
    a packed row of seq_len + 1 tokens, computed from nothing but the slot number.

    The slot's source: block g // MIX_BLOCK holds each source's exact share in a seeded order.
    Its row: the k-th row of that source, where k counts the source's earlier slots; a source's
    rows cut its token stream (its documents in a seeded permutation, a new one each epoch) into
    seq_len + 1 pieces, so a small source repeats with fresh orders and the mix never drifts.
    """

    def __init__(self, stores, weights, seq_len, seed):
        self.stores, self.row_len, self.seed = stores, seq_len + 1, int(seed)
        self.counts = block_counts(weights)
        self.template = np.repeat(np.arange(len(stores)), self.counts)
        self._block = functools.lru_cache(maxsize=8)(self._block_uncached)
        # two epochs per source, each source its own cache: a tiny source going round many
        # epochs in one batch never evicts a big source's (costly) permutation
        self._epochs = [functools.lru_cache(maxsize=2)(functools.partial(
            self._epoch_uncached, source)) for source in range(len(stores))]

    def _block_uncached(self, block):
        """(source, its row index k) of each slot of one block."""
        order = np.random.default_rng([self.seed, 0, block]).permutation(self.template)
        rank = np.empty(MIX_BLOCK, np.int64)
        for source, count in enumerate(self.counts):
            rank[order == source] = np.arange(count) + block * count
        return order, rank

    def _epoch_uncached(self, source, epoch):
        """(document order, end offset of each in that order's token stream) of one epoch."""
        store = self.stores[source]
        order = np.random.default_rng([self.seed, 1 + source, epoch]).permutation(
            store.lengths.size)
        return order, np.cumsum(store.lengths[order])

    def slot_sources(self, slots):
        """(source, row index k) of each global slot number."""
        sources, ranks = np.empty_like(slots), np.empty_like(slots)
        blocks, within = np.divmod(slots, MIX_BLOCK)
        for block in np.unique(blocks):
            mask = blocks == block
            order, rank = self._block(int(block))
            sources[mask], ranks[mask] = order[within[mask]], rank[within[mask]]
        return sources, ranks

    def source_rows(self, source, ks):
        """(tokens, document ids), int [R, seq_len + 1], of rows ks of one source."""
        store = self.stores[source]
        total, documents = store.total_tokens, store.lengths.size
        epochs, where = np.divmod(ks[:, None] * self.row_len + np.arange(self.row_len), total)
        offsets, doc_ids = np.empty_like(where), np.empty_like(where)
        for epoch in np.unique(epochs):
            mask = epochs == epoch
            order, ends = self._epochs[source](int(epoch))
            j = np.searchsorted(ends, where[mask], side="right")  # index in this epoch's order
            doc = order[j]
            offsets[mask] = store.doc_starts[doc] + where[mask] - (ends[j] - store.lengths[doc])
            doc_ids[mask] = epoch * documents + j
        return store.gather(offsets), doc_ids

    def rows(self, slots):
        """Packed rows of the given global slots: tokens, document ids, source, each [R, ...]."""
        slots = np.asarray(slots, np.int64)
        sources, ks = self.slot_sources(slots)
        tokens = np.empty((slots.size, self.row_len), np.int32)
        doc_ids = np.empty((slots.size, self.row_len), np.int64)
        for source in np.unique(sources):
            mask = sources == source
            tokens[mask], doc_ids[mask] = self.source_rows(int(source), ks[mask])
        return tokens, doc_ids, sources.astype(np.int32)

    def batch(self, step, global_batch_size, rows, with_source=False):
        """The rows `rows` (global row indices) of the batch of training step `step` (1, 2, ...)."""
        slots = (step - 1) * global_batch_size + np.asarray(rows, np.int64)
        tokens, doc_ids, sources = self.rows(slots)
        out = examples(tokens, doc_ids)
        if with_source:
            out["source"] = sources
        return out


def examples(tokens, doc_ids):
    """Packed rows [R, T + 1] -> the model's batch [R, T]: segment ids 1, 2, ... per document
    piece and positions restarting at each (as pipeline.row_features does in-graph)."""
    new_doc = np.ones(tokens.shape, bool)
    new_doc[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    segments = np.cumsum(new_doc, axis=1, dtype=np.int32)
    index = np.arange(tokens.shape[1], dtype=np.int32)
    positions = index - np.maximum.accumulate(np.where(new_doc, index, 0), axis=1)
    return {
        "inputs": tokens[:, :-1], "targets": tokens[:, 1:], "positions": positions[:, :-1],
        "segment_ids": segments[:, :-1],
        # a target from the next document is not a prediction to learn
        "loss_mask": (segments[:, :-1] == segments[:, 1:]).astype(np.float32),
    }


def store_run(data_config) -> bool:
    """True when data.sources are token stores; a mixture of stores and raw sources is refused
    (a store's batches are a function of the step, the raw pipeline's are an iterator's)."""
    from llama_jax.data import sources
    kinds = [sources.check_entry(e) for e in data_config.sources]
    if "store" in kinds and set(kinds) != {"store"}:
        raise ValueError(f"data.sources mixes store= with other kinds ({kinds}): prepare every "
                         "source (python -m llama_jax.data prepare) or use none as a store")
    return bool(kinds) and "store" in kinds


def mixture(data_config, split, model_bytes) -> Mixture:
    """The Mixture of the stores' split; every store must hold the run tokenizer's ids."""
    from llama_jax.data import pipeline
    entries = [dict(e) for e in data_config.sources]
    weights = pipeline.mixture_weights(entries)
    if split != "train":  # validation: the sources that have one, renormalised
        kept = [i for i, e in enumerate(entries) if tf.io.gfile.exists(
            f"{e['store'].rstrip('/')}/{split}/manifest.json")]
        if not kept or weights[kept].sum() == 0:
            raise ValueError(f"no store in data.sources has a {split} split: prepare a source "
                             "with eval_files=/eval_split= (or the built-in corpus)")
        entries, weights = [entries[i] for i in kept], weights[kept] / weights[kept].sum()
    stores = load_manifests(entries, split)
    expected = fingerprint(model_bytes)
    for store in stores:
        if store.manifest["tokenizer"] != expected:
            raise ValueError(f"store {store.path} was prepared with tokenizer "
                             f"{store.manifest['tokenizer']} ({store.manifest['tokenizer_path']})"
                             f" but this run's is {expected}: set data.tokenizer_path to that "
                             "tokenizer or prepare the store again with this one")
    return Mixture(stores, weights, data_config.seq_len, data_config.seed)


class Batches:
    """This process's rows of the batches of steps first_step, first_step + 1, ..., each
    computed (numpy index math, a few ms) on a daemon thread up to `depth` steps ahead. No
    state to save: a resumed run starts a new one at its checkpoint's step + 1. `position`
    maps a step to the data position it reads (the identity, or past the data windows a
    loss-spike rewind skipped: spikes.batch_of_step)."""

    def __init__(self, mix, global_batch_size, rows, first_step, depth=2, position=None):
        self._args = mix, global_batch_size, rows, position or (lambda step: step)
        self._queue = queue.Queue(depth)
        # a daemon: the process exits without waiting for batches nobody will take
        threading.Thread(target=self._fill, args=(first_step,), daemon=True).start()

    def _fill(self, step):
        mix, global_batch_size, rows, position = self._args
        while True:
            try:
                self._queue.put(mix.batch(position(step), global_batch_size, rows))
            except Exception as e:  # a bad shard: raised in the training thread, named
                self._queue.put(e)
                return
            step += 1

    def __iter__(self):
        return self

    def __next__(self):
        item = self._queue.get()
        if isinstance(item, Exception):
            raise item
        return item


class EvalBatches:
    """The validation stream: the same first batches at every evaluation (its `take` is what
    train.validation_loss calls on a tf.data.Dataset)."""

    def __init__(self, mix, global_batch_size, rows):
        self._args = mix, global_batch_size, rows

    def take(self, count):
        mix, global_batch_size, rows = self._args
        return (mix.batch(step, global_batch_size, rows) for step in range(1, count + 1))


def train_batches(data_config, tokenizer, rows, first_step, position=None):
    """What train.py reads for a store run: this process's rows (sharding.Reader.rows) from
    first_step on."""
    mix = mixture(data_config, "train", tokenizer.path.read_bytes())
    return Batches(mix, data_config.global_batch_size, rows, first_step, position=position)


class TrainData:
    """A store run's training input as train.py reads it (the tf.data one is
    pipeline.TrainStream): no iterator state, a step's batch is read at its data position."""

    def __init__(self, data_config, tokenizer, rows):
        self._args = data_config, tokenizer, rows

    def batches(self, first_step, windows):
        """This process's rows of the batches of the steps after first_step, the data windows
        a loss-spike rewind skipped (spikes.py) left out."""
        from llama_jax import spikes
        return train_batches(*self._args, first_step + 1,
                             lambda step: spikes.batch_of_step(step, windows))

    def state(self):
        return None  # nothing to save beside a checkpoint: its step is the data position

    def resume(self, saved_shards, step):
        return None  # nothing to restore, whatever the process count was


def eval_batches(data_config, tokenizer, rows):
    mix = mixture(data_config, "validation", tokenizer.path.read_bytes())
    return EvalBatches(mix, data_config.global_batch_size, rows)
