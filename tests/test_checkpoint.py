"""Checkpoints, resume and failure handling: every row fails loudly or recovers exactly."""

import dataclasses
import json
import re
import os
import shutil
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import helpers
import pytest

from helpers import ROOT, micro_config, random_batch
from llama_jax import checkpoint, convert, goodput, sharding, train_step
from llama_jax.config import model_config
from llama_jax.data import corpus
from llama_jax.model import ModelConfig
from llama_jax.metrics import read_metrics
from llama_jax.train import train


def config_for(steps=4, **train):
    config = micro_config()
    config.train.update(steps=steps, warmup_steps=1, log_every=1, eval_every=100,
                        eval_batches=1, **train)
    config.checkpoint.every_steps = 2
    return config


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2 and 4."""
    workdir = tmp_path_factory.mktemp("base") / "run"
    train(config_for(), workdir)
    return workdir


@pytest.fixture
def run_copy(base_run, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(base_run, workdir)
    return workdir


def restored_params(workdir, config, step):
    abstract = train_step.build(config, sharding.make_mesh(config.mesh)).abstract
    ckpt = checkpoint.Checkpointer(workdir)
    state = ckpt.restore(step, abstract)
    ckpt.close()
    return state


def test_a_training_workdir_serves_generate_and_convert_without_config(base_run, tmp_path):
    """model.json records the model as configured, so the inference entry points need no
    --config; a --config that disagrees with it is one line naming the fields."""
    recorded = json.loads((base_run / "model.json").read_text())
    assert recorded == dataclasses.asdict(model_config(config_for()))
    assert recorded["attention"] == "auto" and not (base_run / "model.json.tmp").exists()
    env = {"PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"}

    def run(module, *args):
        return subprocess.run([sys.executable, "-m", f"llama_jax.{module}", *args], env=env,
                              capture_output=True, text=True, timeout=300)

    done = run("generate", f"--workdir={base_run}", "--prompt=def ", "--max_new_tokens=8")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("def ") and len(done.stdout.rstrip("\n")) > len("def ")

    other = dict(recorded, n_layers=3)
    (tmp_path / "other.py").write_text(
        "from llama_jax.config import base_config\n\n\ndef get_config():\n"
        f"    return base_config(**{other!r})\n")
    done = run("generate", f"--workdir={base_run}", f"--config={tmp_path / 'other.py'}",
               "--prompt=def ")
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: --config's model section differs from {base_run / 'model.json'} in n_layers "
        "(config 3, model.json 2): drop --config to use the recorded model, or pass the config "
        "this workdir was trained with")

    done = run("convert", "--to=hf", f"--src={base_run}", f"--dst={tmp_path / 'hf'}")
    assert done.returncode == 0, done.stderr[-2000:]
    cfg, params = convert.load_hf(tmp_path / "hf")
    assert (cfg.vocab_size, cfg.dim, cfg.n_layers, cfg.n_kv_heads, cfg.ffn_dim) == \
        (512, 64, 2, 2, 128)
    trained = checkpoint.load_params(base_run)
    assert jax.tree.structure(params) == jax.tree.structure(trained)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params),
                                                    jax.tree.leaves(trained)))
    assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == \
        (base_run / "tokenizer.model").read_bytes()


def test_read_model_takes_a_matching_config_and_one_for_a_workdir_without_model_json(
        base_run, tmp_path):
    config = config_for()
    assert checkpoint.read_model(base_run, config) == checkpoint.read_model(base_run)
    config.model.rope_theta = 500000.0
    with pytest.raises(checkpoint.CheckpointError, match=r"in rope_theta \(config 500000.0, "
                       r"model.json 10000.0\): drop --config"):
        checkpoint.read_model(base_run, config)
    assert checkpoint.read_model(tmp_path, config).rope_theta == 500000.0
    cfg, _, tokenizer_path = checkpoint.load_model(base_run)
    assert cfg.attention == "xla" and tokenizer_path == base_run / "tokenizer.model"


def test_load_params_reads_only_the_params_of_a_training_state(base_run):
    params = checkpoint.load_params(base_run)
    expected = jax.device_get(restored_params(base_run, config_for(), 4).params)
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(params))
    jax.tree.map(np.testing.assert_array_equal, params, expected)


def test_a_tokenizer_bigger_than_the_vocabulary_writes_nothing(base_run, tmp_path):
    cfg = ModelConfig(vocab_size=101, dim=32, n_layers=1, n_heads=4)
    with pytest.raises(ValueError, match="512 pieces but model.vocab_size is 101"):
        checkpoint.save_params(tmp_path / "wd", cfg, None, base_run / "tokenizer.model")
    assert not list((tmp_path / "wd").iterdir())


def test_checkpoints_are_kept_by_count_and_period(tmp_path):
    config = config_for(steps=7)
    config.checkpoint.update(every_steps=1, keep=2, keep_period=3)
    train(config, tmp_path)
    assert checkpoint.Checkpointer(tmp_path).mngr.all_steps() == [3, 6, 7]
    meta = checkpoint.Checkpointer(tmp_path).read_meta(7)
    assert json.loads(meta["config"])["model"]["dim"] == 64 and meta["process_count"] == 1


def test_an_unfinished_save_is_never_loaded(run_copy):
    steps = run_copy / "checkpoints"
    (steps / "4").rename(steps / "4.orbax-checkpoint-tmp-1234567")
    summary = train(config_for(), run_copy)
    assert summary["first_step"] == 2  # resumed from the last committed step
    assert [r["step"] for r in read_metrics(run_copy) if "loss" in r] == [1, 2, 3, 4]


def test_skip_drops_non_finite_updates_and_keeps_the_state(run_copy, monkeypatch):
    real = train_step.summed_loss
    monkeypatch.setattr(train_step, "summed_loss",
                        lambda *a: (lambda loss, count: (loss * jnp.nan, count))(*real(*a)))
    config = config_for(steps=6, on_nan="skip")
    train(config, run_copy)
    records = [r for r in read_metrics(run_copy) if "loss" in r]
    assert records[-1]["skipped_steps"] == 2 and records[-1]["finite"] == 0.0
    before, after = restored_params(run_copy, config, 4), restored_params(run_copy, config, 6)
    assert int(after.step) == 6
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(before.params),
                 jax.device_get(after.params))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(before.opt_state),
                 jax.device_get(after.opt_state))


def test_abort_names_the_steps_and_the_last_good_checkpoint(run_copy, monkeypatch):
    real = train_step.summed_loss
    monkeypatch.setattr(train_step, "summed_loss",
                        lambda *a: (lambda loss, count: (loss * jnp.inf, count))(*real(*a)))
    with pytest.raises(FloatingPointError, match=r"at step 5 .*last good checkpoint: step 4"):
        train(config_for(steps=8), run_copy)


def test_train_step_skip_keeps_every_leaf_bit_identical():
    config = micro_config()
    built = train_step.build(config, sharding.make_mesh({"fsdp": -1}))
    state, step = built.init(jax.random.key(0)), built.train_step
    batch = random_batch(jax.random.key(1), 8, 32, 512)
    state, _ = step(state, batch)
    before = jax.device_get(state)
    batch["loss_mask"] = batch["loss_mask"].at[0, 0].set(jnp.nan)
    state, metrics = step(state, batch)
    assert float(metrics["finite"]) == 0.0 and int(state.step) == 2
    jax.tree.map(np.testing.assert_array_equal, before.params, jax.device_get(state.params))
    jax.tree.map(np.testing.assert_array_equal, before.opt_state,
                 jax.device_get(state.opt_state))


def _set(config, key, value):
    section, name = key.split(".")
    config[section][name] = value


# (what goes wrong, how to break it, the message) — each must fail before training proceeds
ROWS = [
    ("mesh product != device count",
     lambda c, w: c.mesh.update(data=2, fsdp=2, tensor=1), "has 4 devices but 8"),
    ("n_heads not divisible by tensor",
     lambda c, w: c.mesh.update(data=1, fsdp=1, tensor=8), "not divisible by mesh.tensor=8"),
    ("n_heads not divisible by n_kv_heads",
     lambda c, w: _set(c, "model.n_kv_heads", 3), "not divisible by model.n_kv_heads=3"),
    ("global batch not divisible by data*fsdp",
     lambda c, w: _set(c, "data.global_batch_size", 12), "global_batch_size=12 is not divisible"),
    ("seq_len > max_seq_len",
     lambda c, w: _set(c, "data.seq_len", 128), "seq_len=128 exceeds model.max_seq_len=64"),
    ("tokenizer vocab > model vocab",
     lambda c, w: _set(c, "data.tokenizer_vocab_size", 1024),
     "tokenizer_vocab_size has 1024 pieces but model.vocab_size is 512"),
    ("unknown config key",
     lambda c, w: c.model.__setattr__("hidden", 3) if c.model.unlock() else None,
     r"model.hidden is not a known setting: remove it or fix its spelling"),
    ("zero learning rate", lambda c, w: _set(c, "train.lr", 0.0), r"train.lr=0.0 is outside its range \(0, 1\]"),
    ("negative steps", lambda c, w: _set(c, "train.steps", -5), r"train.steps=-5 is outside its range integer >= 1"),
    ("warmup longer than training",
     lambda c, w: _set(c, "train.warmup_steps", 10), "warmup_steps=10 is not shorter"),
    ("checkpoint from a different model",
     lambda c, w: _set(c, "model.ffn_dim", 192),
     "model.ffn_dim is 128 in its model.json but 192 in this config; use a new --workdir"),
    ("checkpoint from a different model, no model.json",
     lambda c, w: [_set(c, "model.ffn_dim", 192), (w / "model.json").unlink()],
     r"\['w1'\] has shape \(2, 64, 128\) in the checkpoint but \(2, 64, 192\)"),
    # every step damaged (one damaged step falls back to the previous: test_bad_inputs.py)
    ("corrupt checkpoints",
     lambda c, w: [f.write_bytes(b"garbage") for f in (w / "checkpoints").glob("*/state/**/*")
                   if f.is_file()], "no checkpoint in .* can be read .*from a backup"),
    ("resume with a different tokenizer",
     lambda c, w: helpers.train_tokenizer(corpus.stdlib_files("train")[:10], 480,
                                            w / "tokenizer.model", 5000),
     "trained with tokenizer"),
    ("workdir is a file", "file", "is a file: pass a directory path"),
    ("train.steps below the latest checkpoint", lambda c, w: _set(c, "train.steps", 2),
     "is step 4, past train.steps=2: raise train.steps to train on, or use a new --workdir"),
]


@pytest.mark.parametrize("name, breaker, message", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input_is_one_clear_error(name, breaker, message, run_copy):
    config = config_for(steps=6)
    workdir = run_copy
    if breaker == "file":
        workdir = run_copy / "metrics.jsonl"
    else:
        breaker(config, run_copy)
    before = sorted(p.name for p in (run_copy / "checkpoints").iterdir())
    with pytest.raises((ValueError, OSError)) as raised:
        train(config, workdir)
    assert len(str(raised.value).splitlines()) == 1
    assert re.search(message, str(raised.value)), str(raised.value)
    assert sorted(p.name for p in (run_copy / "checkpoints").iterdir()) == before  # nothing lost


def test_cli_prints_one_line_not_a_traceback(tmp_path):
    (tmp_path / "file").write_text("x")
    done = subprocess.run([sys.executable, "-m", "llama_jax.train", "--config=configs/tiny.py",
                           f"--workdir={tmp_path / 'file'}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1] == \
        f"error: --workdir={tmp_path / 'file'} is a file: pass a directory path"
    assert "Traceback" not in done.stderr


def _train_cmd(workdir, extra=()):
    overrides = {"model.vocab_size": 512, "model.dim": 64, "model.n_heads": 4,
                 "model.ffn_dim": 128, "model.n_layers": 2, "data.seq_len": 32,
                 "data.tokenizer_vocab_size": 512, "data.tokenizer_sample_lines": 20000,
                 "data.shuffle_buffer": 64, "train.steps": 14, "train.warmup_steps": 2,
                 "train.log_every": 1, "train.eval_every": 7, "train.eval_batches": 1,
                 "checkpoint.every_steps": 4}
    return ([sys.executable, "-m", "llama_jax.train", "--config=configs/tiny.py",
             f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in overrides.items()]
            + list(extra))


def test_kill_9_then_rerun_gives_bit_identical_losses_with_a_3_source_mixture(tmp_path):
    notes = tmp_path / "notes.jsonl"
    notes.write_text("".join(json.dumps({"text": f"note {i}: " + "word " * (i % 40)}) + "\n"
                             for i in range(400)))
    config_file = tmp_path / "mix.py"
    config_file.write_text(
        "from configs.tiny import get_config as tiny\n\n\ndef get_config():\n"
        "    c = tiny()\n    c.data.sources = [\n"
        "        dict(name='code', weight=0.5, builtin='code'),\n"
        "        dict(name='prose', weight=0.3, builtin='prose'),\n"
        f"        dict(name='notes', weight=0.2, files='{notes}', format='jsonl', field='text'),\n"
        "    ]\n    return c\n")
    # each sequence split over 2 devices (context parallelism: its load-balancing reorder must
    # resume exactly too), without LLVM optimisation: three processes compile the step, and
    # compile time would outweigh 40 micro steps (a 2-process kill and resume is test_store.py's)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2 "
               "--xla_backend_optimization_level=0", PYTHONPATH=str(ROOT))

    def command(workdir):
        cmd = _train_cmd(workdir)
        cmd[3] = f"--config={config_file}"
        return cmd + ["--config.train.steps=40", "--config.mesh.context=2"]

    straight = subprocess.run(command(tmp_path / "a"), cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr[-2000:]
    # same tokenizer for both runs, so the comparison is about resume only
    (tmp_path / "b").mkdir()
    shutil.copy(tmp_path / "a" / "tokenizer.model", tmp_path / "b" / "tokenizer.model")

    proc = subprocess.Popen(command(tmp_path / "b"), cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "b" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (
            (tmp_path / "b" / "checkpoints" / "8").is_dir() and metrics.exists()
            and any(json.loads(x)["step"] >= 10 for x in metrics.read_text().splitlines())):
        time.sleep(0.2)
    proc.kill()  # SIGKILL: no handler, no final save
    proc.wait()
    killed_at = max(json.loads(x)["step"] for x in metrics.read_text().splitlines())
    assert 10 <= killed_at < 40, killed_at
    last_saved = checkpoint.Checkpointer(tmp_path / "b").latest_step()
    resumed = subprocess.run(command(tmp_path / "b"), cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from step {last_saved}" in resumed.stderr

    def losses(workdir):
        return {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r}

    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(a) == sorted(b) == list(range(1, 41))
    assert a == b  # bit-identical floats, including every step after the resume

    # goodput: the killed session's steps past the checkpoint were computed twice; its ledger
    # is rewritten at every log step (here every step), after the metrics line
    totals = goodput.read(tmp_path / "b")
    assert totals["sessions"] == 2
    assert killed_at - last_saved - 1 <= totals["lost_steps"] <= killed_at - last_saved
    assert (totals["restart_lost_s"] > 0) == (totals["lost_steps"] > 0)
    assert abs(totals["unaccounted_s"]) < 0.05 * totals["wall_s"], totals
