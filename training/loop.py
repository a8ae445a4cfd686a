"""The fine-tuning loop: data-parallel steps over a device mesh, evaluation, logs, checkpoints.

Parameters and optimizer state are replicated over a 1-D ``Mesh`` of all devices (axis
``data``) and each global batch is sharded along it with ``NamedSharding``; XLA inserts the
gradient all-reduce. Each process loads only its slice of a batch and the global array is
assembled with ``jax.make_array_from_process_local_data``, so the same code runs on one CPU,
eight fake CPU devices, or many hosts. A run checkpoints every N steps and at the end, and a
run started again with the same settings resumes from the newest checkpoint and ends with the
same parameters as an uninterrupted one.
"""

import dataclasses
import json
import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from training import checkpoints, masks, optim
from training import data as data_lib
from training import train_step as step_lib

DATA_AXIS = "data"


@dataclasses.dataclass(frozen=True)
class FitConfig:
    """Loop settings.

    Attributes:
        epochs: passes over the training data (each drops the last partial batch).
        global_batch: examples per step over all devices (divisible by the device count).
        seed: data order, augmentation and dropout/mixup randomness.
        mode: ``full``, ``linear``, ``bitfit`` or ``ssf`` (see ``training.masks``).
        head_name: the top-level classifier module (``head`` for ViT, ``fc`` for ResNet).
        checkpoint_dir: where to save/resume; ``None`` disables checkpoints.
        checkpoint_every: save every this many steps (and always at the end).
        log_path: JSON-lines metrics file; ``None`` disables it.
        log_every: write training metrics every this many steps.
        eval_with_ema: evaluate the EMA weights when EMA is on.
        stop_after_steps: stop (without a final save) once the step count reaches this;
            simulates a killed job and bounds benchmark runs. ``None`` runs to the end.
        progress: show a tqdm progress bar (process 0 only).
        num_workers: image-decoding threads per process.
    """

    epochs: int = 1
    global_batch: int = 64
    seed: int = 0
    mode: str = "full"
    head_name: str = masks.HEAD_NAME
    checkpoint_dir: str | None = None
    checkpoint_every: int = 500
    log_path: str | None = None
    log_every: int = 10
    eval_with_ema: bool = True
    stop_after_steps: int | None = None
    progress: bool = True
    num_workers: int = 0

    def __post_init__(self):
        if self.mode not in masks.MODES:
            raise ValueError(f"mode must be one of {masks.MODES}; got {self.mode!r}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1; got {self.epochs}")
        if self.global_batch < 1:
            raise ValueError(f"global_batch must be >= 1; got {self.global_batch}")
        if self.checkpoint_every < 1 or self.log_every < 1:
            raise ValueError(
                f"checkpoint_every and log_every must be >= 1; "
                f"got {self.checkpoint_every}, {self.log_every}"
            )


@dataclasses.dataclass
class FitResult:
    """What :func:`fit` returns: the final state, evaluation history and the last metrics."""

    state: step_lib.TrainState
    evals: list[dict]
    last_train: dict
    finished: bool


def host_copy(tree):
    """NumPy copy of a pytree of replicated arrays, on every process.

    ``jax.device_get`` refuses arrays that span several hosts; a replicated array's local
    shard is the whole value, so read that instead.
    """
    to_host = lambda x: np.asarray(x.addressable_data(0) if isinstance(x, jax.Array) else x)
    return jax.tree.map(to_host, tree)


def data_mesh() -> Mesh:
    """A 1-D mesh over every device of every process, axis ``data``."""
    return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """Global arrays from this process's slice of a batch, split along ``data``."""
    sharding = NamedSharding(mesh, P(DATA_AXIS))
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def evaluate(eval_fn, state, source, preprocess, global_batch, mesh, use_ema) -> dict:
    """Loss and accuracy of ``state`` over ``source`` (padding excluded)."""
    totals = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
    params = state.params(use_ema=use_ema)
    for batch in data_lib.eval_batches(
        source, global_batch, preprocess, jax.process_index(), jax.process_count()
    ):
        sums = eval_fn(params, state.batch_stats, shard_batch(batch, mesh))
        for k, v in host_copy(sums).items():
            totals[k] += float(v)
    count = max(totals["count"], 1.0)
    return {
        "loss": totals["loss_sum"] / count,
        "accuracy": totals["correct"] / count,
        "count": int(totals["count"]),
    }


class _JsonLines:
    def __init__(self, path: str | None):
        self.file = None
        if path and jax.process_index() == 0:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self.file = open(path, "a")  # closed in close()

    def write(self, record: dict) -> None:
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()


