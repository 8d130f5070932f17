"""Compiler flags per accelerator generation, in one table. train_step.build compiles the step
with its platform's profile (jax.jit compiler_options), so a pod run, the benchmark and the AOT
plan (python -m llama_jax.compile) compile the same program; config.xla overrides it.
"""

from llama_jax.metrics import CHIPS

# MaxText's v5p Llama recipes pass ten flags to libtpu (its benchmarks/xla_flags_library.py
# CF_FOR_ALL_GATHER and DATA_PARALLEL_OVERLAP, and the shell recipes' LIBTPU_INIT_ARGS). Each
# was compiled into the tests' micro step (bf16, remat full, 4 loss chunks) with the libtpu
# the [tpu] extra pins (0.0.52), and kept only where the compiled HLO changed:
# - xla_tpu_enable_async_collective_fusion_fuse_all_gather is refused on v4, v5p and v6e
#   ("Continuation fusion for AllGather ... not supported/recommended on platforms other than
#   TPU v5e"); libtpu 0.0.42.1 accepted it and, with xla_enable_async_all_gather, made the
#   weight gathers asynchronous there.
# - xla_enable_async_all_gather makes v4's fsdp weight gathers asynchronous (async / blocking
#   collective runs per step 0/45 -> 30/15; with 0.0.42.1 0/49 -> 34/15).
# - The other eight (xla_tpu_enable_async_collective_fusion, ..._multiple_steps,
#   xla_tpu_overlap_compute_collective_tc, xla_tpu_enable_data_parallel_all_reduce_opt,
#   xla_tpu_data_parallel_opt_different_sized_ops, xla_enable_async_collective_permute,
#   xla_tpu_enable_ag_backward_pipelining, xla_tpu_megacore_fusion_allow_ags=false), all nine
#   together on v5p and v6e, and all of them on v5e (already 20 of 39 runs asynchronous by
#   default) left the compiled module identical, metadata aside. config.xla.flags adds any.
PROFILES = {
    "v4": {"xla_enable_async_all_gather": True},
    "v5e": {},
    "v5p": {},
    "v6e": {},
    # NVIDIA's JAX-Toolbox and JAX's GPU performance tips: the latency-hiding scheduler lets
    # XLA:GPU overlap collectives with compute; the combine thresholds (as in MaxText's GPU
    # scripts: 128 MiB all-gather and all-reduce, 64 MiB reduce-scatter) batch the per-layer
    # fsdp collectives into fewer, larger NCCL calls. Not compiled for a GPU here (this
    # machine has none), so no effect is shown; XLA:CPU checks the names and value types.
    "gpu": {
        "xla_gpu_enable_latency_hiding_scheduler": True,
        "xla_gpu_all_gather_combine_threshold_bytes": 134217728,
        "xla_gpu_reduce_scatter_combine_threshold_bytes": 67108864,
        "xla_gpu_all_reduce_combine_threshold_bytes": 134217728,
    },
}
CHOICES = ("auto", "none", *PROFILES)  # config.xla.profile


def generation(device):
    """The PROFILES key of a device: its TPU generation, "gpu", or None (a CPU)."""
    if device.platform == "gpu":
        return "gpu"
    for name, chip in CHIPS.items():
        if name in PROFILES and any(kind in device.device_kind for kind in chip["kinds"]):
            return name
    return None


def parse_flags(text):
    """'name=value,name=value' -> {name: value}, values as bool, int or float where they read
    as one (compiler_options is typed: 'true' is no bool to it), else the string."""
    flags = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep or not name.startswith("xla_"):
            raise ValueError(f"xla.flags item {item!r} is not xla_NAME=VALUE: write e.g. "
                             "'xla_tpu_enable_async_collective_fusion=false'")
        lowered = value.lower()
        if lowered in ("true", "false"):
            flags[name] = lowered == "true"
            continue
        for kind in (int, float):
            try:
                flags[name] = kind(value)
                break
            except ValueError:
                pass
        else:
            flags[name] = value
    return flags


def compiler_options(xla_config, device):
    """The flags a step compiled for `device` gets: config.xla.profile's ("auto": the device's
    generation, none on a CPU), then config.xla.flags over them."""
    name = xla_config.profile
    if name == "auto":
        name = generation(device)
    options = dict(PROFILES.get(name, {}))  # "none" and CPU: no profile
    options.update(parse_flags(xla_config.flags))
    return options
