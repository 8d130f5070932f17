import json
import subprocess
import sys

import numpy as np
import pytest

from helpers import ROOT
from llama_jax import plot


def write_run(workdir, steps, losses, eval_steps, eval_losses, tokens_per_step=2048):
    workdir.mkdir(parents=True)
    records = [{"step": s, "loss": l, "tokens_seen": s * tokens_per_step}
               for s, l in zip(steps, losses)]
    records += [{"step": s, "eval_loss": l} for s, l in zip(eval_steps, eval_losses)]
    records.sort(key=lambda r: r["step"])
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_two_runs_on_one_figure(tmp_path):
    write_run(tmp_path / "small", [10, 20, 30], [6.0, 4.5, 4.0], [0, 30], [8.3, 4.1])
    write_run(tmp_path / "large", [10, 20], [5.5, 4.2], [0, 20], [8.3, 4.3], tokens_per_step=4096)
    fig = plot.loss_figure([tmp_path / "small", tmp_path / "large"])
    lines = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
             for line in fig.axes[0].get_lines()}
    assert lines == {
        "small train": ([20480, 40960, 61440], [6.0, 4.5, 4.0]),
        "small eval": ([0, 61440], [8.3, 4.1]),
        "large train": ([40960, 81920], [5.5, 4.2]),
        "large eval": ([0, 81920], [8.3, 4.3])}
    assert fig.axes[0].get_yscale() == "log"  # 8.3 / 4.0 is a wide range

    out = tmp_path / "loss.png"
    done = subprocess.run(
        [sys.executable, "-m", "llama_jax.plot", f"--workdir={tmp_path / 'small'}",
         f"--workdir={tmp_path / 'large'}", f"--out={out}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    image = plot.pyplot().imread(out)  # [H, W, RGBA] floats in [0, 1]
    assert image.shape[:2] == (500, 800)
    ink = (image[..., :3] < 0.9).any(axis=-1)  # not white: axes, text and the curves
    assert 0.02 < ink.mean() < 0.5 and image[..., :3].std() > 0.05
    # a pure colour of each run's curve appears (C0 blue, C1 orange)
    for rgb in ((0x1f, 0x77, 0xb4), (0xff, 0x7f, 0x0e)):
        close = np.abs(image[..., :3] - np.array(rgb) / 255).max(axis=-1) < 0.02
        assert close.sum() > 100


def test_narrow_range_stays_linear_and_same_names_get_paths(tmp_path):
    write_run(tmp_path / "a" / "run", [10, 20], [4.2, 4.0], [20], [4.1])
    write_run(tmp_path / "b" / "run", [10, 20], [4.3, 4.1], [], [])
    fig = plot.loss_figure([tmp_path / "a" / "run", tmp_path / "b" / "run"])
    ax = fig.axes[0]
    assert ax.get_yscale() == "linear"
    assert [line.get_label() for line in ax.get_lines()] == [
        f"{tmp_path / 'a' / 'run'} train", f"{tmp_path / 'a' / 'run'} eval",
        f"{tmp_path / 'b' / 'run'} train"]


def test_errors_are_one_line(tmp_path, monkeypatch):
    bad = subprocess.run([sys.executable, "-m", "llama_jax.plot", f"--workdir={tmp_path}",
                          f"--out={tmp_path / 'x.png'}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0
    assert bad.stderr.strip().splitlines()[-1] == (
        f"error: --workdir={tmp_path} has no metrics.jsonl: pass the workdir of a "
        "llama_jax.train run")
    assert not (tmp_path / "x.png").exists()

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    write_run(tmp_path / "run", [10], [4.0], [], [])
    with pytest.raises(ImportError, match=r"pip install 'llama_jax\[plot\]'"):
        plot.loss_figure([tmp_path / "run"])
