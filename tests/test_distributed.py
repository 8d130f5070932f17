"""Multi-process runs on this machine through llama_jax.launch.local (CPU devices, gloo).

Three launches share one story, so each assertion reads runs that already happened:
  A  2 processes x 2 devices, fresh workdir (process 0 trains the tokenizer), steps 1..6;
  B  1 process x 4 devices on A's workdir cut back to step 3, data.shards=2: steps 4..6;
  C  2 processes x 2 devices on B's workdir with data.shards=4 (a new data stream), stopped by
     SIGTERM to process 1 only.
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

from helpers import ROOT, micro_config
from llama_jax.checkpoint import Checkpointer
from llama_jax.data import pipeline, tokenizer as tokenizer_lib
from llama_jax.metrics import read_metrics

OVERRIDES = {"model.vocab_size": 512, "model.dim": 64, "model.n_heads": 4, "model.ffn_dim": 128,
             "model.n_layers": 2, "data.seq_len": 32, "data.tokenizer_vocab_size": 512,
             "data.tokenizer_sample_lines": 5000, "train.steps": 6, "train.warmup_steps": 1,
             "train.log_every": 1, "train.eval_every": 1000, "train.eval_batches": 1,
             "checkpoint.every_steps": 3, "checkpoint.keep": 10}


def command(workdir, processes, devices, **overrides):
    settings = {**OVERRIDES, **overrides}
    train = [sys.executable, "-m", "llama_jax.train", "--config=configs/tiny.py",
             f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in settings.items()]
    return [sys.executable, "-m", "llama_jax.launch.local", f"-n={processes}",
            f"--devices_per_process={devices}", "--grace_s=20", "--"] + train


def launch(workdir, processes, devices, **overrides):
    """Starts the job; its output goes to WORKDIR.log (a pipe nobody reads could fill up)."""
    log = open(f"{workdir}.log", "w")
    return subprocess.Popen(command(workdir, processes, devices, **overrides), cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT)


def finish(proc, workdir, timeout):
    proc.wait(timeout=timeout)
    return open(f"{workdir}.log").read()


def losses(workdir):
    return {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    out = {}
    a = launch(root / "a", 2, 2)
    out["a"] = finish(a, root / "a", 300)
    assert a.returncode == 0, out["a"][-3000:]

    # B: a 1-process run resumes A's 2-process checkpoint at step 3 (later steps removed)
    shutil.copytree(root / "a", root / "b")
    for later in ("checkpoints/6", "data_state/6"):
        shutil.rmtree(root / "b" / later)
    b = launch(root / "b", 1, 4, **{"data.shards": 2})
    out["b"] = finish(b, root / "b", 300)
    assert b.returncode == 0, out["b"][-3000:]

    # C: 2 processes resume B's 1-process checkpoint; SIGTERM reaches process 1 only
    shutil.copytree(root / "b", root / "c")
    c = launch(root / "c", 2, 2, **{"data.shards": 4, "train.steps": 10_000})
    deadline = time.time() + 240
    while time.time() < deadline and max(losses(root / "c"), default=0) < 8:
        time.sleep(0.2)
    pid = re.search(r"\[launch\] process 1 pid (\d+)", open(f"{root / 'c'}.log").read())[1]
    os.kill(int(pid), signal.SIGTERM)
    out["c"] = finish(c, root / "c", 120)
    out["c_returncode"] = c.returncode
    out["root"] = root
    return out


def test_two_processes_match_one_process_and_resume_across_process_counts(runs):
    root = runs["root"]
    two, one = losses(root / "a"), losses(root / "b")
    assert sorted(two) == [1, 2, 3, 4, 5, 6] and sorted(one) == [1, 2, 3, 4, 5, 6]
    # B restored A's step-3 checkpoint and data shards in one process: the 2x2 and 1x4 runs
    # take the same steps 4..6 on the same global batches
    assert "resumed from step 3" in runs["b"]
    np.testing.assert_allclose([one[s] for s in (4, 5, 6)], [two[s] for s in (4, 5, 6)],
                               rtol=0, atol=1e-5)
    assert two[6] < two[1]
    # every process wrote its own shards' data state; only process 0 wrote metrics (once)
    assert sorted(p.name for p in (root / "a" / "data_state" / "6").iterdir()) == [
        "shard_0", "shard_1"]
    assert runs["a"].count("Run summary: 6 steps") == 2
    assert [r["step"] for r in read_metrics(root / "a") if "loss" in r] == [1, 2, 3, 4, 5, 6]


def test_one_process_checkpoint_resumes_in_two_processes_with_a_new_data_stream(runs):
    stderr = runs["c"]
    for process in (0, 1):
        assert re.search(rf"\[{process}\] .*resumed from step 6", stderr)
    assert "data stream has 2 shards but this run reads 4" in stderr
    steps = losses(runs["root"] / "c")
    assert min(s for s in steps if s > 6) == 7 and all(np.isfinite(list(steps.values())))


def test_sigterm_to_one_process_makes_both_save_the_same_step(runs):
    assert runs["c_returncode"] != 0
    stderr = runs["c"]
    saved = Checkpointer(runs["root"] / "c").latest_step()
    assert saved > 6
    for process in (0, 1):
        assert re.search(rf"\[{process}\] .*preempted at step {saved}: checkpoint saved", stderr)
    assert sorted(p.name for p in (runs["root"] / "c" / "data_state" / str(saved)).iterdir()) \
        == ["shard_0", "shard_1", "shard_2", "shard_3"]


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
        [sys.executable, "-m", "llama_jax.launch.local", f"-n={processes}", "--grace_s=2", "--",
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
    assert "[0] hello from 0 2 --xla_force_host_platform_device_count=1" in stdout
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
