"""Benchmark: python -m llama_jax.bench --config=configs/cpu_bench.py [--steps=N]

Runs the real sharded train step on synthetic tokens and prints one JSON line: throughput,
median step time after compile, compile time, FLOPs, MFU against a stated peak, and memory.
"""

import json
import resource
import statistics
import sys
import time

from absl import app, flags
from ml_collections import config_flags

from llama_jax import cli


def define_flags():
    """Defined only when run as a program, so tests can import every entry point at once."""
    config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.",
                                    lock_config=True)
    flags.DEFINE_integer("steps", 10, "Timed steps (after one warm-up step); 0: compile only.")
    flags.DEFINE_integer("documents", 1, "Documents per row of the synthetic batch, equal "
                         "lengths, passed as segment ids as packed training data is; 0: no "
                         "segment ids (plain causal attention over the whole row).")


if __name__ == "__main__":  # --help and flag or config errors answer before JAX loads
    define_flags()
    cli.parse_flags()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from llama_jax import ranges, sharding, train_step  # noqa: E402
from llama_jax.metrics import peak_flops  # noqa: E402


def synthetic_batch(mesh, batch_size, seq_len, vocab_size, documents=1):
    tokens = jax.random.randint(jax.random.key(0), (batch_size, seq_len + 1), 0, vocab_size)
    segment = jnp.arange(seq_len) * max(documents, 1) // seq_len  # 0-based document of each slot
    start = jnp.searchsorted(segment, segment)  # where that document begins
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
             "positions": jnp.broadcast_to(jnp.arange(seq_len) - start, (batch_size, seq_len)),
             "segment_ids": jnp.broadcast_to(segment + 1, (batch_size, seq_len)).astype(jnp.int32),
             "loss_mask": jnp.ones((batch_size, seq_len), jnp.float32)}
    if not documents:
        del batch["segment_ids"]
    return jax.device_put(batch, sharding.batch_sharding(mesh))


def bench(config, steps, documents=1):
    ranges.check_config(config)  # before the mesh; build() checks how the keys relate
    step = train_step.build(config, sharding.make_mesh(config.mesh))
    cfg, mesh = step.cfg, step.mesh
    seq_len, batch_size = config.data.seq_len, config.data.global_batch_size
    batch = synthetic_batch(mesh, batch_size, seq_len, cfg.vocab_size, documents)

    start = time.perf_counter()
    compiled = step.train_step.lower(step.abstract, batch).compile()  # no state allocated yet
    compile_s = time.perf_counter() - start
    # XLA's own plan: temp is the activations and workspace live at the peak, per device
    plan = compiled.memory_analysis()
    result = {
        "config": {"dim": cfg.dim, "n_layers": cfg.n_layers, "seq_len": seq_len,
                   "global_batch_size": batch_size, "dtype": cfg.dtype, "remat": cfg.remat,
                   "scan_layers": cfg.scan_layers, "attention": cfg.attention,
                   "documents": documents, "loss_chunk_size": config.train.loss_chunk_size,
                   "mesh": dict(mesh.shape)},
        "devices": f"{mesh.size} x {jax.devices()[0].device_kind}",
        "compile_s": round(compile_s, 2),
        "compiled_temp_mib": round(plan.temp_size_in_bytes / 2**20, 1),
        "compiled_argument_mib": round(plan.argument_size_in_bytes / 2**20, 1),
    }
    if not steps:
        return result
    state = step.init(jax.random.key(0))
    state, metrics = compiled(state, batch)  # warm-up: first-run allocations are not timed
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)

    step_time = statistics.median(times)
    tokens_per_sec = batch_size * seq_len / step_time
    flops_per_token = cfg.flops_per_token(seq_len)
    peak, peak_source = peak_flops(jax.devices()[0])
    achieved = tokens_per_sec * flops_per_token
    memory = jax.devices()[0].memory_stats() or {}
    result.update({
        "tokens_per_sec": round(tokens_per_sec, 1),
        "step_time_s": round(step_time, 4),
        "step_time_min_max_s": [round(min(times), 4), round(max(times), 4)],
        "flops_per_token": flops_per_token,
        "achieved_gflops_per_sec": round(achieved / 1e9, 1),
        "peak_gflops_per_sec": round(peak * mesh.size / 1e9, 1),
        "peak_source": peak_source,
        "mfu": round(achieved / (peak * mesh.size), 4),
        "final_loss": round(float(metrics["loss"]), 4),
        "peak_host_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "device_peak_bytes_in_use": memory.get("peak_bytes_in_use"),
    })
    return result


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if flags.FLAGS.config is None:
        raise app.UsageError("--config is required, e.g. --config=configs/cpu_bench.py")
    try:
        ranges.check_flags("bench", {"steps": flags.FLAGS.steps,
                                     "documents": flags.FLAGS.documents})
        if flags.FLAGS.documents > flags.FLAGS.config.data.seq_len:
            raise ValueError(f"--documents={flags.FLAGS.documents} exceeds data.seq_len="
                             f"{flags.FLAGS.config.data.seq_len}: use at most one per token")
        result = bench(flags.FLAGS.config, flags.FLAGS.steps, flags.FLAGS.documents)
    except ValueError as e:
        sys.exit(f"error: {e}")
    print(json.dumps(result))


if __name__ == "__main__":
    cli.run(main)
