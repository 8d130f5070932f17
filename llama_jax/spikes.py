"""Loss spikes (PaLM, section 5.1): a loss above train.spike_factor x the mean of the last
train.spike_window steps rewinds the run to its last committed checkpoint and skips the data
that led to the spike, so training goes on from healthy weights on other batches.

What is skipped is a record of data windows, WORKDIR/data_skips.json: [first, last] batch
numbers of the data stream (batch b is the b-th batch the stream yields; without skips, step s
reads batch s). It is written atomically before the rewind, so every later session, however it
starts, reads the same batches: the skip is part of the resumable state. The tf.data pipeline
applies it by reading and dropping the skipped batches; a pipeline whose batch is a function of
its number reads batch_of_step(s) directly.
"""

import collections
import json
import os
import pathlib


def batch_of_step(step, windows):
    """The stream batch that feeds `step` once the windows are skipped."""
    batch = step
    for first, last in sorted(windows):
        if first <= batch:
            batch += last - first + 1
    return batch


def read_skips(path):
    """The events of a data_skips.json; a damaged one is a one-line error naming it, since a
    run must not guess which batches an earlier session skipped."""
    try:
        events = json.loads(path.read_text())["skips"]
        if all(len(e["batches"]) == 2 and all(isinstance(b, int) for b in e["batches"])
               for e in events):
            return events
        problem = "a skip without two batch numbers"
    except (ValueError, KeyError, TypeError) as e:  # not JSON, or not the layout add() writes
        problem = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:100]}"
    raise ValueError(f"{path} is damaged ({problem}): restore it, or delete it to go on, which "
                     "forgets the data windows skipped after loss spikes (those batches are "
                     "read again)")


class SkipRecord:
    """The skipped windows of one workdir and the spikes that caused them."""

    def __init__(self, workdir, enabled=True):
        self.path = pathlib.Path(workdir) / "data_skips.json"
        self.enabled = enabled  # only process 0 writes; every process reads the same file
        self.events = read_skips(self.path) if self.path.exists() else []

    @property
    def windows(self):
        return [event["batches"] for event in self.events]

    def add(self, event):
        self.events.append(event)
        if self.enabled:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"skips": self.events}, indent=1))
            os.replace(tmp, self.path)  # complete or absent


def skipping(batches, windows, step):
    """The batches of steps step + 1, step + 2, ... from an iterator that has yielded the
    batches up to `step`'s, reading and dropping those inside the windows."""
    position = batch_of_step(step, windows) if step else 0
    while True:
        step += 1
        target = batch_of_step(step, windows)
        for _ in range(target - position - 1):
            next(batches)
        position = target
        yield next(batches)


class Detector:
    """The running mean of the last `window` finite losses; a spike is a loss above factor x
    that mean once the window is full. Its state is saved with each checkpoint."""

    def __init__(self, factor, window, losses=()):
        self.factor = factor
        self.losses = collections.deque(losses, maxlen=window)

    def mean(self):
        return sum(self.losses) / len(self.losses)

    def is_spike(self, loss):
        """Whether `loss` is a spike; a loss that is not joins the window."""
        if len(self.losses) == self.losses.maxlen and loss > self.factor * self.mean():
            return True
        self.losses.append(loss)
        return False

    def state(self):
        return list(self.losses)
