"""Every setting has a range, checked before anything is built or written: a table of bad
values walks every key of base_config(), of a data.sources entry and of the entry points' flags."""

import json
import math
import os
import subprocess
import sys

import ml_collections
import numpy as np
import optax
import pytest

from helpers import ROOT, micro_config
from llama_jax import optim, ranges
from llama_jax.config import base_config
from llama_jax.train import train

# key -> a value outside its range (one per key; the test below checks none is missing)
BAD = {
    "model.vocab_size": 0, "model.dim": -64, "model.n_layers": 0, "model.n_heads": 0,
    "model.n_kv_heads": 0, "model.ffn_dim": -1, "model.multiple_of": 0, "model.norm_eps": 0.0,
    "model.rope_theta": -1.0, "model.max_seq_len": 0, "model.dtype": "float8",
    "model.param_dtype": "int8", "model.remat": "some", "model.scan_layers": "yes",
    "model.attention": "flash", "model.head_dim": 0, "model.rope_scaling": "yarn",
    "model.rope_scaling_factor": 0.5, "model.rope_low_freq_factor": 0.0,
    "model.rope_high_freq_factor": -4.0, "model.rope_original_max_seq_len": 0,
    "model.tie_embeddings": "no", "mesh.slices": -1, "mesh.data": 0, "mesh.fsdp": -2, "mesh.tensor": 1.5,
    "mesh.context": 0,
    "sharding_rules": "tp", "data.sources": [], "data.validation_fraction": 1.5,
    "data.seq_len": 0, "data.global_batch_size": 0, "data.shuffle_buffer": 0,
    "data.tokenizer_path": "/nonexistent/tokenizer.model", "data.tokenizer_vocab_size": 10,
    "data.tokenizer_sample_lines": 0, "data.seed": -1, "data.shards": -2, "train.steps": 0,
    "train.lr": math.nan, "train.warmup_steps": -5, "train.final_lr_fraction": 2.0,
    "train.b1": 1.0, "train.b2": 1.5, "train.eps": 0.0, "train.weight_decay": -0.1,
    "train.grad_clip": -1.0, "train.loss_chunk_size": -8, "train.microbatches": 0,
    "train.seed": 2**40, "train.log_every": 0, "train.eval_every": 0, "train.eval_batches": 0,
    "train.on_nan": "ignore", "train.on_spike": "skip", "train.spike_factor": 0.5,
    "train.spike_window": 1, "train.spike_skip_batches": -1, "checkpoint.every_steps": 0,
    "checkpoint.keep": 0, "checkpoint.keep_period": -3, "profile.steps": "15:10",
    "init_from": "/nonexistent/run", "xla.profile": "v7", "xla.flags": "async_fusion",
}
# more bad values of the keys the issue names, beyond the one above
MORE = [("data.validation_fraction", 0.0), ("train.lr", math.inf), ("train.lr", -1e-3),
        ("train.steps", 2.5), ("train.microbatches", True), ("model.dtype", 16)]
SOURCE_BAD = {"name": "", "weight": -1.0, "builtin": "poetry", "files": [], "eval_files": "",
              "format": "csv", "field": "", "tfds": " ", "data_dir": 3, "split": "",
              "eval_split": "", "store": ""}
FLAG_BAD = {("generate", "temperature"): -1.0, ("generate", "top_p"): 2.0,
            ("generate", "top_k"): -1, ("generate", "max_new_tokens"): 0,
            ("generate", "seed"): -3, ("evaluate", "batch_size"): 0, ("evaluate", "seq_len"): -1,
            ("evaluate", "max_batches"): -1, ("bench", "steps"): -1, ("bench", "documents"): -1,
            ("local", "num_processes"): 0, ("local", "devices_per_process"): 0,
            ("local", "grace_s"): -1.0, ("plot", "workdir"): "/nonexistent",
            ("plot", "out"): "loss.jpg"}


def test_the_table_covers_every_key():
    assert set(ranges.CONFIG) == set(ranges.flat(base_config()))
    assert set(BAD) == set(ranges.CONFIG)
    assert set(SOURCE_BAD) == set(ranges.SOURCE)
    assert set(FLAG_BAD) == {(tool, name) for tool, f in ranges.FLAGS.items() for name in f}
    assert ranges.config_problems(micro_config()) == []


@pytest.mark.parametrize("key, value", list(BAD.items()) + MORE,
                         ids=[f"{k}={v!r}" for k, v in list(BAD.items()) + MORE])
