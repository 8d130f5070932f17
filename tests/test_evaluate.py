"""Evaluation counts every token once and agrees with a direct per-document computation, per
configured data source and over all of them; the entry points run end to end on a converted
Hugging Face model and fail in one line on bad input."""

import dataclasses
import json
import math
import subprocess
import sys

import jax
import numpy as np
import helpers
import pytest

from helpers import ROOT
from llama_jax import checkpoint, evaluate
from llama_jax.config import base_config
from llama_jax.data import corpus, tokenizer as tokenizer_lib
from llama_jax.model import Llama, ModelConfig
from test_generate import params_for

TEXTS = ["def add(a, b):\n    return a + b\n", "x = 1\n", "   \n",
         "class Point:\n    def __init__(self, x, y):\n        self.x, self.y = x, y\n"]
CFG = ModelConfig(vocab_size=400, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                  max_seq_len=128, remat="none", dtype="float32")
# a JSONL source: its training file and its (different) evaluation file
NOTES_TRAIN = ["Training notes only; never evaluated.", "More training text here."]
NOTES_EVAL = ["The café opens at nine.", "Evaluation documents are held out.\nTwo lines.",
              "Short one."]


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    helpers.train_tokenizer(corpus.stdlib_files("train")[:20], 400, path, 3000)
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


def direct_nll(cfg, params, sp, texts):
    """(summed nats, predicted tokens) of each document alone, right-padded to one shape
    (causality hides the padding); every document must fit max_seq_len."""
    forward = jax.jit(lambda x: jax.nn.log_softmax(Llama(cfg).apply({"params": params}, x)))
    nll = tokens = 0.0
    for text in texts:
        if not text.strip():
            continue
        doc = np.array([1] + sp.encode(text) + [2], np.int32)
        logp = np.asarray(forward(np.pad(doc, (0, cfg.max_seq_len - len(doc)))[None]))
        logp = logp[0, :len(doc) - 1]
        nll -= float(np.take_along_axis(logp, doc[1:, None], -1).sum())
        tokens += len(doc) - 1
    return nll, tokens


def test_loss_and_bits_per_byte_match_a_direct_computation(tokenizer_path):
    sp = tokenizer_lib.load_tokenizer(tokenizer_path, 400)
    cfg = CFG
    params = params_for(cfg, seed=2)
    # all documents share one 128-token row (so segment isolation is exercised) and none is
    # cut, so full-context per-document scores are the reference
    result = evaluate.evaluate_texts(cfg, params, sp, TEXTS, seq_len=128, batch_size=2)
    nll, tokens = direct_nll(cfg, params, sp, TEXTS)
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
    # no --config: the default data section's one source, the built-in code corpus
    source, out = map(json.loads, run("evaluate", f"--workdir={wd}", "--seq_len=128",
                                      "--max_batches=2").strip().splitlines())
    assert (source["source"], out["source"]) == ("stdlib_code", "all")
    assert out["tokens"] == source["tokens"] > 0 and math.isfinite(out["loss"])
    # an untrained model is near-uniform over the 400 pieces
    assert abs(out["loss"] - math.log(400)) < 0.5


def two_source_data(tmp_path):
    """The built-in code corpus (a small validation share) + a JSONL file source whose
    validation documents live in their own file."""
    for name, texts in (("train", NOTES_TRAIN), ("eval", NOTES_EVAL)):
        # json.dumps writes é as \\u00e9: the reader must give back the text's own bytes
        (tmp_path / f"notes_{name}.jsonl").write_text(
            "".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts)))
    data = base_config().data
    data.sources = [
        dict(name="code", weight=0.7, builtin="code"),
        dict(name="notes", weight=0.3, files=str(tmp_path / "notes_train.jsonl"),
             eval_files=str(tmp_path / "notes_eval.jsonl"), format="jsonl"),
    ]
    data.validation_fraction = 0.005
    data.seq_len = 128
    return data


