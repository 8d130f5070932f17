"""Ahead-of-time compile plan:
  python -m llama_jax.compile --config=configs/llama_7b.py --topology=v5p:2x2x1

Compiles the real sharded train step for a TPU slice on this (CPU) machine through libtpu's
compile-only devices, and prints one JSON line: per-device memory from XLA, whether it fits the
chip's HBM, the analytic FLOPs per step and a roofline step time.
"""

import importlib.util
import json
import os
import sys
import time

# the TPU is only a compile target: never let JAX probe for a local accelerator
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from llama_jax import sharding, train_step  # noqa: E402
from llama_jax.metrics import CHIPS, GIB  # noqa: E402


TPUS = [name for name in CHIPS if name.startswith("v")]
INSTALL = "pip install 'llama_jax[tpu]' (or: pip install 'jax[tpu]==0.10.2')"


def topology_devices(topology):
    """'v5p:2x2x1' -> (generation, compile-only devices, one per chip)."""
    generation, _, chips = topology.partition(":")
    if generation not in TPUS or not chips:
        raise ValueError(f"--topology={topology!r} is not GENERATION:CHIPS with GENERATION one of "
                         f"{TPUS}, e.g. v5p:2x2x1 or v5e:4x4")
    if importlib.util.find_spec("libtpu") is None:
        raise ValueError(f"compiling for a TPU topology needs libtpu, which is not installed: "
                         f"{INSTALL}")
    # another process (or a TPU runtime) may hold libtpu's lock file; compile-only use is safe
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    # v4 shows each chip's two TensorCores as one device only in megacore mode, as a v4 VM does
    kwargs = {"chip_config_name": "megacore"} if generation == "v4" else {}
    try:
        topo = topologies.get_topology_desc(topology_name=topology, platform="tpu", **kwargs)
    except jax.errors.JaxRuntimeError as e:
        first_line = (str(e).splitlines() or [""])[0][:200]
        raise ValueError(f"libtpu does not know topology {topology!r} ({first_line}): use the "
                         "chip grid of a real slice, e.g. v5p:2x2x1, v4:4x4x4, v5e:16x16") from e
    return generation, topo.devices


def compile_plan(config, topology):
    generation, devices = topology_devices(topology)
    chip = CHIPS[generation]
    # the same jitted step train.py runs, lowered on abstract arrays: nothing is allocated
    step = train_step.build(config, sharding.make_mesh(config.mesh, devices))
    cfg, seq_len, batch_size = step.cfg, config.data.seq_len, config.data.global_batch_size
    # analytic count: XLA's cost_analysis counts a scanned layer body once, not n_layers times
    flops_per_step = cfg.flops_per_token(seq_len) * batch_size * seq_len
    roofline_s = flops_per_step / (len(devices) * chip["peak"])
    plan = {
        "topology": topology, "devices": len(devices), "device_kind": devices[0].device_kind,
        "mesh": dict(step.mesh.shape), "sharding_rules": config.sharding_rules,
        "remat": cfg.remat, "loss_chunk_size": config.train.loss_chunk_size,
        "attention": cfg.attention,
        "params": cfg.num_params(), "global_batch_size": batch_size, "seq_len": seq_len,
        "hbm_gib": chip["hbm"] / GIB, "flops_per_step": flops_per_step,
        "roofline_step_s": float(f"{roofline_s:.4g}"),
        "roofline_tokens_per_sec_per_chip": round(batch_size * seq_len / roofline_s / len(devices)),
    }
    start = time.perf_counter()
    try:
        compiled = step.train_step.lower(step.abstract, step.abstract_batch()).compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        # the TPU compiler itself refuses a program whose temporaries cannot fit in HBM
        return {**plan, "fits": False, "compile_s": round(time.perf_counter() - start, 1),
                "compiler_error": str(e).splitlines()[0][:300]}
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    sizes = {name: int(getattr(memory, f"{name}_size_in_bytes")) for name in (
        "argument", "output", "alias", "temp", "generated_code")}
    # the state is donated, so outputs that alias arguments take no extra memory
    total = (sizes["argument"] + sizes["output"] - sizes["alias"] + sizes["temp"]
             + sizes["generated_code"])
    return {**plan, "bytes_per_device": sizes, "total_bytes_per_device": total,
            "total_gib_per_device": round(total / GIB, 2), "fits": total <= chip["hbm"],
            "compile_s": round(compile_s, 1)}


def define_flags():
    """Defined only when run as a program, so tests can import every entry point at once."""
    config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.",
                                    lock_config=True)
    flags.DEFINE_string("topology", None, "GENERATION:CHIPS, e.g. v5p:2x2x1, v4:4x4x4, v5e:16x16.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if flags.FLAGS.config is None or flags.FLAGS.topology is None:
        raise app.UsageError("--config and --topology are both required, e.g. "
                             "--config=configs/llama_7b.py --topology=v5p:2x2x1")
    try:
        print(json.dumps(compile_plan(flags.FLAGS.config, flags.FLAGS.topology)))
    except (ValueError, KeyError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
