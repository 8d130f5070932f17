"""Writes token stores (llama_jax/data/store.py): a source's documents, tokenized in parallel
worker processes, one shard per unit of work (an input file, or a slice of the built-in corpus
or a TFDS split). The plan of units is saved first, so a killed prepare reruns only the units
whose shard never got its .json (and any whose files no longer match it).
"""

import contextlib
import gzip
import io
import itertools
import json
import multiprocessing
import os
import time
import types
import zlib

import numpy as np
from absl import logging

from llama_jax import quiet

tf = quiet.import_tensorflow()

from llama_jax.data import corpus, sources, store  # noqa: E402

CODE_FILES_PER_UNIT, PROSE_DOCS_PER_UNIT, TFDS_UNITS = 64, 256, 16


def plan_units(entry, split, validation_fraction):
    """The units of one split (JSON-able, each enough for a worker to read its documents), or
    [] when the entry has no such split."""
    kind = sources.check_entry(entry)
    if kind == "store":
        raise ValueError(f"source {entry['name']!r} is already a store")
    if kind == "builtin" and entry["builtin"] == "code":
        paths = [str(p) for p in corpus.stdlib_files(split, validation_fraction)]
        return [{"code": paths[i:i + CODE_FILES_PER_UNIT]}
                for i in range(0, len(paths), CODE_FILES_PER_UNIT)]
    if kind == "builtin":
        count = len(corpus.prose_documents(split, validation_fraction))
        return [{"prose": [i, min(i + PROSE_DOCS_PER_UNIT, count)], "split": split,
                 "validation_fraction": validation_fraction}
                for i in range(0, count, PROSE_DOCS_PER_UNIT)]
    if kind == "tfds":
        name = entry.get("split", "train") if split == "train" else entry.get("eval_split")
        # the worker rebuilds part i of tfds.even_splits (its objects are not JSON)
        return [] if name is None else [{"tfds": name, "part": [i, TFDS_UNITS]}
                                        for i in range(TFDS_UNITS)]
    pattern = entry["files"] if split == "train" else entry.get("eval_files")
    if pattern is None:
        return []
    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    paths = sorted({p for pat in patterns for p in tf.io.gfile.glob(pat)})
    if not paths:
        raise FileNotFoundError(f"source {entry['name']!r}: pattern {patterns} matches no file:"
                                " fix the path or glob")
    return [{"file": p} for p in paths]


class _GFileStream(io.RawIOBase):
    """A tf.io.gfile file (gs:// too) as the io stream gzip, zstandard and TextIOWrapper read."""

    def __init__(self, path):
        self._file = tf.io.gfile.GFile(path, "rb")

    def readable(self):
        return True

    def readinto(self, buffer):
        data = self._file.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def close(self):
        self._file.close()
        super().close()


class _ZstdStream(io.RawIOBase):
    """A .zst file decompressed frame after frame. zstandard's stream_reader returns a truncated
    frame's output without a word, which would make a shorter store; here an input that ends
    inside a frame raises EOFError."""

    def __init__(self, raw):
        import zstandard
        self._raw, self._decompressor = raw, zstandard.ZstdDecompressor()
        self._frame, self._out, self._zstd_error = None, b"", zstandard.ZstdError

    def readable(self):
        return True

    def readinto(self, buffer):
        while not self._out:
            data = self._raw.read(2**20)
            if not data:
                if self._frame is not None and not self._frame.eof:
                    raise EOFError("the file ends inside a zstd frame")
                return 0
            while data:  # a chunk may end one frame and start the next
                if self._frame is None or self._frame.eof:
                    self._frame = self._decompressor.decompressobj()
                try:
                    self._out += self._frame.decompress(data)
                except self._zstd_error as e:
                    raise OSError(f"zstd: {e}") from None
                data = self._frame.unused_data if self._frame.eof else b""
        size = min(len(buffer), len(self._out))
        buffer[:size], self._out = self._out[:size], self._out[size:]
        return size

    def close(self):
        self._raw.close()
        super().close()


def _open_bytes(path):
    """A binary stream of the file's contents, .gz and .zst decompressed on the fly."""
    raw = io.BufferedReader(_GFileStream(path), 2**20)
    if path.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw)
    if path.endswith(".zst"):
        return io.BufferedReader(_ZstdStream(raw), 2**20)
    return raw


def file_documents(entry, path):
    """The documents of one input file, in file order; a file that cannot be read whole is a
    one-line error naming it (never a shorter store)."""
    name = entry["name"]
    try:
        yield from _file_documents(entry, path)
    except (EOFError, OSError, zlib.error) as e:  # gzip, zstd: truncated or not compressed
        raise ValueError(f"source {name!r}: {path} is truncated or corrupt ({e}): download or "
                         "compress it again, or remove it from files=") from None


