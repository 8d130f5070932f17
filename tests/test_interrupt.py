"""Ctrl-C, SIGTERM and the workdir lock, through the real command line.

One story, since each training process costs seconds to start: run A is refused a second run
B into its workdir, then Ctrl-C saves its step and exits; run C takes over a stale lock,
resumes A's checkpoint, and a double Ctrl-C stops it at once; run D resumes again and a SIGTERM
(a preemption) saves its step; metrics.jsonl has each step once.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from helpers import ROOT
from llama_jax import checkpoint, lock

SETTINGS = {"model.vocab_size": 512, "model.dim": 64, "model.n_heads": 4, "model.ffn_dim": 128,
            "model.n_layers": 2, "data.seq_len": 32, "data.tokenizer_vocab_size": 512,
            "data.tokenizer_sample_lines": 5000, "train.steps": 100_000,
            "train.warmup_steps": 1, "train.log_every": 1, "train.eval_every": 100_000,
            "train.eval_batches": 1, "checkpoint.every_steps": 100_000}
# 1 device, and no LLVM optimisation: compile time would outweigh a few micro steps
ENV = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1 "
           "--xla_backend_optimization_level=0")


def start(workdir):
    command = [sys.executable, "-m", "llama_jax.train", "--config=configs/tiny.py",
               f"--workdir={workdir}", *(f"--config.{k}={v}" for k, v in SETTINGS.items())]
    return subprocess.Popen(command, cwd=ROOT, env=ENV, stderr=subprocess.PIPE, text=True)


def wait_for_step(proc, workdir, step):
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not any(
            r["step"] >= step for r in _records(workdir) if "loss" in r):
        time.sleep(0.1)
    assert proc.poll() is None, proc.stderr.read()[-3000:]


def _records(workdir):
    """metrics.jsonl as far as it is written: the run may be appending a line now."""
    path, records = workdir / "metrics.jsonl", []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            records.append(json.loads(line))
        except ValueError:
            pass
    return records


def interrupt(proc, times, signum=signal.SIGINT):
    """SIGINTs, as a terminal's Ctrl-C sends them (or a SIGTERM, as a preemption does);
    (exit status, seconds to exit, stderr)."""
    sent = time.time()
    for _ in range(times):
        proc.send_signal(signum)
        time.sleep(0.05)
    _, stderr = proc.communicate(timeout=120)
    return proc.returncode, time.time() - sent, stderr


def _reaped():
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid  # reaped: no process has it until the kernel's pids wrap around


def test_ctrl_c_saves_and_resumes_and_a_second_run_is_refused(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    # a session killed before its first checkpoint: a fresh start must not keep its records
    (workdir / "metrics.jsonl").write_text('{"step": 0, "eval_loss": 99.0}\n'
                                           '{"step": 1, "loss": 99.0}\n')
    a = start(workdir)
    wait_for_step(a, workdir, 3)

    b = start(workdir)
    _, b_err = b.communicate(timeout=240)
    assert b.returncode == 1 and "Traceback" not in b_err
    assert b_err.splitlines()[-1].startswith(
        f"error: --workdir={workdir} is in use by process {a.pid} on {socket.gethostname()} "
        "(started ")

    status, seconds, a_err = interrupt(a, 1)
    saved = checkpoint.Checkpointer(workdir).latest_step()
    assert status == 130 and seconds < 60, a_err[-3000:]
    assert "Traceback" not in a_err and "KeyboardInterrupt" not in a_err
    assert a_err.splitlines()[-1].startswith(
        f"interrupted at step {saved}: checkpoint saved in {workdir}/checkpoints; to resume, "
        f"rerun {sys.executable} -m llama_jax.train --config=configs/tiny.py")
    assert saved >= 3 and not (workdir / lock.NAME).exists()
    assert not any(r.get("loss") == 99.0 or r.get("eval_loss") == 99.0
                   for r in _records(workdir))

    # a lock left by a run that died (a pid no process has) is taken over
    (workdir / lock.NAME).write_text(json.dumps(
        {"pid": _reaped(), "host": socket.gethostname(), "started": "2020-01-01T00:00:00"}))
    c = start(workdir)
    wait_for_step(c, workdir, saved + 2)
    status, seconds, c_err = interrupt(c, 2)
    assert status == 130 and seconds < 20, c_err[-3000:]
    assert "Traceback" not in c_err
    assert f"taking over {workdir}/{lock.NAME} from process" in c_err
    assert f"resumed from step {saved}" in c_err
    assert c_err.splitlines()[-1] == ("interrupted again: exiting now; the last committed "
                                      "checkpoint is kept")
    resumable = checkpoint.Checkpointer(workdir).latest_step()
    assert resumable >= saved

    c_last = max(r["step"] for r in _records(workdir) if "loss" in r)
    d = start(workdir)
    wait_for_step(d, workdir, c_last + 1)  # past C's records: D is in its loop
    status, seconds, d_err = interrupt(d, 1, signal.SIGTERM)
    preempted = checkpoint.Checkpointer(workdir).latest_step()
    assert status == 1 and seconds < 60, d_err[-3000:]
    assert "Traceback" not in d_err and f"resumed from step {resumable}" in d_err
    assert d_err.splitlines()[-1].startswith(
        f"preempted at step {preempted}: checkpoint saved in {workdir}/checkpoints; "), d_err
    assert "rerun the same command to resume" in d_err.splitlines()[-1]
    steps = [r["step"] for r in _records(workdir) if "loss" in r]
    assert steps == sorted(set(steps)) and steps[0] == 1 and steps[-1] == preempted
    assert preempted > c_last


def _lock_file(workdir, host, age_s=0.0):
    path = workdir / lock.NAME
    path.write_text(json.dumps({"pid": 1, "host": host, "started": "2020-01-01T00:00:00"}))
    then = time.time() - age_s
    os.utime(path, (then, then))


def test_a_stale_lock_is_taken_over_and_a_live_one_refused(tmp_path, caplog):
    caplog.set_level("WARNING")
    path = tmp_path / lock.NAME
    _lock_file(tmp_path, "another-host", age_s=2 * lock.STALE_S)
    lock.acquire(tmp_path)
    assert json.loads(path.read_text())["pid"] == os.getpid()
    assert "no heartbeat for 20 minutes" in caplog.text
    lock.release()
    assert not path.exists()

    _lock_file(tmp_path, "another-host")  # heartbeat fresh: its host's run may be alive
    with pytest.raises(lock.WorkdirBusy, match="in use by process 1 on another-host"):
        lock.acquire(tmp_path)
    _lock_file(tmp_path, socket.gethostname())  # pid 1 is alive on this host
    with pytest.raises(lock.WorkdirBusy, match=f"process 1 on {socket.gethostname()}"):
        lock.acquire(tmp_path)
    assert json.loads(path.read_text())["pid"] == 1  # a refused run leaves the lock alone
    lock.release()
    assert path.exists()
