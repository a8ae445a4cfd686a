"""One fine-tuning run from a `RunConfig`: check everything, build the model, fit, write the folder.

This is what ``hubtune tune`` calls, in two phases:

- `plan(config)` does every cheap check before anything heavy: settings, the output folder (a
  file, a folder holding another run, a finished run), the model reference and its checkpoint's
  header, the data (readable, labels within the classes, evaluation classes within training's,
  TFDS prepared), batch size against devices and data. Errors are `RunError`, `DataError` or
  `ModelRefError`: one line each.
- `run(plan)` executes it in its run folder (`training.run_folder`): a finished run is immutable
  (its stored result is returned and nothing is written); otherwise the folder is locked, the
  model built from ``init_seed``, fitted (resuming from the newest readable checkpoint), and its
  weights (SSF folded into the plain architecture, EMA weights when EMA is on) and results
  written.

Multi-process (one process per host, `jaxmodels.distributed`): every process plans and runs the
same config; process 0 alone takes the folder's lock and writes JSON, and tells the others
whether it got the lock; every process takes part in the collective writes (checkpoints, the
final weights), which orbax does shard by shard.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil
import time
from collections.abc import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

import jaxmodels
from jaxmodels import sharding
from jaxmodels.data import pipeline
from jaxmodels.data import sources as data_lib
from jaxmodels.models import paths, registry
from training import loop, masks
from training import run_folder as folder_lib
from training.config import RunConfig, RunError


@dataclasses.dataclass
class Plan:
    """A run whose every cheap check has passed (`plan`); `run` executes it.

    Attributes:
        config: the run's settings, paths made absolute.
        stored_result: the folder's ``result.json`` when the run has finished (then nothing
            else is opened: a finished run is only re-read).
        ref: the model reference.
        train_source, eval_source: the data (labels read, images not).
        num_classes: the head's size.
        steps_per_epoch: optimizer steps per epoch.
    """

    config: RunConfig
    stored_result: dict | None = None
    ref: jaxmodels.ModelRef | None = None
    train_source: data_lib.ImageSource | None = None
    eval_source: data_lib.ImageSource | None = None
    num_classes: int = 0
    steps_per_epoch: int = 0

    @property
    def finished(self) -> bool:
        return self.stored_result is not None

    @property
    def folder(self) -> pathlib.Path:
        return pathlib.Path(self.config.out_dir)


def resolve_paths(config: RunConfig) -> RunConfig:
    """The config with every local path absolute, so the stored config means the same thing
    from any working directory (TFDS specs and bare model names are left as they are)."""
    absolute = lambda p: os.path.abspath(p) if p else p
    data = lambda spec: spec if spec is None or spec.startswith("tfds:") else absolute(spec)
    return dataclasses.replace(
        config,
        model=_resolve_model_ref(config.model),
        train_data=data(config.train_data),
        eval_data=data(config.eval_data),
        out_dir=absolute(config.out_dir),
        tfds_data_dir=absolute(config.tfds_data_dir),
    )


def _resolve_model_ref(text: str) -> str:
    head, sep, rest = text.partition(":")
    label, body = (head + sep, rest) if sep and "=" not in head and "/" not in head else ("", text)
    name, eq, path = body.partition("=")
    if eq:
        return f"{label}{name}={os.path.abspath(path)}" if os.path.exists(path) else text
    return f"{label}{os.path.abspath(body)}" if os.path.isdir(body) else text


def plan(config: RunConfig) -> Plan:
    """Checks a run before any heavy work (module docstring).

    Raises:
        RunError, jaxmodels.data.sources.DataError, jaxmodels.ModelRefError: one line, naming the problem.
    """
    config = resolve_paths(config)
    folder = pathlib.Path(config.out_dir)
    if folder.exists() and not folder.is_dir():
        raise RunError(f"output folder {str(folder)!r} is a file")
    stored = folder_lib.read_json(folder / folder_lib.CONFIG_JSON)
    result = folder_lib.read_json(folder / folder_lib.RESULT_JSON)
    if stored is None and isinstance(result, dict):
        stored = result.get("config")
    if isinstance(stored, dict):
        differences = config.differences(stored)
        if differences:
            raise RunError(
                f"{folder} holds a run with other settings ({'; '.join(differences)}); use "
                "another --out, or the folder's own settings to resume or re-read it"
            )
    if isinstance(result, dict) and result.get("finished"):
        return Plan(config, stored_result=result)
    ref = jaxmodels.parse_model_ref(config.model)
    train = data_lib.open_source(
        config.train_data, split="train", data_dir=config.tfds_data_dir,
        num_classes=config.num_classes,
    )  # fmt: skip
    num_classes = config.num_classes or train.num_classes
    if config.num_classes is None:
        _check_every_class_present(train)
    evaluation = None
    if config.eval_data:
        evaluation = data_lib.open_source(
            config.eval_data, split="test", data_dir=config.tfds_data_dir
        )
        data_lib.check_classes_within(evaluation, num_classes, "evaluation data")
    devices = jax.device_count()
    if config.batch_size % devices:
        lower = max(devices, config.batch_size // devices * devices)
        raise RunError(
            f"batch size {config.batch_size} must be a multiple of the {devices} devices "
            f"(try {lower} or {lower + devices})"
        )
    per_epoch = pipeline.steps_per_epoch(len(train), config.batch_size)
    if per_epoch == 0:
        raise RunError(
            f"batch size {config.batch_size} exceeds the {len(train)} training examples of "
            f"{config.train_data}"
        )
    return Plan(config, None, ref, train, evaluation, num_classes, per_epoch)


def data_summary(run_plan: Plan, model_side: int) -> list[str]:
    """What the run read, in lines for the log: images, classes, image size and source of the
    training and evaluation data, and a warning for a class so small it looks like a stray label
    (one image of class 10 among 10 classes of 90 would silently add an 11th output)."""
    lines = []
    for role, source in (("training", run_plan.train_source), ("evaluation", run_plan.eval_source)):
        if source is None:
            continue
        height, width = source[0]["image"].shape[:2]
        lines.append(
            f"{role} data: {source.describe()}, images {height}×{width} "
            f"(fed at {model_side}×{model_side})"
        )
    counts = np.bincount(run_plan.train_source.labels, minlength=run_plan.num_classes)
    median = float(np.median(counts))
    stray = np.flatnonzero((counts > 0) & (counts <= max(1.0, 0.02 * median)))
    if median >= 10 and stray.size:
        listed = ", ".join(f"class {c} ({counts[c]} images)" for c in stray[:5])
        lines.append(
            f"warning: {listed} against a median of {median:.0f} per class: stray labels? "
            f"the head has {run_plan.num_classes} outputs; pass --num-classes to declare how "
            "many there are (labels beyond it are then an error)"
        )
    return lines


def _check_every_class_present(source) -> None:
    """Without --num-classes the head has max(label) + 1 outputs: a stray label (99 among 0–4)
    would silently add 95 empty classes, so every class below the largest must have examples."""
    counts = np.bincount(source.labels, minlength=source.num_classes)
    empty = np.flatnonzero(counts == 0)
    if empty.size:
        listed = ", ".join(f"label {c} ({counts[c]} images)" for c in np.flatnonzero(counts))
        raise RunError(
            f"training data {source.spec!r} has no example of {empty.size} of its "
            f"{source.num_classes} classes (first missing: {int(empty[0])}); its labels: "
            f"{listed}. Fix stray labels, or pass --num-classes to train a head with empty classes"
        )


def run(
    run_plan: Plan | RunConfig,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Runs (or resumes, or re-reads) one fine-tuning run in its folder.

    Args:
        run_plan: from `plan` (a `RunConfig` is planned first).
        progress: show a progress bar.
        log: prints progress lines on process 0 (default `print`).

    Returns:
        The run's result, also in ``result.json`` (for a finished run: the stored one, with
        nothing in the folder changed).

    Raises:
        RunError: another process holds the folder, or its checkpoints belong to another run.
    """
    run_plan = plan(run_plan) if isinstance(run_plan, RunConfig) else run_plan
    log = log or print
    if run_plan.finished:
        return run_plan.stored_result
    config, folder = run_plan.config, run_plan.folder
    lock = folder_lib.FolderLock(folder)
    error = None
    if jax.process_index() == 0:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            lock.acquire()
        except (RunError, OSError) as err:
            error = err if isinstance(err, RunError) else RunError(f"cannot lock {folder}: {err}")
    if jax.process_count() > 1:  # every process learns whether process 0 holds the folder
        held = bool(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
        if not held and error is None:
            error = RunError(f"{folder} is in use by another command (process 0 could not lock it)")
    if error is not None:
        raise error
    config_path = folder / folder_lib.CONFIG_JSON
    created = False
    try:
        if jax.process_index() == 0 and not config_path.exists():
            folder_lib.write_json(config_path, _stored_config(config))
            created = True
        return _execute(run_plan, progress, log)
    except BaseException:
        if created:  # failed before its first checkpoint: nothing the corrected command must match
            _forget_unstarted(folder)
        raise
    finally:
        lock.release()


def _forget_unstarted(folder: pathlib.Path) -> None:
    """Removes what a run that saved no checkpoint wrote (its config, log, empty checkpoint
    folder), so that a corrected command — another model, say — is not refused as "other
    settings"; a run with a checkpoint is kept, to be resumed."""
    checkpoints = folder / folder_lib.CHECKPOINT_DIR
    if checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir()):
        return
    shutil.rmtree(checkpoints, ignore_errors=True)
    for name in (folder_lib.CONFIG_JSON, folder_lib.METRICS_JSONL):
        (folder / name).unlink(missing_ok=True)


