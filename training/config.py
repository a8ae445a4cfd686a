"""What one fine-tuning run is: `TrainConfig` (how to train) inside `RunConfig` (which run),
every field checked when it is made.

A run folder stores its config as JSON (`config.json`, and again in `result.json`); a command
started on an existing folder is compared with it field by field (`differences`), so a finished
run is never silently re-labelled and a resumed run never silently changes its recipe.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jaxmodels
from training import masks


class RunError(ValueError):
    """A user error about a run — its settings, its folder, its data — stated in one line."""


# Augmentation presets a sweep grids over (model soups vary augmentation strength per ingredient).
AUGMENTATIONS = {
    "none": dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=False),
    "light": dict(scale=(0.35, 1.0), hflip=True),
    "strong": dict(scale=(0.08, 1.0), hflip=True, mixup_alpha=0.8, cutmix_alpha=1.0),
}

# Settings that do not change what a run computes: they may differ between a run and the command
# that resumes or re-reads it.
OPERATIONAL_FIELDS = (
    "out_dir",
    "checkpoint_every",
    "eval_every",
    "keep_checkpoints",
    "tfds_data_dir",
    "num_workers",
    "stop_after_steps",
    "shard_params",  # where the state lives, not what it holds: a run may resume either way
)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How to train: the one settings object the loop, the train step, the optimizer and the
    data pipeline read (`RunConfig` adds what names a run: its model, data and folder).

    Attributes:
        mode: ``full``, ``linear``, ``bitfit`` or ``ssf`` (`training.masks`).
        epochs, batch_size: passes over the data (each drops its last partial batch) and the
            global batch size (a multiple of the device count).
        lr, weight_decay, warmup_epochs, clip_norm: the optimizer (`training.optim`: AdamW,
            linear warmup over ``warmup_epochs``, then cosine to zero; ``clip_norm=None`` does
            not clip).
        label_smoothing: ε of label smoothing.
        augmentation: a key of :data:`AUGMENTATIONS`: the crop and flip of the pipeline, and
            mixup/cutmix in the step.
        ema_decay: EMA of the trained weights (``None`` = off); the EMA is evaluated and saved.
        bf16: compute in bfloat16 (float32 master weights, optimizer state and loss).
        num_classes: the head's size; default the training data's class count.
        seed: data order, augmentation, dropout and mixup/cutmix randomness.
        checkpoint_every: steps between checkpoints (always one at the end).
        eval_every: epochs between evaluations of the run's eval data (always one at the end).
        keep_checkpoints: how many of the newest checkpoints stay (``None``: all of them, the
            run's trajectory, which ``hubtune soup --trajectory`` averages).
        num_workers: image-decoding threads per process.
        stop_after_steps: stop early (a smoke test, a killed job) without finishing the run.
        shard_params: shard parameters, gradients and optimizer state over the devices (fully
            sharded data parallel) instead of replicating them.
    """

    mode: str = "ssf"
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    clip_norm: float | None = 1.0
    label_smoothing: float = 0.0
    augmentation: str = "light"
    ema_decay: float | None = None
    bf16: bool = False
    num_classes: int | None = None
    seed: int = 0
    checkpoint_every: int = 500
    eval_every: int = 1
    keep_checkpoints: int | None = 2
    num_workers: int = 4
    stop_after_steps: int | None = None
    shard_params: bool = False

    def __post_init__(self):
        if self.mode not in masks.MODES:
            raise RunError(f"mode must be one of {', '.join(masks.MODES)}; got {self.mode!r}")
        if self.augmentation not in AUGMENTATIONS:
            raise RunError(
                f"augmentation must be one of {', '.join(AUGMENTATIONS)}; got {self.augmentation!r}"
            )
        _positive_int("epochs", self.epochs)
        _positive_int("batch_size", self.batch_size)
        _positive_int("checkpoint_every", self.checkpoint_every)
        _positive_int("eval_every", self.eval_every)
        if self.keep_checkpoints is not None:
            _positive_int("keep_checkpoints", self.keep_checkpoints)
        for name in ("seed", "num_workers"):
            _int_at_least(name, getattr(self, name), 0)
        if self.stop_after_steps is not None:
            _positive_int("stop_after_steps", self.stop_after_steps)
        if self.num_classes is not None:
            _int_at_least("num_classes", self.num_classes, 2)
        _finite("lr", self.lr, low=0.0, low_open=True)
        _finite("weight_decay", self.weight_decay, low=0.0)
        _finite("warmup_epochs", self.warmup_epochs, low=0.0)
        _finite("label_smoothing", self.label_smoothing, low=0.0, high=1.0)
        if self.clip_norm is not None:
            _finite("clip_norm", self.clip_norm, low=0.0, low_open=True)
        if self.ema_decay is not None:
            _finite("ema_decay", self.ema_decay, low=0.0, low_open=True, high=1.0)
        if not isinstance(self.bf16, bool) or not isinstance(self.shard_params, bool):
            raise RunError("bf16 and shard_params must be booleans")

    @property
    def compute_dtype(self) -> str:
        """``bfloat16`` or ``float32``: the dtype of the forward and backward passes."""
        return "bfloat16" if self.bf16 else "float32"

    @property
    def update_batch_stats(self) -> bool:
        """Only full fine-tuning moves BatchNorm statistics; other modes freeze the backbone."""
        return self.mode == "full"

    @property
    def mix_alphas(self) -> tuple[float, float]:
        """(mixup α, cutmix α) of the augmentation preset (0 = off)."""
        preset = AUGMENTATIONS[self.augmentation]
        return preset.get("mixup_alpha", 0.0), preset.get("cutmix_alpha", 0.0)

    @property
    def crop_options(self) -> dict[str, Any]:
        """The pipeline's crop and flip (`jaxmodels.data.pipeline.Augment`'s options)."""
        preset = AUGMENTATIONS[self.augmentation]
        return {k: v for k, v in preset.items() if k not in ("mixup_alpha", "cutmix_alpha")}


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig(TrainConfig):
    """Everything one fine-tuning run needs (all JSON-able): how to train (`TrainConfig`'s
    fields, keyword-only here too) and what the run is.

    Attributes:
        model: a `jaxmodels.parse_model_ref` reference: ``NAME`` (random init), ``NAME=CHECKPOINT``
            or a model/run folder (e.g. a linear-probe run, whose head is kept when the classes
            match: the LP-FT recipe model soups need).
        train_data: a data spec (`jaxmodels.data.sources.open_source`): ``tfds:NAME[:SPLIT]``, a
            ``.npz`` file or an image folder.
        out_dir: the run folder (checkpoints, weights, metrics, results).
        eval_data: evaluated every ``eval_every`` epochs and at the end; ``None`` skips
            evaluation.
        image_size: model input side (default the model's own).
        init_seed: every freshly initialised parameter (a new head, SSF, a random init). Runs of
            a sweep share it, so they start from one point — what a model soup needs.
        tfds_data_dir: TFDS data directory.
    """

    model: str
    train_data: str
    out_dir: str
    eval_data: str | None = None
    image_size: int | None = None
    init_seed: int = 0
    tfds_data_dir: str | None = None

    def __post_init__(self):
        for name in ("model", "train_data", "out_dir"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise RunError(f"{name} must be a non-empty string; got {getattr(self, name)!r}")
        super().__post_init__()
        _int_at_least("init_seed", self.init_seed, 0)
        if self.image_size is not None:
            _positive_int("image_size", self.image_size)

    @property
    def model_name(self) -> str:
        """The architecture's registry name, when the reference names one (else '')."""
        body = self.model.split(":", 1)[-1] if ":" in self.model.split("=", 1)[0] else self.model
        name = body.split("=", 1)[0]
        return name if name in jaxmodels.MODEL_NAMES else ""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunConfig:
        """The config a run folder stored (fields this version does not know are an error)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise RunError(f"stored run config has fields this hubtune does not know: {unknown}")
        return cls(**data)

    def identity(self) -> dict[str, Any]:
        """The fields that decide what the run computes (all but `OPERATIONAL_FIELDS`)."""
        return {k: v for k, v in self.to_json().items() if k not in OPERATIONAL_FIELDS}

    def differences(self, stored: dict[str, Any]) -> list[str]:
        """``field: stored → this`` for every result-changing field that differs from `stored`."""
        mine = self.identity()
        return [
            f"{key}: {stored.get(key)!r} → {mine.get(key)!r}"
            for key in sorted(set(mine) | (set(stored) - set(OPERATIONAL_FIELDS)))
            if _plain(stored.get(key)) != _plain(mine.get(key))
        ]


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def _positive_int(name: str, value) -> None:
    _int_at_least(name, value, 1)


def _int_at_least(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise RunError(f"{name} must be an integer ≥ {low}; got {value!r}")


def _finite(name, value, *, low=None, high=None, low_open=False) -> None:
    """A finite number in [low, high) (or (low, high) with low_open)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise RunError(f"{name} must be a finite number; got {value!r}")
    if low is not None and (value < low or (low_open and value == low)):
        bound = f"> {low}" if low_open else f"≥ {low}"
        raise RunError(f"{name} must be {bound}; got {value!r}")
    if high is not None and value >= high:
        raise RunError(f"{name} must be < {high}; got {value!r}")
