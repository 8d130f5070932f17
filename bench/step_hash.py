"""Hashes of the compiled train step, to show that a refactor leaves the program unchanged.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu python bench/step_hash.py [DIR]

Prints one line per case: the sha256 of `jit(...).lower(...).compile().as_text()` with the
parts that name source files or modules stripped (canonical), so moving a function between
files keeps the hash while any change to what is computed does not. With DIR, each case's
canonical text is written there too, for a diff.
"""

import hashlib
import pathlib
import re
import sys

import jax

from llama_jax import sharding, train_step
from llama_jax.config import load_config

sys.path.insert(0, "tests")
from helpers import micro_config  # noqa: E402


def cases():
    bench = load_config("configs/cpu_bench.py")
    yield "a cpu_bench, 1 device", bench, jax.devices()[:1]
    tp = micro_config()
    tp.mesh.update(fsdp=2, tensor=2)
    tp.sharding_rules = "fsdp_tp"
    tp.train.microbatches = 2
    yield "b fsdp_tp 2x2, microbatches 2", tp, jax.devices()[:4]
    slices = micro_config()
    slices.mesh.update(slices=2, fsdp=4)
    yield "c 2 slices x fsdp 4", slices, jax.devices()[:8]
    full = micro_config(remat="full")
    full.mesh.update(fsdp=4)
    full.train.microbatches = 2
    yield "d remat full, fsdp 4, microbatches 2", full, jax.devices()[:4]
    evaluate = micro_config()
    evaluate.mesh.update(slices=2, fsdp=2)
    evaluate.train.microbatches = 2
    yield "e eval step, 2 slices x fsdp 2, microbatches 2", evaluate, jax.devices()[:4]


def canonical(text):
    """The HLO without what names the Python source: op metadata, the module name, and the
    stack-frame tables (FileNames ... StackFrames) between the module line and the first
    computation; instruction numbers are renumbered in order of appearance, since an op traced
    and then simplified away (a no-op reshape, a constant) shifts every later one."""
    text = re.sub(r", metadata=\{[^}]*\}", "", text)
    head, _, rest = text.partition("\n")
    head = re.sub(r"^HloModule \S+", "HloModule m", head)
    body = re.search(r"^(%|ENTRY )", rest, flags=re.M)
    names = {}

    def renumbered(match):  # param_2.45 -> param_.7: the 7th numbered name met
        name = match.group(0)
        if not re.search(r"\.\d", name):
            return name
        return names.setdefault(name, re.sub(r"[.\d]+$", "", name) + f".{len(names)}")
    # names start with a letter (or %), so numbers such as 0.015625 are left alone
    rest = re.sub(r"%?\b[A-Za-z_][\w-]*(?:\.[\w-]+)*", renumbered, rest[body.start():])
    return head + "\n" + rest


def main(dump=None):
    """dump: a directory to write each case's canonical text into, to diff two trees."""
    for name, config, devices in cases():
        step = train_step.build(config, sharding.make_mesh(config.mesh, devices))
        if name.startswith("e"):
            lowered = step.eval_step.lower(step.abstract.params, step.abstract_batch())
        else:
            lowered = step.train_step.lower(step.abstract, step.abstract_batch())
        text = canonical(lowered.compile().as_text())
        print(f"{hashlib.sha256(text.encode()).hexdigest()[:16]}  {name}", flush=True)
        if dump:
            pathlib.Path(dump, name.split()[0] + ".hlo").write_text(text)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
