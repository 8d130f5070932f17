import gzip
import json
import os
import subprocess
import sys

import numpy as np
import helpers
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from helpers import ROOT, load_config, micro_config
from llama_jax.data import corpus, pipeline, sources, stdlib_tfds, tokenizer


def test_corpus_split_is_deterministic_disjoint_and_nonempty():
    train = corpus.stdlib_files("train")
    validation = corpus.stdlib_files("validation")
    assert len(train) > 300 and len(validation) >= 5
    assert not set(train) & set(validation)
    assert corpus.stdlib_files("validation") == validation
    assert not any("site-packages" in p.parts or "test" in p.parts for p in train)
    with pytest.raises(ValueError, match="split='dev' is unknown"):
        corpus.stdlib_files("dev")


@pytest.fixture(scope="module")
def sp(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    helpers.train_tokenizer(corpus.stdlib_files("train")[:40], 400, path, 20_000)
    return tokenizer.load_tokenizer(path, 512)


def test_tokenizer_has_llama_settings(sp):
    assert sp.vocab_size() == 400
    assert (sp.bos_id(), sp.eos_id(), sp.processor.unk_id(), sp.processor.pad_id()) == \
        (1, 2, 0, -1)
    assert [p for p in sp.pieces("x = 2024") if p.strip("▁")][-4:] == \
        ["2", "0", "2", "4"]  # digits split
    text = "naïve ✓ 𝄞\n    indent"
    assert sp.decode(sp.encode(text)) == text  # byte fallback and whitespace round-trip


def test_tokenizer_larger_than_model_vocab_is_refused(sp, tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(sp.path.read_bytes())
    with pytest.raises(ValueError, match="has 400 pieces but model.vocab_size is 256"):
        tokenizer.load_tokenizer(path, 256)
    config = micro_config()
    config.data.tokenizer_vocab_size = 1024
    with pytest.raises(ValueError, match="1024 pieces but model.vocab_size is 512"):
        tokenizer.get_tokenizer(tmp_path / "run", config.data, 512)
    assert not (tmp_path / "run" / "tokenizer.model").exists()


def test_in_graph_tokenization_matches_sentencepiece_with_bos_and_eos(sp):
    texts = ["def f(x):\n    return x + 2024\n", "naïve ✓ 𝄞", "   "]
    docs = tf.data.Dataset.from_tensor_slices(texts)
    ids = [t.numpy().tolist() for t in pipeline.tokenize(docs, sp)]
    assert ids == [[1] + sp.encode(t) + [2] for t in texts[:2]]  # blank documents are dropped


def packed_rows(docs, seq_len):
    ds = tf.data.Dataset.from_generator(lambda: iter(docs), output_signature=tf.TensorSpec(
        [None], tf.int32))  # test input only; the pipeline itself reads graph-only sources
    return [[x.numpy() for x in pipeline.row_features(*row)]
            for row in pipeline.pack(ds, seq_len)]


def test_packing_keeps_every_token_in_order_with_segments_and_positions():
    docs = [[1, 5, 6, 2], [1, 7, 2], [1, 8, 9, 10, 11, 12, 13, 2]]
    rows = packed_rows(docs, seq_len=5)
    assert len(rows) == 2 and all(len(r[0]) == 6 for r in rows)
    flat = np.concatenate([r[0] for r in rows])
    assert flat.tolist() == sum(docs, [])[:len(flat)]
    tokens, segments, positions = rows[0]
    assert segments.tolist() == [1, 1, 1, 1, 2, 2]
    assert positions.tolist() == [0, 1, 2, 3, 0, 1]
    tokens, segments, positions = rows[1]  # the second doc's tail, then the third doc
    assert segments.tolist() == [1, 2, 2, 2, 2, 2]
    assert positions.tolist() == [0, 0, 1, 2, 3, 4]
    # a document longer than two rows spans them, positions restarting in each row
    rows = packed_rows([[1] + list(range(3, 15)) + [2]], seq_len=4)
    assert [r[1].tolist() for r in rows] == [[1] * 5] * 2
    assert [r[2].tolist() for r in rows] == [[0, 1, 2, 3, 4]] * 2


def test_loss_mask_drops_targets_from_the_next_document_and_padding():
    row = [tf.constant(x, tf.int32) for x in
           ([1, 5, 2, 1, 7, 0], [1, 1, 1, 2, 2, 0], [0, 1, 2, 0, 1, 0])]
    example = {k: v.numpy().tolist() for k, v in pipeline.to_example(*row).items()}
    assert example["inputs"] == [1, 5, 2, 1, 7] and example["targets"] == [5, 2, 1, 7, 0]
    assert example["loss_mask"] == [1, 1, 0, 1, 0]


def test_dataset_batches_and_process_shards(sp):
    config = micro_config()
    ds = pipeline.make_dataset("validation", config.data, sp, 4)
    batch = next(ds.as_numpy_iterator())
    assert {k: v.shape for k, v in batch.items()} == {k: (4, 32) for k in (
        "inputs", "targets", "positions", "segment_ids", "loss_mask")}
    assert batch["inputs"].dtype == np.int32 and batch["loss_mask"].dtype == np.float32
    np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
    assert batch["inputs"][0, 0] == 1  # validation is not shuffled: a document starts it
    again = next(pipeline.make_dataset("validation", config.data, sp, 4).as_numpy_iterator())
    np.testing.assert_array_equal(batch["inputs"], again["inputs"])  # eval is deterministic
    one = next(pipeline.make_dataset("train", config.data, sp, 4, process_index=0,
                                     process_count=2).as_numpy_iterator())
    two = next(pipeline.make_dataset("train", config.data, sp, 4, process_index=1,
                                     process_count=2).as_numpy_iterator())
    assert not np.array_equal(one["inputs"], two["inputs"])


def mixture_config(**sources_by_name):
    config = micro_config()
    config.data.sources = [dict(name=n, **kw) for n, kw in sources_by_name.items()]
    return config


@pytest.fixture(scope="module")
def stdlib_tfds_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    stdlib_tfds.prepare(data_dir, ("code",))  # about a second, offline
    return str(data_dir)


def test_stdlib_tfds_builder_reads_per_process_disjoint_parts(stdlib_tfds_dir):
    entry = dict(name="code", tfds="llama_jax_stdlib/code", data_dir=stdlib_tfds_dir,
                 field="key")

    def keys(split, process_index):
        entry_split = dict(entry, eval_split=split)
        ds = sources.documents(entry_split, "validation" if split == "validation" else "train",
                               train=False, seed=0, validation_fraction=0.02,
                               process_index=process_index, process_count=2)
        return {k.decode() for k in ds.as_numpy_iterator()}

    one, two = keys("train", 0), keys("train", 1)
    assert one and two and not one & two
    root = corpus.stdlib_root()
    assert one | two == {p.relative_to(root).as_posix() for p in corpus.stdlib_files("train")}
    assert len(keys("validation", 0) | keys("validation", 1)) == len(
        corpus.stdlib_files("validation"))


def test_resume_gives_the_batches_of_an_uninterrupted_run(sp, tmp_path, stdlib_tfds_dir):
    # a TFDS source, an in-memory source and local files: each reader's state must resume
    (tmp_path / "notes.txt").write_text("\n".join(f"note {i} " + "xy" * i for i in range(40)))
    config = mixture_config(code=dict(weight=0.5, tfds="llama_jax_stdlib/code",
                                      data_dir=stdlib_tfds_dir),
                            prose=dict(weight=0.3, builtin="prose"),
                            notes=dict(weight=0.2, files=str(tmp_path / "*.txt"),
                                       format="lines"))
    straight = pipeline.DataIterator(pipeline.make_dataset("train", config.data, sp, 4), 0)
    expected = [next(straight) for _ in range(11)][5:]
    first = pipeline.DataIterator(pipeline.make_dataset("train", config.data, sp, 4), 0)
    for _ in range(5):
        next(first)
    first.save(tmp_path)
    del first
    resumed = pipeline.DataIterator(pipeline.make_dataset("train", config.data, sp, 4), 0)
    next(resumed)  # a fresh iterator that has moved on must be put back by restore
    resumed.restore(tmp_path)
    for want in expected:
        got = next(resumed)
        assert all(np.array_equal(got[k], want[k]) for k in want)
    other = pipeline.DataIterator(pipeline.make_dataset("train", config.data, sp, 4), 1)
    with pytest.raises(FileNotFoundError, match="no data iterator state at .*shard_1"):
        other.restore(tmp_path)


def test_mixture_token_shares_match_weights_over_2000_sequences(sp, tmp_path):
    lines = [json.dumps({"id": i, "text": f"record {i}: " + "ab" * (i % 50)}) for i in range(300)]
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    weights = {"code": 0.5, "prose": 0.3, "records": 0.2}
    config = mixture_config(code=dict(weight=5, builtin="code"),
                            prose=dict(weight=3, builtin="prose"),
                            records=dict(weight=2, files=str(tmp_path / "*.jsonl"),
                                         format="jsonl"))
    ds = pipeline.make_dataset("train", config.data, sp, 8, with_source=True).take(250)
    tokens = np.zeros(3)
    for batch in ds.as_numpy_iterator():
        real = (batch["segment_ids"] > 0).sum(axis=1)  # padding is not a token of any source
        np.add.at(tokens, batch["source"], real)
    shares = tokens / tokens.sum()
    assert np.abs(shares - np.array(list(weights.values()))).max() < 0.01, shares


def test_local_files_text_lines_and_jsonl_with_escapes(tmp_path):
    (tmp_path / "a.txt").write_text("first file\nsecond line")
    (tmp_path / "b.txt").write_text("b file")
    records = ["naïve ✓ 𝄞 \"quoted\" back\\slash\nnew\tline \\n literal", "plain"]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"meta": {"text": "no"}, "body": r})
                                              + "\n" for r in records) + "\n")

    def read(**entry):
        ds = sources.documents(dict(name="mine", **entry), "train", train=False, seed=0,
                               validation_fraction=0.02, process_index=0, process_count=1)
        return [x.decode() for x in ds.as_numpy_iterator()]

    assert read(files=str(tmp_path / "*.txt")) == ["first file\nsecond line", "b file"]
    assert read(files=str(tmp_path / "*.txt"), format="lines") == [
        "first file", "second line", "b file"]
    assert read(files=str(tmp_path / "c.jsonl"), format="jsonl", field="body") == records
    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "zipped ✓"}) + "\n")
    assert read(files=str(tmp_path / "*.jsonl.gz"), format="jsonl") == ["zipped ✓"]
    with pytest.raises(ValueError, match="mixes .gz and plain files"):
        read(files=str(tmp_path / "*.jsonl*"), format="jsonl")
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match="source mine: a JSON line has no string field title"):
        read(files=str(tmp_path / "c.jsonl"), format="jsonl", field="title")
    with pytest.raises(FileNotFoundError, match=r"pattern \['.*\*.parquet'\] matches no file"):
        read(files=str(tmp_path / "*.parquet"))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="'mine' has zero documents"):
        read(files=str(tmp_path / "empty.txt"))


