"""Orbax checkpoints of a fine-tuning run: train state, step, data position and run identity.

A checkpoint holds the whole :class:`training.train_step.TrainState` (trainable and frozen
params, BatchNorm statistics, optimizer state, EMA, step) and a JSON record of the data position
and of what the run is (model, mode, trainable paths and shapes, data seed and size). Restoring
into a run whose identity differs raises a ``ValueError`` naming the difference, before any
array is read, instead of silently training the wrong parameters.
"""

import os
from collections.abc import Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from training.data import DataPosition


def run_identity(state, **fields) -> dict:
    """JSON-able description of a run that a resumed run must match.

    Args:
        state: the :class:`TrainState` (its trainable/frozen paths and shapes are recorded).
        **fields: more JSON-able facts to match (model name, mode, seed, dataset size, batch…).

    Returns:
        A dict of plain Python values.
    """
    shapes = lambda flat: {k: list(v.shape) for k, v in sorted(flat.items())}
    return {
        **{k: v for k, v in sorted(fields.items())},
        "trainable": shapes(state.trainable),
        "frozen": shapes(state.frozen),
    }


def make_manager(directory: str, max_to_keep: int | None = 2) -> ocp.CheckpointManager:
    """A checkpoint manager over ``directory`` (created if missing) keeping the newest ones."""
    directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    return ocp.CheckpointManager(directory, options=options)


def save(
    manager: ocp.CheckpointManager,
    state,
    position: DataPosition,
    identity: Mapping,
    wait: bool = False,
) -> None:
    """Saves ``state`` at its step with the data position and run identity.

    Args:
        manager: from :func:`make_manager`.
        state: the train state (a pytree of arrays, replicated over the mesh).
        position: where the training data stream resumes.
        identity: from :func:`run_identity`.
        wait: block until the (asynchronous) write is done.
    """
    step = int(np.asarray(state.step.addressable_data(0)))
    meta = {"position": position.to_dict(), "identity": dict(identity)}
    # one process: save a NumPy copy, which skips orbax's per-array device copies (one small
    # compilation per leaf shape); several: orbax writes the global arrays itself
    to_save = jax.device_get(state) if jax.process_count() == 1 else state
    manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(to_save), meta=ocp.args.JsonSave(meta)),
    )
    if wait:
        manager.wait_until_finished()


def _first_difference(expected, found, prefix="") -> str | None:
    if isinstance(expected, Mapping) and isinstance(found, Mapping):
        keys = set(expected) | set(found)
        # plain facts (mode, seed, model…) before parameter shapes: they name the cause
        nested = lambda k: isinstance(expected.get(k, found.get(k)), Mapping)
        for key in sorted(keys, key=lambda k: (nested(k), k)):
            if key not in found:
                return f"{prefix}{key}: this run has {expected[key]!r}, checkpoint has none"
            if key not in expected:
                return f"{prefix}{key}: checkpoint has {found[key]!r}, this run has none"
            diff = _first_difference(expected[key], found[key], f"{prefix}{key}/")
            if diff:
                return diff
        return None
    if expected != found:
        return f"{prefix.rstrip('/')}: this run has {expected!r}, checkpoint has {found!r}"
    return None


def restore_latest(
    manager: ocp.CheckpointManager, target_state, identity: Mapping
) -> tuple[object, DataPosition] | None:
    """Restores the newest checkpoint into the structure/sharding of ``target_state``.

    Args:
        manager: from :func:`make_manager`.
        target_state: a train state of this run (its arrays give shapes, dtypes and shardings).
        identity: this run's :func:`run_identity`; must equal the saved one.

    Returns:
        ``(state, position)``, or ``None`` when the directory holds no checkpoint.

    Raises:
        ValueError: the checkpoint belongs to a different run (model, mode, shapes, data…).
    """
    step = manager.latest_step()
    if step is None:
        return None
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    diff = _first_difference(_jsonable(identity), meta["identity"])
    if diff:
        raise ValueError(
            f"checkpoint {manager.directory}/{step} does not match this run ({diff}); "
            "use another checkpoint directory or the run's original settings"
        )
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)
    restored = manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
    )["state"]
    return restored, DataPosition.from_dict(meta["position"])


def _jsonable(value):
    """Same normalisation JSON applies (tuples → lists), so comparisons are like for like."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value
