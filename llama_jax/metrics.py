"""Watching a run: metrics.jsonl, TensorBoard scalars, one short terminal line per log step, MFU.

Only process 0 writes. metrics.jsonl is the record tests and plots read; TensorBoard gets the
same values under WORKDIR/tensorboard; the terminal gets step, loss, tokens/s, MFU (where a
datasheet peak makes it meaningful) and the time left, nanoGPT style.
"""

import functools
import json
import pathlib
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
    """show_mfu: put MFU on the terminal line. Off on CPU, where the peak is a matmul measured
    once on a shared host (the share varies, so "MFU" can read near 1); metrics.jsonl keeps it."""

    def __init__(self, workdir, enabled=True, total_steps=None, config_text=None, show_mfu=True):
        self.enabled = enabled
        self.path = pathlib.Path(workdir) / "metrics.jsonl"
        self.total_steps, self.show_mfu = total_steps, show_mfu
        self.first = None  # (step, time) of the first train record: the ETA's rate since then
        self.tb = None
        if enabled:
            import tensorflow as tf  # only process 0 pays for the TensorBoard writer
            self.tf = tf
            self.tb = tf.summary.create_file_writer(str(pathlib.Path(workdir) / "tensorboard"))
            if config_text:
                with self.tb.as_default():
                    tf.summary.text("config", f"```\n{config_text}\n```", step=0)

    def write(self, step, values, prefix="train"):
        """One record in metrics.jsonl and TensorBoard; a train record is also a terminal line."""
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
        if prefix == "train":
            logging.info("%s", self.train_line(step, record))

    def step_text(self, step):
        return f"step {step}/{self.total_steps}" if self.total_steps else f"step {step}"

    def train_line(self, step, record):
        """'step 40/300 | loss 5.1234 | 3,210 tok/s | MFU 31.2% | ETA 2m10s'."""
        parts = [self.step_text(step)]
        if "loss" in record:
            parts.append(f"loss {record['loss']:.4f}")
        if "tokens_per_sec" in record:
            parts.append(f"{record['tokens_per_sec']:,.0f} tok/s")
        if self.show_mfu and "mfu" in record:
            parts.append(f"MFU {100 * record['mfu']:.1f}%")
        now = time.time()
        if self.first is None:
            self.first = (step, now, record.get("step_time_s", 0.0))
        first_step, first_time, step_time = self.first
        if step > first_step:  # evaluations and checkpoints included: the time it will take
            step_time = (now - first_time) / (step - first_step)
        if self.total_steps and step_time:
            parts.append(f"ETA {_duration(step_time * (self.total_steps - step))}")
        return " | ".join(parts)

    def close(self):
        if self.tb is not None:
            self.tb.close()


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