def test_each_process_reads_a_disjoint_part_of_every_source(tmp_path):
    for i in range(4):
        (tmp_path / f"f{i}.txt").write_text("\n".join(f"file {i} line {j}" for j in range(3)))

    def read(pattern, process_index):
        ds = sources.documents(dict(name="mine", files=str(tmp_path / pattern), format="lines"),
                               "train", train=False, seed=0, validation_fraction=0.02,
                               process_index=process_index, process_count=2)
        return set(ds.as_numpy_iterator())

    for pattern in ("f*.txt", "f0.txt"):  # file-level, then example-level within one file
        one, two = read(pattern, 0), read(pattern, 1)
        assert one and two and not one & two
        assert len(one | two) == 3 * len(list(tmp_path.glob(pattern)))


def test_tfds_source_reads_the_text_field(sp):
    with tfds.testing.mock_data(num_examples=12):
        entry = dict(name="lm1b", tfds="lm1b:1.1.0", field="text")
        docs = sources.documents(entry, "train", train=True, seed=0, validation_fraction=0.02,
                                 process_index=0, process_count=1)
        texts = list(docs.as_numpy_iterator())
        assert len(texts) == 12 and all(isinstance(t, bytes) and t for t in texts)
        config = mixture_config(lm1b=dict(weight=1, **{k: v for k, v in entry.items()
                                                       if k != "name"}))
        batch = next(pipeline.make_dataset("train", config.data, sp, 2).as_numpy_iterator())
        assert batch["inputs"].shape == (2, 32) and (batch["inputs"] == 1).any()
        with pytest.raises(ValueError, match="'lm1b': TFDS 'lm1b:1.1.0' has no feature 'body'"):
            sources.documents(dict(entry, field="body"), "train", train=True, seed=0,
                              validation_fraction=0.02, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="'c4': TFDS cannot load 'no_such_dataset'"):
        sources.documents(dict(name="c4", tfds="no_such_dataset"), "train", train=True, seed=0,
                          validation_fraction=0.02, process_index=0, process_count=1)


