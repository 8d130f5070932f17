"""Training entry point: python -m llama_jax.train --config=configs/tiny.py --workdir=runs/tiny

One linear function of named phases: mesh -> tokenizer and data -> abstract state and
shardings -> init or restore -> loop (log, evaluate, checkpoint).
"""

import pathlib
import time

import jax
import jax.numpy as jnp
from absl import app, flags, logging
from ml_collections import config_flags

from llama_jax import checkpoint, optim, sharding, train_step
from llama_jax.config import validate
from llama_jax.data import pipeline, tokenizer as tokenizer_lib
from llama_jax.metrics import MetricsWriter
from llama_jax.model import Llama

config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory: tokenizer, metrics.jsonl, checkpoints.")


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


def train(config, workdir):
    """Runs training; returns a summary dict (final train loss, first and last eval loss, ...)."""
    start = time.time()
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)

    # Phase 1: mesh and validated settings.
    mesh = sharding.make_mesh(config.mesh)
    cfg = validate(config, mesh.devices.shape)
    data, tc = config.data, config.train
    logging.info("mesh %s over %d devices; model %s, %.1fM parameters", dict(mesh.shape),
                 mesh.size, cfg, cfg.num_params() / 1e6)

    # Phase 2: tokenizer and data, each process reading its own share.
    tokenizer = tokenizer_lib.get_tokenizer(workdir, data, cfg.vocab_size)
    local_batch = data.global_batch_size // jax.process_count()
    shard = dict(process_index=jax.process_index(), process_count=jax.process_count())
    # an iterator (not the dataset) so its position can be saved and restored with checkpoints
    train_ds = pipeline.DataIterator(
        pipeline.make_dataset("train", data, tokenizer, local_batch, **shard))
    eval_ds = pipeline.make_dataset("validation", data, tokenizer, local_batch, **shard)

    # Phase 3: model, optimizer, abstract state and its shardings (no memory used yet).
    model = Llama(cfg)
    tx, schedule = optim.make_optimizer(tc)
    abstract, shardings = train_step.state_shardings(model, tx, mesh, config.sharding_rules,
                                                     data.seq_len)

    # Phase 4: init straight into sharded memory, or restore the latest checkpoint.
    mngr = checkpoint.manager(workdir)
    if mngr.latest_step() is not None:
        state = checkpoint.restore(mngr, abstract)
        logging.info("restored step %d from %s", int(state.step), mngr.directory)
    else:
        state = train_step.init_state(jax.random.key(tc.seed), model, tx, shardings,
                                      data.seq_len)

    # Phase 5: the loop.
    step_fn = train_step.jit_train_step(model, tx, schedule, mesh, shardings, tc.loss_chunk_size)
    eval_fn = train_step.jit_eval_step(model, mesh, shardings, tc.loss_chunk_size)
    writer = MetricsWriter(workdir, enabled=jax.process_index() == 0)
    batches = pipeline.global_batches(train_ds, sharding.batch_sharding(mesh))
    first_step = int(state.step)
    summary = {"first_step": first_step, "eval_loss": []}
    if first_step == 0:
        loss = evaluate(eval_fn, state.params, eval_ds, mesh, tc.eval_batches)
        writer.write(0, {"eval_loss": loss})
        summary["eval_loss"].append(loss)

    window_start, window_tokens = time.time(), 0
    for step in range(first_step + 1, tc.steps + 1):
        state, metrics = step_fn(state, next(batches))
        window_tokens += data.global_batch_size * data.seq_len
        if step % tc.log_every == 0 or step == tc.steps:
            metrics = jax.device_get(metrics)  # waits for the step: the timing below is real
            elapsed = time.time() - window_start
            if not jnp.isfinite(metrics["loss"]):
                raise FloatingPointError(f"loss is {metrics['loss']} at step {step}: lower "
                                         "train.lr or raise train.warmup_steps")
            writer.write(step, {**metrics, "tokens_per_sec": window_tokens / elapsed})
            summary["train_loss"] = float(metrics["loss"])
            window_start, window_tokens = time.time(), 0
        if step % tc.eval_every == 0 or step == tc.steps:
            loss = evaluate(eval_fn, state.params, eval_ds, mesh, tc.eval_batches)
            writer.write(step, {"eval_loss": loss})
            summary["eval_loss"].append(loss)
            window_start, window_tokens = time.time(), 0  # evaluation is not throughput

    if int(state.step) > first_step:
        checkpoint.save(mngr, int(state.step), state)
    mngr.wait_until_finished()
    mngr.close()
    summary.update(steps=int(state.step), wall_s=time.time() - start,
                   checkpoint=str(mngr.directory))
    logging.info("done: %s", summary)
    return summary


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if flags.FLAGS.config is None or flags.FLAGS.workdir is None:
        raise app.UsageError("--config and --workdir are both required, e.g. "
                             "--config=configs/tiny.py --workdir=runs/tiny")
    train(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