def fit(
    apply_fn: Callable,
    variables: dict,
    train_source,
    preprocess: data_lib.Preprocess,
    optim_config: optim.OptimConfig,
    step_config: step_lib.StepConfig,
    config: FitConfig,
    eval_source=None,
    eval_preprocess: data_lib.Preprocess | None = None,
    identity: dict | None = None,
) -> FitResult:
    """Fine-tunes ``variables`` on ``train_source`` and evaluates after each epoch.

    Args:
        apply_fn: ``model.apply`` of a Flax Linen classifier taking ``(variables, images,
            train=)``; the classifier is the top-level module ``config.head_name``.
        variables: initial ``{"params": ..., ["batch_stats": ...]}``.
        train_source: random-access source (see ``training.data``) of training examples.
        preprocess: training transform settings (image size, normalisation).
        optim_config: optimizer settings; its ``total_steps`` should equal
            ``epochs * steps_per_epoch`` (use :func:`total_steps`).
        step_config: train-step options.
        config: loop settings.
        eval_source: optional source evaluated after each epoch and at the end.
        eval_preprocess: evaluation transform (default: ``preprocess``).
        identity: extra facts a resumed run must match (e.g. ``{"model": "vit_s16"}``).

    Returns:
        A :class:`FitResult`.

    Raises:
        ValueError: bad mode, a mask that selects nothing, a batch not divisible by the
            device count, a schedule length other than the run's, or a checkpoint from a
            different run.
    """
    mesh = data_mesh()
    if config.global_batch % mesh.size:
        raise ValueError(
            f"global_batch {config.global_batch} must be divisible by the {mesh.size} devices"
        )
    per_epoch = data_lib.steps_per_epoch(len(train_source), config.global_batch)
    if per_epoch == 0:
        raise ValueError(
            f"global_batch {config.global_batch} exceeds the {len(train_source)} training examples"
        )
    total = config.epochs * per_epoch
    if optim_config.total_steps != total:
        # otherwise the cosine schedule would end early or never reach its floor
        raise ValueError(
            f"optim_config.total_steps must equal epochs * steps per epoch = "
            f"{config.epochs} * {per_epoch} = {total}; got {optim_config.total_steps}"
        )
    trainable_mask = masks.trainable_mask(variables["params"], config.mode, config.head_name)
    decay_mask = masks.flatten_params(masks.weight_decay_mask(variables["params"]))
    trainable, _ = masks.split_params(variables["params"], trainable_mask)
    optimizer, _ = optim.init_optimizer(optim_config, trainable, decay_mask)

    replicated = NamedSharding(mesh, P())
    state = step_lib.init_train_state(
        variables, trainable_mask, optimizer, ema=step_config.ema_decay is not None
    )
    # fresh buffers: the train step donates its state, and the caller's variables must survive
    # (device_put may hand back the caller's buffer as the device-0 shard, may_alias or not)
    state = jax.tree.map(jnp.copy, jax.device_put(state, replicated))
    run_id = checkpoints.run_identity(
        state,
        **{
            **(identity or {}),
            "mode": config.mode,
            "seed": config.seed,
            "global_batch": config.global_batch,
            "num_train_examples": len(train_source),
        },
    )
    position = data_lib.DataPosition()
    manager = checkpoints.make_manager(config.checkpoint_dir) if config.checkpoint_dir else None
    if manager is not None:
        restored = checkpoints.restore_latest(manager, state, run_id)
        if restored is not None:
            state, position = restored

    schedule = optim.make_schedule(optim_config)
    train_fn = jax.jit(
        step_lib.make_train_step(apply_fn, optimizer, step_config, schedule),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
    )
    eval_fn = jax.jit(
        step_lib.make_eval_step(apply_fn, step_config.compute_dtype), out_shardings=replicated
    )
    key = jax.device_put(jax.random.key(config.seed), replicated)
    log = _JsonLines(config.log_path)
    evals: list[dict] = []
    metrics: dict = {}
    step = int(host_copy(state.step))
    end = total if config.stop_after_steps is None else min(total, config.stop_after_steps)
    bar = tqdm(
        total=total,
        initial=step,
        disable=not config.progress or jax.process_index() > 0,
        desc=f"fit[{config.mode}]",
        unit="step",
    )
    batches = data_lib.train_batches(
        train_source,
        config.global_batch,
        preprocess,
        config.seed,
        position,
        jax.process_index(),
        jax.process_count(),
        config.num_workers,
    )
    use_ema = config.eval_with_ema and step_config.ema_decay is not None
    try:
        tick = time.perf_counter()
        while step < end:
            position, batch = next(batches)
            state, metrics = train_fn(state, shard_batch(batch, mesh), key)
            step += 1
            bar.update(1)
            if step % config.log_every == 0 or step == end:
                metrics = {k: float(v) for k, v in host_copy(metrics).items()}
                now = time.perf_counter()
                log.write(
                    {
                        "split": "train",
                        "step": step,
                        "epoch": step / per_epoch,
                        "elapsed_s": now - tick,
                        **metrics,
                    }
                )
                bar.set_postfix(loss=f"{metrics['loss']:.4f}")
            if manager is not None and (step % config.checkpoint_every == 0 or step == total):
                checkpoints.save(manager, state, position, run_id)
            if eval_source is not None and (step % per_epoch == 0 or step == total):
                result = evaluate(
                    eval_fn,
                    state,
                    eval_source,
                    eval_preprocess or preprocess,
                    config.global_batch,
                    mesh,
                    use_ema,
                )
                record = {"split": "eval", "step": step, "epoch": step // per_epoch, **result}
                evals.append(record)
                log.write(record)
    finally:
        bar.close()
        log.close()
        batches.close()
        if manager is not None:
            manager.wait_until_finished()
            manager.close()
    metrics = {k: float(v) for k, v in host_copy(metrics).items()}
    return FitResult(state=state, evals=evals, last_train=metrics, finished=step == total)


def total_steps(num_examples: int, global_batch: int, epochs: int) -> int:
    """Optimizer steps of a run: ``epochs * (num_examples // global_batch)``."""
    return epochs * data_lib.steps_per_epoch(num_examples, global_batch)
