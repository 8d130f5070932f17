"""Where documents come from: each entry of config.data.sources becomes a tf.data.Dataset of
strings (one element per document) holding this process's disjoint share of that source.

Everything here is a graph-only tf.data op (no Python generators), so the iterator that reads it
can be checkpointed and resumed exactly.
"""

import gzip
import json
import re

from llama_jax import quiet

tf = quiet.import_tensorflow()
with quiet.native_notices_filtered():  # TensorFlow's native start-up notices
    import tensorflow_datasets as tfds

# importing stdlib_tfds registers the llama_jax_stdlib builder, so tfds= can name it
from llama_jax.data import FORMATS, corpus, stdlib_tfds  # noqa: F401, E402

# keys an entry may carry besides name and weight, per kind; anything else is a typo
KINDS = {
    "builtin": {"builtin"},
    "files": {"files", "format", "field", "eval_files"},
    "tfds": {"tfds", "data_dir", "split", "eval_split", "field"},
    "store": {"store"},  # a token store written by python -m llama_jax.data prepare
}


def check_entry(entry) -> str:
    """Returns the entry's kind; raises a one-line error naming the source and the fix."""
    name = entry.get("name")
    if not name:
        raise ValueError(f"data.sources entry {entry} has no name: add name='...'")
    kinds = [k for k in KINDS if k in entry]
    if len(kinds) != 1:
        raise ValueError(f"source {name!r} must set exactly one of builtin=, files=, tfds= or "
                         "store= "
                         f"(it sets {kinds or 'none'})")
    unknown = set(entry) - KINDS[kinds[0]] - {"name", "weight"}
    if unknown:
        raise ValueError(f"source {name!r} has unknown keys {sorted(unknown)}: a {kinds[0]} "
                         f"source takes {sorted(KINDS[kinds[0]])} besides name and weight")
    if kinds[0] == "builtin" and entry["builtin"] not in ("code", "prose"):
        raise ValueError(f"source {name!r}: builtin={entry['builtin']!r} is unknown: use "
                         "'code' (stdlib .py files) or 'prose' (pydoc topics, docstrings)")
    if kinds[0] == "files" and entry.get("format", "text") not in FORMATS:
        raise ValueError(f"source {name!r}: format={entry['format']!r} is unknown: use one of "
                         f"{FORMATS}")
    return kinds[0]


def check_names(entries):
    """Each source's name is its identity (its store directory OUTPUT/NAME, its share in the
    mixture's reports), so two entries may not share one."""
    names = [entry.get("name") for entry in entries]
    twice = sorted({n for n in names if n and names.count(n) > 1})
    if twice:
        raise ValueError(f"data.sources has more than one source named {twice[0]!r}: give "
                         "each its own name=")


def check_first_document(entry):
    """A JSONL source whose first line lacks the text field fails here, in one line, before
    any graph runs (a later such line stops the run with the in-graph check's message)."""
    if "files" not in entry or entry.get("format") != "jsonl":
        return
    patterns = [entry["files"]] if isinstance(entry["files"], str) else list(entry["files"])
    paths = sorted(p for pat in patterns for p in tf.io.gfile.glob(pat))
    if not paths:
        return  # _local_files names the pattern that matches nothing
    field = entry.get("field", "text")
    with (gzip.open(paths[0], "rt") if paths[0].endswith(".gz") else
          tf.io.gfile.GFile(paths[0], "r")) as f:
        line = next((x for x in f if x.strip()), None)
    try:
        record = json.loads(line) if line is not None else {}
    except json.JSONDecodeError:
        raise ValueError(f"source {entry['name']!r}: the first line of {paths[0]} is not JSON: "
                         "use format='lines' or 'text' for plain text") from None
    if not isinstance(record, dict) or not isinstance(record.get(field), str):
        keys = sorted(record) if isinstance(record, dict) else []
        raise ValueError(f"source {entry['name']!r}: the first line of {paths[0]} has no string "
                         f"field {field!r} (its keys: {keys}): set field= to the key that holds "
                         "the text")


