"""The LLaMA paper's claim reproduced small: at equal training compute, is a smaller model trained
on more tokens better than a larger one trained on fewer?

  python -m llama_jax.scaling --budget=6e12 --sizes=128x2,192x3,256x4,384x6 --workdir=runs/scaling

Each size DIMxLAYERS (heads of the base config's head dim, Meta's SwiGLU width) trains with
llama_jax.train for the steps that --budget FLOPs buy at ModelConfig.flops_per_token, with warmup
and cosine decay over its own steps, on the base config's data (default configs/tiny.py: the
built-in corpus); all are evaluated on the same validation batches. Writes DIR/scaling.json,
DIR/scaling.md and DIR/scaling.png. Rerunning resumes unfinished sizes and skips finished ones.
"""

import json
import math
import pathlib
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

from llama_jax import cli

DEFAULT_CONFIG = "configs/tiny.py"
DEFAULT_SIZES = ["128x2", "192x3", "256x4", "384x6"]
DEFAULT_BUDGET = 6e12  # FLOPs per size: the default study took 25 min on 2 heavily shared cores
WARMUP_FRACTION = 0.1  # configs/tiny.py warms up over 30 of its 300 steps
EVALS = 4  # evaluations per run after the one at step 0: enough points for a curve


def define_flags():
    """Only when run as a program, like the other entry points' own flags."""
    config_flags.DEFINE_config_file("config", None, "Base config (default configs/tiny.py).",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "Study directory: one run per size, results.")
    flags.DEFINE_float("budget", DEFAULT_BUDGET, "Training FLOPs per model size.")
    flags.DEFINE_list("sizes", DEFAULT_SIZES, "Model sizes as DIMxLAYERS, e.g. 256x4.")


if __name__ == "__main__":  # --help and flag or config errors answer before JAX loads
    define_flags()
    cli.parse_flags()

from llama_jax import plot  # noqa: E402
from llama_jax.config import load_config, model_config  # noqa: E402
from llama_jax.data import tokenizer as tokenizer_lib  # noqa: E402
from llama_jax.metrics import read_metrics  # noqa: E402
from llama_jax.train import train  # noqa: E402




def parse_size(text):
    """'256x4' -> (256, 4)."""
    try:
        dim, layers = (int(x) for x in text.lower().split("x"))
    except ValueError:
        dim = layers = 0
    if dim <= 0 or layers <= 0:
        raise ValueError(f"--sizes entry {text!r} is not DIMxLAYERS with positive integers, "
                         "e.g. 256x4")
    return dim, layers


