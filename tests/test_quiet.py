"""The quiet start-up (llama_jax/quiet.py): a train run prints our lines only, LLAMA_JAX_VERBOSE=1
brings the libraries' notices back, and nothing but the known notices is ever held back."""

import json
import logging
import os
import re
import subprocess
import sys

from helpers import ROOT
from llama_jax import quiet

# what the first screen of `make train` showed before: TensorFlow's native notices, its CUDA
# probe, libtpu probing a host without a TPU, and Orbax's bookkeeping
HIDDEN = ("oneDNN", "cudart_stub", "absl::InitializeLog", "cuInit", "TPU accelerator",
          "precompiled_charsmap", "orbax")
ABSL_INFO = re.compile(r"^I\d{4} [\d:.]+ +\d+ (\S+\.py):\d+\] ", re.M)


def clean_env(**env):
    """The environment without the test session's settings (a user's shell has none of them)."""
    clean = {k: v for k, v in os.environ.items()
             if k not in ("TF_CPP_MIN_LOG_LEVEL", "JAX_PLATFORMS", "XLA_FLAGS",
                          "LLAMA_JAX_VERBOSE")}
    return {**clean, **env}


def train_output(workdir, **env):
    """stdout + stderr of a few-second train run, with no test-session settings inherited."""
    small = ["--config.model.dim=32", "--config.model.n_heads=2", "--config.model.ffn_dim=64",
             "--config.model.n_layers=1", "--config.data.seq_len=32",
             "--config.model.vocab_size=512", "--config.data.tokenizer_vocab_size=512",
             "--config.data.tokenizer_sample_lines=20000", "--config.train.warmup_steps=1",
             "--config.train.steps=2", "--config.train.log_every=1",
             "--config.train.eval_every=2", "--config.train.eval_batches=1"]
    done = subprocess.run(
        [sys.executable, "-m", "llama_jax.train", "--config=configs/tiny.py",
         f"--workdir={workdir}", *small],
        cwd=ROOT, env=clean_env(**env), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


def test_train_prints_short_plain_lines_only_unless_verbose(tmp_path):
    out = train_output(tmp_path / "quiet")
    assert [marker for marker in HIDDEN if marker in out] == [], out[-3000:]
    lines = out.splitlines()
    # no absl prefix (date, thread, file:line), every line short, one line per log step
    assert not ABSL_INFO.search(out), out[-3000:]
    assert max(len(line) for line in lines) < 120, max(lines, key=len)
    assert [line.split(" | ")[0] for line in lines if re.match(r"step \d+/2 \| loss ", line)] == [
        "step 1/2", "step 2/2"], out
    # on CPU no MFU (a matmul measured once on a shared host is no peak); the ETA is there
    assert all("MFU" not in line and " | ETA " in line for line in lines if "| loss " in line)
    assert re.search(r"^step 2/2 \| eval loss \d+\.\d{4} on the first 1 validation batches "
                     r"\(256 tokens\)$", out, re.M), out
    # the config once, short, with all of it in the workdir
    assert sum(line.startswith("model ") for line in lines) == 1
    assert "(all settings: config.json in the workdir)" in out
    assert json.loads((tmp_path / "quiet" / "config.json").read_text())["train"]["steps"] == 2
    assert "Run summary: 2 steps" in out

    # the same command again, verbose: the finished run starts up (every library loaded, the
    # checkpoint read) and stops there, with the notices shown
    loud = train_output(tmp_path / "quiet", LLAMA_JAX_VERBOSE="1")
    assert "run already finished at step 2" in loud, loud[-3000:]
    assert [marker for marker in HIDDEN if marker in loud], loud[-3000:]

    # the other tools start as quietly on the run's workdir: no CUDA probe, no Orbax warning
    # about its healthy checkpoint
    for args in (["llama_jax.generate", "--prompt=def", "--max_new_tokens=2"],
                 ["llama_jax.evaluate", "--max_batches=1"]):
        done = subprocess.run([sys.executable, "-m", *args, f"--workdir={tmp_path / 'quiet'}"],
                              cwd=ROOT, env=clean_env(), capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stderr == "" or [m for m in HIDDEN + ("Metadata file", "read only",
                                                          "WARNING") if m in done.stderr] == [], \
            done.stderr[-3000:]


def test_native_filter_holds_back_known_notices_only(capfd):
    with quiet.native_notices_filtered():
        os.write(2, b"I0000 port.cc:153] oneDNN custom operations are on. You may see ...\n")
        os.write(2, b"E0000 something.cc:1] a real failure\n")
        os.write(2, b"I0000 cuda_platform.cc:52] failed call to cuInit: UNKNOWN ERROR (303)\n")
    err = capfd.readouterr().err
    assert err == "E0000 something.cc:1] a real failure\n"


def test_library_info_is_dropped_but_warnings_and_our_info_pass(monkeypatch):
    monkeypatch.setattr(quiet, "VERBOSE", False)
    keep = quiet.LibraryInfoFilter().filter

    def record(path, level):
        return logging.LogRecord("absl", level, path, 1, "message", None, None)

    orbax = "/venv/site-packages/orbax/checkpoint/checkpoint_manager.py"
    assert not keep(record(orbax, logging.INFO))
    assert keep(record(orbax, logging.WARNING))
    assert keep(record(str(ROOT / "llama_jax" / "checkpoint.py"), logging.INFO))
    monkeypatch.setattr(quiet, "VERBOSE", True)  # LLAMA_JAX_VERBOSE=1
    assert keep(record(orbax, logging.INFO))
