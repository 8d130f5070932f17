"""A Hugging Face tokenizer.json (byte-level BPE, as Llama 3 ships) wherever a SentencePiece
model goes: against the tokenizers library itself, in the data pipeline, in a training run and
in the tools that read its workdir."""

import json

import numpy as np
import pytest
import tensorflow as tf
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from helpers import micro_config
from llama_jax import checkpoint, evaluate, generate as gen
from llama_jax.data import corpus, pipeline, tokenizer as tokenizer_lib
from llama_jax.lm_eval_adapter import LlamaJaxLM
from llama_jax.metrics import read_metrics
from llama_jax.train import train

TEXTS = ["def f(x):\n    return x + 2024\n", "naïve ✓ 𝄞 — «quotes»\n\ttab",
         "  two  spaces ", "x=1;y=2", "🙂" * 3]


@pytest.fixture(scope="module")
def hf_path(tmp_path_factory):
    """A 400-token byte-level BPE trained offline on a few stdlib files, Llama 3's special
    token names at ids 0 and 1 (Llama 3 has them at 128000/128001)."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator((corpus.read_text(f) for f in corpus.stdlib_files("train")[:40]),
                            trainer)
    path = tmp_path_factory.mktemp("hf_tok") / "tokenizer.json"
    bpe.save(str(path))
    return path


def test_encode_decode_and_in_graph_ids_match_the_tokenizers_library(hf_path, tmp_path):
    ours = tokenizer_lib.load_tokenizer(hf_path, 512)
    library = Tokenizer.from_file(str(hf_path))
    assert (ours.vocab_size(), ours.bos_id(), ours.eos_id()) == (400, 0, 1)
    for text in TEXTS:
        ids = library.encode(text, add_special_tokens=False).ids
        assert ours.encode(text) == ids
        assert ours.decode(ids) == library.decode(ids) == text  # byte-level: exact round trip
        assert ours.pieces(text) == library.encode(text, add_special_tokens=False).tokens
    assert len(ours.encode(TEXTS[0])) < 0.7 * len(TEXTS[0])  # merges learnt from the code
    assert ours.decode([0] + ours.encode("x") + [1]) == "x"  # BOS/EOS dropped, as SentencePiece
    graph = [t.numpy().tolist() for t in
             pipeline.tokenize(tf.data.Dataset.from_tensor_slices(TEXTS + ["   "]), ours)]
    assert graph == [[0] + ours.encode(t) + [1] for t in TEXTS]  # the blank one is dropped

    with pytest.raises(ValueError, match="has 400 pieces but model.vocab_size is 300"):
        tokenizer_lib.load_tokenizer(hf_path, 300)
    # BOS/EOS by tokenizer_config.json when one is beside the file, as transformers reads them
    (tmp_path / "tokenizer.json").write_bytes(hf_path.read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|end_of_text|>", "eos_token": {"content": "<|begin_of_text|>"}}))
    swapped = tokenizer_lib.load_tokenizer(tmp_path / "tokenizer.json", 512)
    assert (swapped.bos_id(), swapped.eos_id()) == (1, 0)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>"}))
    with pytest.raises(ValueError, match="no BOS/EOS tokens"):
        tokenizer_lib.load_tokenizer(tmp_path / "tokenizer.json", 512)


def test_a_tiny_run_trains_with_it_and_its_workdir_serves_every_tool(hf_path, tmp_path):
    config = micro_config()  # vocab 512 >= the tokenizer's 400
    config.data.tokenizer_path = str(hf_path)
    config.train.update(steps=30, lr=1e-2, log_every=10, eval_every=30)
    train(config, tmp_path / "run")
    evals = [r["eval_loss"] for r in read_metrics(tmp_path / "run") if "eval_loss" in r]
    assert evals[-1] < evals[0] - 0.4, evals  # it learns from the BPE ids
    assert (tmp_path / "run" / "tokenizer.json").read_bytes() == hf_path.read_bytes()

    # generate, evaluate and lm_eval find the tokenizer.json in the workdir they are given
    cfg, params, tok_path = checkpoint.load_model(tmp_path / "run")
    assert tok_path == tmp_path / "run" / "tokenizer.json"
    tok = tokenizer_lib.load_tokenizer(tok_path, cfg.vocab_size)
    result = evaluate.evaluate_texts(cfg, params, tok, [TEXTS[0] * 4], 32, 2)
    assert result["tokens"] == len(tok.encode(TEXTS[0] * 4)) + 1 and result["loss"] < 6
    out = gen.generate(cfg, params, [[tok.bos_id()] + tok.encode("def f(x):")], 8)[0]
    assert len(out) == 8 and isinstance(tok.decode(out), str)
    lm = LlamaJaxLM(workdir=str(tmp_path / "run"))
    assert lm.tokenizer.path == tok_path and lm._split("a", " b")[0][0] == tok.bos_id()

    # exported to Hugging Face, config.json names this tokenizer's BOS/EOS, not 1 and 2
    from llama_jax import convert
    convert.export_hf(tmp_path / "run", tmp_path / "hf")
    exported = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (exported["bos_token_id"], exported["eos_token_id"]) == (tok.bos_id(), tok.eos_id())
    assert (tok.bos_id(), tok.eos_id()) != (1, 2)
    assert (tmp_path / "hf" / "tokenizer.json").read_bytes() == hf_path.read_bytes()

    # the workdir keeps the tokenizer it started with
    other = tmp_path / "other" / "tokenizer.json"
    other.parent.mkdir()
    other.write_text(hf_path.read_text() + "\n")  # the same JSON, other bytes
    config.data.tokenizer_path = str(other)
    with pytest.raises(ValueError, match="differs from data.tokenizer_path"):
        tokenizer_lib.get_tokenizer(tmp_path / "run", config.data, 512)
    assert np.isfinite(result["bits_per_byte"])
