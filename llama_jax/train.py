"""Training entry point: python -m llama_jax.train --config=configs/tiny.py --workdir=runs/tiny

One linear function of named phases: the step (mesh, model, optimizer, abstract state) ->
workdir -> tokenizer and data -> init, restore or init_from -> loop (log, evaluate, checkpoint,
preemption). Rerunning the same command on the same workdir resumes from its latest committed
checkpoint.
"""

import contextlib
import os
import pathlib
import shlex
import shutil
import signal
import socket
import sys
import threading
import time
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

from llama_jax import cli, distributed


def define_flags():
    """Defined only when run as a program, so tests can import every entry point at once."""
    config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "Run directory: tokenizer, metrics.jsonl, checkpoints.")
    distributed.define_flags()


if __name__ == "__main__":  # --help and flag or config errors answer before JAX loads
    define_flags()
    cli.parse_flags()

import jax  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from llama_jax import (checkpoint, goodput, lock, ranges, sharding, spikes,  # noqa: E402
                       train_step)
from llama_jax.config import model_config  # noqa: E402
from llama_jax.data import pipeline, store, tokenizer as tokenizer_lib  # noqa: E402
from llama_jax.metrics import MetricsWriter, Throughput, truncate_metrics  # noqa: E402


class Preempted(SystemExit):
    """Raised once a stopped run's checkpoint is committed; exits 1 after SIGTERM (a scheduler
    requeues the job), 130 after Ctrl-C (as a shell reports SIGINT; see main)."""

    def __init__(self, step, directory, interrupted):
        self.interrupted = interrupted
        if interrupted:
            super().__init__(f"interrupted at step {step}: checkpoint saved in {directory}; "
                             f"to resume, rerun {_rerun_command()}")
        else:
            super().__init__(f"preempted at step {step}: checkpoint saved in {directory}; "
                             "rerun the same command to resume")


def validation_loss(eval_step, params, dataset, mesh, num_batches, global_batch_size):
    """Token-weighted mean validation loss over the first num_batches batches."""
    total = count = 0.0
    for batch in pipeline.global_batches(dataset.take(num_batches),
                                         sharding.batch_sharding(mesh), global_batch_size):
        out = eval_step(params, batch)
        total += float(out["loss_sum"])
        count += float(out["tokens"])
    if not count:
        raise ValueError("the validation split produced no batch: lower data.seq_len or "
                         "data.global_batch_size")
    return total / count


def check_workdir(workdir, abstract_state):
    """Fails before any compile when the workdir cannot hold the run's files."""
    if workdir.exists() and not workdir.is_dir():
        raise NotADirectoryError(f"--workdir={workdir} is a file: pass a directory path")
    workdir.mkdir(parents=True, exist_ok=True)
    probe = workdir / f".write_probe_{jax.process_index()}"
    try:
        if jax.process_index() == 0:  # one lock for the job: process 0 writes the shared files
            lock.acquire(workdir)
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise PermissionError(f"--workdir={workdir} is not writable ({e.strerror}): fix its "
                              "permissions or pick another directory") from e
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract_state))
    free = shutil.disk_usage(workdir).free
    need = 2 * state_bytes // jax.process_count()  # a new checkpoint beside the previous one
    if free < need:
        raise OSError(f"--workdir={workdir} has {free / 2**30:.2f} GiB free but a checkpoint "
                      f"needs about {need / 2**30:.2f} GiB: free space or use another disk")


