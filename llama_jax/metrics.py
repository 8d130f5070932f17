"""Watching a run: metrics.jsonl, TensorBoard scalars, a terminal progress line, MFU.

Only process 0 writes. metrics.jsonl is the record tests and plots read; TensorBoard gets the
same values under WORKDIR/tensorboard; the progress line is for a person at a terminal.
"""

import functools
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
from absl import logging

GIB = 2 ** 30
# Per chip, from the datasheets: dense bf16 peak FLOP/s, HBM bytes, the device_kind strings
# JAX reports for it (matched in this order, so "TPU v5 lite" is v5e before "TPU v5" is v5p),
# and for TPUs the chips that share one host's data-center network link. compile.py names TPU generations by these keys (v5p:2x2x1); MFU looks chips up by kind.
CHIPS = {
    "v4": {"peak": 275e12, "hbm": 32 * GIB, "kinds": ("TPU v4",), "chips_per_host": 4},
    "v5e": {"peak": 197e12, "hbm": 16 * GIB, "kinds": ("TPU v5 lite", "TPU v5e"),
            "chips_per_host": 4},  # a multi-host slice's VMs (only those join a multi-slice run)
    "v5p": {"peak": 459e12, "hbm": 95 * GIB, "kinds": ("TPU v5p", "TPU v5"), "chips_per_host": 4},
    "v6e": {"peak": 918e12, "hbm": 32 * GIB, "kinds": ("TPU v6 lite", "TPU v6e"),
            "chips_per_host": 4},
    "H100": {"peak": 989e12, "hbm": 80e9, "kinds": ("H100",)},
    "H200": {"peak": 989e12, "hbm": 141e9, "kinds": ("H200",)},
    "A100": {"peak": 312e12, "hbm": 80e9, "kinds": ("A100",)},
}


@functools.lru_cache(maxsize=None)  # measured once per process
def measured_cpu_peak(size=2048, repeats=5):
    """FLOP/s of a large float32 matmul on this host: a CPU has no datasheet number here."""
    a = jnp.ones((size, size), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best


def peak_flops(device):
    """(peak FLOP/s of one device, where the number comes from)."""
    if device.platform == "cpu":
        return measured_cpu_peak(), "measured float32 matmul"
    for chip in CHIPS.values():
        if any(kind in device.device_kind for kind in chip["kinds"]):
            return chip["peak"], f"{device.device_kind} bf16 datasheet"
    raise ValueError(f"no peak FLOP/s known for {device.device_kind!r}: add it to CHIPS "
                     "in llama_jax/metrics.py")


class Throughput:
    """Tokens/s, step time and MFU over the steps counted since the last report or reset."""

    def __init__(self, tokens_per_step, flops_per_token, num_devices):
        self.tokens_per_step, self.flops_per_token = tokens_per_step, flops_per_token
        self.peak = peak_flops(jax.devices()[0])[0] * num_devices
        self.reset()

    def reset(self):
        self.start, self.steps = time.time(), 0

    def count(self):
        self.steps += 1

    def report(self):
        """Call once the counted steps have finished (after fetching their metrics)."""
        elapsed, steps = time.time() - self.start, self.steps
        self.reset()
        tokens_per_sec = steps * self.tokens_per_step / elapsed
        return {"tokens_per_sec": tokens_per_sec, "step_time_s": elapsed / max(steps, 1),
                "mfu": tokens_per_sec * self.flops_per_token / self.peak}


def _duration(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


class MetricsWriter:
    def __init__(self, workdir, enabled=True, total_steps=None, config_text=None):
        self.enabled = enabled
        self.path = pathlib.Path(workdir) / "metrics.jsonl"
        self.total_steps = total_steps
        self.tty = sys.stderr.isatty()
        self.started = time.time()
        self.tb = None
        if enabled:
            import tensorflow as tf  # only process 0 pays for the TensorBoard writer
            self.tf = tf
            self.tb = tf.summary.create_file_writer(str(pathlib.Path(workdir) / "tensorboard"))
            if config_text:
                with self.tb.as_default():
                    tf.summary.text("config", f"```\n{config_text}\n```", step=0)

    def write(self, step, values, prefix="train"):
        if not self.enabled:
            return
        record = {"step": int(step), **{k: float(v) for k, v in values.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        with self.tb.as_default():
            for key, value in record.items():
                if key != "step":
                    tag = f"{prefix}/{key.removeprefix(prefix + '_')}"  # eval_loss -> eval/loss
                    self.tf.summary.scalar(tag, value, step=int(step))
        self.tb.flush()
        line = "  ".join(f"{k} {v:.4g}" for k, v in record.items() if k != "step")
        logging.info("step %d  %s", step, line)
        if self.tty and prefix == "train" and self.total_steps:
            self._progress(step, record)

    def _progress(self, step, record):
        rate = (time.time() - self.started) / max(step, 1)
        eta = _duration(rate * (self.total_steps - step))
        mfu = f"  MFU {100 * record['mfu']:.1f}%" if "mfu" in record else ""
        sys.stderr.write(f"\rstep {step}/{self.total_steps}  loss {record.get('loss', 0):.4f}  "
                         f"{record.get('tokens_per_sec', 0):,.0f} tok/s{mfu}  ETA {eta}   ")
        sys.stderr.flush()

    def close(self):
        if self.tb is not None:
            self.tb.close()
        if self.tty and self.enabled:
            sys.stderr.write("\n")


def read_metrics(workdir):
    path = pathlib.Path(workdir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(path, last_step):
    """Drops records past the restored step, so a resumed run's log reads as one run."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line)["step"] <= last_step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(path)