def _file_documents(entry, path):
    fmt, field, name = entry.get("format", "text"), entry.get("field", "text"), entry["name"]
    if fmt == "parquet":
        import pyarrow
        import pyarrow.parquet as pq
        with tf.io.gfile.GFile(path, "rb") as f:
            try:
                table = pq.read_table(io.BytesIO(f.read()))
            except pyarrow.ArrowException as e:
                raise ValueError(f"source {name!r}: {path} is not a readable Parquet file ({e})"
                                 ": write it again, or set format= to what it holds") from None
        if field not in table.column_names:
            raise ValueError(f"source {name!r}: {path} has no column {field!r} (it has "
                             f"{table.column_names}): set field=")
        yield from (text for text in table.column(field).to_pylist() if text)
        return
    with _open_bytes(path) as stream:
        if fmt == "text":
            yield stream.read().decode("utf-8", errors="replace")
            return
        for number, line in enumerate(io.TextIOWrapper(stream, "utf-8", errors="replace"), 1):
            if fmt == "lines" or not line.strip():
                yield line.rstrip("\n")
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"source {name!r}: {path} line {number} is not JSON ({e.msg}): "
                                 "use format='lines' or 'text' for plain text") from None
            if not isinstance(record, dict):
                raise ValueError(f"source {name!r}: {path} line {number} is a JSON "
                                 f"{type(record).__name__}, not an object: format='jsonl' "
                                 f"reads one object a line, its text in field {field!r}")
            if not isinstance(record.get(field), str):
                raise ValueError(f"source {name!r}: {path} line {number} has no string field "
                                 f"{field!r}: set field= to the key that holds the text")
            yield record[field]


def unit_documents(entry, unit, texts):
    if "code" in unit:
        return map(corpus.read_text, unit["code"])
    if "prose" in unit:  # the parent parsed the stdlib once and passes this unit's texts
        return iter(texts)
    if "tfds" in unit:
        import tensorflow_datasets as tfds
        builder = tfds.builder(entry["tfds"], data_dir=entry.get("data_dir"))
        index, count = unit["part"]
        part = tfds.even_splits(unit["tfds"], n=count, drop_remainder=False)[index]
        ds = builder.as_dataset(split=part, shuffle_files=False)
        field = entry.get("field", "text")
        return (ex[field].decode("utf-8", errors="replace") for ex in ds.as_numpy_iterator())
    return file_documents(entry, unit["file"])


def _unit_texts(unit):
    if "prose" not in unit:
        return None
    docs = corpus.prose_documents(unit["split"], unit["validation_fraction"])
    return [text for _, text in docs[slice(*unit["prose"])]]


_worker = {}


def _init_worker(path, vocab_size):
    from llama_jax.data import tokenizer
    _worker["tokenizer"] = tokenizer.load_tokenizer(path, vocab_size)


def tokenize_unit(task):
    """In a worker: reads, tokenizes and writes one unit's shard; returns (pid, record, s)."""
    entry, unit, texts, directory, index, dtype = task
    start = time.time()
    tok = _worker["tokenizer"]
    ids, lengths = [], []
    docs = (d for d in unit_documents(entry, unit, texts) if d.strip())  # as the in-graph pipeline
    while batch := list(itertools.islice(docs, 256)):
        encoded = tok.encode_documents(batch)
        ids.extend(encoded)
        lengths.extend(map(len, encoded))
    tokens = np.fromiter(itertools.chain.from_iterable(ids), dtype, count=sum(lengths))
    record = store.write_shard(directory, index, tokens, np.array(lengths, np.int64),
                               {"unit": unit})
    return os.getpid(), record, time.time() - start


def _read_json(path):
    with tf.io.gfile.GFile(path, "rb") as f:
        try:
            return json.loads(f.read())
        except json.JSONDecodeError:
            raise ValueError(f"{path} is not JSON (damaged): delete its directory and rerun "
                             "prepare") from None


def _plan(entry, split, directory, tokenizer_id, validation_fraction):
    """The units of this split: those saved by an earlier (maybe killed) prepare of the same
    source and tokenizer, else a new plan, saved before any shard is written."""
    path = f"{directory}/plan.json"
    for written in (path, f"{directory}/manifest.json"):  # a store without its plan counts too
        if not tf.io.gfile.exists(written):
            continue
        saved = _read_json(written)
        if saved.get("source") != entry or saved.get("tokenizer") != tokenizer_id:
            raise ValueError(f"{directory} was prepared from another source or tokenizer "
                             f"({written} holds {saved.get('source')}, tokenizer "
                             f"{saved.get('tokenizer')}): use another --output or delete it")
        if written == path:
            return saved["units"]
    units = plan_units(entry, split, validation_fraction)
    if units:
        tf.io.gfile.makedirs(directory)
        store.write_atomic(path, json.dumps({"source": entry, "tokenizer": tokenizer_id,
                                             "units": units}).encode())
    return units


def _shards_to_write(directory, count, dtype):
    """The shards without a .json (never written, or killed), and finished ones whose files no
    longer match their .json (truncated, overwritten): the reader refuses those, so they are
    redone rather than trusted."""
    todo = []
    for index in range(count):
        record, damage = store.check_done_shard(directory, index, dtype)
        if damage:
            logging.warning("redoing %s/%s: %s", directory, store.shard_name(index), damage)
        if record is None:
            todo.append(index)
    return todo