def start_state(step, config, ckpt, meta, train_data):
    """(state, the checkpoint's meta or {}): the newest readable checkpoint restored (with
    train_data's position), else a fresh init (optionally with another run's params,
    config.init_from)."""
    latest = ckpt.latest_step()
    if ckpt.uncommitted():
        logging.warning("ignoring unfinished checkpoint saves %s", ckpt.uncommitted())
    if latest is None:
        state = step.init(jax.random.key(config.train.seed))
        if config.init_from:
            state = state.replace(params=checkpoint.restore_params(config.init_from,
                                                                   step.abstract))
        return state, {}
    if latest > config.train.steps:
        raise checkpoint.CheckpointError(
            f"the latest checkpoint in {ckpt.mngr.directory} is step {latest}, past "
            f"train.steps={config.train.steps}: raise train.steps to train on, or use a new "
            "--workdir")
    # a damaged latest step (a save cut short by a full disk, a truncated copy) falls back to
    # the newest one that reads; the damaged ones are moved aside, never deleted
    unreadable = []
    for saved in sorted(ckpt.mngr.all_steps(), reverse=True):
        try:
            saved_meta = ckpt.check_compatible(saved, step.abstract.params, meta)
            state = ckpt.restore(saved, step.abstract,
                                 train_data.resume(saved_meta["data_shards"], saved))
            break
        except checkpoint.UnreadableCheckpoint as e:
            unreadable.append((saved, e.reason))
    else:
        raise checkpoint.CheckpointError(
            f"no checkpoint in {ckpt.mngr.directory} can be read (step {unreadable[0][0]}: "
            f"{unreadable[0][1]}): restore them from a backup, or use a new --workdir to start "
            "again")
    for bad, reason in unreadable:
        moved = ckpt.set_aside(bad)
        logging.warning("skipped the checkpoint at step %d, which cannot be read (%s): moved "
                        "to %s; resuming from step %d", bad, reason, moved, saved)
    logging.info("resumed from step %d in %s", saved, ckpt.mngr.directory)
    return state, saved_meta


def train(config, workdir):
    """Runs training; returns a summary dict (final train loss, first and last eval loss, ...)."""
    start = time.time()
    workdir = pathlib.Path(workdir)
    data, tc = config.data, config.train

    # Phase 1: mesh, validated settings, model, optimizer, abstract state (no memory used yet).
    # every key in its range before the mesh is built; build() checks how they relate
    ranges.check_config(config)
    ranges.check_sources(config.data)
    step = train_step.build(config, sharding.make_mesh(config.mesh))
    check_workdir(workdir, step.abstract)

    # Phase 2: tokenizer and data, each process reading its own data shards.
    tokenizer = tokenizer_lib.shared_tokenizer(workdir, data, step.cfg.vocab_size)
    if jax.process_index() == 0:  # as configured, not resolved: the workdir loads anywhere
        checkpoint.write_model(workdir, model_config(config))
        (workdir / "config.json").write_text(checkpoint.config_json(config) + "\n")
    logging.info("%s", describe_start(step, config))
    # this process's rows; the processes of a context group that spans hosts read the same ones
    reader = sharding.batch_readers(step.mesh, data.global_batch_size,
                                    data.seq_len)[jax.process_index()]
    if store.store_run(data):  # a step's batch is read at its data position
        train_data = store.TrainData(data, tokenizer, reader.rows)
        eval_data = store.eval_batches(data, tokenizer, reader.rows)
    else:  # an iterator (not the dataset) so its position can be saved with checkpoints
        train_data = pipeline.TrainStream(data, tokenizer, reader)
        eval_data = pipeline.concat_shards(pipeline.process_datasets(
            "validation", data, tokenizer, reader.index, reader.count))

    # Phase 3: restore the latest checkpoint, or init (from scratch or another run's params).
    ckpt = checkpoint.Checkpointer(workdir, config.checkpoint.keep,
                                   config.checkpoint.keep_period or None)
    meta = {"config": checkpoint.config_json(config), "process_count": jax.process_count(),
            "data_shards": pipeline.process_shards(data, reader.index, reader.count)[1],
            "tokenizer": checkpoint.fingerprint(tokenizer.path)}
    lead = jax.process_index() == 0
    clock = goodput.Goodput(workdir, enabled=lead, start=start)
    restore_start = time.time()
    state, saved_meta = start_state(step, config, ckpt, meta, train_data)
    if saved_meta and int(state.step) == tc.steps:  # a finished run: nothing to compile or do
        # after the restore, so a damaged last checkpoint still falls back and trains on
        logging.info("run already finished at step %d (train.steps): raise "
                     "--config.train.steps to train on, or use a new --workdir", tc.steps)
        ckpt.close()
        lock.release()
        return {"first_step": tc.steps, "steps": tc.steps, "eval_loss": [], "finished": True,
                "checkpoint": str(ckpt.mngr.directory), "last_saved": tc.steps}
    # a fresh init (its compile included) is start-up; a restore is checkpoint time
    clock.add("checkpoint_restore" if saved_meta else "startup", time.time() - restore_start)
    clock.resumed(int(state.step))
    # an earlier session's records past the restored step are redone by this one (on a fresh
    # start all of them, step 0's evaluation included), so each step is in the log once
    if lead:
        truncate_metrics(workdir / "metrics.jsonl", int(state.step) if saved_meta else -1)

    # Phase 4: the loop.
    writer = MetricsWriter(workdir, enabled=lead, total_steps=tc.steps, config_text=str(config),
                           show_mfu=jax.devices()[0].platform != "cpu")
    run = Run(step, config, ckpt, meta, writer, train_data, eval_data, int(state.step), clock,
              saved_meta.get("loss_window", ()))
    clock.add("startup", time.time() - start - clock.session_seconds())
    # the wrap-up below is inside the handlers too: a Ctrl-C while it waits for the last save
    # is a second Ctrl-C, not a KeyboardInterrupt
    with stop_signals() as stop:
        try:
            run.loop(state, stop)
        finally:
            with clock.timed("checkpoint_save"):
                ckpt.close()  # waits for the last async save and raises its error, if any
            totals = clock.totals()
            writer.write(run.summary["steps"],
                         {k: v for k, v in totals.items() if k != "sessions"}, prefix="goodput")
            writer.close()
            clock.write()
            run.summary.update(wall_s=time.time() - start, checkpoint=str(ckpt.mngr.directory),
                               last_saved=ckpt.latest_step(), goodput=totals)
            logging.info("%s", describe(run.summary, data.global_batch_size * data.seq_len))
            lock.release()  # after the last save is committed
    return run.summary


