"""Run metrics: a log line every few steps and the same values as JSON lines in metrics.jsonl."""

import json
import pathlib

from absl import logging


class MetricsWriter:
    def __init__(self, workdir, enabled=True):
        self.enabled = enabled
        self.path = pathlib.Path(workdir) / "metrics.jsonl"

    def write(self, step, values):
        if not self.enabled:  # only process 0 writes
            return
        record = {"step": int(step), **{k: float(v) for k, v in values.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        logging.info("step %d  %s", step, "  ".join(
            f"{k} {v:.4g}" for k, v in record.items() if k != "step"))


def read_metrics(workdir):
    path = pathlib.Path(workdir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
