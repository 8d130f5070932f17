"""The command line before any work: every entry point answers --help (exit 0) and a bad flag
(one `error:` line) without importing JAX, TensorFlow, Flax, Orbax or optax, and a Ctrl-C
while those load is one line and exit 130. Subprocesses, each well under a second."""

import re
import subprocess
import sys

import pytest

from helpers import ROOT

HEAVY = ("jax", "jaxlib", "flax", "tensorflow", "orbax", "optax", "torch")
ENTRY_POINTS = ["llama_jax.train", "llama_jax.data", "llama_jax.data.tokenizer",
                "llama_jax.generate", "llama_jax.evaluate", "llama_jax.convert", "llama_jax.bench",
                "llama_jax.compile", "llama_jax.plot", "llama_jax.scaling"]
# `llama_jax lm_eval` is lm-eval's own command line, reached through the console script
LM_EVAL = ["-c", "import sys; from llama_jax import cli; sys.argv[1:1] = ['lm_eval']; cli.main()"]


def imported(args):
    """(the finished process, the top-level packages it imported), from -X importtime."""
    done = subprocess.run([sys.executable, "-X", "importtime", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    modules = {line.rsplit("|", 1)[-1].strip().split(".")[0]
               for line in done.stderr.splitlines() if line.startswith("import time:")}
    return done, modules


@pytest.mark.parametrize("args", [["-m", m] for m in ENTRY_POINTS] + [LM_EVAL],
                         ids=ENTRY_POINTS + ["lm_eval"])
def test_help_exits_0_before_any_heavy_import(args):
    done, modules = imported([*args, "--help"])
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--" in done.stdout  # the flags are listed
    assert not modules & set(HEAVY), sorted(modules & set(HEAVY))


def test_a_mistyped_flag_is_one_line_before_any_heavy_import():
    done, modules = imported(["-m", "llama_jax.generate", "--workdir=runs/x", "--tempreature=1"])
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if not line.startswith("import time:")]
    assert errors == ["error: Unknown command line flag 'tempreature'. Did you mean: "
                      "temperature ?; see --help"], errors
    assert not modules & set(HEAVY), sorted(modules & set(HEAVY))


def test_ctrl_c_while_the_libraries_load_is_one_line_and_exit_130():
    # the signal arrives after the flags are parsed, during `import jax` (deterministically:
    # the process sends it to itself)
    code = ("import os, signal, sys; from llama_jax import cli; "
            "sys.argv = ['prog']; cli.parse_flags(); "
            "os.kill(os.getpid(), signal.SIGINT); import jax; print('not interrupted')")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 130, done.stderr[-2000:]
    assert done.stderr.strip().splitlines() == ["interrupted: exiting"], done.stderr
    assert "not interrupted" not in done.stdout


# (the command, the one error line) for the other tools' expected failures; all but the
# generate row fail before JAX or TensorFlow is imported, or soon after
ERROR_ROWS = [
    (["llama_jax.data.tokenizer", "encode", "--model=README.md", "x"],
     r"^error: --model=README\.md: tokenizer README\.md cannot be read \(.*\): give a "
     r"SentencePiece \.model or a Hugging Face tokenizer\.json"),
    (["llama_jax.plot", "--workdir=runs/no_such_run"],
     r"^error: --workdir='runs/no_such_run' is outside its range a directory holding "
     r"metrics\.jsonl: pass the workdir of a llama_jax\.train run"),
    (["llama_jax.bench", "--config=configs/tiny.py", "--steps=-1"],
     r"^error: --steps=-1 is outside its range integer >= 0"),
    (["llama_jax.compile", "--config=configs/tiny.py", "--topology=v9:2x2"],
     r"^error: --topology='v9:2x2' is not GENERATION:CHIPS with GENERATION one of "),
    (["llama_jax.data", "prepare", "--workers=two"],
     r"^error: flag --workers=two: invalid literal for int\(\) .*; see --help$"),
    (["llama_jax.generate", "--workdir=runs/no_such_run", "--prompt=def"],
     r"^error: runs/no_such_run/model\.json is missing: point --workdir at a training or "
     r"converted workdir"),
]


@pytest.mark.parametrize("args, pattern", ERROR_ROWS, ids=[r[0][0] for r in ERROR_ROWS])
def test_expected_failures_of_the_tools_are_one_error_line(args, pattern):
    done = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=180)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert [line for line in lines if line.startswith("error:")] == lines[-1:], done.stderr
    assert re.search(pattern, lines[-1]), lines[-1]