class Run:
    """The loop of one training session and what it reports: summary holds the steps done,
    the last logged train loss and every evaluation of this session."""

    def __init__(self, step, config, ckpt, meta, writer, train_data, eval_data, first_step,
                 clock, loss_window=()):
        self.step, self.config, self.ckpt, self.meta = step, config, ckpt, meta
        # store.TrainData or pipeline.TrainStream
        self.writer, self.train_data, self.eval_data = writer, train_data, eval_data
        self.clock = clock  # goodput: where this session's time goes
        self.skips = spikes.SkipRecord(ckpt.workdir, enabled=jax.process_index() == 0)
        # the spike detector's window is part of each checkpoint, so a resume sees the same
        self.detector = spikes.Detector(config.train.spike_factor, config.train.spike_window,
                                        loss_window)
        # step -> the detector's window saved with that checkpoint (what a rewind restores)
        self.saved_windows = {first_step: list(loss_window)}
        self.summary = {"first_step": first_step, "steps": first_step, "eval_loss": [],
                        "eval_batches": config.train.eval_batches}

    def evaluate(self, n, params):
        with self.clock.timed("evaluation"):
            loss = validation_loss(self.step.eval_step, params, self.eval_data, self.step.mesh,
                                   self.config.train.eval_batches,
                                   self.config.data.global_batch_size)
        self.writer.write(n, {"eval_loss": loss}, prefix="eval")
        data = self.config.data  # the same batches every time; `evaluate` reads the whole split
        logging.info("%s | eval loss %.4f on the first %d validation batches (%s tokens)",
                     self.writer.step_text(n), loss, self.config.train.eval_batches,
                     f"{self.config.train.eval_batches * data.global_batch_size * data.seq_len:,}")
        self.summary["eval_loss"].append(loss)

    def check_finite(self, n, metrics):
        """Counts a dropped update; with train.on_nan=abort, stops the run instead."""
        if metrics["finite"]:  # one scalar fetch a step, so no bad step goes unseen
            return 0
        if self.config.train.on_nan == "abort":
            latest = self.ckpt.latest_step()
            raise FloatingPointError(
                f"non-finite loss or gradient at step {n} (the update was dropped); " + (f"last good checkpoint: step {latest} in "
                                f"{self.ckpt.mngr.directory}" if latest is not None else
                                "no checkpoint was saved yet") +
                ". Lower train.lr, raise train.warmup_steps, or set train.on_nan=skip")
        logging.warning("step %d: non-finite loss or gradient, update skipped", n)
        return 1

    def batches(self, first_step):
        """Global batches for the steps after first_step, the skipped windows left out: a
        store's batch is read at the step's data position, an iterator's are read and dropped."""
        return pipeline.global_batches(self.train_data.batches(first_step, self.skips.windows),
                                       sharding.batch_sharding(self.step.mesh),
                                       self.config.data.global_batch_size)

    def save(self, n, state):
        self.saved_windows[n] = self.detector.state()
        with self.clock.timed("checkpoint_save"):
            self.ckpt.save(n, state, {**self.meta, "loss_window": self.saved_windows[n]},
                           self.train_data.state())

    def rewind(self, n, loss, done):
        """After a spike at step n: the last committed checkpoint's state and loss window, its
        data position, and a skip over the batches from there to the spike (and
        train.spike_skip_batches more); None when there is no checkpoint to go back to."""
        tc = self.config.train
        with self.clock.timed("checkpoint_save"):
            self.ckpt.wait()  # a save in flight is committed (or fails) first
        back = self.ckpt.latest_step()
        if back is None:
            logging.warning("step %d: loss spike %.4f but no checkpoint to rewind to yet", n, loss)
            return None
        windows = self.skips.windows
        first = spikes.batch_of_step(back + 1, windows)
        last = spikes.batch_of_step(n, windows) + tc.spike_skip_batches
        event = {"spike_step": n, "loss": loss, "mean": self.detector.mean(),
                 "rewound_to": back, "batches": [first, last]}
        self.skips.add(event)  # on disk before anything else: a restart skips them too
        self.clock.rewound(n - back, done[n] - done[back])
        with self.clock.timed("checkpoint_restore"):
            state = self.ckpt.restore(back, self.step.abstract, self.train_data.state())
        self.detector = spikes.Detector(tc.spike_factor, tc.spike_window, self.saved_windows[back])
        if jax.process_index() == 0:
            truncate_metrics(self.ckpt.workdir / "metrics.jsonl", back)
        self.writer.write(back, {"spike_step": n, "spike_loss": loss,
                                 "spike_mean": event["mean"], "rewound_to_step": back,
                                 "skipped_first_batch": first, "skipped_last_batch": last},
                          prefix="spike")
        logging.warning("step %d: loss %.4f > %g x mean %.4f: rewound to step %d, data batches "
                        "%d-%d skipped", n, loss, tc.spike_factor, event["mean"], back, first,
                        last)
        return state

    def loop(self, state, sigterm):
        """Steps from state.step to train.steps. `sigterm` is a list that becomes non-empty
        when the job is told to stop: the current step is saved and Preempted raised."""
        step, config, ckpt, clock = self.step, self.config, self.ckpt, self.clock
        data, tc = config.data, config.train
        tokens_per_step = data.global_batch_size * data.seq_len
        with clock.timed("startup"):  # on CPU, Throughput measures the peak FLOP/s (seconds)
            throughput = Throughput(tokens_per_step, step.cfg.flops_per_token(data.seq_len),
                                    step.mesh.size)
            profile = Profile(config.profile.steps, ckpt.workdir / "tensorboard")
            n = int(state.step)
            batches = self.batches(n)
        with clock.timed("compile"):  # ahead of time, so no step's time includes it
            train_step = step.train_step.lower(step.abstract, step.abstract_batch()).compile()
        skipped = 0
        if n == 0:
            self.evaluate(0, state.params)
        throughput.reset()
        done = {n: 0.0}  # step -> this session's productive seconds when it finished
        while n < tc.steps:
            n += 1
            with clock.timed("data_wait"):
                batch = next(batches)
            began = time.time()
            profile.before(n)
            state, metrics = train_step(state, batch)
            throughput.count()
            profile.after(n, metrics)
            spike = False
            if tc.on_spike != "off":  # the loss joins the one scalar fetch of each step
                loss, finite = (float(x) for x in jax.device_get(
                    (metrics["loss"], metrics["finite"])))
                skipped += self.check_finite(n, {"finite": finite})
                spike = finite and self.detector.is_spike(loss)
            else:
                skipped += self.check_finite(n, metrics)
            self.summary["steps"] = n
            if n % tc.log_every == 0 or n == tc.steps:
                metrics = jax.device_get(metrics)  # waits for the step: the timing is real
                self.writer.write(n, {**metrics, **throughput.report(), "skipped_steps": skipped,
                                      "tokens_seen": n * tokens_per_step})
                self.summary["train_loss"] = float(metrics["loss"])
            done[n] = done[n - 1] + time.time() - began
            clock.step_done(n, time.time() - began, flush=n % tc.log_every == 0)
            if spike and (rewound := self.rewind(n, loss, done)) is not None:
                state, n = rewound, int(rewound.step)
                self.summary["steps"], batches = n, self.batches(n)
                throughput.reset()
                continue
            if n % tc.eval_every == 0 or n == tc.steps:
                self.evaluate(n, state.params)
                throughput.reset()  # evaluation time is not training throughput
            if n % config.checkpoint.every_steps == 0 or n == tc.steps:
                self.save(n, state)
            if _preempted(n, sigterm):
                if ckpt.latest_step() != n:
                    self.save(n, state)
                with clock.timed("checkpoint_save"):
                    ckpt.wait()
                raise Preempted(n, ckpt.mngr.directory, signal.SIGINT in sigterm)


