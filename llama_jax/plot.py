"""Loss curves after a run: train and eval loss against tokens seen, one or several runs on one
figure, read from each workdir's metrics.jsonl; with --goodput, where each run's wall time went
(goodput.json), as one stacked bar per run.

  python -m llama_jax.plot --workdir=runs/a --workdir=runs/b --out=loss.png
  python -m llama_jax.plot --goodput --workdir=runs/a --out=goodput.png

matplotlib comes with the package (requirements.txt pins it).
"""

import pathlib
import sys

from absl import app, flags

from llama_jax import cli


def define_flags():
    """Only when run as a program: llama_jax.scaling imports this module beside train's flags."""
    flags.DEFINE_multi_string("workdir", None, "A training workdir (repeat for several runs).")
    flags.DEFINE_string("out", "loss.png", "The PNG to write.")
    flags.DEFINE_bool("goodput", False, "Plot each run's wall time by part instead of its loss.")


if __name__ == "__main__":  # --help and flag or config errors answer before JAX loads
    define_flags()
    cli.parse_flags()

from llama_jax import goodput, ranges  # noqa: E402
from llama_jax.metrics import read_metrics  # noqa: E402


INSTALL_HINT = "pip install -r requirements.txt (or: pip install matplotlib==3.11.2)"


def pyplot():
    """matplotlib.pyplot on the Agg backend: files only, so no display is ever needed."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError(f"plotting needs matplotlib, which is not installed: {INSTALL_HINT}")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def curves(workdir):
    """{"train": (tokens, losses), "eval": (tokens, losses)} from a workdir's metrics.jsonl."""
    path = pathlib.Path(workdir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"--workdir={workdir} has no metrics.jsonl: pass the workdir of "
                                "a llama_jax.train run")
    records = read_metrics(workdir)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    if not train:
        raise ValueError(f"{path} has no train loss yet: plot again after the first "
                         "train.log_every steps")
    # eval records carry only the step; every train record knows the tokens of one step
    tokens_per_step = train[0]["tokens_seen"] / train[0]["step"]
    return {"train": ([r["tokens_seen"] for r in train], [r["loss"] for r in train]),
            "eval": ([r["step"] * tokens_per_step for r in evals],
                     [r["eval_loss"] for r in evals])}


def labels(workdirs):
    """Each run's directory name, or the path as given where two names collide."""
    names = [pathlib.Path(w).name for w in workdirs]
    return [name if names.count(name) == 1 else str(w) for name, w in zip(names, workdirs)]


# the first losses (about ln V) dwarf the later ones: over a wider span than this factor a log
# axis keeps the late part readable; over a narrow range it would only waste the ticks
LOG_SCALE_SPAN = 1.5


def y_scale(losses):
    """"log" or "linear" for a loss axis holding these values."""
    return "log" if max(losses) / min(losses) > LOG_SCALE_SPAN else "linear"


def series(runs):
    """What draw_runs draws, in order: (label, tokens, losses, kind, colour index) with kind
    "train" for every run and "eval" for each run that has evaluations."""
    out = []
    for index, (label, run) in enumerate(runs.items()):
        out.append((f"{label} train", *run["train"], "train", index % 10))
        if run["eval"][0]:
            out.append((f"{label} eval", *run["eval"], "eval", index % 10))
    return out


def draw_runs(ax, runs):
    """Draws {label: curves} on ax: one colour per run, train thin, eval with markers."""
    from matplotlib.ticker import EngFormatter
    style = {"train": dict(linewidth=1, alpha=0.6),
             "eval": dict(linewidth=2, marker="o", markersize=4)}
    drawn = series(runs)
    for label, tokens, losses, kind, colour in drawn:
        ax.plot(tokens, losses, color=f"C{colour}", label=label, **style[kind])
    if y_scale([y for _, _, losses, _, _ in drawn for y in losses]) == "log":
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter("{x:g}")
        ax.yaxis.set_minor_formatter("{x:g}")
    ax.xaxis.set_major_formatter(EngFormatter())  # 1.2M rather than an offset like 1e6
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("loss (nats per token)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")


def loss_figure(workdirs):
    """The figure for `python -m llama_jax.plot`; returns the matplotlib Figure."""
    runs = {label: curves(w) for label, w in zip(labels(workdirs), workdirs)}
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    draw_runs(ax, runs)
    ax.set_title("loss vs tokens seen")
    fig.tight_layout()
    return fig


def goodput_figure(workdirs):
    """One horizontal bar per run: its wall time over all sessions, split into the parts."""
    runs = [goodput.read(w) for w in workdirs]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 2.2 + 0.6 * len(runs)), dpi=100)
    names = labels(workdirs)
    lefts = [0.0] * len(runs)
    for index, part in enumerate(goodput.PARTS + ("unaccounted",)):
        widths = [max(run[part + "_s"], 0.0) for run in runs]  # a rounding -0.1 s draws nothing
        ax.barh(names, widths, left=lefts, color=f"C{index}", label=part.replace("_", " "))
        lefts = [left + width for left, width in zip(lefts, widths)]
    ax.set_xlabel("wall time (s), all sessions")
    ax.set_title("goodput: " + ", ".join(f"{n} {100 * r['goodput']:.0f}%"
                                         for n, r in zip(names, runs)))
    ax.legend(fontsize="small", ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.3))
    fig.tight_layout()
    return fig


def main(argv):
    if len(argv) > 1 or not flags.FLAGS.workdir:
        raise app.UsageError("usage: python -m llama_jax.plot --workdir=DIR [--workdir=DIR2 ...] "
                             "--out=loss.png [--goodput]")
    try:
        for workdir in flags.FLAGS.workdir:
            ranges.check_flags("plot", {"workdir": workdir})
        ranges.check_flags("plot", {"out": flags.FLAGS.out})
        figure = goodput_figure if flags.FLAGS.goodput else loss_figure
        fig = figure(flags.FLAGS.workdir)
        fig.savefig(flags.FLAGS.out)
    except (ImportError, ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {flags.FLAGS.out}")


if __name__ == "__main__":
    cli.run(main)
