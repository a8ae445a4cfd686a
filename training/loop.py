"""The fine-tuning loop: data-parallel steps over a device mesh, evaluation, logs, checkpoints.

Parameters and optimizer state live on a 1-D ``Mesh`` of all devices (axis ``data``,
`jaxmodels.sharding`): replicated (the default; XLA inserts the gradient all-reduce), or with
``shard_params`` fully sharded — parameters, gradients, optimizer moments and EMA each split along
their largest dimension divisible by the device count (`sharding.param_shardings`), so a device
holds about 1/n of them; XLA all-gathers the weights for the forward and backward passes and
reduce-scatters the gradients. Where flat collectives pay (CPU, several processes:
`flat_reduce.flat_reduce_pays`), the sharded state is flat instead (`training.flat_sharded`: one
all-gather and one reduce-scatter per step), in the pytree layout again for checkpoints,
evaluations and the result. The train state is built by one ``jax.jit`` (`training.programs`, with
the step and the optimizer) whose ``out_shardings`` place every array where it lives from then on
(never a full copy per device first), and each global batch is split along the mesh with
``NamedSharding``. Batches come from the grain pipeline of `jaxmodels.data.pipeline` as uint8 and
are normalised on the device; each process loads only its slice of a batch and the global array is
assembled with ``jax.make_array_from_process_local_data``, so the same code runs on one CPU, eight
fake CPU devices, or many hosts. The evaluation set is decoded once (`jaxmodels.prepare`) and
evaluated every ``eval_every`` epochs and at the end with `jaxmodels.evaluate`. A run checkpoints
every N steps and at the end (the data position follows from the step), and a run started again
with the same settings resumes from the newest readable checkpoint — under any process count,
replicated or sharded — and ends with the same parameters as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
from tqdm.auto import tqdm

import jaxmodels
from jaxmodels import sharding
from jaxmodels.data import pipeline, preprocess
from training import checkpoints, masks, optim
from training import step as step_lib
from training.config import TrainConfig
from training.programs import run_programs

# Training metrics are fetched from the device and logged every this many steps (a host sync)
# by default.
LOG_EVERY = 10


# An interrupted or crashed single-process run loses at most this much training: a checkpoint
# is also saved once this long has passed since the last (several processes would have to agree
# on the clock; they save at every epoch's end instead).
CHECKPOINT_SECONDS = 120.0


class Interrupted(Exception):
    """Ctrl-C during `fit`: the run stopped at `step`, with a checkpoint there if `saved`."""

    def __init__(self, step: int, saved: bool):
        super().__init__(f"interrupted at step {step}")
        self.step, self.saved = step, saved


@dataclasses.dataclass
class FitResult:
    """What :func:`fit` returns.

    Attributes:
        state: the final train state.
        evals: every evaluation of the run, those from before a resume included.
        last_train: the last logged training metrics.
        finished: whether the run reached its last step.
        resumed_from: the step it resumed from, or None for a fresh start.
    """

    state: step_lib.TrainState
    evals: list[dict]
    last_train: dict
    finished: bool
    resumed_from: int | None = None


# NumPy copy of global arrays on every process (``jax.device_get`` refuses multi-host arrays).
host_copy = sharding.host_copy


class _MetricsLog:
    """The JSON-lines log, written by process 0; on resume, lines after the resumed step go."""

    def __init__(self, path: str | None):
        self.path = path if path and jax.process_index() == 0 else None
        self.file = None

    def resume(self, step: int | None) -> list[dict]:
        """Keeps the records up to `step` (none for a fresh start); returns their evaluations."""
        if self.path is None:
            return []
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        kept: list[dict] = []
        if step is not None and os.path.exists(self.path):
            with open(self.path) as f:
                for line in f:
                    record = _parse(line)
                    if record is not None and record.get("step", 0) <= step:
                        kept.append(record)
        with open(self.path, "w") as f:  # each step once: what came after `step` is redone
            f.writelines(json.dumps(r) + "\n" for r in kept)
        self.file = open(self.path, "a")  # closed in close()
        return [r for r in kept if r.get("split") == "eval"]

    def write(self, record: dict) -> None:
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()


def _parse(line: str) -> dict | None:
    try:
        record = json.loads(line)
    except ValueError:  # a line cut by a kill
        return None
    return record if isinstance(record, dict) else None


def fit(
    model,
    variables: dict,
    train_source,
    preprocessing: preprocess.Preprocessing,
    config: TrainConfig,
    *,
    head_name: str = masks.HEAD_NAME,
    eval_data=None,
    checkpoint_dir: str | None = None,
    log_path: str | None = None,
    log_every: int = LOG_EVERY,
    identity: dict | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> FitResult:
    """Fine-tunes ``variables`` on ``train_source`` and evaluates after each epoch.

    Args:
        model: a Flax Linen classifier taking ``(variables, images, train=)``.
        variables: initial ``{"params": ..., ["batch_stats": ...]}``.
        train_source: an `ImageSource` (`jaxmodels.data.sources`) of training examples.
        preprocessing: the model's; the pipeline crops to its side (``config.augmentation``),
            the step normalises on the device, and the evaluation set is prepared with it.
        config: the run's settings, read as one object by this loop, the pipeline and
            `training.programs.run_programs` (masks, optimizer, placement and step).
        head_name: the classifier's top-level module (``head`` for ViT, ``fc`` for ResNet).
        eval_data: optional labelled data (a source, spec or `jaxmodels.Prepared` set)
            evaluated after each epoch and at the end.
        checkpoint_dir: where to save and resume; ``None`` disables checkpoints.
        log_path: JSON-lines metrics file; ``None`` disables it.
        log_every: write training metrics every this many steps (and at the last).
        identity: extra facts a resumed run must match (e.g. ``{"model": "vit_s16"}``).
        progress: show a tqdm progress bar (process 0 only).
        log: prints progress lines (evaluations, resumption) on process 0; default `print`.

    Returns:
        A :class:`FitResult`.

    Raises:
        ValueError: a mask that selects nothing, a batch not divisible by the device count.
        training.config.RunError: a checkpoint from a different run.
    """
    log = log or print
    say = lambda text: log(text) if jax.process_index() == 0 else None
    mesh = sharding.data_mesh()
    sharding.check_batch_size(config.batch_size, mesh)
    augment = pipeline.Augment(preprocessing, **config.crop_options)
    num_classes = config.num_classes or train_source.num_classes
    train = pipeline.train_dataset(
        train_source, augment, global_batch=config.batch_size, seed=config.seed,
        epochs=config.epochs, num_threads=config.num_workers,
    )  # fmt: skip
    per_epoch = train.steps_per_epoch
    total = config.epochs * per_epoch
    programs = run_programs(
        model, variables, config, num_classes=num_classes, preprocessing=preprocessing,
        head_name=head_name, mesh=mesh,
    )  # fmt: skip
    replicated = sharding.replicated_sharding(mesh)
    ema = config.ema_decay is not None
    state = programs.initial_state(variables, optim.schedule_state(config, per_epoch))
    run_id = checkpoints.run_identity(
        state,
        **{
            **(identity or {}),
            "mode": config.mode,
            "seed": config.seed,
            "global_batch": config.batch_size,
            "num_train_examples": len(train_source),
        },
    )
    manager = None
    if checkpoint_dir:
        manager = checkpoints.make_manager(checkpoint_dir, config.keep_checkpoints)
    resumed_from = None
    if manager is not None:
        restored = checkpoints.restore_latest(manager, state, run_id, say)
        if restored is not None:
            state, resumed_from = restored
            say(f"resumed from step {resumed_from} of {total} ({checkpoint_dir})")
            train = pipeline.train_dataset(
                train_source, augment, global_batch=config.batch_size, seed=config.seed,
                epochs=config.epochs, num_threads=config.num_workers, start_step=resumed_from,
            )  # fmt: skip
    batches = iter(train)
    metrics_log = _MetricsLog(log_path)
    evals = metrics_log.resume(resumed_from)

    # the flat sharded state (where flat collectives pay) goes back to the pytree layout for
    # checkpoints, evaluations and the result
    as_tree, train_fn = programs.to_tree, programs.train_step
    state = programs.to_flat(state)
    prepared = None
    if eval_data is not None:
        prepared = jaxmodels.prepare(
            eval_data, preprocessing, batch_size=config.batch_size, mesh=mesh, progress=False
        )
    eval_dtype = jnp.bfloat16 if config.bf16 else None
    # made on the mesh: a key array on one local device cannot be put on other hosts' devices
    key = jax.jit(lambda: jax.random.key(config.seed), out_shardings=replicated)()
    metrics: dict = {}
    step = int(host_copy(state.step))
    end = total if config.stop_after_steps is None else min(total, config.stop_after_steps)
    bar = tqdm(
        total=total,
        initial=step,
        disable=not progress or jax.process_index() > 0,
        desc=f"fit[{config.mode}]",
        unit="step",
        leave=False,
        delay=2.0,  # work done within 2 s draws no bar (logs would keep its 0 %)
    )
    report = (lambda text: bar.write(text)) if not bar.disable else say
    single = jax.process_count() == 1
    try:
        tick = last_save = time.perf_counter()
        while step < end:
            batch = next(batches)
            try:
                state, metrics = train_fn(state, sharding.shard_local_batch(batch, mesh), key)
            except KeyboardInterrupt:
                # state is the last completed step's (the interrupted call returned nothing);
                # one process alone can save it (a collective save needs every process)
                saved = manager is not None and single and step > 0
                if saved:
                    checkpoints.save(manager, as_tree(state), run_id)
                raise Interrupted(step, saved) from None
            step += 1
            bar.update(1)
            if step % log_every == 0 or step == end:
                metrics = {k: float(v) for k, v in host_copy(metrics).items()}
                record = {"split": "train", "step": step, "epoch": step / per_epoch, **metrics}
                metrics_log.write({**record, "elapsed_s": time.perf_counter() - tick})
                bar.set_postfix(loss=f"{metrics['loss']:.4f}")
            due = step % config.checkpoint_every == 0 or step == total
            if single:
                due = due or time.perf_counter() - last_save >= CHECKPOINT_SECONDS
            else:
                due = due or step % per_epoch == 0
            if manager is not None and due:
                checkpoints.save(manager, as_tree(state), run_id)
                last_save = time.perf_counter()
            evaluate_now = step % (per_epoch * config.eval_every) == 0 or step == total
            if prepared is not None and evaluate_now:
                variables_now = {"params": as_tree(state).params(use_ema=ema)}
                if state.batch_stats:
                    variables_now["batch_stats"] = state.batch_stats
                result = jaxmodels.evaluate(model, variables_now, prepared, dtype=eval_dtype)
                record = {"split": "eval", "step": step, "epoch": step // per_epoch,
                          **result._asdict()}  # fmt: skip
                evals.append(record)
                metrics_log.write(record)
                report(
                    f"epoch {step // per_epoch}/{config.epochs}  step {step}/{total}  "
                    f"eval accuracy {result.accuracy:.4f}  loss {result.loss:.4f}  "
                    f"({result.count} examples)"
                )
    finally:
        bar.close()
        metrics_log.close()
        if manager is not None:
            manager.wait_until_finished()
            manager.close()
    metrics = {k: float(v) for k, v in host_copy(metrics).items()}
    return FitResult(as_tree(state), evals, metrics, step == total, resumed_from)
