"""What llama_jax.plot decides: which curves come from a workdir's metrics.jsonl, their labels,
the loss axis' scale, and the one-line errors; matplotlib's drawing itself is not under test."""

import json
import struct
import subprocess
import sys

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


def test_curves_put_eval_losses_at_the_tokens_of_their_step(tmp_path):
    # an eval record carries only its step; the train records say 4096 tokens a step
    write_run(tmp_path / "run", [10, 20], [5.5, 4.2], [0, 20], [8.3, 4.3], tokens_per_step=4096)
    assert plot.curves(tmp_path / "run") == {"train": ([40960, 81920], [5.5, 4.2]),
                                             "eval": ([0, 81920], [8.3, 4.3])}


def test_each_run_gets_a_colour_a_train_curve_and_an_eval_curve_if_it_has_evals():
    runs = {"a": {"train": ([1, 2], [5.0, 4.0]), "eval": ([2], [4.5])},
            "b": {"train": ([1, 2], [5.1, 4.1]), "eval": ([], [])}}
    assert plot.series(runs) == [("a train", [1, 2], [5.0, 4.0], "train", 0),
                                 ("a eval", [2], [4.5], "eval", 0),
                                 ("b train", [1, 2], [5.1, 4.1], "train", 1)]


def test_labels_are_directory_names_unless_two_collide(tmp_path):
    assert plot.labels([tmp_path / "small", tmp_path / "large"]) == ["small", "large"]
    a, b, c = tmp_path / "a" / "run", tmp_path / "b" / "run", tmp_path / "c"
    assert plot.labels([a, b, c]) == [str(a), str(b), "c"]


@pytest.mark.parametrize("losses, scale", [
    ([8.3, 6.0, 4.0], "log"),  # the step-0 loss is more than 1.5x the last: log keeps both
    ([4.3, 4.0], "linear"),  # a narrow range: log would only waste the ticks
    ([6.0, 4.0], "linear"),  # exactly 1.5x is still narrow
])
def test_loss_axis_is_log_only_over_a_wide_range(losses, scale):
    assert plot.y_scale(losses) == scale


def test_the_figure_draws_those_decisions(tmp_path):
    write_run(tmp_path / "small", [10, 20, 30], [6.0, 4.5, 4.0], [0, 30], [8.3, 4.1])
    write_run(tmp_path / "large", [10, 20], [5.5, 4.2], [], [])
    workdirs = [tmp_path / "small", tmp_path / "large"]
    ax = plot.loss_figure(workdirs).axes[0]
    drawn = [(line.get_label(), list(line.get_xdata()), list(line.get_ydata()))
             for line in ax.get_lines()]
    runs = {label: plot.curves(w) for label, w in zip(plot.labels(workdirs), workdirs)}
    assert drawn == [(label, x, y) for label, x, y, _, _ in plot.series(runs)]
    assert ax.get_yscale() == "log"
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("tokens seen", "loss (nats per token)")


def png_size(path):
    """(width, height) from a PNG's IHDR chunk."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_command_writes_the_png_and_errors_are_one_line(tmp_path, monkeypatch):
    write_run(tmp_path / "run", [10, 20], [5.0, 4.0], [20], [4.1])
    out = tmp_path / "loss.png"
    done = subprocess.run(
        [sys.executable, "-m", "llama_jax.plot", f"--workdir={tmp_path / 'run'}", f"--out={out}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == f"wrote {out}"
    assert png_size(out) == (800, 500)  # 8 x 5 inches at 100 dpi

    bad = subprocess.run([sys.executable, "-m", "llama_jax.plot", f"--workdir={tmp_path}",
                          f"--out={tmp_path / 'x.png'}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0
    assert bad.stderr.strip().splitlines()[-1] == (
        f"error: --workdir='{tmp_path}' is outside its range a directory holding metrics.jsonl: "
        "pass the workdir of a llama_jax.train run (repeat for several)")
    assert not (tmp_path / "x.png").exists()

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    with pytest.raises(ImportError, match=r"pip install -r requirements\.txt"):
        plot.loss_figure([tmp_path / "run"])