def size_config(base, size, budget):
    """The base config with the model of `size` and the steps `budget` FLOPs buy."""
    dim, layers = parse_size(size)
    head_dim = base.model.dim // base.model.n_heads  # kept, so sizes differ in width and depth only
    if dim % head_dim:
        raise ValueError(f"--sizes entry {size!r}: dim {dim} does not split into heads of "
                         f"{head_dim}: use a multiple of {head_dim}")
    config = base.copy_and_resolve_references()
    # ffn_dim None = Meta's 8/3 * dim rounding; multiple_of 32 keeps it close to 8/3 at these
    # widths (256 gives configs/tiny.py's 704)
    config.model.update(dim=dim, n_layers=layers, n_heads=dim // head_dim, n_kv_heads=None,
                        ffn_dim=None, multiple_of=32)
    flops_per_token = model_config(config).flops_per_token(config.data.seq_len)
    tokens_per_step = config.data.global_batch_size * config.data.seq_len
    steps = round(budget / (flops_per_token * tokens_per_step))
    if steps < 2:
        raise ValueError(f"--budget={budget:g} buys {steps} steps of size {size} "
                         f"({flops_per_token * tokens_per_step:.3g} FLOPs a step): raise --budget")
    eval_every = math.ceil(steps / EVALS)
    config.train.update(steps=steps, warmup_steps=max(1, round(WARMUP_FRACTION * steps)),
                        eval_every=eval_every, log_every=max(1, steps // 20))
    config.checkpoint.every_steps = eval_every  # an interrupted study loses little
    return config


def check_study(workdir, base, budget):
    """Refuses a workdir holding a study with another budget or base config: its finished sizes
    would be mixed with new ones, and its unfinished ones resumed under another schedule."""
    settings = {"budget": budget, "config": json.loads(base.to_json_best_effort())}
    path = workdir / "study.json"
    if path.exists():
        saved = json.loads(path.read_text())
        if saved != settings:
            raise ValueError(f"{workdir} holds a study with another --budget or config (see "
                             f"{path}): use a new --workdir")
    else:
        path.write_text(json.dumps(settings, indent=1) + "\n")


def run_size(config, size, workdir, tokenizer_path):
    """Trains one size in workdir/size, or reads the result of a finished earlier session."""
    sub = workdir / size
    done = sub / "scaling_run.json"
    if done.exists():
        logging.info("size %s already finished: %s", size, done)
        return json.loads(done.read_text())
    sub.mkdir(parents=True, exist_ok=True)
    if not tokenizer_lib.tokenizer_file(sub).exists():  # one tokenizer: the same eval tokens
        tokenizer_lib.install(tokenizer_path, sub)
    cfg = model_config(config)
    data, tc = config.data, config.train
    logging.info("size %s: %.2fM parameters, %d steps", size, cfg.num_params() / 1e6, tc.steps)
    summary = train(config, sub)
    # from the log, not the summary: a session that resumes a finished run evaluates nothing
    final = [r["eval_loss"] for r in read_metrics(sub)
             if "eval_loss" in r and r["step"] == tc.steps]
    flops_per_token = cfg.flops_per_token(data.seq_len)
    tokens = tc.steps * data.global_batch_size * data.seq_len
    embedding = 2 * cfg.vocab_size * cfg.dim  # input embedding and output projection
    result = {
        "size": size, "dim": cfg.dim, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads,
        "ffn_dim": cfg.ffn_dim, "params": cfg.num_params(),
        "params_non_embedding": cfg.num_params() - embedding,
        "flops_per_token": flops_per_token, "steps": tc.steps, "warmup_steps": tc.warmup_steps,
        "tokens": tokens, "tokens_per_param": tokens / cfg.num_params(),
        "flops": tokens * flops_per_token, "final_eval_loss": final[-1],
        "wall_s": summary["wall_s"]}  # of the session that finished it, if it was resumed
    done.write_text(json.dumps(result, indent=1) + "\n")
    return result


def run_study(base, budget, sizes, workdir):
    """Trains every size (or reuses finished ones); writes scaling.json/.md/.png in workdir."""
    start = time.time()
    workdir = pathlib.Path(workdir)
    plot.pyplot()  # a missing matplotlib fails now, not after the training
    configs = {size: size_config(base, size, budget) for size in sizes}
    workdir.mkdir(parents=True, exist_ok=True)
    check_study(workdir, base, budget)
    tokenizer_path = tokenizer_lib.get_tokenizer(workdir, base.data, base.model.vocab_size).path
    results = [run_size(configs[size], size, workdir, tokenizer_path) for size in sizes]
    results.sort(key=lambda r: r["params"])
    study = {"budget": budget, "seq_len": base.data.seq_len,
             "global_batch_size": base.data.global_batch_size, "lr": base.train.lr,
             "wall_s": time.time() - start, "results": results}
    (workdir / "scaling.json").write_text(json.dumps(study, indent=1) + "\n")
    (workdir / "scaling.md").write_text(markdown(study))
    curves = {r["size"]: plot.curves(workdir / r["size"]) for r in results}
    study_figure(results, curves, budget).savefig(workdir / "scaling.png")
    return study


def markdown(study):
    """The results table, with the settings it depends on."""
    lines = [
        f"Budget {study['budget']:.3g} FLOPs per size (`ModelConfig.flops_per_token`: 6 per "
        f"weight outside the input embedding, plus causal attention); {study['global_batch_size']} x {study['seq_len']}-token "
        f"batches; peak lr {study['lr']:g}, warmup {WARMUP_FRACTION:.0%} of each run's steps, "
        f"cosine to 10%. Wall time of this invocation (sizes finished by an earlier one are "
        f"not retrained) {study['wall_s'] / 60:.1f} min.", "",
        "| size | params (non-embedding) | params (total) | tokens | tokens/param | steps "
        "| FLOPs | final eval loss | wall time |",
        "|---|---|---|---|---|---|---|---|---|"]
    best = min(r["final_eval_loss"] for r in study["results"])
    for r in study["results"]:
        loss = f"{r['final_eval_loss']:.3f}"
        lines.append(
            f"| {r['size']} | {r['params_non_embedding']:,} | {r['params']:,} | {r['tokens']:,} "
            f"| {r['tokens_per_param']:.2f} | {r['steps']} | {r['flops']:.3g} "
            f"| {f'**{loss}**' if r['final_eval_loss'] == best else loss} "
            f"| {r['wall_s']:.0f} s |")
    return "\n".join(lines) + "\n"


def study_figure(results, curves, budget):
    """Left: final eval loss vs parameters at fixed compute; right: loss vs tokens per size."""
    plt = plot.pyplot()
    from matplotlib.ticker import NullLocator
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=100)
    params = [r["params"] for r in results]
    losses = [r["final_eval_loss"] for r in results]
    left.plot(params, losses, marker="o", color="k")
    for r, color in zip(results, (f"C{i % 10}" for i in range(len(results)))):
        left.plot(r["params"], r["final_eval_loss"], marker="o", markersize=9, color=color)
        left.annotate(f"{r['size']}\n{r['tokens'] / 1e6:.2g}M tokens",
                      (r["params"], r["final_eval_loss"]), textcoords="offset points",
                      xytext=(6, 6), fontsize="small")
    left.set_xscale("log")
    # a 10x span has one or two decade ticks: tick the sizes themselves instead
    left.set_xticks(params, [f"{p / 1e6:.3g}M" for p in params])
    left.xaxis.set_minor_locator(NullLocator())
    left.margins(0.15)  # room for the labels of the end points
    left.set_xlabel("parameters (total)")
    left.set_ylabel("final eval loss (nats per token)")
    left.set_title(f"equal compute: {budget:.3g} FLOPs each")
    left.grid(True, which="both", alpha=0.3)
    plot.draw_runs(right, curves)
    right.set_title("loss vs tokens seen")
    fig.tight_layout()
    return fig


def main(argv):
    fl = flags.FLAGS
    if len(argv) > 1 or not fl.workdir:
        raise app.UsageError("usage: python -m llama_jax.scaling --budget=FLOPS "
                             "--sizes=DIMxLAYERS,... --workdir=DIR [--config=configs/tiny.py]")
    try:
        base = fl.config if fl.config is not None else load_config(DEFAULT_CONFIG)
        study = run_study(base, fl.budget, fl.sizes, fl.workdir)
    except (ImportError, ValueError, KeyError, OSError, FloatingPointError) as e:
        sys.exit(f"error: {e}")
    print(markdown(study))


if __name__ == "__main__":
    cli.run(main)