def _files_dataset(paths, reader, train, seed, process_index, process_count):
    """File-level sharding when every process gets a file, else example-level (each process
    reads all files and keeps every process_count-th document)."""
    paths = sorted(paths)
    if len(paths) >= process_count:
        paths = paths[process_index::process_count]
        example_shard = False
    else:
        example_shard = process_count > 1
    ds = tf.data.Dataset.from_tensor_slices(paths)
    if train:
        ds = ds.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True)
    ds = reader(ds)
    return ds.shard(process_count, process_index) if example_shard else ds


def _jsonl_field(line, field, name):
    """The string value of a JSON field, parsed in-graph with RE2 (no Python). The first
    occurrence of the key wins, so a nested object must not repeat it before the top-level one."""
    key = '"' + re.escape(field) + r'"\s*:\s*"((?:[^"\\]|\\.)*)"'
    found = tf.strings.regex_full_match(line, r".*" + key + r".*")
    tf.debugging.assert_equal(found, True, message=(
        f"source {name}: a JSON line has no string field {field}: set field= to the key "
        "that holds the text"))
    text = tf.strings.regex_replace(line, r"^.*?" + key + r".*$", r"\1")
    return _json_unescape(text)


def _json_unescape(text):
    # mark every escape as its own piece (\x00 and \x01 never occur raw in a JSON string)
    marked = tf.strings.regex_replace(text, r"\\(u[0-9a-fA-F]{4}|.)", "\x00\x01\\1\x00")
    pieces = tf.strings.split(marked, "\x00")
    pieces = tf.boolean_mask(pieces, pieces != "")  # so a surrogate pair's halves are neighbours
    body = tf.strings.regex_replace(pieces, "^\x01", "")
    is_escape = tf.strings.substr(pieces, 0, 1) == "\x01"
    is_code = is_escape & (tf.strings.length(body) == 5)
    # \uXXXX (json.dumps writes non-ASCII this way by default) -> code point -> UTF-8
    digits = tf.strings.unicode_decode(tf.strings.lower(tf.strings.substr(body + "0000", 1, 4)),
                                       "UTF-8").to_tensor(shape=[None, 4])
    values = tf.where(digits >= ord("a"), digits - ord("a") + 10, digits - ord("0"))
    points = tf.reduce_sum(values * tf.constant([4096, 256, 16, 1]), axis=1)
    # an astral character is a surrogate pair of two escapes: the high one carries it whole
    high = is_code & (points >= 0xD800) & (points < 0xDC00)
    low = is_code & (points >= 0xDC00) & (points < 0xE000)
    next_points = tf.concat([points[1:], [0]], 0)
    points = tf.where(high, 0x10000 + (points - 0xD800) * 1024 + (next_points - 0xDC00), points)
    points = tf.where(is_code, points, 32)  # keeps unicode_encode away from garbage values
    chars = tf.strings.unicode_encode(tf.expand_dims(points, 1), "UTF-8")
    plain = body  # \" \\ \/ stand for themselves
    for letter, char in (("n", "\n"), ("t", "\t"), ("r", "\r"), ("b", "\b"), ("f", "\f")):
        plain = tf.where(body == letter, char, plain)
    prev_high = tf.concat([[False], high[:-1]], 0)
    out = tf.where(is_code, tf.where(low & prev_high, "", chars), plain)
    return tf.strings.reduce_join(tf.where(is_escape, out, pieces))


