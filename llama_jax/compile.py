"""Ahead-of-time compile plan:
  python -m llama_jax.compile --config=configs/llama_7b.py --topology=v5p:2x2x1
  python -m llama_jax.compile --plan --config=configs/llama_7b.py --topology=v5p:2x2x1
  python -m llama_jax.compile --config=configs/llama_65b.py --topology=v5p:4x4x2 --slices=2

Compiles the real sharded train step for a TPU slice on this (CPU) machine through libtpu's
compile-only devices, and prints one JSON line: per-device memory from XLA, whether it fits the
chip's HBM, the analytic FLOPs per step, a roofline step time, and the bytes each collective
moves (read from the compiled HLO) beside the FSDP minimum (and, with mesh.context > 1, the
key/value gathers' minimum). --slices=N compiles for N such
slices joined by the data-center network (DCN) and reports the bytes that cross it apart, with
the step time they imply at --dcn_gbps per host. --plan compiles a grid of (microbatch size,
remat) candidates and prints a table and the best fitting one's overrides.
"""

import copy
import importlib.util
import json
import os
import sys
import tempfile
import time

# the TPU is only a compile target: never let JAX probe for a local accelerator
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import app, flags, logging
from ml_collections import config_flags

from llama_jax import cli

# Gb/s of data-center network per TPU VM host assumed by the DCN step-time bound (--dcn_gbps);
# TPU VM hosts have 100-200 Gb/s
DCN_GBPS = 100
PLAN_SIZES = (1, 2, 4, 8, 16)  # sequences per chip per microbatch
PLAN_REMAT = ("full", "minimal", "dots_saveable", "none")  # least memory first


def define_flags():
    """Defined only when run as a program, so tests can import every entry point at once."""
    config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.",
                                    lock_config=True)
    flags.DEFINE_string("topology", None, "GENERATION:CHIPS, e.g. v5p:2x2x1, v4:4x4x4, v5e:16x16.")
    flags.DEFINE_bool("plan", False, "Compile every (sequences per chip per microbatch, remat) "
                      "candidate and print a table and the best fitting choice's overrides.")
    flags.DEFINE_list("plan_sizes", [str(s) for s in PLAN_SIZES],
                      "--plan: sequences per chip per microbatch to try.")
    flags.DEFINE_list("plan_remat", list(PLAN_REMAT), "--plan: remat policies to try.")
    flags.DEFINE_list("plan_context", [], "--plan: context sizes (mesh.context) to try, e.g. "
                      "1,2,4,8; empty: the config's.")
    flags.DEFINE_float("headroom", 0.1, "--plan: fraction of HBM a fitting candidate leaves free.")
    flags.DEFINE_float("dcn_gbps", DCN_GBPS, "Data-center network Gb/s per TPU host, for the "
                       "step time the DCN bytes imply.")


if __name__ == "__main__":  # --help answers before JAX loads
    define_flags()
    cli.answer_help()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import topologies  # noqa: E402

from llama_jax import quiet, ranges, sharding, train_step  # noqa: E402
from llama_jax.config import model_config  # noqa: E402
from llama_jax.hlo import collective_bytes  # noqa: E402
from llama_jax.metrics import CHIPS, GIB  # noqa: E402
from llama_jax.model import DTYPES  # noqa: E402

if __name__ == "__main__":
    # named after the mesh axis it sets, which only sharding.py spells: defined (and the flags
    # parsed) once it is imported; the docstring above documents it for --help
    flags.DEFINE_integer(sharding.SLICES, None, "Compile for this many slices of --topology "
                         "joined by the data-center network (sets config.mesh.slices).")
    cli.parse_flags()


TPUS = [name for name in CHIPS if name.startswith("v")]
INSTALL = "pip install 'llama_jax[tpu]' (or: pip install jaxlib==0.10.2 libtpu==0.0.52)"


def topology_devices(topology, slices=1):
    """'v5p:2x2x1' -> (generation, compile-only devices, one per chip of `slices` such slices)."""
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
    if slices > 1:  # the devices then carry their slice_index, as on a multi-slice job
        kwargs["num_slices"] = slices
    try:
        with quiet.native_notices_filtered():  # libtpu probing for a TPU this host lacks
            topo = topologies.get_topology_desc(topology_name=topology, platform="tpu",
                                                **kwargs)
    except jax.errors.JaxRuntimeError as e:
        first_line = (str(e).splitlines() or [""])[0][:200]
        raise ValueError(f"libtpu does not know topology {topology!r} ({first_line}): use the "
                         "chip grid of a real slice, e.g. v5p:2x2x1, v4:4x4x4, v5e:16x16") from e
    return generation, topo.devices