@pytest.mark.parametrize("entries, message", [
    ([dict(name="a", weight=-1, builtin="code")], "source 'a' has weight -1.0 < 0"),
    ([dict(name="a", weight=0, builtin="code")], "weights are all zero"),
    ([dict(name="a", builtin="code", files="x")], "exactly one of builtin=, files=, tfds= or store="),
    ([dict(name="a", builtin="code", feild="x")], r"unknown keys \['feild'\]"),
    ([dict(name="a", builtin="poems")], "builtin='poems' is unknown"),
    ([dict(name="a", files="x", format="csv")], "format='csv' is unknown"),
    ([], "data.sources is empty"),
])
def test_bad_sources_give_one_line_errors(sp, entries, message):
    config = micro_config()
    config.data.sources = entries
    with pytest.raises(ValueError, match=message) as error:
        pipeline.make_dataset("train", config.data, sp, 4)
    assert "\n" not in str(error.value)


def test_tokenizer_command_trains_on_the_configured_mixture(tmp_path):
    config = tmp_path / "config.py"
    config.write_text(
        "from llama_jax.config import base_config\n\n\ndef get_config():\n"
        "    c = base_config()\n"
        "    c.data.sources = [dict(name='prose', weight=1.0, builtin='prose')]\n"
        "    c.data.tokenizer_vocab_size = 600\n"
        "    c.data.tokenizer_sample_lines = 3000\n"
        "    return c\n")
    output = tmp_path / "tok" / "tokenizer.model"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, "-m", "llama_jax.data.tokenizer", "train", f"--config={config}",
         f"--output={output}"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1])["vocab_size"] == 600
    sp = tokenizer.load_tokenizer(output, 1024)
    assert sp.vocab_size() == 600
    text = "The assert statement: assert x == 42"
    assert sp.decode(sp.encode(text)) == text
    bad = subprocess.run([sys.executable, "-m", "llama_jax.data.tokenizer", "decode",
                          f"--model={output}", "one"], capture_output=True, text=True, env=env)
    assert bad.returncode != 0 and "decode takes integer ids" in bad.stderr