def _local_files(entry, split, train, seed, process_index, process_count):
    """Files matching the glob(s); .gz files are decompressed in-graph."""
    name = entry["name"]
    pattern = entry["files"] if split == "train" else entry.get("eval_files")
    if pattern is None:
        return None
    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    paths = sorted({p for pat in patterns for p in tf.io.gfile.glob(pat)})  # gs:// too
    if not paths:
        raise FileNotFoundError(f"source {name!r}: pattern {patterns} matches no file: fix the "
                                "path or glob")
    if all(tf.io.gfile.stat(p).length == 0 for p in paths):
        raise ValueError(f"source {name!r} has zero documents: its files {patterns} are empty")
    if entry.get("format") == "parquet" or any(p.endswith(".zst") for p in paths):
        raise ValueError(f"source {name!r}: Parquet and .zst files are read by prepare only: "
                         "run python -m llama_jax.data prepare and train on its store=")
    gzipped = [p.endswith(".gz") for p in paths]
    if any(gzipped) and not all(gzipped):
        raise ValueError(f"source {name!r} mixes .gz and plain files: give each its own source")
    compression = "GZIP" if all(gzipped) else ""
    fmt, field = entry.get("format", "text"), entry.get("field", "text")

    def lines(ds):
        return ds.interleave(lambda path: tf.data.TextLineDataset(path, compression),
                             cycle_length=1)  # one file after another: a stable order

    if fmt == "text":  # one document per file
        reader = lambda ds: ds.map(
            lambda path: tf.io.decode_compressed(tf.io.read_file(path), compression))
    elif fmt == "lines":
        reader = lines
    else:
        reader = lambda ds: lines(ds).filter(
            lambda line: tf.strings.length(tf.strings.strip(line)) > 0).map(
            lambda line: _jsonl_field(line, field, name))
    return _files_dataset(paths, reader, train, seed, process_index, process_count)


def _tfds(entry, split, train, seed, process_index, process_count):
    name = entry["name"]
    split_name = entry.get("split", "train") if split == "train" else entry.get("eval_split")
    if split_name is None:
        return None
    try:
        builder = tfds.builder(entry["tfds"], data_dir=entry.get("data_dir"))
    except Exception as e:  # tfds raises several types for an unknown or unprepared name
        raise ValueError(f"source {name!r}: TFDS cannot load {entry['tfds']!r} ({type(e).__name__})"
                         ": check the name:version and data_dir") from None
    field = entry.get("field", "text")
    if field not in builder.info.features:
        raise ValueError(f"source {name!r}: TFDS {entry['tfds']!r} has no feature {field!r} (it "
                         f"has {sorted(builder.info.features)}): set field=")
    splits = builder.info.splits  # empty when unknown (tfds.testing.mock_data): then not checked
    if splits and split_name not in splits:
        raise ValueError(f"source {name!r}: TFDS {entry['tfds']!r} has no split {split_name!r} "
                         f"(it has {sorted(splits)}): set split=/eval_split=")
    if splits and splits[split_name].num_examples == 0:
        raise ValueError(f"source {name!r} has zero documents in split {split_name!r}")
    # example-level ranges: a TFDS split has its own file layout, even_splits reads a disjoint part
    part = tfds.even_splits(split_name, n=process_count, drop_remainder=False)[process_index]
    try:
        ds = builder.as_dataset(split=part, shuffle_files=train,
                                # no autocache: its partial state would bloat iterator checkpoints
                            read_config=tfds.ReadConfig(shuffle_seed=seed, try_autocache=False))
    except AssertionError:  # what tfds raises for a dataset that was never prepared
        raise ValueError(f"source {name!r}: TFDS {entry['tfds']!r} is not prepared under "
                         f"data_dir={entry.get('data_dir')}: run tfds build or fix data_dir"
                         ) from None
    return ds.map(lambda example: example[field])


def documents(entry, split, *, train, seed, validation_fraction, process_index, process_count):
    """tf.data.Dataset of document strings for one source entry, or None when the entry has no
    data for the validation split."""
    kind = check_entry(entry)
    if kind == "store":
        raise ValueError(f"source {entry['name']!r} is a token store, not documents: set "
                         "data.tokenizer_path to the tokenizer it was prepared with")
    if kind == "files":
        return _local_files(entry, split, train, seed, process_index, process_count)
    if kind == "tfds":
        return _tfds(entry, split, train, seed, process_index, process_count)
    if entry["builtin"] == "code":
        paths = [str(p) for p in corpus.stdlib_files(split, validation_fraction)]
        return _files_dataset(paths, lambda ds: ds.map(tf.io.read_file), train, seed,
                              process_index, process_count)
    texts = [text for _, text in corpus.prose_documents(split, validation_fraction)]
    if not texts:
        return None
    ds = tf.data.Dataset.from_tensor_slices(texts).shard(process_count, process_index)
    return ds.shuffle(len(texts), seed=seed, reshuffle_each_iteration=True) if train else ds
