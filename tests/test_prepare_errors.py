"""`python -m llama_jax.data prepare` on bad inputs: a table of cases, each one line `error: ...`
naming the file and the fix, with nothing loadable left behind; and a damaged shard of a
finished store, which a rerun of prepare redoes."""

import gzip
import json
import os
import subprocess
import sys
import types

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from helpers import ROOT, micro_config, train_tokenizer
from llama_jax.data import __main__ as cli
from llama_jax.data import corpus, store

LINES = "".join(json.dumps({"text": f"note {i}: the list at index {i} holds {i * i} items"}) + "\n"
                for i in range(60))


def write_inputs(root):
    (root / "good.jsonl").write_text(LINES)
    (root / "not_json.jsonl").write_text("plain words\nmore words\n")
    (root / "arrays.jsonl").write_text("[1, 2]\n[3]\n")
    (root / "empty.jsonl").write_text("")
    pq.write_table(pa.table({"content": ["a b c", "d e f"]}), root / "books.parquet")
    (root / "fake.parquet").write_bytes(b"not parquet" * 8)
    packed = zstandard.ZstdCompressor().compress(LINES.encode())
    (root / "cut.jsonl.zst").write_bytes(packed[:len(packed) // 2])
    (root / "garbage.jsonl.zst").write_bytes(b"\x00garbage" * 40)
    # two frames, as pzstd and concatenated downloads write them
    half = len(LINES) // 2
    (root / "frames.jsonl.zst").write_bytes(b"".join(
        zstandard.ZstdCompressor().compress(part.encode()) for part in (LINES[:half],
                                                                        LINES[half:])))
    packed = gzip.compress(LINES.encode())
    (root / "cut.jsonl.gz").write_bytes(packed[:len(packed) // 2])
    (root / "a_file").write_text("not a directory")
    (root / "workdir" / "checkpoints").mkdir(parents=True)
    (root / "converted").mkdir()
    (root / "converted" / "model.json").write_text("{}")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    train_tokenizer(corpus.stdlib_files("train")[:10], 512, root / "tokenizer.model", 5_000)
    write_inputs(root)
    prepare(root, [("notes", "good.jsonl", "jsonl")], root / "stores")  # a finished store
    return root


def prepare(root, sources, output, config_path="configs/mine.py", tokenizer="tokenizer.model",
            vocab_size=512):
    """The prepare command in this process: what main() runs after parsing the flags."""
    config = micro_config(vocab_size=vocab_size)
    config.data.sources = [dict(name=name, files=str(root / pattern), format=fmt)
                           for name, pattern, fmt in sources]
    fl = types.SimpleNamespace(tokenizer=str(root / tokenizer), output=str(output), sources=[],
                               workers=0)
    cli.run_prepare(config, config_path, fl)


JSONL = "jsonl"
# case -> (sources as (name, file, format), --output, the file the line names, what it says,
#          other settings); "out" is a fresh directory
CASES = {
    "glob matches nothing": ([("a", "missing_*.jsonl", JSONL)], "out", "missing_*.jsonl",
                             "matches no file: fix the path or glob", {}),
    "jsonl not json": ([("a", "not_json.jsonl", JSONL)], "out", "not_json.jsonl",
                       "line 1 is not JSON", {}),
    "jsonl lines not objects": ([("a", "arrays.jsonl", JSONL)], "out", "arrays.jsonl",
                                "line 1 is a JSON list, not an object", {}),
    "empty jsonl": ([("a", "empty.jsonl", JSONL)], "out", "empty.jsonl",
                    "holds no documents for the train split", {}),
    "parquet without the field": ([("a", "books.parquet", "parquet")], "out", "books.parquet",
                                  "has no column 'text' (it has ['content']): set field=", {}),
    "not parquet": ([("a", "fake.parquet", "parquet")], "out", "fake.parquet",
                    "is not a readable Parquet file", {}),
    "truncated zst": ([("a", "cut.jsonl.zst", JSONL)], "out", "cut.jsonl.zst",
                      "is truncated or corrupt (the file ends inside a zstd frame)", {}),
    "truncated zst as lines": ([("a", "cut.jsonl.zst", "lines")], "out", "cut.jsonl.zst",
                               "is truncated or corrupt", {}),
    "corrupt zst": ([("a", "garbage.jsonl.zst", JSONL)], "out", "garbage.jsonl.zst",
                    "is truncated or corrupt (zstd:", {}),
    "truncated gz": ([("a", "cut.jsonl.gz", JSONL)], "out", "cut.jsonl.gz",
                     "is truncated or corrupt", {}),
    "output holds another source's store": (
        [("notes", "frames.jsonl.zst", JSONL)], "stores", "stores/notes/train/plan.json",
        "was prepared from another source or tokenizer", {}),
    "output is one source's store": ([("a", "good.jsonl", JSONL)], "stores/notes", "notes",
                                     "is one source's store (it holds train/plan.json)", {}),
    "output is a file": ([("a", "good.jsonl", JSONL)], "a_file", "a_file",
                         "is a file: give a directory", {}),
    "output is a training workdir": ([("a", "good.jsonl", JSONL)], "workdir", "workdir",
                                     "is a training workdir (it holds checkpoints)", {}),
    "output is a converted workdir": ([("a", "good.jsonl", JSONL)], "converted", "converted",
                                      "is a training workdir (it holds model.json)", {}),
    "tokenizer larger than the vocabulary": (
        [("a", "good.jsonl", JSONL)], "out", "tokenizer.model",
        "has 512 pieces but model.vocab_size is 256", {"vocab_size": 256}),
    "tokenizer missing": ([("a", "good.jsonl", JSONL)], "out", "nothing.model",
                          "cannot be read", {"tokenizer": "nothing.model"}),
    "two sources with one name": (
        [("a", "good.jsonl", JSONL), ("a", "frames.jsonl.zst", JSONL)], "out",
        "configs/mine.py", "more than one source named 'a': give each its own name=", {}),
}


@pytest.mark.parametrize("case", CASES)
def test_a_bad_input_is_one_line_naming_the_file(case, inputs, tmp_path, capsys):
    sources, output, names, says, settings = CASES[case]
    output = tmp_path / "out" if output == "out" else inputs / output
    before = sorted(str(p) for p in inputs.rglob("*"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        prepare(inputs, sources, output, **settings)
    message = exited.value.code
    assert message.startswith("error: ") and "\n" not in message, message
    assert names in message and says in message, message
    assert capsys.readouterr().out == ""
    # nothing a reader could load: no store in a fresh output, no new file beside the inputs
    assert not list(tmp_path.rglob("manifest.json"))
    assert sorted(str(p) for p in inputs.rglob("*")) == before


def test_an_empty_source_prepares_once_it_has_text(inputs, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(SystemExit, match="holds no documents"):
        prepare(tmp_path, [("a", "empty.jsonl", JSONL)], tmp_path / "stores",
                tokenizer=inputs / "tokenizer.model")
    (tmp_path / "empty.jsonl").write_text(LINES)
    prepare(tmp_path, [("a", "empty.jsonl", JSONL)], tmp_path / "stores",
            tokenizer=inputs / "tokenizer.model")
    assert store.Store(str(tmp_path / "stores/a/train")).lengths.size == 60


def test_the_command_line_prints_only_the_error_line(inputs, tmp_path):
    """The real CLI, a worker process reading the inputs: the good source's store is written,
    the truncated one fails in one line and leaves no store."""
    config = tmp_path / "sources.py"
    config.write_text(f'''from llama_jax.config import base_config


def get_config():
    c = base_config(vocab_size=512, dim=64, n_layers=2, n_heads=4, ffn_dim=128, max_seq_len=32)
    c.data.sources = [dict(name="notes", files="{inputs / 'frames.jsonl.zst'}", format="jsonl"),
                      dict(name="cut", files="{inputs / 'cut.jsonl.zst'}", format="jsonl")]
    return c
''')
    done = subprocess.run(
        [sys.executable, "-m", "llama_jax.data", "prepare", f"--config={config}",
         f"--tokenizer={inputs / 'tokenizer.model'}", f"--output={tmp_path / 'stores'}",
         "--workers=1"], cwd=ROOT, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [
        f"error: source 'cut': {inputs / 'cut.jsonl.zst'} is truncated or corrupt (the file ends "
        "inside a zstd frame): download or compress it again, or remove it from files="]
    assert json.loads(done.stdout)["documents"] == 60  # both frames of frames.jsonl.zst
    assert store.Store(str(tmp_path / "stores/notes/train")).total_tokens
    assert not (tmp_path / "stores/cut/train/manifest.json").exists()


def truncate(path):
    path.write_bytes(path.read_bytes()[:-6])


def overwrite(path):
    path.write_bytes(b"\x07\x00" + path.read_bytes()[2:])


@pytest.mark.parametrize("damage, file, why", [
    (truncate, "shard_00000.tokens", "has {short} bytes, not the {size} recorded (truncated"),
    (overwrite, "shard_00000.index", "fails its sha256 checksum (corrupt)"),
    (lambda path: path.write_text("{"), "shard_00000.json", "is not JSON"),
])
def test_rerunning_prepare_redoes_a_damaged_shard(damage, file, why, inputs, tmp_path,
                                                  caplog):
    sources = [("notes", "good.jsonl", JSONL)]
    prepare(inputs, sources, tmp_path)
    train = tmp_path / "notes" / "train"
    files = {p.name: p.read_bytes() for p in train.iterdir()}
    size = len(files["shard_00000.tokens"])
    damage(train / file)
    if file != "shard_00000.json":  # the reader refuses the damaged shard, saying what to do
        with pytest.raises(store.StoreError, match="rerun prepare for this store"):
            store.Store(str(train)).shard_tokens(0)
    prepare(inputs, sources, tmp_path)
    why = why.format(short=size - 6, size=size)
    assert f"redoing {train}/shard_00000: {train / file} {why}" in caplog.text
    assert {p.name: p.read_bytes() for p in train.iterdir()} == files  # as before the damage
    assert store.Store(str(train)).shard_tokens(0).nbytes == size
