"""Orbax checkpoints of the TrainState under WORKDIR/checkpoints, restorable onto any mesh."""

import pathlib

import orbax.checkpoint as ocp


def manager(workdir, max_to_keep=3) -> ocp.CheckpointManager:
    path = pathlib.Path(workdir).absolute() / "checkpoints"
    return ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True))


def save(mngr, step, state):
    """Starts an async save; call mngr.wait_until_finished() before relying on it."""
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))


def restore(mngr, abstract_state, step=None):
    """Restores onto the shardings carried by abstract_state (any mesh, any device count)."""
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no committed checkpoint under {mngr.directory}")
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))
    return restored.state
