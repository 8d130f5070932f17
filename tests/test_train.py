import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from helpers import ROOT, load_config, micro_config
from llama_jax import checkpoint, sharding, train_step
from llama_jax.config import validate
from llama_jax.metrics import read_metrics
from llama_jax.train import train


@pytest.mark.parametrize("path", sorted(p.relative_to(ROOT).as_posix()
                                        for p in (ROOT / "configs").glob("*.py")))
def test_every_config_loads_and_validates(path):
    config = load_config(path)
    if config.data.tokenizer_path.startswith("runs/"):  # made by the steps its docstring gives
        config.data.tokenizer_path = ""
    cfg = validate(config, sharding.make_mesh({}, jax.devices()[:1]))
    assert cfg.num_params() > 0
    assert f"python -m llama_jax.train --config={path}" in (ROOT / path).read_text()


def scalar_tags(logdir):
    import tensorflow as tf
    tags = {}
    for path in logdir.glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                tags.setdefault(value.tag, []).append(event.step)
    return tags


def test_train_end_to_end_logs_evaluates_and_checkpoints(tmp_path, caplog):
    caplog.set_level("INFO")
    config = micro_config()
    config.profile.steps = "11:13"
    config.mesh.update(data=2, fsdp=2, tensor=2)
    config.sharding_rules = "fsdp_tp"
    config.train.update(steps=40, lr=1e-2, log_every=10, eval_every=20)
    summary = train(config, tmp_path)
    records = read_metrics(tmp_path)
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in steps] == [10, 20, 30, 40]
    assert {"step", "loss", "learning_rate", "tokens_per_sec", "grad_norm"} <= set(steps[0])
    assert [r["step"] for r in evals] == [0, 20, 40]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 0.4
    assert (tmp_path / "tokenizer.model").exists()
    assert summary["steps"] == 40
    assert 0 < steps[-1]["mfu"] < 1 and steps[-1]["tokens_seen"] == 40 * 8 * 32

    tags = scalar_tags(tmp_path / "tensorboard")
    assert tags["train/loss"] == [10, 20, 30, 40] and tags["eval/loss"] == [0, 20, 40]
    assert {"train/learning_rate", "train/grad_norm", "train/mfu", "train/tokens_per_sec",
            "train/update_norm", "train/param_norm", "train/step_time_s", "config"} <= set(tags)
    assert list((tmp_path / "tensorboard" / "plugins" / "profile").glob("*/*.xplane.pb"))
    assert "Run summary: 40 steps (40 this session), 10,240 tokens" in caplog.text

    # the final checkpoint restores onto another mesh with identical parameters
    ckpt = checkpoint.Checkpointer(tmp_path)
    assert ckpt.latest_step() == 40
    restored = {}
    for mesh_config in ({"data": 2, "fsdp": 2, "tensor": 2}, {"data": 1, "fsdp": 8, "tensor": 1}):
        mesh = sharding.make_mesh(mesh_config)
        config.sharding_rules = "fsdp"
        abstract = train_step.build(config, mesh).abstract
        restored[len(restored)] = ckpt.restore(40, abstract)
    assert int(restored[1].step) == 40
    assert restored[1].params["output"].sharding.spec == P(("fsdp", "context"), None)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 restored[0].params, restored[1].params)


def test_command_line_overrides_and_bad_values(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2 "
               "--xla_backend_optimization_level=0")
    base = [sys.executable, "-m", "llama_jax.train", "--config=configs/tiny.py",
            f"--workdir={tmp_path}"]
    small = ["--config.model.dim=32", "--config.model.n_heads=2", "--config.model.ffn_dim=64",
             "--config.model.n_layers=1", "--config.data.seq_len=32",
             "--config.model.vocab_size=512", "--config.data.tokenizer_vocab_size=512",
             "--config.data.tokenizer_sample_lines=20000", "--config.train.warmup_steps=1",
             "--config.train.steps=4", "--config.train.log_every=2",
             "--config.train.eval_every=4", "--config.train.eval_batches=1"]
    done = subprocess.run(base + small, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x] == [2, 4]

    bad = subprocess.run(base + small + ["--config.train.warmup_steps=10"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0
    assert "train.warmup_steps=10 is not shorter than train.steps=4" in bad.stderr
    typo = subprocess.run(base + ["--config.train.learning_rate=1e-3"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert typo.returncode != 0 and "learning_rate" in typo.stderr
