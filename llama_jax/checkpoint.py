"""Workdirs on disk: training checkpoints, params-only (converted) checkpoints, the model
description model.json, and loading a workdir's model for inference. All Orbax I/O lives here.

A training step directory holds `state` (TrainState: step, params, optimizer state) and `meta`
(resolved config, tokenizer fingerprint, process count, data shards). Orbax writes each step
into a tmp directory and renames it only when complete, so a save killed half-way is never
listed, never loaded.
Each data shard's iterator is saved beside it under WORKDIR/data_state/STEP/shard_J by the
process that reads it, and only read for a step that Orbax committed.
A converted workdir's checkpoints/0 holds one item, `params`. Both kinds hold model.json (the
ModelConfig as configured, attention "auto" kept) and usually its tokenizer (.model or .json).
"""

import dataclasses
import json
import os
import pathlib
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from llama_jax.config import model_config, model_from_fields
from llama_jax.data import store
from llama_jax.data.tokenizer import install, load_tokenizer, tokenizer_file
from llama_jax.attention import resolve_attention
from llama_jax.model import ModelConfig

# the ModelConfig fields that decide the parameter tree; a resume may change the others
SHAPE_FIELDS = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim",
                "scan_layers")


class CheckpointError(ValueError):
    """A checkpoint that must not be loaded as asked; the message says what to do instead."""


class UnreadableCheckpoint(CheckpointError):
    """A step whose files are damaged (truncated, overwritten); `reason` is the first line of
    the library's error, so a resume can fall back to an earlier step and say why."""

    def __init__(self, message, reason):
        super().__init__(message)
        self.reason = reason


def fingerprint(path) -> str:
    """A file's identity (a tokenizer's, in checkpoint meta): the token stores' fingerprint."""
    return store.fingerprint(pathlib.Path(path).read_bytes())


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
            # writes tmp/shard_j/... for each shard of this process (none where another process
            # of its context group saves them: pipeline.ShardedIterator)
            data_iterator.save(tmp)
            for part in tmp.iterdir() if tmp.exists() else ():
                shutil.rmtree(tmp.parent / part.name, ignore_errors=True)
                os.replace(part, tmp.parent / part.name)  # complete or absent, never half-written
            shutil.rmtree(tmp, ignore_errors=True)
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
                                  f" but the workdir's tokenizer is {meta['tokenizer']}: restore "
                                  "the original tokenizer file or use a new --workdir")
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
            # TensorStore's first line ends in a pointer to a repr of its details: drop that
            first_line = (str(e).splitlines() or [""])[0].split(". See full")[0]
            reason = f"{type(e).__name__}: {first_line[:200]}"
            raise UnreadableCheckpoint(
                f"the checkpoint at step {step} in {self.mngr.directory} cannot be read "
                f"({reason}): delete that step directory to resume from the previous one",
                reason) from e

    def set_aside(self, step):
        """Moves an unreadable step out of checkpoints/ (kept, never deleted) into
        WORKDIR/unreadable_checkpoints/, so that this run can save that step again; returns
        where it went. Process 0 moves it; every process then lists the steps afresh."""
        target = self.workdir / "unreadable_checkpoints" / str(step)
        if jax.process_index() == 0:
            while target.exists():  # the same step damaged twice: keep both
                target = target.with_name(target.name + "_again")
            target.parent.mkdir(exist_ok=True)
            os.replace(self.workdir / "checkpoints" / str(step), target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"llama_jax set aside step {step}")
        self.mngr.reload()
        return target

    def close(self):
        self.wait()
        self.mngr.close()


def restore_params(source, abstract_state):
    """Params only, from another run's or a converted workdir, onto this run's shardings."""
    source = pathlib.Path(source)
    if not (source / "checkpoints").is_dir():
        raise CheckpointError(f"config.init_from={source} holds no checkpoints/ directory: "
                              "point it at a run's or a converted workdir")
    params = load_params(source)  # host numpy
    problem = _shape_mismatch(params, abstract_state.params)
    if problem:
        raise CheckpointError(f"config.init_from={source} is from a different model: {problem}")
    logging.info("initialised params from %s", source)
    return jax.tree.map(lambda x, a: jax.device_put(x.astype(a.dtype), a.sharding), params,
                        abstract_state.params)


# ------------------------------------------------------------------ params-only workdirs

def save_params(workdir, cfg: ModelConfig, params, tokenizer_path=None):
    """A converted workdir: model.json [+ tokenizer] + checkpoints/0 (the Orbax item
    "params", no optimizer state). Generate and evaluate read it directly; a training run starts
    from it with `--config.init_from=WORKDIR` (params only; fresh optimizer and step)."""
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if tokenizer_path is not None:
        load_tokenizer(tokenizer_path, cfg.vocab_size)  # a vocabulary mismatch stops here
    write_model(workdir, cfg)
    if tokenizer_path is not None:
        install(tokenizer_path, workdir)
    manager = ocp.CheckpointManager((workdir / "checkpoints").absolute(),
                                    item_handlers={"params": ocp.StandardCheckpointHandler()})
    manager.save(0, args=ocp.args.Composite(params=ocp.args.StandardSave(params)), force=True)
    manager.wait_until_finished()
    manager.close()


