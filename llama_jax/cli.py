"""The `llama_jax` console command: `llama_jax train --config=... --workdir=...` runs
`python -m llama_jax.train ...`; every subcommand is a module with its own flags."""

import runpy
import sys

COMMANDS = {name: f"llama_jax.{name}" for name in (
    "train", "bench", "tokenizer", "data", "convert", "generate", "evaluate", "compile")}


def main():
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        sys.exit(f"usage: llama_jax {{{','.join(COMMANDS)}}} [flags]; "
                 "e.g. llama_jax train --config=configs/tiny.py --workdir=runs/tiny")
    command = sys.argv.pop(1)
    sys.argv[0] = f"llama_jax {command}"
    runpy.run_module(COMMANDS[command], run_name="__main__", alter_sys=True)