def test_each_source_is_scored_on_its_own_documents_and_all_is_their_token_mean(
        tokenizer_path, tmp_path, capsys):
    sp = tokenizer_lib.load_tokenizer(tokenizer_path, 400)
    params = params_for(CFG, seed=2)
    data = two_source_data(tmp_path)
    # a source with no validation split is named and left out, not silently dropped
    data.sources = list(data.sources) + [
        dict(name="train_only", files=str(tmp_path / "notes_train.jsonl"), format="jsonl")]
    code, notes, overall = evaluate.evaluate_sources(
        CFG, params, sp, evaluate.selected_sources(data), data.validation_fraction, seq_len=128,
        batch_size=4)
    assert [r["source"] for r in (code, notes, overall)] == ["code", "notes", "all"]
    assert "source 'train_only' has no validation split" in capsys.readouterr().err
    # code: exactly the built-in corpus's validation files, each token once
    code_texts = [t for t in map(corpus.read_text, corpus.stdlib_files("validation", 0.005))
                  if t.strip()]
    assert code["tokens"] == sum(len(sp.encode(t)) + 1 for t in code_texts)
    assert code["bytes"] == sum(len(t.encode()) for t in code_texts)
    # notes: exactly its evaluation file (not its training file), scored like the model does
    nll, tokens = direct_nll(CFG, params, sp, NOTES_EVAL)
    assert notes["tokens"] == tokens and notes["bytes"] == sum(len(t.encode()) for t in NOTES_EVAL)
    assert math.isclose(notes["loss"], nll / tokens, rel_tol=1e-5)
    assert abs(code["loss"] - notes["loss"]) > 1e-3  # so the mean below is not trivially equal
    # all: every token of both sources once
    assert overall["tokens"] == code["tokens"] + notes["tokens"]
    assert overall["bytes"] == code["bytes"] + notes["bytes"]
    total_nll = code["loss"] * code["tokens"] + notes["loss"] * notes["tokens"]
    assert math.isclose(overall["loss"], total_nll / overall["tokens"], rel_tol=1e-9)
    assert math.isclose(overall["bits_per_byte"],
                        total_nll / math.log(2) / overall["bytes"], rel_tol=1e-9)
    # --sources picks one; the numbers do not depend on what else is evaluated
    only, only_all = evaluate.evaluate_sources(
        CFG, params, sp, evaluate.selected_sources(data, ["notes"]), data.validation_fraction,
        seq_len=128, batch_size=4)
    assert only == notes and only_all["tokens"] == notes["tokens"]


def test_evaluate_command_reports_each_source_and_fails_in_one_line(tokenizer_path, tmp_path):
    checkpoint.save_params(tmp_path / "wd", CFG, params_for(CFG, seed=2), tokenizer_path)
    data = two_source_data(tmp_path)
    (tmp_path / "cfg.py").write_text(
        "from llama_jax.config import base_config\n\n\ndef get_config():\n"
        f"    c = base_config(**{dataclasses.asdict(CFG)!r})\n"
        f"    c.data.sources = {[dict(e) for e in data.sources]!r}\n"
        "    c.data.validation_fraction = 0.005\n    c.data.seq_len = 128\n    return c\n")
    env = {"PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"}

    def run(*args):
        return subprocess.run([sys.executable, "-m", "llama_jax.evaluate", *args], env=env,
                              capture_output=True, text=True, timeout=300)

    done = run(f"--workdir={tmp_path / 'wd'}", f"--config={tmp_path / 'cfg.py'}",
               "--batch_size=4")
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [json.loads(line) for line in done.stdout.strip().splitlines()]
    assert [r["source"] for r in lines] == ["code", "notes", "all"]
    assert lines[2]["tokens"] == lines[0]["tokens"] + lines[1]["tokens"]
    for args, message in [
        ((f"--workdir={tmp_path / 'wd'}", f"--config={tmp_path / 'cfg.py'}", "--sources=prose"),
         "error: --sources names ['prose'], which data.sources does not have (it has "
         "['code', 'notes']): fix the names or the config"),
        ((f"--workdir={tmp_path / 'none'}",),
         f"error: {tmp_path / 'none' / 'model.json'} is missing: point --workdir at a "
         "training or converted workdir, or pass the --config it was trained with"),
    ]:
        done = run(*args)
        assert done.returncode != 0
        assert done.stderr.strip().splitlines()[-1] == message
        assert "Traceback" not in done.stderr
