"""Training entry point: python -m llama_jax.train --config=configs/tiny.py --workdir=runs/tiny

One linear function of named phases: workdir -> mesh -> tokenizer and data -> abstract state
and shardings -> init, restore or init_from -> loop (log, evaluate, checkpoint, preemption).
Rerunning the same command on the same workdir resumes from its latest committed checkpoint.
"""

import json
import pathlib
import shutil
import signal
import time
import traceback

import jax
from absl import app, flags, logging
from jax.experimental import multihost_utils
from ml_collections import config_flags

from llama_jax import checkpoint, distributed, sharding, train_step
from llama_jax.config import model_config, profile_range
from llama_jax.data import pipeline, tokenizer as tokenizer_lib
from llama_jax.metrics import MetricsWriter, peak_flops

config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory: tokenizer, metrics.jsonl, checkpoints.")


class Preempted(SystemExit):
    """Raised after the preemption checkpoint is committed; exits non-zero."""


def evaluate(eval_fn, params, dataset, mesh, num_batches):
    """Token-weighted mean validation loss over the first num_batches batches."""
    total = count = 0.0
    batches = pipeline.global_batches(dataset.take(num_batches), sharding.batch_sharding(mesh))
    for batch in batches:
        out = eval_fn(params, batch)
        total += float(out["loss_sum"])
        count += float(out["tokens"])
    if not count:
        raise ValueError("the validation split produced no batch: lower data.seq_len or "
                         "data.global_batch_size")
    return total / count


def check_workdir(workdir, state_bytes):
    """Fails before any compile when the workdir cannot hold the run's files."""
    if workdir.exists() and not workdir.is_dir():
        raise NotADirectoryError(f"--workdir={workdir} is a file: pass a directory path")
    workdir.mkdir(parents=True, exist_ok=True)
    probe = workdir / f".write_probe_{jax.process_index()}"
    try:
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise PermissionError(f"--workdir={workdir} is not writable ({e.strerror}): fix its "
                              "permissions or pick another directory") from e
    free = shutil.disk_usage(workdir).free
    need = 2 * state_bytes // jax.process_count()  # a new checkpoint beside the previous one
    if free < need:
        raise OSError(f"--workdir={workdir} has {free / 2**30:.2f} GiB free but a checkpoint "
                      f"needs about {need / 2**30:.2f} GiB: free space or use another disk")


def shared_tokenizer(workdir, data, vocab_size):
    """Process 0 trains the tokenizer of a fresh workdir while the others wait, then all read it."""
    if jax.process_count() > 1 and not data.tokenizer_path:
        if jax.process_index() == 0:
            tokenizer_lib.get_tokenizer(workdir, data, vocab_size)
        distributed.barrier("tokenizer")
        if not (workdir / "tokenizer.model").exists():
            raise OSError(f"process {jax.process_index()} cannot see {workdir}/tokenizer.model "
                          "that process 0 wrote: --workdir must be a directory every process "
                          "shares (a bucket mount, NFS), or set data.tokenizer_path")
    return tokenizer_lib.get_tokenizer(workdir, data, vocab_size)


def restarted_stream(data, tokenizer, saved_shards, data_shards, step):
    """A new train iterator for a checkpoint whose data state belongs to another shard count
    (no saved state fits these shards), reseeded so it does not replay the run's first batches."""
    logging.warning(
        "the checkpoint's data stream has %d shards but this run reads %d (the process count or "
        "data.shards changed): the data iterator restarts with seed data.seed + %d. Set "
        "data.shards to a multiple of every process count you use to resume the stream exactly",
        saved_shards, data_shards, step)
    reseeded = data.copy_and_resolve_references()
    reseeded.seed = data.seed + step
    return pipeline.ShardedIterator(pipeline.process_datasets("train", reseeded, tokenizer))


