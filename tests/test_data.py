import numpy as np
import pytest
import tensorflow as tf

from helpers import micro_config
from llama_jax.data import corpus, pipeline, tokenizer


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
    tokenizer.train_tokenizer(corpus.stdlib_files("train")[:40], 400, path, 20_000)
    return tokenizer.load_tokenizer(path, 512)


def test_tokenizer_has_llama_settings(sp):
    assert sp.vocab_size() == 400
    assert (sp.bos_id(), sp.eos_id(), sp.unk_id(), sp.pad_id()) == (1, 2, 0, -1)
    assert [p for p in sp.encode("x = 2024", out_type=str) if p.strip("▁")][-4:] == \
        ["2", "0", "2", "4"]  # digits split
    text = "naïve ✓ 𝄞\n    indent"
    assert sp.decode(sp.encode(text)) == text  # byte fallback and whitespace round-trip


def test_tokenizer_larger_than_model_vocab_is_refused(sp, tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(sp.serialized_model_proto())
    with pytest.raises(ValueError, match="has 400 pieces but model.vocab_size is 256"):
        tokenizer.load_tokenizer(path, 256)
    config = micro_config()
    config.data.tokenizer_vocab_size = 1024
    with pytest.raises(ValueError, match="exceeds model.vocab_size=512"):
        tokenizer.get_tokenizer(tmp_path / "run", config.data, 512)
    assert not (tmp_path / "run" / "tokenizer.model").exists()


def test_packing_keeps_every_token_in_order_with_segments_and_positions():
    docs = [[1, 5, 6, 2], [1, 7, 2], [1, 8, 9, 10, 11, 12, 13, 2]]
    rows = list(pipeline.pack_documents(iter(docs), seq_len=5))
    assert all(len(r[0]) == 6 for r in rows)
    flat = np.concatenate([r[0] for r in rows])
    assert flat.tolist() == sum(docs, [])[:len(flat)]
    tokens, segments, positions = rows[0]
    assert segments.tolist() == [1, 1, 1, 1, 2, 2]
    assert positions.tolist() == [0, 1, 2, 3, 0, 1]
    tokens, segments, positions = rows[1]  # the second doc's tail, then the third doc
    assert segments.tolist() == [1, 2, 2, 2, 2, 2]
    assert positions.tolist() == [0, 0, 1, 2, 3, 4]


def test_loss_mask_drops_targets_from_the_next_document():
    row = [tf.constant(x, tf.int32) for x in
           ([1, 5, 2, 1, 7, 2], [1, 1, 1, 2, 2, 2], [0, 1, 2, 0, 1, 2])]
    example = {k: v.numpy().tolist() for k, v in pipeline.to_example(*row).items()}
    assert example["inputs"] == [1, 5, 2, 1, 7] and example["targets"] == [5, 2, 1, 7, 2]
    assert example["loss_mask"] == [1, 1, 0, 1, 1]


def test_dataset_batches_and_process_shards(sp):
    config = micro_config()
    ds = pipeline.make_dataset("validation", config.data, sp, 4)
    batch = next(ds.as_numpy_iterator())
    assert {k: v.shape for k, v in batch.items()} == {k: (4, 32) for k in (
        "inputs", "targets", "positions", "segment_ids", "loss_mask")}
    assert batch["inputs"].dtype == np.int32 and batch["loss_mask"].dtype == np.float32
    np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
    again = next(pipeline.make_dataset("validation", config.data, sp, 4).as_numpy_iterator())
    np.testing.assert_array_equal(batch["inputs"], again["inputs"])  # eval is deterministic
    one = next(pipeline.make_dataset("train", config.data, sp, 4, process_index=0,
                                     process_count=2).as_numpy_iterator())
    two = next(pipeline.make_dataset("train", config.data, sp, 4, process_index=1,
                                     process_count=2).as_numpy_iterator())
    assert not np.array_equal(one["inputs"], two["inputs"])
