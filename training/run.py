"""One fine-tuning run from names and paths: build the model, fit it, write weights and results.

This is what ``scripts/finetune.py`` calls. A run is described by a :class:`RunConfig` (JSON-able,
so a sweep can write it beside its result) and leaves in its output directory:

- ``checkpoints/``: resumable train state (orbax), so a killed run picks up where it stopped;
- ``model/``: the final weights for ``jaxmodels.load(model_name, path)``. SSF runs are folded
  into the plain architecture (``jaxmodels.ssf.fold``): the deployed model has the original
  speed. With EMA on, the EMA weights are the ones written (and evaluated);
- ``metrics.jsonl``: training and evaluation metrics, one JSON object per line;
- ``result.json``: the config, final evaluation, parameter counts and wall time.
"""

import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxmodels
from training import data as data_lib
from training import loop, masks, optim, sources
from training import train_step as step_lib

# Augmentation presets a sweep grids over (model soups vary augmentation strength per ingredient).
AUGMENTATIONS = {
    "none": dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=False),
    "light": dict(scale=(0.35, 1.0), hflip=True),
    "strong": dict(scale=(0.08, 1.0), hflip=True, mixup_alpha=0.8, cutmix_alpha=1.0),
}


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything one fine-tuning run needs (all JSON-able).

    Attributes:
        model: ``NAME`` (random init) or ``NAME=CHECKPOINT`` (``jaxmodels.load`` path).
        train_data: ``tfds:NAME[:SPLIT]``, a ``.npz`` file or an image folder.
        eval_data: same forms; ``None`` skips evaluation.
        out_dir: directory for checkpoints, weights, metrics and results.
        mode: ``full``, ``linear``, ``bitfit`` or ``ssf``.
        epochs, batch_size: passes over the data and the global batch size.
        lr, weight_decay, warmup_epochs, clip_norm: optimizer (AdamW, warmup + cosine).
        label_smoothing: ε of label smoothing.
        augmentation: a key of :data:`AUGMENTATIONS`.
        ema_decay: EMA of the trained weights (``None`` = off).
        bf16: compute in bfloat16 (float32 master weights).
        image_size: model input side (default the model's own).
        seed: data order, augmentation, head/SSF initialisation.
        checkpoint_every: steps between checkpoints.
        tfds_data_dir: TFDS data directory.
        num_workers: image-decoding threads.
        stop_after_steps: stop early (e.g. for a smoke test) without marking the run finished.
    """

    model: str
    train_data: str
    out_dir: str
    eval_data: str | None = None
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
    image_size: int | None = None
    seed: int = 0
    checkpoint_every: int = 500
    tfds_data_dir: str | None = None
    num_workers: int = 4
    stop_after_steps: int | None = None

    def __post_init__(self):
        if self.augmentation not in AUGMENTATIONS:
            raise ValueError(
                f"augmentation must be one of {sorted(AUGMENTATIONS)}; got {self.augmentation!r}"
            )
        if self.mode not in masks.MODES:
            raise ValueError(f"mode must be one of {masks.MODES}; got {self.mode!r}")
        name = self.model_name
        if name not in jaxmodels.MODEL_NAMES:
            raise ValueError(
                f"model must be NAME or NAME=CHECKPOINT with NAME in "
                f"{', '.join(jaxmodels.MODEL_NAMES)}; got {self.model!r}"
            )
        if self.warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0; got {self.warmup_epochs}")

    @property
    def model_name(self) -> str:
        return self.model.split("=", 1)[0]

    @property
    def checkpoint(self) -> str | None:
        return self.model.split("=", 1)[1] if "=" in self.model else None


def build_variables(
    model_name: str,
    checkpoint: str | None,
    num_classes: int,
    ssf: bool,
    image_size: int | None = None,
    seed: int = 0,
):
    """The module and its starting variables, with fresh SSF parameters when ``ssf``.

    Args:
        model_name: a ``jaxmodels.MODEL_NAMES`` entry.
        checkpoint: weights for ``jaxmodels.load`` (its head is re-initialised when the class
            count differs); ``None`` initialises everything at random from ``seed``.
        num_classes: K of the new head.
        ssf: insert SSF (γ ~ N(1, 0.02), β ~ N(0, 0.02)) next to the loaded weights.
        image_size: ViT input side (the position embedding is resized when it differs).
        seed: initialisation seed.

    Returns:
        ``(model, variables)``.
    """
    overrides = (
        {} if image_size is None or model_name.startswith("resnet") else {"image_size": image_size}
    )
    model = jaxmodels.create(model_name, num_classes=num_classes, ssf=ssf, **overrides)
    size = jaxmodels.spec(model_name, image_size=image_size).preprocessing.image_size
    images = jnp.zeros((1, size, size, 3))
    if checkpoint is None:
        fresh = jax.jit(model.init)(jax.random.key(seed), images)
        return model, jax.tree.map(jnp.asarray, dict(fresh))
    _, loaded = jaxmodels.load(
        model_name, checkpoint, num_classes=num_classes, image_size=image_size, seed=seed
    )
    # shapes only: every leaf but SSF's comes from the checkpoint, so compiling init is waste
    shapes = jax.eval_shape(model.init, jax.random.key(seed), images)
    return model, _with_fresh_ssf(dict(shapes), dict(loaded), seed)


def _with_fresh_ssf(shapes: dict, loaded: dict, seed: int) -> dict:
    """Loaded leaves where the model has them; SSF leaves drawn as ``jaxmodels.ssf`` does.

    γ ~ N(1, σ²), β ~ N(0, σ²) with σ = ``jaxmodels.ssf.SSF_INIT_STD`` (Lian et al. 2022).
    """
    key = jax.random.key(seed)
    out = {}
    for collection, tree in shapes.items():
        wanted = masks.flatten_params(tree)
        given = masks.flatten_params(loaded.get(collection, {}))
        unknown = sorted(set(given) - set(wanted))
        missing = sorted(p for p in set(wanted) - set(given) if not masks.is_ssf_path(p))
        if unknown or missing:
            raise ValueError(
                f"checkpoint does not fit the model: leaves it lacks {missing[:5]}, "
                f"leaves the model lacks {unknown[:5]}"
            )
        flat = {}
        for i, (path, spec) in enumerate(sorted(wanted.items())):
            if path in given:
                if tuple(given[path].shape) != tuple(spec.shape):
                    raise ValueError(
                        f"checkpoint leaf {collection}/{path} has shape "
                        f"{tuple(given[path].shape)}; the model wants {tuple(spec.shape)}"
                    )
                flat[path] = jnp.asarray(given[path], spec.dtype)
                continue
            noise = jaxmodels.ssf.SSF_INIT_STD * jax.random.normal(
                jax.random.fold_in(key, i), spec.shape, spec.dtype
            )
            flat[path] = 1.0 + noise if path.endswith("/scale") else noise
        out[collection] = masks.unflatten_params(flat)
    return out


def run(config: RunConfig, progress: bool = True) -> dict:
    """Runs (or resumes) one fine-tuning run and writes its outputs to ``config.out_dir``.

    Args:
        config: the run.
        progress: show a progress bar.

    Returns:
        The result dict also written to ``out_dir/result.json``.

    Raises:
        ValueError: bad data or model specs, a mode that selects nothing, a batch not divisible
            by the device count, or a checkpoint directory holding a different run.
    """
    augment = dict(AUGMENTATIONS[config.augmentation])
    mixup_alpha = augment.pop("mixup_alpha", 0.0)
    cutmix_alpha = augment.pop("cutmix_alpha", 0.0)
    train_source = sources.open_source(config.train_data, "train", config.tfds_data_dir)
    eval_source = None
    if config.eval_data:
        eval_source = sources.open_source(config.eval_data, "test", config.tfds_data_dir)
    num_classes = train_source.num_classes
    model, variables = build_variables(
        config.model_name, config.checkpoint, num_classes, config.mode == "ssf",
        config.image_size, config.seed,
    )  # fmt: skip
    preprocess = data_lib.preprocess_for_model(config.model_name, config.image_size, **augment)
    steps = loop.total_steps(len(train_source), config.batch_size, config.epochs)
    if steps == 0:
        raise ValueError(
            f"batch_size {config.batch_size} exceeds the {len(train_source)} training examples"
        )
    per_epoch = steps // config.epochs
    optim_config = optim.OptimConfig(
        learning_rate=config.lr,
        total_steps=steps,
        warmup_steps=min(steps, round(config.warmup_epochs * per_epoch)),
        weight_decay=config.weight_decay,
        clip_norm=config.clip_norm,
    )
    head = masks.head_name_for(config.model_name)
    step_config = step_lib.StepConfig(
        num_classes=num_classes,
        label_smoothing=config.label_smoothing,
        mixup_alpha=mixup_alpha,
        cutmix_alpha=cutmix_alpha,
        ema_decay=config.ema_decay,
        compute_dtype="bfloat16" if config.bf16 else "float32",
        # only full fine-tuning moves BatchNorm statistics; other modes freeze the backbone
        update_batch_stats=config.mode == "full",
    )
    fit_config = loop.FitConfig(
        epochs=config.epochs,
        global_batch=config.batch_size,
        seed=config.seed,
        mode=config.mode,
        head_name=head,
        checkpoint_dir=os.path.join(config.out_dir, "checkpoints"),
        checkpoint_every=config.checkpoint_every,
        log_path=os.path.join(config.out_dir, "metrics.jsonl"),
        stop_after_steps=config.stop_after_steps,
        progress=progress,
        num_workers=config.num_workers,
    )
    os.makedirs(config.out_dir, exist_ok=True)
    start = time.perf_counter()
    result = loop.fit(
        model.apply, variables, train_source, preprocess, optim_config, step_config, fit_config,
        eval_source=eval_source, identity=_identity(config),
    )  # fmt: skip
    seconds = time.perf_counter() - start
    state = result.state
    final = {"params": state.params(use_ema=bool(state.ema))}
    if state.batch_stats:
        final["batch_stats"] = state.batch_stats
    model_dir = os.path.join(config.out_dir, "model")
    if result.finished and jax.process_index() == 0 and not os.path.exists(model_dir):
        weights = loop.host_copy(final)
        weights = jaxmodels.ssf.fold(weights) if config.mode == "ssf" else weights
        overrides = (
            {}
            if config.image_size is None or config.model_name.startswith("resnet")
            else {"image_size": config.image_size}
        )
        jaxmodels.save(model_dir, config.model_name, jax.device_get(weights), **overrides)
    output = {
        "config": dataclasses.asdict(config),
        "finished": result.finished,
        "steps": int(loop.host_copy(state.step)),
        "seconds": seconds,
        "num_classes": num_classes,
        "trainable_params": masks.count_params(state.trainable),
        "total_params": masks.count_params(state.trainable) + masks.count_params(state.frozen),
        "final_eval": result.evals[-1] if result.evals else None,
        "evals": result.evals,
        "last_train": result.last_train,
        "model_dir": model_dir if result.finished else None,
    }
    if jax.process_index() == 0:
        with open(os.path.join(config.out_dir, "result.json"), "w") as f:
            json.dump(_plain(output), f, indent=2)
    return output


# settings that may change between a run and its resumption (they do not alter the weights)
_RESUMABLE_FIELDS = (
    "out_dir",
    "eval_data",
    "checkpoint_every",
    "tfds_data_dir",
    "num_workers",
    "stop_after_steps",
)


def _identity(config: RunConfig) -> dict:
    """The settings a resumed run must share with the run that wrote the checkpoint."""
    fields = dataclasses.asdict(config)
    return _plain({k: v for k, v in fields.items() if k not in _RESUMABLE_FIELDS})


def _plain(value):
    """JSON-safe copy (NumPy scalars → Python numbers, tuples → lists)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
