"""Checkpoints: the Orbax CheckpointManager under WORKDIR/checkpoints, plus per-shard data state.

A step directory holds `state` (TrainState: step, params, optimizer state) and `meta` (resolved
config, tokenizer fingerprint, process count, data shards). Orbax writes each step into a tmp
directory and renames it only when complete, so a save killed half-way is never listed, never
loaded.
Each data shard's iterator is saved beside it under WORKDIR/data_state/STEP/shard_J by the
process that reads it, and only read for a step that Orbax committed.
"""

import hashlib
import json
import os
import pathlib
import shutil

import jax
import orbax.checkpoint as ocp
from absl import logging


class CheckpointError(ValueError):
    """A checkpoint that must not be loaded as asked; the message says what to do instead."""


def fingerprint(path) -> str:
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()[:16]


def _shape_mismatch(saved_tree, abstract_params):
    """The first parameter whose saved shape differs from the model's, as a message or None."""
    saved = dict(jax.tree_util.tree_leaves_with_path(saved_tree))
    for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_params):
        key = jax.tree_util.keystr(path)
        other = saved.get(path)
        if other is None:
            return f"parameter {key} is missing from the checkpoint"
        if tuple(other.shape) != tuple(leaf.shape):
            return (f"parameter {key} has shape {tuple(other.shape)} in the checkpoint but "
                    f"{tuple(leaf.shape)} in this model")
    return None


class Checkpointer:
    """Saves and restores one run's state, its metadata and each process's data iterator."""

    def __init__(self, workdir, keep=3, keep_period=None):
        self.workdir = pathlib.Path(workdir).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, keep_period=keep_period, create=True, cleanup_tmp_directories=True)
        self.mngr = ocp.CheckpointManager(self.workdir / "checkpoints", options=options,
                                          item_handlers={"state": ocp.StandardCheckpointHandler(),
                                                         "meta": ocp.JsonCheckpointHandler()})
        self.data_dir = self.workdir / "data_state"

    def latest_step(self):
        return self.mngr.latest_step()

    def uncommitted(self):
        """Step directories that Orbax never finished (tmp names); listed for the log only."""
        root = self.workdir / "checkpoints"
        return sorted(p.name for p in root.iterdir() if ".orbax-checkpoint-tmp" in p.name)

    def save(self, step, state, meta, data_iterator=None):
        """Data state first (synchronously, atomically), then the async Orbax save."""
        self.mngr.check_for_errors()  # a failed background save surfaces here, not never
        if data_iterator is not None:
            tmp = self.data_dir / str(step) / f".tmp_process_{jax.process_index()}"
            shutil.rmtree(tmp, ignore_errors=True)
            data_iterator.save(tmp)  # writes tmp/shard_j/... for each shard of this process
            for part in tmp.iterdir():
                shutil.rmtree(tmp.parent / part.name, ignore_errors=True)
                os.replace(part, tmp.parent / part.name)  # complete or absent, never half-written
            tmp.rmdir()
        self.mngr.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

    def wait(self):
        self.mngr.wait_until_finished()
        self.mngr.check_for_errors()
        self._prune_data_state()

    def _prune_data_state(self):
        if jax.process_index() != 0 or not self.data_dir.exists():
            return
        kept = {str(s) for s in self.mngr.all_steps()}
        for path in self.data_dir.iterdir():
            if path.name not in kept and not self._is_pending(path.name):
                shutil.rmtree(path, ignore_errors=True)

    def _is_pending(self, name):
        return name.isdigit() and int(name) > (self.mngr.latest_step() or -1)

    def read_meta(self, step):
        return self.mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def check_compatible(self, step, abstract_params, meta):
        """Refuses a checkpoint of another model shape or tokenizer; returns its meta."""
        where = f"the checkpoint at step {step} in {self.mngr.directory}"
        saved_meta, saved = self._unreadable_is_an_error(step, lambda: (
            self.read_meta(step), self.mngr.item_metadata(step)["state"].tree["params"]))
        problem = _shape_mismatch(saved, abstract_params)
        if problem:
            raise CheckpointError(f"{where} is from a different model: {problem}; use a new "
                                  "--workdir, or --config.init_from for a model of this shape")
        if saved_meta["tokenizer"] != meta["tokenizer"]:
            raise CheckpointError(f"{where} was trained with tokenizer {saved_meta['tokenizer']}"
                                  f" but the workdir's tokenizer.model is {meta['tokenizer']}: "
                                  "restore the original tokenizer.model or use a new --workdir")
        return saved_meta

    def restore(self, step, abstract_state, data_iterator=None):
        """The state at `step` laid out by abstract_state's shardings (any mesh)."""
        restored = self._unreadable_is_an_error(step, lambda: self.mngr.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))))
        if data_iterator is not None:
            path = self.data_dir / str(step)
            try:
                data_iterator.restore(path)
            except FileNotFoundError as e:
                raise CheckpointError(f"data state {path} for step {step} is missing ({e}): "
                                      "delete the step directory to resume from the previous "
                                      "one") from e
        return restored.state

    def _unreadable_is_an_error(self, step, read):
        try:
            return read()
        except Exception as e:  # Orbax, TensorStore and json raise many types for damaged files
            first_line = (str(e).splitlines() or [""])[0][:200]
            raise CheckpointError(
                f"the checkpoint at step {step} in {self.mngr.directory} cannot be read "
                f"({type(e).__name__}: {first_line}): delete that step directory to resume "
                "from the previous one") from e

    def close(self):
        self.wait()
        self.mngr.close()


def restore_params(source, abstract_state):
    """Params only, from another run's or a converted workdir, onto this run's shardings."""
    from llama_jax import convert  # convert imports this module's neighbours, not the reverse
    source = pathlib.Path(source)
    if not (source / "checkpoints").is_dir():
        raise CheckpointError(f"config.init_from={source} holds no checkpoints/ directory: "
                              "point it at a run's or a converted workdir")
    params = convert.load_params(source)  # host numpy
    problem = _shape_mismatch(params, abstract_state.params)
    if problem:
        raise CheckpointError(f"config.init_from={source} is from a different model: {problem}")
    logging.info("initialised params from %s", source)
    return jax.tree.map(lambda x, a: jax.device_put(x.astype(a.dtype), a.sharding), params,
                        abstract_state.params)


def config_json(config) -> str:
    return json.dumps(config.to_dict(), sort_keys=True, default=str)