def test_llama_mixture_config_has_the_papers_seven_sources():
    config = load_config("configs/data_llama_mixture.py")
    shares = {e["name"]: e["weight"] for e in config.data.sources}
    assert shares == {"commoncrawl": 0.67, "c4": 0.15, "github": 0.045, "wikipedia": 0.045,
                      "books": 0.045, "arxiv": 0.025, "stackexchange": 0.02}
    assert abs(sum(shares.values()) - 1) < 1e-9
    kinds = [sources.check_entry(dict(e)) for e in config.data.sources]  # no unknown keys
    assert kinds.count("tfds") == 3 and kinds.count("files") == 4


def test_pipeline_stats_report_shares_padding_and_document_length(sp):
    from llama_jax.data.__main__ import measure
    config = mixture_config(code=dict(weight=0.75, builtin="code"),
                            prose=dict(weight=0.25, builtin="prose"))
    dataset = pipeline.make_dataset("train", config.data, sp, 8, with_source=True)
    stats = measure(dataset.as_numpy_iterator(), ["code", "prose"], batches=50,
                    bos_id=sp.bos_id(), warmup=1)
    # 400 rows are part of one 1,000-row block, so the share is near, not exactly, the weight
    assert abs(stats["token_share"]["code"] - 0.75) < 0.03
    assert abs(sum(stats["token_share"].values()) - 1) < 1e-3
    assert stats["padding_fraction"] == 0.0 and stats["tokens_per_sec"] > 0
    assert 5 < stats["mean_document_tokens"] < 100_000