def load_params(workdir, step=None):
    """Parameters of a workdir's latest (or given) checkpoint: a converted one (item "params")
    or a training one (item "state", of which only params are read), as host numpy arrays."""
    manager = ocp.CheckpointManager((pathlib.Path(workdir) / "checkpoints").absolute(),
                                    options=ocp.CheckpointManagerOptions(read_only=True))
    step = manager.latest_step() if step is None else step
    manager.close()
    if step is None:
        raise FileNotFoundError(f"no checkpoint under {pathlib.Path(workdir) / 'checkpoints'}: "
                                "train or convert into this workdir first")
    step_dir = pathlib.Path(manager.directory) / str(step)
    item = "params" if (step_dir / "params").exists() else "state"
    checkpointer = ocp.PyTreeCheckpointer()
    meta = checkpointer.metadata(step_dir / item).item_metadata
    meta = meta if item == "params" else meta["params"]
    # read straight into host numpy: no mesh is needed, and a training state's optimizer
    # moments (twice the size of the parameters) are never loaded
    target = jax.tree.map(lambda m: np.zeros((), m.dtype), meta)
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
    if item == "state":
        target, args = {"params": target}, {"params": args}
    tree = checkpointer.restore(step_dir / item, args=ocp.args.PyTreeRestore(
        item=target, restore_args=args, partial_restore=item == "state"))
    params = tree if item == "params" else tree["params"]
    return jax.tree.map(np.asarray, params)


# -------------------------------------------------------------------------- model.json

def write_model(workdir, cfg: ModelConfig):
    """WORKDIR/model.json: the ModelConfig as configured (attention "auto" stays "auto", so the
    workdir loads on any backend), written to a tmp file and renamed: complete or absent.

    Refuses to relabel checkpoints of another parameter shape, which this run could not resume
    anyway, so that model.json keeps describing the checkpoints beside it."""
    workdir = pathlib.Path(workdir)
    path = workdir / "model.json"
    steps = workdir / "checkpoints"
    if path.exists() and steps.is_dir() and any(p.name.isdigit() for p in steps.iterdir()):
        recorded = json.loads(path.read_text())
        for name in SHAPE_FIELDS:
            if recorded.get(name) != getattr(cfg, name):
                raise CheckpointError(
                    f"{workdir} holds checkpoints of a different model: model.{name} is "
                    f"{recorded.get(name)!r} in its model.json but {getattr(cfg, name)!r} in "
                    "this config; use a new --workdir, or --config.init_from for a model of "
                    "this shape")
    tmp = workdir / "model.json.tmp"
    tmp.write_text(json.dumps(dataclasses.asdict(cfg), indent=2, sort_keys=True))
    os.replace(tmp, path)


def read_model(workdir, config=None) -> ModelConfig:
    """The model a workdir holds: its model.json, which a --config given as well must match;
    the config's model section alone for a workdir written before model.json was recorded."""
    path = pathlib.Path(workdir) / "model.json"
    configured = None if config is None else model_config(config)
    if not path.exists():
        if configured is None:
            raise FileNotFoundError(f"{path} is missing: point --workdir at a training or "
                                    "converted workdir, or pass the --config it was trained with")
        return configured
    try:
        recorded = model_from_fields(json.loads(path.read_text()), path, "it was written by "
                                     "another version of llama_jax; remove them or use that "
                                     "version")
    except ValueError as e:
        raise CheckpointError(str(e)) from e
    if configured is not None:
        have = dataclasses.asdict(recorded)
        differ = [f"{k} (config {v!r}, model.json {have[k]!r})"
                  for k, v in dataclasses.asdict(configured).items() if v != have[k]]
        if differ:
            raise CheckpointError(f"--config's model section differs from {path} in "
                                  f"{', '.join(differ)}: drop --config to use the recorded "
                                  "model, or pass the config this workdir was trained with")
    return recorded


# --------------------------------------------------------------------------- inference

def load_model(workdir, config=None):
    """(ModelConfig with attention resolved for this backend, host params of the latest
    checkpoint, tokenizer path) of a training or converted workdir."""
    cfg = resolve_attention(read_model(workdir, config), jax.default_backend())
    return cfg, load_params(workdir), tokenizer_file(workdir)


def config_json(config) -> str:
    return json.dumps(config.to_dict(), sort_keys=True, default=str)
