"""The lm-evaluation-harness adapter's scores against a direct computation with the model."""

import json
import math

import jax
import numpy as np
import pytest

from llama_jax import convert, generate as gen
from llama_jax.data import corpus, tokenizer as tokenizer_lib
from llama_jax.lm_eval_adapter import LlamaJaxLM
from llama_jax.model import Llama, ModelConfig
from test_generate import params_for

CFG = ModelConfig(vocab_size=400, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                  max_seq_len=128, remat="none")
# a small local multiple-choice task, as a harness task YAML would read it from a JSON file
TASK = [
    {"question": "def add(a, b):\n    return", "choices": [" a + b", " a - b", " None"],
     "answer": 0},
    {"question": "import", "choices": [" os", " sys", " re\n"], "answer": 1},
    {"question": "for i in", "choices": [" range(10):", " items:", " x"], "answer": 0},
]


class Request:  # what lm-eval hands a model: an object with .args
    def __init__(self, *args):
        self.args = args


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    tokenizer_lib.train_tokenizer(corpus.stdlib_files("train")[:20], 400, root / "tok.model",
                                  3000)
    convert.save_workdir(CFG, params_for(CFG, seed=4), root / "wd", root / "tok.model")
    return root / "wd"


@jax.jit
def forward(params, ids):
    """One compiled width (128): right padding is invisible to earlier positions."""
    return Llama(CFG).apply({"params": params}, ids)


def logits_of(params, ids):
    padded = np.zeros((1, CFG.max_seq_len), np.int32)
    padded[0, :len(ids)] = ids
    return np.asarray(forward(params, padded))[0, :len(ids)]


def direct_scores(lm, context, continuation):
    """Full forward of [BOS] + the joint encoding; the continuation's tokens scored."""
    ids = [1] + lm.tokenizer.encode(context + continuation)
    n_ctx = 1 + len(lm.tokenizer.encode(context))
    logits = logits_of(lm.params, ids[:-1])
    logp = np.asarray(jax.nn.log_softmax(logits))
    targets = np.array(ids[n_ctx:])
    rows = np.arange(n_ctx - 1, len(ids) - 1)
    return logp[rows, targets].sum(), bool((logits[rows].argmax(-1) == targets).all())


def test_multiple_choice_task_scores_match_a_direct_computation(model_dir, tmp_path):
    (tmp_path / "task.json").write_text(json.dumps(TASK))
    task = json.loads((tmp_path / "task.json").read_text())
    lm = LlamaJaxLM(workdir=str(model_dir), batch_size=4)
    requests = [Request(q["question"], c) for q in task for c in q["choices"]]
    got = lm.loglikelihood(requests)
    want = [direct_scores(lm, *r.args) for r in requests]
    for (g_ll, g_greedy), (w_ll, w_greedy) in zip(got, want):
        assert math.isclose(g_ll, w_ll, rel_tol=1e-5, abs_tol=1e-5) and g_greedy == w_greedy
    assert all(ll < 0 for ll, _ in got)
    chosen = [int(np.argmax([ll for ll, _ in got[3 * i:3 * i + 3]])) for i in range(len(task))]
    direct = [int(np.argmax([ll for ll, _ in want[3 * i:3 * i + 3]])) for i in range(len(task))]
    assert chosen == direct
    accuracy = np.mean([c == q["answer"] for c, q in zip(chosen, task)])
    assert accuracy == np.mean([d == q["answer"] for d, q in zip(direct, task)])


def test_rolling_loglikelihood_covers_the_whole_text(model_dir):
    text = "def f(x):\n    return [i * x for i in range(3)]\n" * 2
    lm = LlamaJaxLM(workdir=str(model_dir))
    whole = lm.loglikelihood_rolling([Request(text)])[0]
    ids = [1] + lm.tokenizer.encode(text)
    assert len(ids) < CFG.max_seq_len  # one window: compare with one full forward
    logp = np.asarray(jax.nn.log_softmax(logits_of(lm.params, ids[:-1])))
    assert math.isclose(whole, logp[np.arange(len(ids) - 1), ids[1:]].sum(), rel_tol=1e-5)
    # short windows lose context but still score every token once: close, not equal
    short = LlamaJaxLM(workdir=str(model_dir), max_length=16).loglikelihood_rolling(
        [Request(text)])[0]
    assert short != whole and abs(short - whole) < 0.2 * abs(whole)


def test_generate_until_is_greedy_generation_cut_at_the_stop(model_dir):
    lm = LlamaJaxLM(workdir=str(model_dir))
    context = "class A:\n    def"
    prompt = [1] + lm.tokenizer.encode(context)
    full = lm.tokenizer.decode(gen.generate(CFG, lm.params, [prompt], 16,
                                            eos_id=lm.tokenizer.eos_id())[0])
    stop = full[len(full) // 2:len(full) // 2 + 1]
    out = lm.generate_until([Request(context, {"until": [stop], "max_gen_toks": 16}),
                             Request(context, {"until": [], "max_gen_toks": 16})])
    assert out == [full.split(stop)[0], full]
