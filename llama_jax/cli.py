"""The `llama_jax` console command: `llama_jax train --config=... --workdir=...` runs
`python -m llama_jax.train ...`; every subcommand is a module with its own flags, except
`llama_jax lm_eval ...`, which is lm-eval's own command line with our model registered."""

import runpy
import sys

COMMANDS = {name: f"llama_jax.{name}" for name in (
    "train", "bench", "data", "convert", "generate", "evaluate", "plot", "scaling", "compile")}
COMMANDS["tokenizer"] = "llama_jax.data.tokenizer"


def lm_eval():
    """lm-eval 0.4.13 has no plugin hook for outside models (its registry lazy-imports only
    lm_eval.models), so importing the adapter here is what makes `--model llama_jax` resolve;
    every other lm-eval flag passes through unchanged."""
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        sys.exit("error: lm-eval is not installed: pip install lm-eval==0.4.13 "
                 "(or pip install -e .[lm_eval])")
    from llama_jax import lm_eval_adapter  # noqa: F401  registers the model "llama_jax"
    try:
        cli_evaluate()
    except (ValueError, KeyError, OSError) as e:
        # a bad --model_args (no workdir, a missing checkpoint) is one line, not a traceback
        sys.exit(f"error: {e}")


def main():
    names = [*COMMANDS, "lm_eval"]
    if len(sys.argv) < 2 or sys.argv[1] not in names:
        sys.exit(f"usage: llama_jax {{{','.join(names)}}} [flags]; "
                 "e.g. llama_jax train --config=configs/tiny.py --workdir=runs/tiny")
    command = sys.argv.pop(1)
    sys.argv[0] = f"llama_jax {command}"
    if command == "lm_eval":
        lm_eval()
    else:
        runpy.run_module(COMMANDS[command], run_name="__main__", alter_sys=True)