class Profile:
    """A JAX profiler trace over config.profile.steps ("START:END"), into the TensorBoard dir."""

    def __init__(self, steps, logdir):
        self.range = ranges.profile_range(steps) if steps else None
        self.logdir = str(logdir)

    def before(self, n):
        if self.range and n == self.range[0]:
            jax.profiler.start_trace(self.logdir)

    def after(self, n, metrics):
        if self.range and n == self.range[1]:
            jax.block_until_ready(metrics)
            jax.profiler.stop_trace()


@contextlib.contextmanager
def stop_signals():
    """A list that gets the signal when the run is told to stop, SIGTERM or a first Ctrl-C
    (SIGINT): the loop then saves the step it is on and raises Preempted. A second Ctrl-C exits
    at once; the save it cuts short is an Orbax tmp directory, never loaded (checkpoint.py).
    A thread reads the signals from Python's wakeup fd, so both answer at once even while the
    main thread is in a long compile or step. With several processes JAX's preemption service
    owns SIGTERM (see _preempted), and a Ctrl-C is passed on to it as one."""
    received = []
    several = jax.process_count() > 1
    handled = {signal.SIGINT} if several else {signal.SIGINT, signal.SIGTERM}
    reader, writer = socket.socketpair()
    writer.setblocking(False)  # the C-level handler must never block on it

    def watch():
        while data := reader.recv(16):  # b"" once the writer is closed on exit
            for signum in (s for s in data if s in handled):  # two Ctrl-C may come as one read
                if signum == signal.SIGINT and signal.SIGINT in received:
                    print("interrupted again: exiting now; the last committed checkpoint is kept",
                          file=sys.stderr, flush=True)
                    lock.release()
                    os._exit(130)
                received.append(signum)
                if signum == signal.SIGINT:
                    print("Ctrl-C: saving a checkpoint after this step, then exiting "
                          "(Ctrl-C again to exit now)", file=sys.stderr, flush=True)
                    if several:
                        os.kill(os.getpid(), signal.SIGTERM)

    previous = {s: signal.signal(s, lambda *_: None) for s in handled}  # no KeyboardInterrupt
    previous_fd = signal.set_wakeup_fd(writer.fileno())
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield received
    finally:
        signal.set_wakeup_fd(previous_fd)
        for s, handler in previous.items():
            signal.signal(s, handler)
        writer.close()
        watcher.join()
        reader.close()