def _execute(run_plan: Plan, progress: bool, log) -> dict:
    config, folder = run_plan.config, run_plan.folder
    built = jaxmodels.build(
        run_plan.ref, num_classes=run_plan.num_classes, ssf=config.mode == "ssf",
        init_seed=config.init_seed, image_size=config.image_size,
    )  # fmt: skip
    model, variables = built.model, built.variables
    start_sha256 = paths.tree_digest(variables)
    spec = jaxmodels.spec_of(model)
    if jax.process_index() == 0:
        for line in data_summary(run_plan, spec.preprocessing.image_size):
            log(line)
    start = time.perf_counter()
    fitted = loop.fit(
        model, variables, run_plan.train_source, spec.preprocessing, config,
        head_name=spec.head, eval_data=run_plan.eval_source,
        checkpoint_dir=str(folder / folder_lib.CHECKPOINT_DIR),
        log_path=str(folder / folder_lib.METRICS_JSONL),
        identity={**config.identity(), "start_sha256": start_sha256}, progress=progress, log=log,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    state = fitted.state
    model_dir = folder / folder_lib.MODEL_DIR
    if fitted.finished:
        # global arrays, replicated or sharded: saved shard by shard, never gathered on a host
        weights = {"params": state.params(use_ema=bool(state.ema))}
        if state.batch_stats:
            weights["batch_stats"] = state.batch_stats
        weights = jaxmodels.models.ssf.fold(weights) if config.mode == "ssf" else weights
        plain = model.clone(ssf=False) if config.mode == "ssf" else model
        info = {
            "mode": config.mode,
            "ssf_folded": config.mode == "ssf",
            "ema": config.ema_decay is not None,
            "seed": config.seed,
            "init_seed": config.init_seed,
            "base_model": config.model,
            "base_checkpoint_sha256": built.checkpoint_sha256,
            "start_sha256": start_sha256,
            "train_data": config.train_data,
            "eval_data": config.eval_data,
        }
        _save_model(model_dir, built.ref.name, plain, weights, info)
    result = {
        "config": _stored_config(config),
        "finished": fitted.finished,
        "steps": int(loop.host_copy(state.step)),
        "seconds": seconds,
        "resumed_from": fitted.resumed_from,
        "num_classes": run_plan.num_classes,
        "seed": config.seed,
        "init_seed": config.init_seed,
        "trainable_params": masks.count_params(state.trainable),
        "total_params": masks.count_params(state.trainable) + masks.count_params(state.frozen),
        "final_eval": fitted.evals[-1] if fitted.evals else None,
        "evals": fitted.evals,
        "last_train": fitted.last_train,
        "model_dir": folder_lib.MODEL_DIR if fitted.finished else None,
        "metrics": folder_lib.METRICS_JSONL,
        "checkpoints": folder_lib.CHECKPOINT_DIR,
    }
    if jax.process_index() == 0:
        folder_lib.write_json(folder / folder_lib.RESULT_JSON, _plain(result))
    return _plain(result)


def _save_model(model_dir: pathlib.Path, name: str, model, weights: dict, info: dict) -> None:
    """Writes the final weights; every process takes part (orbax's save is collective)."""
    # decided together: a process that looked after process 0 moved the folder would skip the
    # barrier below and wait in another collective
    if sharding.any_process(model_dir.exists()):  # an earlier attempt died before result.json
        if jax.process_index() == 0:
            aside = model_dir.with_name(f"{model_dir.name}-incomplete-{int(time.time())}")
            model_dir.rename(aside)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("model folder moved aside")
    overrides = registry.overrides_of(name, model)
    jaxmodels.save(model_dir, name, weights, info=info, **overrides)


def _stored_config(config: RunConfig) -> dict:
    """The config as a run folder stores it: out_dir is the folder itself."""
    return {**config.to_json(), "out_dir": "."}


def _plain(value):
    """JSON-safe copy (NumPy scalars → Python numbers, tuples → lists)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
