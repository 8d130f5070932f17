"""Writes token stores (llama_jax/data/store.py): a source's documents, tokenized in parallel
worker processes, one shard per unit of work (an input file, or a slice of the built-in corpus
or a TFDS split). The plan of units is saved first, so a killed prepare reruns only the units
whose shard never got its .json.
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

import numpy as np

from llama_jax import quiet

with quiet.native_notices_filtered():  # TensorFlow's native start-up notices
    import tensorflow as tf

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


def _open_bytes(path):
    """A binary stream of the file's contents, .gz and .zst decompressed on the fly."""
    raw = io.BufferedReader(_GFileStream(path), 2**20)
    if path.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw)
    if path.endswith(".zst"):
        import zstandard
        return zstandard.ZstdDecompressor().stream_reader(raw)
    return raw


def file_documents(entry, path):
    """The documents of one input file, in file order."""
    fmt, field, name = entry.get("format", "text"), entry.get("field", "text"), entry["name"]
    if fmt == "parquet":
        import pyarrow.parquet as pq
        with tf.io.gfile.GFile(path, "rb") as f:
            table = pq.read_table(io.BytesIO(f.read()))
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
            text = json.loads(line).get(field)
            if not isinstance(text, str):
                raise ValueError(f"source {name!r}: {path} line {number} has no string field "
                                 f"{field!r}: set field= to the key that holds the text")
            yield text


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


def _plan(entry, split, directory, tokenizer_id, validation_fraction):
    """The units of this split: those saved by an earlier (maybe killed) prepare of the same
    source and tokenizer, else a new plan, saved before any shard is written."""
    path = f"{directory}/plan.json"
    if tf.io.gfile.exists(path):
        with tf.io.gfile.GFile(path, "rb") as f:
            saved = json.loads(f.read())
        if saved["source"] != entry or saved["tokenizer"] != tokenizer_id:
            raise ValueError(f"{directory} was prepared from another source or tokenizer "
                             f"({saved['source']}, {saved['tokenizer']}): use another --output "
                             "or delete it")
        return saved["units"]
    units = plan_units(entry, split, validation_fraction)
    if units:
        tf.io.gfile.makedirs(directory)
        store.write_atomic(path, json.dumps({"source": entry, "tokenizer": tokenizer_id,
                                             "units": units}).encode())
    return units


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
    todo = [i for i in range(len(units)) if store.read_done_shard(directory, i) is None]
    busy, counted = {}, {}
    tasks = [(entry, units[i], _unit_texts(units[i]), directory, i, dtype) for i in todo]
    for pid, record, seconds in pool.imap_unordered(tokenize_unit, tasks):
        busy[pid] = busy.get(pid, 0.0) + seconds
        counted[pid] = counted.get(pid, 0) + record["tokens"]
    shards = [store.read_done_shard(directory, i) for i in range(len(units))]
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


def prepare(entries, output, tokenizer, workers, validation_fraction):
    """Prepares each entry into OUTPUT/NAME/{train,validation}; yields one summary a split."""
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
                directory = f"{output.rstrip('/')}/{entry['name']}/{split}"
                summary = prepare_split(pool, dict(entry), split, directory, tokenizer,
                                        validation_fraction)
                if summary is not None:
                    yield {"source": entry["name"], "split": split, **summary}