def compile_with_text(lowered, options):
    """(compiled, its optimized HLO text) of a lowered step compiled with `options`. The text is
    the one the compiler dumps: compiled.as_text() makes jaxlib parse the compiler's HLO proto
    again, which jax 0.10.2 refuses for libtpu 0.0.52's 7B step ("async-update instruction
    should have 1 operands but sees 3")."""
    with tempfile.TemporaryDirectory() as dump:
        compiled = lowered.compile(compiler_options={
            **options, "xla_dump_to": dump, "xla_dump_hlo_as_text": True})
        texts = [name for name in os.listdir(dump) if name.endswith(".after_optimizations.txt")]
        if len(texts) != 1:
            raise ValueError(f"the compiler dumped {len(texts)} optimized HLO modules, not 1")
        with open(os.path.join(dump, texts[0])) as f:
            return compiled, f.read()


def compile_plan(config, topology, dcn_gbps=DCN_GBPS):
    """The plan's JSON-able dict for one config on one topology (see the module docstring)."""
    ranges.check_config(config)
    return _compile_on(config, topology, *topology_devices(topology, config.mesh[sharding.SLICES]),
                       dcn_gbps=dcn_gbps)


def _compile_on(config, topology, generation, devices, dcn_gbps=DCN_GBPS):
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
        "remat": cfg.remat, "microbatches": config.train.microbatches,
        "loss_chunk_size": config.train.loss_chunk_size,
        "attention": cfg.attention,
        "xla_flags": step.compiler_options,  # the chips' profile (xla_flags.py) and overrides
        "params": cfg.num_params(), "global_batch_size": batch_size, "seq_len": seq_len,
        "hbm_gib": chip["hbm"] / GIB, "flops_per_step": flops_per_step,
        "roofline_step_s": float(f"{roofline_s:.4g}"),
        "roofline_tokens_per_sec_per_chip": round(batch_size * seq_len / roofline_s / len(devices)),
    }
    start = time.perf_counter()
    try:
        compiled, hlo_text = compile_with_text(
            step.train_step.lower(step.abstract, step.abstract_batch()), step.compiler_options)
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        # the TPU compiler itself refuses a program whose temporaries cannot fit in HBM
        return {**plan, "fits": False, "compile_s": round(time.perf_counter() - start, 1),
                "compiler_error": str(e).splitlines()[0][:300]}
    compile_s = time.perf_counter() - start
    slices = step.plan.slices
    measured = collective_bytes(hlo_text,
                                len(devices) // slices if slices > 1 else None)
    minimum = fsdp_minimum_bytes(cfg, dict(step.mesh.shape), config.train.microbatches)
    context = context_minimum_bytes(cfg, dict(step.mesh.shape), batch_size, seq_len)
    least = minimum["total_bytes"] + context["total_bytes"]
    memory = compiled.memory_analysis()
    sizes = {name: int(getattr(memory, f"{name}_size_in_bytes")) for name in (
        "argument", "output", "alias", "temp", "generated_code")}
    # the state is donated, so outputs that alias arguments take no extra memory
    total = (sizes["argument"] + sizes["output"] - sizes["alias"] + sizes["temp"]
             + sizes["generated_code"])
    return {**plan, "bytes_per_device": sizes, "total_bytes_per_device": total,
            "total_gib_per_device": round(total / GIB, 2), "fits": total <= chip["hbm"],
            "collective_bytes_per_device": measured, "fsdp_minimum_bytes_per_device": minimum,
            "context_minimum_bytes_per_device": context,
            # measured over the least both need (the fsdp minimum alone without context)
            "collective_ratio_to_minimum": round(measured["total_bytes"] / least, 3) if least
            else None,
            **(dcn_report(measured, minimum, chip, dcn_gbps, roofline_s) if slices > 1 else {}),
            "compile_s": round(compile_s, 1)}


def dcn_report(measured, minimum, chip, dcn_gbps, roofline_s):
    """What crosses the data-center network per step: the bytes per chip apart from ICI, per
    host (its chips share the host's link), and the step time that alone would take at
    dcn_gbps, the lower bound it puts on a step (beside the compute roofline's)."""
    dcn = measured["dcn_total_bytes"]
    per_host = dcn * chip["chips_per_host"]
    bound_s = per_host * 8 / (dcn_gbps * 1e9)
    return {"ici_bytes_per_device": measured["total_bytes"] - dcn,
            "dcn_bytes_per_device": dcn, "dcn_minimum_bytes_per_device": minimum["dcn_bytes"],
            "dcn_bytes_per_host": per_host, "dcn_gbps_per_host": dcn_gbps,
            "dcn_bound_step_s": float(f"{bound_s:.4g}"),
            "dcn_bound": bound_s > roofline_s}


def fsdp_minimum_bytes(cfg, mesh_shape, microbatches=1):
    """The least a ZeRO-3 (fsdp) step must move per device, in collective_bytes' units, for
    the N parameters split n = mesh fsdp ways (and mesh tensor ways, whose own activation
    traffic this leaves out), all in the compute dtype, with d = slices x data replicas:

      all-gather      N (n-1)/n per microbatch in the forward, and again in the backward unless
                      remat is "none" (then the gathered weights are kept for it)
      reduce-scatter  N (n-1)/n per microbatch: the gradients; only their shard is accumulated
      all-reduce      2 (N/n) (d-1)/d: the gradient shards summed over the d data replicas

    Gradients count in the compute dtype, not the parameters' float32: each weight is cast
    before its matmul, so its gradient arrives in the compute dtype and is summed there (libtpu
    reduce-scatters 7B's gradients in bfloat16, then converts the shard).

    Of these only a gradient sum over the s slices need cross the data-center network:
    "dcn_bytes" = 2 (4 N/(n data)) (s-1)/s, each device's part of its shard once the data
    replicas within its slice have split it, in float32: each slice accumulates its gradient
    in float32 (parallel.by_slice) and the slices sum that (0 for one slice).
    """
    # the parameters' splits (fsdp: the model dim, tensor: heads and ffn) and the batch axes
    # that only replicate them (slices, data), read from the mesh table
    fsdp = sharding.size_of(mesh_shape, sharding.weight_axes("embed"))
    params = cfg.num_params() / sharding.size_of(mesh_shape, sharding.weight_axes("heads"))
    replicas = sharding.size_of(mesh_shape, [a for a in sharding.BATCH
                                             if a not in sharding.weight_axes("embed")])
    slices = sharding.size_of(mesh_shape, sharding.DCN)
    size = jnp.dtype(DTYPES[cfg.dtype]).itemsize * params
    gathers = (1 if cfg.remat == "none" else 2) * microbatches
    moved = {"all-gather": gathers * size * (fsdp - 1) / fsdp,
             "reduce-scatter": microbatches * size * (fsdp - 1) / fsdp,
             "all-reduce": 2 * size / fsdp * (replicas - 1) / replicas}
    moved = {kind: round(b) for kind, b in moved.items() if b}
    return {"bytes": moved, "total_bytes": sum(moved.values()),
            "dcn_bytes": round(2 * 4 * params / (fsdp * replicas / slices) * (slices - 1) / slices)}


def context_minimum_bytes(cfg, mesh_shape, batch_size, seq_len):
    """The least context parallelism adds per device, beside fsdp_minimum_bytes (0 without it):
    each layer gathers the keys and values of its rows' whole sequences, K E / tensor of each
    per token, in the compute dtype, of which a device receives the (c-1)/c it does not hold
    (c = mesh context), for its B / (batch devices) rows:

      all-gather      L 2 (B/b) T (K E / t) (c-1)/c in the forward, again in the backward
                      unless remat is "none" (then the gathered keys and values are kept)
      reduce-scatter  the same once: the gathered keys' and values' gradients, back to their
                      owners
    """
    context = sharding.size_of(mesh_shape, sharding.CONTEXT)
    rows = batch_size / sharding.size_of(mesh_shape, sharding.BATCH)
    heads = cfg.n_kv_heads / sharding.size_of(mesh_shape, sharding.weight_axes("kv_heads"))
    gathered = (2 * cfg.n_layers * rows * seq_len * heads * cfg.head_dim
                * jnp.dtype(DTYPES[cfg.dtype]).itemsize * (context - 1) / context)
    moved = {"all-gather": (1 if cfg.remat == "none" else 2) * gathered,
             "reduce-scatter": gathered}
    moved = {kind: round(b) for kind, b in moved.items() if b}
    return {"bytes": moved, "total_bytes": sum(moved.values())}


# ---------------------------------------------------------------------------------------------
# The planner: python -m llama_jax.compile --plan --config=... --topology=...



def recompute_flops_per_token(cfg, seq_len):
    """Forward FLOPs per token the backward repeats under cfg.remat (2 per multiplying weight):

      full           the whole block: every projection and the attention
      minimal        all but wo and w2, whose outputs (attn_out, mlp_out) are kept
      dots_saveable  the attention only: its score and value products have batch dims, which
                     the policy does not keep; every projection output is kept
      none           nothing
    The attention forward is 2 L T D (a third of flops_per_token's 6 L T D); norms, rope and
    other elementwise work are not counted; the loss is outside the remat'ed blocks."""
    d, f, layers = cfg.dim, cfg.ffn_dim, cfg.n_layers
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    weights = {"full": 2 * d * q + 2 * d * kv + 3 * d * f,
               "minimal": d * q + 2 * d * kv + 2 * d * f, "dots_saveable": 0, "none": 0}[cfg.remat]
    attention = 0 if cfg.remat == "none" else 2 * layers * seq_len * q
    return 2 * layers * weights + attention


def plan_candidates(config, topology, sizes=PLAN_SIZES, remats=PLAN_REMAT, headroom=0.1,
                    contexts=None):
    """Compile (AOT, nothing allocated) each (context, sequences per batch shard per
    microbatch, remat) that divides the global batch, and return one row per compile. A
    batch shard is `context` chips (one chip without context parallelism). Within a remat
    policy sizes go up, so memory does: the first that does not fit (or that the compiler
    refuses) ends it. contexts None: the config's mesh.context only."""
    ranges.check_config(config)
    generation, devices = topology_devices(topology, config.mesh[sharding.SLICES])
    chip = CHIPS[generation]
    batch_size, seq_len = config.data.global_batch_size, config.data.seq_len
    budget = chip["hbm"] * (1 - headroom)
    rows = []
    for context, remat in [(c, r) for c in contexts or [config.mesh[sharding.CONTEXT]]
                           for r in remats]:
        at_context = copy.deepcopy(config)
        at_context.mesh[sharding.CONTEXT] = context
        mesh = dict(zip(sharding.MESH_AXES, sharding.mesh_shape(at_context.mesh, len(devices))))
        shards = sharding.size_of(mesh, sharding.BATCH)
        for size in sorted(sizes):
            microbatches, rest = divmod(batch_size, size * shards)
            if rest or not microbatches or (context > 1 and seq_len % (2 * context)):
                continue  # not a whole number of microbatches (or of chunks): no such run
            candidate = copy.deepcopy(at_context)
            candidate.model.remat, candidate.train.microbatches = remat, microbatches
            plan = _compile_on(candidate, topology, generation, devices)
            cfg = model_config(candidate)
            flops = cfg.flops_per_token(seq_len) + recompute_flops_per_token(cfg, seq_len)
            total = plan.get("total_bytes_per_device")
            rows.append({
                "context_size": context, "seqs_per_chip": size, "microbatches": microbatches,
                "remat": remat,
                "gib_per_chip": None if total is None else round(total / GIB, 2),
                "fits": total is not None and total <= budget,
                "compiler_error": plan.get("compiler_error"),
                "roofline_tokens_per_sec_per_chip": round(chip["peak"] / flops),
                "collective_gib_per_chip": None if total is None else round(
                    plan["collective_bytes_per_device"]["total_bytes"] / GIB, 3),
                "dcn_gib_per_chip": None if "dcn_bytes_per_device" not in plan else round(
                    plan["dcn_bytes_per_device"] / GIB, 3),
                "compile_s": plan["compile_s"],
                "overrides": [f"--config.model.remat={remat}",
                              f"--config.train.microbatches={microbatches}"] + (
                    [f"--config.mesh.{sharding.CONTEXT}={context}"] if contexts else []),
            })
            logging.info("plan: context %d, %d per shard, %d microbatches, remat %s: %s GiB, "
                         "fits %s", context, size, microbatches, remat,
                         rows[-1]["gib_per_chip"], rows[-1]["fits"])
            if not rows[-1]["fits"]:
                break
    return rows


def best_candidate(rows):
    """The fitting row with the highest roofline throughput; of equals, the fewest
    microbatches (each one gathers the parameters again), then the least context (each layer
    gathers keys and values over it). None when nothing fits."""
    fitting = [r for r in rows if r["fits"]]
    return max(fitting, key=lambda r: (r["roofline_tokens_per_sec_per_chip"], -r["microbatches"],
                                       -r["context_size"]), default=None)


def format_plan(rows, header):
    dcn = any(r.get("dcn_gib_per_chip") is not None for r in rows)
    context = any(r["context_size"] > 1 for r in rows)
    lines = [header, (f"{'context':>7} " if context else "") +
             f"{'seqs/chip':>9} {'microbatches':>12} {'remat':<13} {'GiB/chip':>8} "
             f"{'fits':<4} {'tokens/s/chip':>13} {'collective GiB':>14} "
             + (f"{'of it DCN':>9} " if dcn else "") + f"{'compile s':>9}"]
    for r in rows:
        gib = "refused" if r["gib_per_chip"] is None else f"{r['gib_per_chip']:.2f}"
        comm = "" if r["collective_gib_per_chip"] is None else f"{r['collective_gib_per_chip']:.3f}"
        over_dcn = "" if r.get("dcn_gib_per_chip") is None else f"{r['dcn_gib_per_chip']:.3f}"
        lines.append((f"{r['context_size']:>7} " if context else "") +
                     f"{r['seqs_per_chip']:>9} {r['microbatches']:>12} {r['remat']:<13} "
                     f"{gib:>8} {'yes' if r['fits'] else 'no':<4} "
                     f"{r['roofline_tokens_per_sec_per_chip']:>13,} {comm:>14} "
                     + (f"{over_dcn:>9} " if dcn else "") + f"{r['compile_s']:>9}")
    best = best_candidate(rows)
    lines.append("best: " + " ".join(best["overrides"]) if best else
                 "best: none fits: add chips, shorten seq_len, or lower the headroom")
    return "\n".join(lines)


def run_plan(config, topology, sizes=PLAN_SIZES, remats=PLAN_REMAT, headroom=0.1,
             contexts=None):
    """(rows, the printed table) of --plan."""
    rows = plan_candidates(config, topology, sizes, remats, headroom, contexts)
    generation, _, _ = topology.partition(":")
    cfg = model_config(config)
    hbm = CHIPS[generation]["hbm"] / GIB
    slices = config.mesh[sharding.SLICES]
    header = (f"plan: {cfg.num_params() / 1e9:.3g}B params, global batch "
              f"{config.data.global_batch_size} x {config.data.seq_len} on "
              f"{f'{slices} x ' if slices > 1 else ''}{topology}, "
              f"{hbm:.0f} GiB HBM per chip, fits under {hbm * (1 - headroom):.1f} GiB "
              f"({headroom:.0%} headroom)")
    return rows, format_plan(rows, header)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    FLAGS = flags.FLAGS
    if FLAGS.config is None or FLAGS.topology is None:
        raise app.UsageError("--config and --topology are both required, e.g. "
                             "--config=configs/llama_7b.py --topology=v5p:2x2x1")
    slices = FLAGS[sharding.SLICES].value  # the flag is named after the mesh axis it sets
    if slices is not None:
        if slices < 1:
            sys.exit(f"error: --{sharding.SLICES}={slices} must be at least 1")
        FLAGS.config.mesh[sharding.SLICES] = slices
    try:
        if FLAGS.plan:
            _, table = run_plan(FLAGS.config, FLAGS.topology, [int(s) for s in FLAGS.plan_sizes],
                                FLAGS.plan_remat, FLAGS.headroom,
                                [int(c) for c in FLAGS.plan_context] or None)
            print(table)
        else:
            print(json.dumps(compile_plan(FLAGS.config, FLAGS.topology, FLAGS.dcn_gbps)))
    except (ValueError, KeyError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    cli.run(main)