def describe_start(step, config):
    """The config, short, at start-up (two lines); WORKDIR/config.json has all of it."""
    cfg, data, tc = step.cfg, config.data, config.train
    mesh = " ".join(f"{name}={size}" for name, size in step.mesh.shape.items() if size > 1)
    params = cfg.num_params()
    size = f"{params / 1e6:.1f}M" if params >= 1e6 else f"{params:,}"
    return (f"model {size} parameters: {cfg.n_layers} layers, dim "
            f"{cfg.dim}, {cfg.n_heads} heads, vocab {cfg.vocab_size}; {step.mesh.size} "
            f"{jax.devices()[0].platform} devices{' (' + mesh + ')' if mesh else ''}\n"
            f"run {tc.steps} steps of {data.global_batch_size} x {data.seq_len} tokens, lr "
            f"{tc.lr:g}, warmup {tc.warmup_steps} (all settings: config.json in the workdir)")


def describe(summary, tokens_per_step):
    """The account of a run, printed however it ends: a few lines, each under 120 characters."""
    evals = summary["eval_loss"]
    saved = summary["last_saved"]
    lines = [f"Run summary: {summary['steps']} steps ({summary['steps'] - summary['first_step']} "
             f"this session), {summary['steps'] * tokens_per_step:,} tokens, wall time "
             f"{summary['wall_s']:.0f} s",
             (f"final train loss {summary['train_loss']:.4f}" if "train_loss" in summary
              else "no train step logged this session") + "; eval loss " +
             (f"{evals[0]:.4f} -> {evals[-1]:.4f} (best {min(evals):.4f}) on the first "
              f"{summary['eval_batches']} validation batches" if evals
              else "not evaluated this session"),
             (f"last checkpoint: step {saved} in {summary['checkpoint']}" if saved is not None
              else "no checkpoint saved")]
    if "goodput" in summary:
        # the parts on a line of their own: all of them would pass 120 characters
        head, parts = goodput.describe(summary["goodput"]).split(": ", 1)
        lines += [f"{head}:", f"  {parts}"]
    return "\n".join(lines)


