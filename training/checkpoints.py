"""Orbax checkpoints of a fine-tuning run: train state and run identity.

A checkpoint holds the whole :class:`training.step.TrainState` (trainable and frozen
params, BatchNorm statistics, optimizer state, EMA, step) and a JSON record of what the run is
(model, mode, trainable paths and shapes, seeds, data). The data position is not stored: every
batch is a pure function of its step (`jaxmodels.data.pipeline.train_dataset(start_step=...)`), so a
resumed run continues at the exact next batch whatever its process count — grain's own iterator
checkpoints are one file per process and would tie a checkpoint to the process layout.

Saving and restoring are collective: every process calls them, orbax writes each shard of a
global array once (from the process that holds it) and restores each process's shards into the
target's sharding, so a checkpoint of a fully sharded run restores into a replicated one and
back. Restoring:

- into a run whose identity differs raises a `RunError` naming the difference, before any array
  is read, instead of silently training the wrong parameters;
- from a checkpoint that cannot be read (a truncated file, empty metadata) reports it in one
  line, moves it aside to ``<checkpoints>-unreadable/`` (never deletes it) and falls back to the
  newest readable one.
"""

from __future__ import annotations

import datetime
import os
import shutil
from collections.abc import Callable, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from jaxmodels import sharding
from jaxmodels.weights.orbax_files import quiet_orbax
from training.config import RunError


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


def save(manager, state, identity: Mapping, wait: bool = False) -> None:
    """Saves ``state`` at its step with the run identity.

    Every process calls this (orbax's save is collective); orbax writes each array once.

    Args:
        manager: from :func:`make_manager`.
        state: the train state (a pytree of global arrays).
        identity: from :func:`run_identity`.
        wait: block until the (asynchronous) write is done.
    """
    step = int(np.asarray(state.step.addressable_data(0)))
    # one process: save a NumPy copy, which skips orbax's per-array device copies (one small
    # compilation per leaf shape); several: orbax writes the global arrays itself
    to_save = jax.device_get(state) if jax.process_count() == 1 else state
    manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(to_save),
            meta=ocp.args.JsonSave({"identity": dict(identity)}),
        ),
    )
    if wait:
        manager.wait_until_finished()


def restore_latest(manager, target_state, identity: Mapping, log: Callable[[str], None] = print):
    """Restores the newest readable checkpoint into the structure/sharding of ``target_state``.

    Every process calls this; they agree on which checkpoint is readable (a step one process
    cannot read is moved aside for all), so none waits in a restore the others skipped.

    Args:
        manager: from :func:`make_manager`.
        target_state: a train state of this run (its arrays give shapes, dtypes and shardings:
            orbax reads each process's shards into them, whatever sharding the checkpoint
            was written from).
        identity: this run's :func:`run_identity`; must equal the saved one.
        log: where the one-line report of an unreadable checkpoint goes.

    Returns:
        ``(state, step)``, or ``None`` when the directory holds no readable checkpoint.

    Raises:
        RunError: the checkpoint belongs to a different run (model, mode, shapes, data…).
    """
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)
    for step in sorted(manager.all_steps(), reverse=True):
        error = None
        try:
            with quiet_orbax():
                meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
            found = meta["meta"]["identity"]
        except Exception as err:  # orbax/tensorstore/json raise many kinds for broken files
            error = err
        if sharding.any_process(error is not None):
            _move_aside(manager, step, error, log)
            continue
        diff = _first_difference(_jsonable(identity), found)
        if diff:
            raise RunError(
                f"checkpoint {manager.directory}/{step} belongs to another run ({diff}); use "
                "another output folder or the run's original settings"
            )
        try:
            with quiet_orbax():
                restored = manager.restore(
                    step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
                )
        except Exception as err:  # a truncated array file, a missing item…
            error = err
        if sharding.any_process(error is not None):
            _move_aside(manager, step, error, log)
            continue
        return restored["state"], step
    return None


def _move_aside(manager, step: int, err: Exception | None, log) -> None:
    """Reports an unreadable checkpoint in one line and moves it out of the manager's sight."""
    if err is None:
        reason = "another process could not read it"
    else:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    directory = os.fspath(manager.directory)
    aside = f"{directory}-unreadable"
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    target = os.path.join(aside, f"{step}-{stamp}")
    if jax.process_index() == 0:
        log(f"checkpoint at step {step} is unreadable ({reason[:200]}); moved to {target}")
        os.makedirs(aside, exist_ok=True)
        shutil.move(os.path.join(directory, str(step)), target)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"checkpoint {step} moved aside")
    manager.reload()


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


def _jsonable(value):
    """Same normalisation JSON applies (tuples → lists), so comparisons are like for like."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value
