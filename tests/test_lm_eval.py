"""The lm-evaluation-harness adapter's scores against a direct computation with the model, both
method by method and through lm-eval's own command line (`llama_jax lm_eval`)."""

import json
import math
import subprocess
import sys
import textwrap

import jax
import numpy as np
import helpers
import pytest

from helpers import ROOT
from llama_jax import checkpoint, cli, generate as gen
from llama_jax.data import corpus
from llama_jax.lm_eval_adapter import LlamaJaxLM
from llama_jax.model import Llama, ModelConfig
from test_generate import params_for

CFG = ModelConfig(vocab_size=400, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                  max_seq_len=128, remat="none", dtype="float32")
# a small local multiple-choice task, as a harness task YAML would read it from a JSON file
TASK = [
    {"question": "def add(a, b):\n    return", "choices": [" a + b", " a - b", " None"],
     "answer": 0},
    {"question": "import", "choices": [" os", " sys", " re\n"], "answer": 1},
    {"question": "for i in", "choices": [" range(10):", " items:", " x"], "answer": 0},
    {"question": "while", "choices": [" True:", " not done:", " 1:"], "answer": 0},
    {"question": "return", "choices": [" None", " self", " 0"], "answer": 2},
    {"question": "with open(path) as", "choices": [" f:", " fh:", " stream:"], "answer": 0},
    {"question": "class Point:\n    def", "choices": [" __init__", " __repr__", " x"],
     "answer": 1},
    {"question": "if x is", "choices": [" None:", " not None:", " True:"], "answer": 1},
]
# the same task for lm-eval: context "question", continuation the choice as written
TASK_YAML = """\
task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
  - metric: acc_norm
"""


class Request:  # what lm-eval hands a model: an object with .args
    def __init__(self, *args):
        self.args = args


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    helpers.train_tokenizer(corpus.stdlib_files("train")[:20], 400, root / "tok.model",
                                  3000)
    checkpoint.save_params(root / "wd", CFG, params_for(CFG, seed=4), root / "tok.model")
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


def run_lm_eval_command(tmp_path, monkeypatch, *args):
    """`llama_jax lm_eval ...` in this process (the console script calls cli.main), on a task
    folder holding tiny_mc over a local JSON file; offline, with its own datasets cache."""
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tmp_path / "task.json").write_text(json.dumps(TASK))
    (tasks / "tiny_mc.yaml").write_text(TASK_YAML.format(data=tmp_path / "task.json",
                                                         cache=tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(sys, "argv", ["llama_jax", "lm_eval", "--model", "llama_jax",
                                      "--include_path", str(tasks), "--tasks", "tiny_mc", *args])
    cli.main()


def test_lm_eval_command_scores_a_local_task_like_a_direct_computation(model_dir, tmp_path,
                                                                      monkeypatch):
    """The harness itself (task YAML over a local JSON file) through the same command users
    run; its per-choice log-likelihoods, acc and acc_norm against Llama.apply directly."""
    run_lm_eval_command(tmp_path, monkeypatch, "--model_args", f"workdir={model_dir}",
                        "--batch_size", "4", "--output_path", str(tmp_path / "out"),
                        "--log_samples")
    [results] = (tmp_path / "out").rglob("results_*.json")
    scores = json.loads(results.read_text())["results"]["tiny_mc"]
    [samples] = (tmp_path / "out").rglob("samples_tiny_mc_*.jsonl")
    harness_ll = {s["doc_id"]: [float(r[0][0]) for r in s["resps"]]
                  for s in map(json.loads, samples.read_text().splitlines())}

    lm = LlamaJaxLM(workdir=str(model_dir))
    acc, acc_norm = [], []
    for doc_id, q in enumerate(TASK):
        ll = np.array([direct_scores(lm, q["question"], c)[0] for c in q["choices"]])
        np.testing.assert_allclose(harness_ll[doc_id], ll, rtol=1e-5, atol=1e-5)
        acc.append(np.argmax(ll) == q["answer"])
        # lm-eval's acc_norm divides by the choice's length in characters
        acc_norm.append(np.argmax(ll / [len(c) for c in q["choices"]]) == q["answer"])
    assert len(harness_ll) == len(TASK)
    assert math.isclose(scores["acc,none"], np.mean(acc))
    assert math.isclose(scores["acc_norm,none"], np.mean(acc_norm))


def test_lm_eval_command_keeps_the_builtin_models_and_errs_in_one_line(tmp_path, monkeypatch):
    """Registering "llama_jax" must not hide lm-eval's own models (its registry lazy-imports
    them only while empty: checked in a fresh process, where nothing else imported them); a bad
    --model_args is one line."""
    env = {"PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin",
           "HF_HUB_OFFLINE": "1"}
    check = textwrap.dedent("""
        import llama_jax.lm_eval_adapter
        from lm_eval.api.registry import get_model, model_registry
        # "hf" is listed, not loaded: HFLM needs accelerate, which is not in the test pins
        print(get_model("llama_jax").__name__, get_model("dummy").__name__,
              "hf" in model_registry)
    """)
    done = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.stdout.split() == ["LlamaJaxLM", "DummyLM", "True"], done.stderr[-2000:]
    with pytest.raises(SystemExit) as exited:
        run_lm_eval_command(tmp_path, monkeypatch, "--model_args", f"workdir={tmp_path / 'none'}")
    assert str(exited.value.code) == (
        f"error: {tmp_path / 'none' / 'model.json'} is missing: point --workdir at a training or "
        "converted workdir, or pass the --config it was trained with")
    with pytest.raises(ValueError, match=r"^--model_args \['workdri'\] unknown: llama_jax takes"):
        LlamaJaxLM(workdri=str(tmp_path))
    with pytest.raises(ValueError, match="exactly one of workdir=DIR or hf=HF_DIR"):
        LlamaJaxLM(config="configs/tiny.py")
