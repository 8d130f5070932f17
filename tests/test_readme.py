"""The examples of README.md and then docs/usage.md run in order on a fresh clone after
`make train`: every file or directory a command reads is in the repository or made by `make
train` (runs/tiny) or an earlier example, and every flag a `python -m llama_jax.*` example passes is one its `--helpfull`
lists (one cheap subprocess per module: flags are read before JAX loads)."""

import re
import shlex
import subprocess
import sys

from helpers import ROOT
from llama_jax import ranges

# flags naming what a command reads, and (per tool) what it makes
READS = ("config", "src", "tokenizer", "model", "include_path", "workdir")
MAKES = {"llama_jax.train": ("workdir",), "llama_jax.scaling": ("workdir",),
         "llama_jax.convert": ("dst",), "llama_jax.plot": ("out",),
         "llama_jax.data": ("output",), "llama_jax.data.tokenizer": ("output",)}
DOCS = ("README.md", "docs/usage.md")  # read in this order, as a newcomer does
CLUSTER = ("gs://", "/shared/")  # a bucket or a cluster's filesystem: not on this machine


def readme_commands():
    """Each shell command of the README's bash blocks, as tokens (continuation lines joined,
    a quoted argument over several lines kept whole, `&&` and launch/local.py's `--` split)."""
    blocks = [block for doc in DOCS
              for block in re.findall(r"```bash\n(.*?)```", (ROOT / doc).read_text(), re.S)]
    commands = []
    for block in blocks:
        text = ""
        for line in block.splitlines():
            text = f"{text}\n{line}" if text else line
            if text.endswith("\\"):
                continue
            try:
                tokens = shlex.split(text.replace("\\\n", " "), comments=True)
            except ValueError:  # an open quote: the argument goes on
                continue
            text = ""
            command = []
            for token in tokens + ["&&"]:
                if token in ("&&", "--") and command:
                    commands.append(command)
                    command = []
                elif token != "--":
                    command.append(token)
    return commands


def tool_of(command):
    """'llama_jax.train' for `python -m llama_jax.train ...` (any python), 'lm_eval' for the
    console script's lm_eval, else None."""
    while re.match(r"[A-Z_]+=", command[0]):  # HF_DATASETS_OFFLINE=1 llama_jax ...
        command = command[1:]
    if "-m" in command:
        return command[command.index("-m") + 1]
    if command[0].endswith("llama_jax") and len(command) > 1:
        return command[1]
    return None


def flag_values(command):
    """{'config': 'configs/tiny.py', ...} of a command's --name=value flags."""
    return dict(token[2:].split("=", 1) for token in command
                if token.startswith("--") and "=" in token)


def test_readme_examples_read_only_what_exists_or_an_earlier_example_made():
    made = {"runs/tiny"}  # by `make train`
    problems, flags_of = [], {}
    for command in readme_commands():
        line = " ".join(command)
        if any(c in line for c in CLUSTER):
            continue
        scripts = [t for t in command if re.match(r"(launch|bench)/\S+\.(sh|py|sbatch)$", t)]
        problems += [f"{line}: {s} is not in the repository" for s in scripts
                     if not (ROOT / s).is_file()]
        if command[:2] == ["mkdir", "-p"]:
            made.update(command[2:])
            continue
        tool = tool_of(command)
        if tool is None or not tool.startswith(("llama_jax", "lm_eval")):
            continue
        values = flag_values(command)
        if tool == "lm_eval":  # --model_args workdir=DIR; the harness's own flags
            values = {"workdir": command[command.index("--model_args") + 1].split("=")[1],
                      "include_path": command[command.index("--include_path") + 1]}
        outputs = MAKES.get(tool, ())
        for name in READS:
            if name in values and name not in outputs:
                path = values[name].split(":")[0]  # configs/tiny_store.py:raw
                if not ((ROOT / path).exists() or any(
                        path == m or path.startswith(m + "/") for m in made)):
                    problems.append(f"{line}: --{name}={values[name]} neither exists nor is "
                                    "made by an earlier example")
        made.update(values[name] for name in outputs if name in values)
        if tool.startswith("llama_jax"):
            flags_of.setdefault(tool, set()).update(
                t[2:].split("=")[0] for t in command if t.startswith("--"))
    assert problems == []

    # every flag of every example exists (the overrides: a key of the config table)
    for tool, used in flags_of.items():
        done = subprocess.run([sys.executable, "-m", tool, "--helpfull"], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        known = set(re.findall(r"--(?:\[no\])?(\w+):", done.stdout))
        unknown = {f for f in used if not f.startswith("config.") and f not in known}
        unknown |= {f for f in used if f.startswith("config.") and f[7:] not in ranges.CONFIG}
        assert unknown == set(), (tool, unknown)
