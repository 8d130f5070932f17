"""Evaluation counts every token once and agrees with a direct per-document computation; the
entry points run end to end on a converted Hugging Face model."""

import json
import math
import subprocess
import sys

import jax
import numpy as np
import pytest

from helpers import ROOT
from llama_jax import evaluate
from llama_jax.data import corpus, tokenizer as tokenizer_lib
from llama_jax.model import Llama, ModelConfig
from test_generate import params_for

TEXTS = ["def add(a, b):\n    return a + b\n", "x = 1\n", "   \n",
         "class Point:\n    def __init__(self, x, y):\n        self.x, self.y = x, y\n"]


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    tokenizer_lib.train_tokenizer(corpus.stdlib_files("train")[:20], 400, path, 3000)
    return path


def test_rows_score_every_target_once_within_its_document():
    docs = [list(range(100, 105)), list(range(200, 230)), [300, 301, 302]]
    pairs = set()
    total = 0
    for inputs, targets, positions, segments, mask in evaluate.rows(docs, 8):
        for i in np.flatnonzero(mask):
            pairs.add((int(inputs[i]), int(targets[i])))
            total += 1
            assert targets[i] == inputs[i] + 1  # consecutive tokens of one document
        assert positions[0] == 0 and np.all(positions[segments == 0] == 0)
    assert total == len(pairs) == sum(len(d) - 1 for d in docs)


def test_loss_and_bits_per_byte_match_a_direct_computation(tokenizer_path):
    sp = tokenizer_lib.load_tokenizer(tokenizer_path, 400)
    cfg = ModelConfig(vocab_size=400, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                      max_seq_len=128, remat="none")
    params = params_for(cfg, seed=2)
    # all documents share one 128-token row (so segment isolation is exercised) and none is
    # cut, so full-context per-document scores are the reference
    result = evaluate.evaluate_texts(cfg, params, sp, TEXTS, seq_len=128, batch_size=2)
    # each document alone, right-padded to one shape (causality hides the padding)
    forward = jax.jit(lambda x: jax.nn.log_softmax(Llama(cfg).apply({"params": params}, x)))
    nll = tokens = 0.0
    for text in TEXTS:
        if not text.strip():
            continue
        doc = np.array([1] + sp.encode(text) + [2], np.int32)
        logp = np.asarray(forward(np.pad(doc, (0, 128 - len(doc)))[None]))[0, :len(doc) - 1]
        nll -= float(np.take_along_axis(logp, doc[1:, None], -1).sum())
        tokens += len(doc) - 1
    n_bytes = sum(len(t.encode()) for t in TEXTS if t.strip())
    assert result["tokens"] == tokens and result["bytes"] == n_bytes
    assert math.isclose(result["loss"], nll / tokens, rel_tol=1e-5)
    assert math.isclose(result["bits_per_byte"], nll / math.log(2) / n_bytes, rel_tol=1e-5)
    assert math.isclose(result["perplexity"], math.exp(nll / tokens), rel_tol=1e-5)


def test_convert_generate_evaluate_from_the_command_line(tokenizer_path, tmp_path):
    import shutil
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=False)).save_pretrained(tmp_path / "hf")
    shutil.copyfile(tokenizer_path, tmp_path / "hf" / "tokenizer.model")
    env = {"PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"}

    def run(module, *args):
        done = subprocess.run([sys.executable, "-m", f"llama_jax.{module}", *args], env=env,
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    wd = tmp_path / "wd"
    run("convert", "--from=hf", f"--src={tmp_path / 'hf'}", f"--dst={wd}")
    assert (wd / "tokenizer.model").exists() and (wd / "model.json").exists()
    text = run("generate", f"--workdir={wd}", "--prompt=def ", "--max_new_tokens=8")
    assert text.startswith("def ") and len(text) > len("def \n")
    out = json.loads(run("evaluate", f"--workdir={wd}", "--seq_len=128", "--max_batches=2")
                     .strip().splitlines()[-1])
    assert out["tokens"] > 0 and math.isfinite(out["loss"])
    # an untrained model is near-uniform over the 400 pieces
    assert abs(out["loss"] - math.log(400)) < 0.5