def _preempted(step, stop):
    """True on every process at the same step once any of them was told to stop."""
    if jax.process_count() > 1:
        return multihost_utils.reached_preemption_sync_point(step)
    return bool(stop)


def _rerun_command():
    """This program's command line, to paste (a multi-process job is rerun by its launcher)."""
    if jax.process_count() > 1:
        return "the same command"
    program = sys.argv[0]  # `llama_jax train` when started through the console command
    if program.endswith("train.py"):  # python -m llama_jax.train
        program = f"{shlex.quote(sys.executable)} -m llama_jax.train"
    return " ".join([program, *map(shlex.quote, sys.argv[1:])])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if flags.FLAGS.config is None or flags.FLAGS.workdir is None:
        raise app.UsageError("--config and --workdir are both required, e.g. "
                             "--config=configs/tiny.py --workdir=runs/tiny")
    try:
        try:
            distributed.initialize_from_flags()  # before anything touches a device
            train(flags.FLAGS.config, flags.FLAGS.workdir)
        finally:
            lock.release()  # also when train() failed before its loop; before any os._exit
    except Preempted as e:
        print(e.code, file=sys.stderr, flush=True)
        sys.exit(130 if e.interrupted else 1)
    except (ValueError, KeyError, OSError, FloatingPointError) as e:
        # a known failure is one line that says the fix, not a traceback wall
        distributed.exit_failed(f"error: {e}")
    except pipeline.tf.errors.InvalidArgumentError as e:  # an in-graph check of the data failed
        distributed.exit_failed(f"error: {pipeline.graph_check_message(e)}")
    except Exception:
        distributed.exit_failed(traceback.format_exc())


if __name__ == "__main__":
    cli.run(main)
