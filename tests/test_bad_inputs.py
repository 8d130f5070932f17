"""Bad inputs a newcomer meets first, each one `error:` line that names the file or key and the
fix, with nothing lost: config flags (a misspelt section, a missing file, an override of a
None default), damaged files in a workdir, a damaged latest checkpoint, a convert into a
workdir, two sources of one name. The CLI rows run the real entry points (a subprocess each)."""

import dataclasses
import json
import logging
import re
import subprocess
import sys

import jax
import pytest
from absl import flags
from ml_collections import config_flags

from helpers import ROOT, micro_config
from llama_jax import checkpoint, cli, goodput, ranges, spikes
from llama_jax.config import model_config
from llama_jax.model import ModelConfig
from llama_jax.train import train


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=180)


def assert_one_error_line(done, pattern):
    """Exit status, the `error:` line last on stderr (and the only one), no traceback."""
    assert done.returncode != 0, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert [line for line in lines if line.startswith("error:")] == lines[-1:], done.stderr
    assert re.search(pattern, lines[-1]), lines[-1]


# (module and flags, the error line): every entry point parses --config through cli.parse_flags
CLI_ROWS = [
    (["llama_jax.train", "--config=configs/tiny.py", "--workdir=unused",
      "--config.trian.steps=10"],
     r"^error: --config\.trian\.steps is not a setting \(did you mean --config\.train\.steps"),
    (["llama_jax.evaluate", "--config=configs/tinyy.py", "--workdir=unused"],
     r"^error: --config=configs/tinyy\.py: no such file: pass a configs/\*\.py path"),
]


@pytest.mark.parametrize("args, pattern", CLI_ROWS, ids=["misspelt section", "missing config"])
def test_config_flag_errors_are_one_line(args, pattern):
    assert_one_error_line(run_cli(*args), pattern)


def parse(*overrides):
    """--config flags parsed as an entry point parses them (its own flag table; ml_collections
    reads the overrides from sys.argv when the flag is defined)."""
    argv = ["prog", "--config=configs/tiny.py", *overrides]
    values = flags.FlagValues()
    saved, sys.argv = sys.argv, argv
    try:
        config_flags.DEFINE_config_file("config", None, "", flag_values=values,
                                        lock_config=True)
        values(argv)
    finally:
        sys.argv = saved
    return values.config


def test_misspelt_section_or_key_is_named_with_the_nearest_setting(monkeypatch):
    monkeypatch.chdir(ROOT)
    for override, near in [("--config.trian.steps=10", "train.steps"),
                            ("--config.train.stpes=10", "train.steps"),
                            ("--config.modle.dim=8", "model.dim")]:
        with pytest.raises((AttributeError, KeyError)) as raised:
            parse(override)
        message = cli.unknown_override(raised.value, ["prog", override])
        key = override.split("=")[0]
        assert message.startswith(f"error: {key} is not a setting (did you mean "
                                  f"--config.{near}"), message


def test_none_defaulted_model_fields_are_overridable_and_none_still_derives(monkeypatch):
    monkeypatch.chdir(ROOT)
    config = parse("--config.model.n_kv_heads=2", "--config.model.head_dim=32",
                   "--config.model.ffn_dim=512")
    cfg = model_config(config)
    assert (cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim) == (2, 32, 512)
    # unset they are still None in the config, its JSON and model.json, and derived as before
    default = parse()
    assert default.model.n_kv_heads is None and default.model.head_dim is None
    assert json.loads(checkpoint.config_json(default))["model"]["n_kv_heads"] is None
    fields = {**default.model.to_dict(), "n_kv_heads": None, "head_dim": None}
    assert model_config(default) == ModelConfig(**fields)
    assert model_config(default).n_kv_heads == default.model.n_heads
    assert dataclasses.asdict(model_config(default))["head_dim"] == \
        default.model.dim // default.model.n_heads


@pytest.mark.parametrize("text", ["{not json", "{}", '{"skips": [{"batches": [3]}]}',
                                  '{"sessions": [{}]}', '{"sessions": [{"parts": {}}]}'])
def test_damaged_workdir_records_name_the_file_and_what_deleting_it_loses(tmp_path, text):
    for name, read, loses in [("data_skips.json", lambda: spikes.SkipRecord(tmp_path),
                               "forgets the data windows skipped"),
                              ("goodput.json", lambda: goodput.Goodput(tmp_path),
                               "only the time accounting of earlier sessions is lost")]:
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(ValueError) as raised:
            read()
        message = str(raised.value)
        assert len(message.splitlines()) == 1
        assert message.startswith(f"{path} is damaged (") and "delete it" in message, message
        assert loses in message
        assert path.read_text() == text  # left as it was


