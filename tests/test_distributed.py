"""Multi-process runs on this machine through launch/local.py (CPU devices, gloo).

One story, so each assertion reads runs that already happened (every launch costs seconds):
  P  in this process (1 process x 8 devices), data.shards=2: tokenizer, steps 1..3;
  A  2 processes x 2 devices, each sequence split over all 4 (mesh.context=4: a context group
     that spans processes, so both read the same rows), resume P's checkpoint at step 3 and
     train until process 1 alone gets SIGTERM;
  B  1 process x 4 devices (no context parallelism) resume A's checkpoint at step 6 and take
     A's steps 7..S again.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from helpers import ROOT, load_config, micro_config
from llama_jax.checkpoint import Checkpointer
from llama_jax.data import pipeline, tokenizer as tokenizer_lib
from llama_jax.metrics import read_metrics, truncate_metrics
from llama_jax.train import train

SETTINGS = {"model.vocab_size": 512, "model.dim": 64, "model.n_heads": 4, "model.ffn_dim": 128,
            "model.n_layers": 2, "data.seq_len": 32, "data.tokenizer_vocab_size": 512,
            "data.tokenizer_sample_lines": 5000, "data.shards": 2, "train.steps": 3,
            "train.warmup_steps": 1, "train.log_every": 1, "train.eval_every": 1000,
            "train.eval_batches": 1, "checkpoint.every_steps": 3, "checkpoint.keep": 10}


def config_with(**overrides):
    config = load_config("configs/tiny.py")
    for key, value in {**SETTINGS, **overrides}.items():
        section, name = key.split(".")
        config[section][name] = value
    return config


def launch(workdir, processes, devices, **overrides):
    """Starts the job; its output goes to WORKDIR.log (a pipe nobody reads could fill up)."""
    flags = [f"--config.{k}={v}" for k, v in {**SETTINGS, **overrides}.items()]
    command = [sys.executable, str(ROOT / "launch" / "local.py"), f"-n={processes}",
               f"--devices_per_process={devices}", "--grace_s=20", "--", sys.executable, "-m",
               "llama_jax.train", "--config=configs/tiny.py", f"--workdir={workdir}", *flags]
    # the launcher passes XLA_FLAGS on (conftest's: no LLVM optimisation of a few micro steps)
    return subprocess.Popen(command, cwd=ROOT, stdout=open(f"{workdir}.log", "w"),
                            stderr=subprocess.STDOUT)


def finish(proc, workdir, timeout):
    proc.wait(timeout=timeout)
    return open(f"{workdir}.log").read()


def losses(workdir):
    return {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    train(config_with(), root / "p")
    shutil.copytree(root / "p", root / "a")
    shutil.copytree(root / "p", root / "p_copy")  # for the changed-shard-count test

    a = launch(root / "a", 2, 2, **{"mesh.context": 4, "train.steps": 10_000})
    deadline = time.time() + 240
    while time.time() < deadline and a.poll() is None and max(losses(root / "a")) < 8:
        time.sleep(0.2)
    pid = re.search(r"\[launch\] process 1 pid (\d+)", open(f"{root / 'a'}.log").read())[1]
    os.kill(int(pid), signal.SIGTERM)
    out = {"root": root, "a": finish(a, root / "a", 120), "a_returncode": a.returncode}
    saved = Checkpointer(root / "a").latest_step()

    shutil.copytree(root / "a", root / "b")
    for later in (root / "b").glob("*/*"):  # B starts from step 6: later saves are removed
        if later.parent.name in ("checkpoints", "data_state") and later.name.isdigit() \
                and int(later.name) > 6:
            shutil.rmtree(later)
    truncate_metrics(root / "b" / "metrics.jsonl", 6)  # as B's resume would: wait for B's own
    # the same train.steps as A (it shapes the learning-rate schedule); stopped once past A
    b = launch(root / "b", 1, 4, **{"train.steps": 10_000})
    deadline = time.time() + 240
    while time.time() < deadline and b.poll() is None and max(losses(root / "b")) < saved:
        time.sleep(0.2)
    b.send_signal(signal.SIGTERM)  # the launcher passes it on
    out["b"] = finish(b, root / "b", 120)
    assert "preempted at step" in out["b"], out["b"][-3000:]
    return out


def test_one_process_checkpoint_resumes_in_two_processes(runs):
    for process in (0, 1):
        assert re.search(rf"\[{process}\] .*resumed from step 3", runs["a"])
    assert "data stream has" not in runs["a"]  # 2 shards before and after: the same stream
    steps = [r["step"] for r in read_metrics(runs["root"] / "a") if "loss" in r]
    assert steps == list(range(1, len(steps) + 1))  # process 0 alone writes metrics.jsonl
    # one reader (the context group), whose first process saved both shards
    assert sorted(p.name for p in (runs["root"] / "a" / "data_state" / "6").iterdir()) == [
        "shard_0", "shard_1"]


def test_sigterm_to_one_process_makes_both_save_the_same_step(runs):
    assert runs["a_returncode"] != 0
    saved = Checkpointer(runs["root"] / "a").latest_step()
    assert saved >= 8
    for process in (0, 1):
        assert re.search(rf"\[{process}\] .*preempted at step {saved}: checkpoint saved",
                         runs["a"])


def test_two_process_checkpoint_resumes_in_one_process_with_the_same_losses(runs):
    two, one = losses(runs["root"] / "a"), losses(runs["root"] / "b")
    assert "resumed from step 6" in runs["b"]
    later = sorted(s for s in two if s > 6)
    assert later and set(later) <= set(one)
    # context 4 over 2 processes and 1 process without context: the same global batches
    np.testing.assert_allclose([one[s] for s in later], [two[s] for s in later], rtol=0,
                               atol=1e-5)
    assert two[later[-1]] < two[1]


def test_a_failing_process_stops_the_job_instead_of_hanging(tmp_path):
    # process 0 fails training the tokenizer while process 1 waits for it at a barrier
    start = time.time()
    job = launch(tmp_path / "run", 2, 1, **{"data.tokenizer_vocab_size": 300})
    log = finish(job, tmp_path / "run", 120)
    assert job.returncode != 0 and time.time() - start < 90
    assert re.search(r"\[0\] error: SentencePiece cannot train 300 pieces on this corpus "
                     r"\(.*Vocabulary size is smaller.*\): change data.tokenizer_vocab_size", log)


def test_a_changed_shard_count_restarts_the_data_stream_with_a_warning(runs, caplog):
    caplog.set_level("WARNING")
    # train.steps=3: restore and build the reseeded stream, then stop (no step to compile)
    summary = train(config_with(**{"data.shards": 1}), runs["root"] / "p_copy")
    assert "data stream has 2 shards but this run reads 1" in caplog.text
    assert "restarts with seed data.seed + 3" in caplog.text
    assert summary["first_step"] == 3 and summary["steps"] == 3


def test_each_process_reads_disjoint_data_shards(tmp_path):
    # one marker word per file; file-level sharding gives each data shard its own files
    for i in range(8):
        (tmp_path / f"f{i}.txt").write_text(" ".join([f"doc{i}x"] * 30))
    sp_path = tmp_path / "sp.model"
    tokenizer_lib.train_on_texts([f"doc{i}x " * 5 for i in range(8)] * 20, 276, sp_path)
    sp = tokenizer_lib.load_tokenizer(sp_path, 512)
    config = micro_config()
    config.data.sources = [dict(name="notes", files=str(tmp_path / "f*.txt"))]
    config.data.shards = 4

    def markers(process):
        datasets = pipeline.process_datasets("train", config.data, sp, process, 2)
        assert sorted(datasets) == [2 * process, 2 * process + 1]
        batch = next(pipeline.ShardedIterator(datasets))
        assert batch["inputs"].shape == (4, 32)  # 2 shards x (8 sequences / 4 shards)
        return set(re.findall(r"doc\dx", " ".join(sp.decode(row.tolist())
                                                  for row in batch["inputs"])))

    first, second = markers(0), markers(1)
    assert first and second and not first & second
    with pytest.raises(ValueError, match="data.shards=3 must be a multiple of the process count"):
        config.data.shards = 3
        pipeline.process_datasets("train", config.data, sp, 0, 2)


def run_launcher(script, processes=2, timeout=60, **kwargs):
    return subprocess.Popen(
        [sys.executable, str(ROOT / "launch" / "local.py"), f"-n={processes}", "--grace_s=2", "--",
         sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, **kwargs)


def test_launcher_prefixes_output_and_stops_the_others_when_one_fails():
    script = ("import os, sys, time; i = os.environ['LLAMA_JAX_PROCESS_ID']; "
              "print('hello from', i, os.environ['LLAMA_JAX_NUM_PROCESSES'], "
              "os.environ['XLA_FLAGS'], flush=True); "
              "sys.exit(3) if i == '1' else time.sleep(120)")
    start = time.time()
    proc = run_launcher(script)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 3 and time.time() - start < 30
    assert re.search(r"^\[0\] hello from 0 2 .*--xla_force_host_platform_device_count=1$", stdout,
                     re.M), stdout
    assert "[1] hello from 1 2" in stdout
    assert "process 1 exited with 3: stopping the others" in stderr


def test_launcher_passes_sigterm_to_every_process():
    script = ("import os, signal, sys, time; i = os.environ['LLAMA_JAX_PROCESS_ID']; "
              "signal.signal(signal.SIGTERM, lambda *_: (print('stopping', i, flush=True), "
              "sys.exit(0))); print('ready', flush=True); time.sleep(120)")
    proc = run_launcher(script)
    ready = 0
    while ready < 2:
        ready += "ready" in proc.stdout.readline()
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert "[0] stopping 0" in stdout and "[1] stopping 1" in stdout