def test_a_bad_value_is_one_line_naming_key_value_and_range(key, value, tmp_path):
    # built from a dict, as a config file may: ConfigDict's own type check (a str for a bool,
    # a float for an int) would otherwise refuse some of these values before train sees them
    fields = micro_config().to_dict()
    section, _, name = key.rpartition(".")
    (fields[section] if section else fields)[name] = value
    config = ml_collections.ConfigDict(fields)
    workdir = tmp_path / "run"
    with pytest.raises(ValueError) as raised:
        train(config, workdir)  # checked before the mesh, the model, the tokenizer, the workdir
    message = str(raised.value)
    assert len(message.splitlines()) == 1
    assert message.startswith(f"{key}={value!r} is outside its range {ranges.CONFIG[key].range}")
    assert not workdir.exists()
    assert "step None" not in message


@pytest.mark.parametrize("key, value", SOURCE_BAD.items(), ids=list(SOURCE_BAD))
def test_a_bad_source_entry_value_names_the_entry_and_key(key, value, tmp_path):
    config = micro_config()
    config.data.sources = [dict(name="code", builtin="code"), {"name": "x", key: value}]
    with pytest.raises(ValueError) as raised:
        train(config, tmp_path / "run")
    assert str(raised.value).startswith(f"data.sources[1].{key}={value!r} is outside its range")
    assert not (tmp_path / "run").exists()


def test_a_jsonl_source_without_the_field_fails_before_anything_is_written(tmp_path):
    (tmp_path / "notes.jsonl").write_text(json.dumps({"body": "hello"}) + "\n")
    config = micro_config()
    config.data.sources = [dict(name="notes", files=str(tmp_path / "notes.jsonl"),
                                format="jsonl")]
    with pytest.raises(ValueError, match=r"source 'notes': the first line of .* has no string "
                                         r"field 'text' \(its keys: \['body'\]\): set field="):
        train(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("tool, name", FLAG_BAD, ids=[f"{t}--{n}" for t, n in FLAG_BAD])
def test_a_bad_flag_names_the_flag_value_and_range(tool, name):
    value = FLAG_BAD[tool, name]
    with pytest.raises(ValueError) as raised:
        ranges.check_flags(tool, {name: value})
    assert str(raised.value).startswith(
        f"--{name}={value!r} is outside its range {ranges.FLAGS[tool][name].range}")


def test_grad_clip_zero_is_no_clipping():
    """0 means off: the update equals an unclipped AdamW's, where a clip of 1 changes it."""
    params = {"w": np.ones((4, 4), np.float32)}
    grads = {"w": np.full((4, 4), 100.0, np.float32)}  # global norm 400

    def update(clip):
        c = micro_config().train
        c.grad_clip = clip
        tx = optim.make_optimizer(c)[0]
        state = tx.init(params)
        for _ in range(3):  # past step 0, whose learning rate is 0 in warmup
            updates, state = tx.update(grads, state, params)
        return np.asarray(updates["w"])

    c = micro_config().train
    schedule = optim.learning_rate_schedule(c)
    plain = optax.adamw(schedule, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay,
                        mask=optim.weight_decay_mask)
    state = plain.init(params)
    for _ in range(3):
        expected, state = plain.update(grads, state, params)
    np.testing.assert_array_equal(update(0.0), np.asarray(expected["w"]))
    assert not np.allclose(update(1e-3), update(0.0))  # a real clip would change it


def _run(*args, **env):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, PYTHONPATH=str(ROOT), **env))


def test_entry_points_print_one_line_and_write_nothing(tmp_path):
    """End to end, in subprocesses: the last stderr line is the error, and no traceback."""
    cases = [
        (["-m", "llama_jax.train", "--config=configs/tiny.py", f"--workdir={tmp_path / 'a'}",
          "--config.data.global_batch_size=0"],
         "error: data.global_batch_size=0 is outside its range integer >= 1"),
        (["-m", "llama_jax.train", "--config=configs/tiny.py", f"--workdir={tmp_path / 'b'}",
          "--config.train.stepz=3"],
         "error: --config.train.stepz is not a setting (did you mean --config.train.steps"),
        (["-m", "llama_jax.generate", f"--workdir={tmp_path / 'c'}", "--prompt=x",
          "--top_p=2"], "error: --top_p=2.0 is outside its range (0, 1], finite"),
        (["launch/local.py", "-n", "0", "--", "true"],
         "error: --num_processes=0 is outside its range integer >= 1"),
    ]
    for args, line in cases:
        done = _run(*args)
        assert done.returncode != 0
        assert done.stderr.strip().splitlines()[-1].startswith(line), done.stderr[-2000:]
        assert "Traceback" not in done.stderr
    assert not any(tmp_path.iterdir())


def test_docs_list_every_range_as_the_code_has_it():
    docs = (ROOT / "docs" / "configs.md").read_text()
    rows = [f"| `{k}` | {c.range} | {c.fix} |" for table in (ranges.CONFIG, ranges.SOURCE)
            for k, c in table.items()]
    rows += [f"| {tool} `--{k}` | {c.range} | {c.fix} |" for tool, f in ranges.FLAGS.items()
             for k, c in f.items()]
    assert [r for r in rows if r not in docs] == []