def test_two_sources_with_one_name_are_refused():
    config = micro_config()
    config.data.sources = [dict(name="code", weight=1.0, builtin="code"),
                           dict(name="code", weight=1.0, builtin="prose")]
    with pytest.raises(ValueError, match=r"^data\.sources has more than one source named "
                                         r"'code': give each its own name=$"):
        ranges.check_sources(config.data)


def truncate_arrays(step_dir):
    """Cuts the biggest file of a step's saved state in half, as a full disk or a broken copy
    would."""
    biggest = max((p for p in (step_dir / "state").rglob("*") if p.is_file()),
                  key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[:biggest.stat().st_size // 2])


def test_a_truncated_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    config = micro_config()
    config.train.update(steps=4, warmup_steps=1, log_every=1, eval_every=100, eval_batches=1)
    config.checkpoint.every_steps = 2
    workdir = tmp_path / "run"
    train(config, workdir)
    truncate_arrays(workdir / "checkpoints" / "4")
    config.train.steps = 6
    summary = train(config, workdir)
    assert summary["first_step"] == 2 and summary["steps"] == 6  # resumed from the good one
    [warning] = [r.getMessage() for r in caplog.records if "skipped the checkpoint" in
                 r.getMessage()]
    assert re.fullmatch(r"skipped the checkpoint at step 4, which cannot be read \(.+\): moved "
                        r"to .*unreadable_checkpoints/4; resuming from step 2", warning), warning
    assert (workdir / "unreadable_checkpoints" / "4" / "state").is_dir()  # kept, not deleted
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()
                  if p.name.isdigit()) == [2, 4, 6]  # step 4 saved again by this run

    # the run is finished (latest checkpoint = train.steps): a rerun says so and compiles nothing
    compiles = []

    def count(event, seconds, **_):
        if "backend_compile" in event:  # XLA compiles (eval_shape's tracing is not one)
            compiles.append(event)
    jax.monitoring.register_event_duration_secs_listener(count)
    caplog.clear()
    try:
        with caplog.at_level(logging.INFO, logger="absl"):
            summary = train(config, workdir)
    finally:
        jax.monitoring.unregister_event_duration_listener(count)
    assert summary["finished"] and summary["steps"] == 6
    assert compiles == [], compiles
    assert [r.getMessage() for r in caplog.records if "finished" in r.getMessage()] == [
        "run already finished at step 6 (train.steps): raise --config.train.steps to train on, "
        "or use a new --workdir"]

    # with every checkpoint damaged: one line, and nothing moved
    for step in (2, 4, 6):
        truncate_arrays(workdir / "checkpoints" / str(step))
    config.train.steps = 8
    with pytest.raises(checkpoint.CheckpointError) as raised:
        train(config, workdir)
    assert len(str(raised.value).splitlines()) == 1
    assert re.search(r"no checkpoint in .*checkpoints can be read \(step 6: .*\): restore "
                     "them from a backup", str(raised.value)), str(raised.value)
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()
                  if p.name.isdigit()) == ["2", "4", "6"]


def test_convert_to_hf_refuses_a_workdir_as_destination(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "metrics.jsonl").write_text('{"step": 1}\n')
    before = sorted(p.name for p in workdir.iterdir())
    done = run_cli("llama_jax.convert", "--to=hf", f"--src={workdir}", f"--dst={workdir}")
    assert_one_error_line(done, rf"^error: --dst={re.escape(str(workdir))} is a training or "
                                r"converted workdir \(it holds metrics\.jsonl\): pass a new")
    assert sorted(p.name for p in workdir.iterdir()) == before


def test_a_short_run_of_the_tiny_config_warms_up_over_a_tenth_of_it(monkeypatch):
    # configs/tiny.py's warmup follows train.steps, so a 20-step try needs no second override;
    # an explicit warmup still wins (and one longer than the run is still refused by validate)
    monkeypatch.chdir(ROOT)
    assert parse().train.warmup_steps == 30
    assert parse("--config.train.steps=20").train.warmup_steps == 2
    assert parse("--config.train.steps=20",
                 "--config.train.warmup_steps=5").train.warmup_steps == 5