def truncate_metrics(path, last_step):
    """Drops records past the restored step, so a resumed run's log reads as one run."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line)["step"] <= last_step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(path)


def train(config, workdir):
    """Runs training; returns a summary dict (final train loss, first and last eval loss, ...)."""
    start = time.time()
    workdir = pathlib.Path(workdir)

    # Phase 1: mesh and validated settings.
    step = train_step.build(config, sharding.make_mesh(config.mesh))
    cfg, mesh, abstract = step.cfg, step.mesh, step.abstract
    data, tc = config.data, config.train
    data_shards = pipeline.process_shards(data, jax.process_index(), jax.process_count())[1]
    logging.info("mesh %s over %d devices; model %s, %.1fM parameters", dict(mesh.shape),
                 mesh.size, cfg, cfg.num_params() / 1e6)

    # Phase 2: model, optimizer, abstract state and its shardings (no memory used yet).
    check_workdir(workdir, sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract)))
    if jax.process_index() == 0:  # as configured, not resolved: the workdir loads anywhere
        checkpoint.write_model(workdir, model_config(config))

    # Phase 3: tokenizer and data, each process reading its own data shards.
    tokenizer = shared_tokenizer(workdir, data, cfg.vocab_size)
    # an iterator (not the dataset) so its position can be saved and restored with checkpoints
    train_ds = pipeline.ShardedIterator(pipeline.process_datasets("train", data, tokenizer))
    eval_ds = pipeline.concat_shards(pipeline.process_datasets("validation", data, tokenizer))

    # Phase 4: restore the latest checkpoint, or init (from scratch or another run's params).
    ckpt = checkpoint.Checkpointer(workdir, config.checkpoint.keep,
                                   config.checkpoint.keep_period or None)
    meta = {"config": checkpoint.config_json(config), "process_count": jax.process_count(),
            "data_shards": data_shards,
            "tokenizer": checkpoint.fingerprint(workdir / "tokenizer.model")}
    latest = ckpt.latest_step()
    if ckpt.uncommitted():
        logging.warning("ignoring unfinished checkpoint saves %s", ckpt.uncommitted())
    if latest is not None:
        saved_meta = ckpt.check_compatible(latest, abstract.params, meta)
        # checkpoints written before data.shards existed read one shard per process
        saved_shards = saved_meta.get("data_shards", saved_meta["process_count"])
        if saved_shards != data_shards:
            train_ds = restarted_stream(data, tokenizer, saved_shards, data_shards, latest)
        state = ckpt.restore(latest, abstract, train_ds if saved_shards == data_shards else None)
        if jax.process_index() == 0:
            truncate_metrics(workdir / "metrics.jsonl", latest)
        logging.info("resumed from step %d in %s", latest, ckpt.mngr.directory)
    else:
        state = step.init(jax.random.key(tc.seed))
        if config.init_from:
            state = state.replace(params=checkpoint.restore_params(config.init_from, abstract))

    # Phase 5: the loop.
    step_fn, eval_fn = step.train_step, step.eval_step
    writer = MetricsWriter(workdir, enabled=jax.process_index() == 0, total_steps=tc.steps,
                           config_text=str(config))
    flops_per_token = cfg.flops_per_token(data.seq_len)
    tokens_per_step = data.global_batch_size * data.seq_len
    peak, _ = peak_flops(jax.devices()[0])
    profile = profile_range(config.profile.steps) if config.profile.steps else None
    batches = pipeline.global_batches(train_ds, sharding.batch_sharding(mesh))
    first_step = int(state.step)
    summary = {"first_step": first_step, "eval_loss": []}
    sigterm = []
    # with several processes JAX's preemption service catches SIGTERM (see _preempted)
    if jax.process_count() == 1:
        previous_handler = signal.signal(signal.SIGTERM, lambda *_: sigterm.append(time.time()))

    def save(step):
        ckpt.save(step, state, meta, train_ds)

    try:
        if first_step == 0:
            loss = evaluate(eval_fn, state.params, eval_ds, mesh, tc.eval_batches)
            writer.write(0, {"eval_loss": loss}, prefix="eval")
            summary["eval_loss"].append(loss)
        window_start, window_tokens, window_steps = time.time(), 0, 0
        skipped, last_checked = 0, first_step
        for step in range(first_step + 1, tc.steps + 1):
            if profile and step == profile[0]:
                jax.profiler.start_trace(str(workdir / "tensorboard"))
            state, metrics = step_fn(state, next(batches))
            window_tokens += data.global_batch_size * data.seq_len
            window_steps += 1
            if profile and step == profile[1]:
                jax.block_until_ready(metrics)
                jax.profiler.stop_trace()
            if not metrics["finite"]:  # one scalar fetch a step, so no bad step goes unseen
                skipped += 1
                if tc.on_nan == "abort":
                    raise FloatingPointError(
                        f"non-finite loss or gradient in steps {last_checked + 1}..{step} "
                        f"(the update was dropped); last good checkpoint: step "
                        f"{ckpt.latest_step()} in {ckpt.mngr.directory}. Lower train.lr, "
                        "raise train.warmup_steps, or set train.on_nan=skip")
                logging.warning("step %d: non-finite loss or gradient, update skipped", step)
            last_checked = step
            if step % tc.log_every == 0 or step == tc.steps:
                metrics = jax.device_get(metrics)  # waits for the step: the timing below is real
                elapsed = time.time() - window_start
                tokens_per_sec = window_tokens / elapsed
                writer.write(step, {
                    **metrics, "tokens_per_sec": tokens_per_sec, "skipped_steps": skipped,
                    "step_time_s": elapsed / window_steps, "tokens_seen": step * tokens_per_step,
                    "mfu": tokens_per_sec * flops_per_token / (peak * mesh.size)})
                summary["train_loss"] = float(metrics["loss"])
                window_start, window_tokens, window_steps = time.time(), 0, 0
            if step % tc.eval_every == 0 or step == tc.steps:
                loss = evaluate(eval_fn, state.params, eval_ds, mesh, tc.eval_batches)
                writer.write(step, {"eval_loss": loss}, prefix="eval")
                summary["eval_loss"].append(loss)
                window_start, window_tokens, window_steps = time.time(), 0, 0  # not throughput
            if step % config.checkpoint.every_steps == 0 or step == tc.steps:
                save(step)
            if _preempted(step, sigterm):
                if ckpt.latest_step() != step:
                    save(step)
                ckpt.wait()
                raise Preempted(f"preempted at step {step}: checkpoint saved in "
                                f"{ckpt.mngr.directory}; rerun the same command to resume")
    finally:
        if jax.process_count() == 1:
            signal.signal(signal.SIGTERM, previous_handler)
        writer.close()
        ckpt.close()  # waits for the last async save and raises its error, if any
        summary.update(steps=int(state.step), wall_s=time.time() - start,
                       checkpoint=str(ckpt.mngr.directory), last_saved=ckpt.latest_step())
        logging.info("%s", describe(summary, tokens_per_step))
    return summary


def describe(summary, tokens_per_step):
    """The one-paragraph account of a run, printed however it ends."""
    evals = summary["eval_loss"]
    return (f"Run summary: {summary['steps']} steps ({summary['steps'] - summary['first_step']} "
            f"this session), {summary['steps'] * tokens_per_step:,} tokens; final train loss "
            f"{summary.get('train_loss', float('nan')):.4f}; eval loss "
            + (f"{evals[0]:.4f} -> {evals[-1]:.4f} (best {min(evals):.4f})" if evals else "n/a")
            + f"; wall time {summary['wall_s']:.0f} s; last checkpoint step "
            f"{summary['last_saved']} in {summary['checkpoint']}.")


def _preempted(step, sigterm):
    """True on every process at the same step once any of them was told to stop."""
    if jax.process_count() > 1:
        return multihost_utils.reached_preemption_sync_point(step)
    return bool(sigterm)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if flags.FLAGS.config is None or flags.FLAGS.workdir is None:
        raise app.UsageError("--config and --workdir are both required, e.g. "
                             "--config=configs/tiny.py --workdir=runs/tiny")
    try:
        distributed.initialize_from_flags()  # before anything touches a device
        train(flags.FLAGS.config, flags.FLAGS.workdir)
    except (ValueError, KeyError, OSError, FloatingPointError) as e:
        # a known failure is one line that says the fix, not a traceback wall
        distributed.exit_failed(f"error: {e}")
    except Exception:
        distributed.exit_failed(traceback.format_exc())


if __name__ == "__main__":
    distributed.define_flags()
    app.run(main)