def _inputs(entry, split):
    """What a split reads, for a message."""
    if "files" in entry:
        return entry["files"] if split == "train" else entry.get("eval_files")
    if "tfds" in entry:
        return f"TFDS {entry['tfds']}"
    return f"the built-in {entry['builtin']} corpus"


def prepare_split(pool, entry, split, directory, tokenizer, validation_fraction):
    """Writes (or finishes) one split's store; returns its summary, or None if it has no data.
    `tokenizer` is (model bytes, path, vocab size)."""
    model_bytes, tokenizer_path, vocab_size = tokenizer
    entry = json.loads(json.dumps(entry))  # as plan.json holds it (lists, not tuples)
    tokenizer_id = store.fingerprint(model_bytes)
    start = time.time()
    units = _plan(entry, split, directory, tokenizer_id, validation_fraction)
    if not units:
        return None
    dtype = store.token_dtype(vocab_size)
    todo = _shards_to_write(directory, len(units), dtype)
    busy, counted = {}, {}
    tasks = [(entry, units[i], _unit_texts(units[i]), directory, i, dtype) for i in todo]
    for pid, record, seconds in pool.imap_unordered(tokenize_unit, tasks):
        busy[pid] = busy.get(pid, 0.0) + seconds
        counted[pid] = counted.get(pid, 0) + record["tokens"]
    shards = [store.read_done_shard(directory, i) for i in range(len(units))]
    if not sum(s["documents"] for s in shards):  # the reader refuses a store of no tokens
        for index in range(len(units)):  # unfinished again: a rerun reads the inputs anew
            tf.io.gfile.remove(f"{directory}/{store.shard_name(index)}.json")
        raise ValueError(f"source {entry['name']!r}: {_inputs(entry, split)} holds no "
                         f"documents for the {split} split (empty or blank): give it text or "
                         "remove the source")
    manifest = {
        "format_version": store.FORMAT_VERSION, "source": entry, "split": split,
        "tokenizer": tokenizer_id, "tokenizer_path": tokenizer_path,
        "dtype": np.dtype(dtype).name,
        "tokens": sum(s["tokens"] for s in shards),
        "documents": sum(s["documents"] for s in shards),
        "shards": [{k: s[k] for k in ("name", "tokens", "documents", "sha256", "index_sha256")}
                   for s in shards]}
    store.write_atomic(f"{directory}/manifest.json", json.dumps(manifest, indent=1).encode())
    seconds = time.time() - start
    return {"store": directory, "tokens": manifest["tokens"],
            "documents": manifest["documents"], "shards": len(shards),
            "shards_written": len(todo), "seconds": round(seconds, 2),
            "bytes": sum(tf.io.gfile.stat(f"{directory}/{s['name']}.{ext}").length
                         for s in shards for ext in ("tokens", "index")),
            "tokens_per_s_per_worker": sorted(round(counted[p] / max(busy[p], 1e-9))
                                              for p in busy)}


def check_output(output):
    """Refuses an output that is not (or cannot become) a directory of stores, before anything
    is written into it."""
    if tf.io.gfile.exists(output) and not tf.io.gfile.isdir(output):
        raise ValueError(f"--output {output} is a file: give a directory (prepare writes "
                         "OUTPUT/NAME/train/)")
    for marker in ("checkpoints", "model.json", "metrics.jsonl"):
        if tf.io.gfile.exists(f"{output}/{marker}"):
            raise ValueError(f"--output {output} is a training workdir (it holds {marker}): "
                             "give prepare a directory of its own, e.g. runs/stores")
    for marker in ("plan.json", "manifest.json", "train/plan.json", "train/manifest.json"):
        if tf.io.gfile.exists(f"{output}/{marker}"):
            raise ValueError(f"--output {output} is one source's store (it holds {marker}): "
                             "give the directory that holds the stores (prepare writes "
                             "OUTPUT/NAME/train/)")


def prepare(entries, output, tokenizer, workers, validation_fraction):
    """Prepares each entry into OUTPUT/NAME/{train,validation}; yields one summary a split."""
    output = output.rstrip("/")
    check_output(output)
    if workers == 0:  # in this process: no start-up cost, for small sources
        _init_worker(tokenizer[1], tokenizer[2])
        pool = contextlib.nullcontext(types.SimpleNamespace(imap_unordered=map))
    else:  # spawn, not fork: the parent has TensorFlow's threads running
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # the workers' TensorFlow start-up
        pool = multiprocessing.get_context("spawn").Pool(
            workers, initializer=_init_worker, initargs=(tokenizer[1], tokenizer[2]))
    with pool as pool:
        for entry in entries:
            for split in ("train", "validation"):
                directory = f"{output}/{entry['name']}/{split}"
                summary = prepare_split(pool, dict(entry), split, directory, tokenizer,
                                        validation_fraction)
                if summary is not None:
                    yield {"source": entry["name"], "split": split, **summary}
