"""Features and streamed statistics of hub models on a target dataset, cached on disk.

For `scoring.hub_ranking`: builds each MODEL_SPEC's model (`jaxmodels.load` for `name=checkpoint`,
a seeded random initialisation for a bare `name`), preprocesses the data for it, and either
extracts features and head logits (`jaxmodels.extract_features`) or folds them into
`scoring.ScoreStats` inside the extraction step (`jaxmodels.stream_reduce`). Results are cached
under a key of the checkpoint's content hash (or the random-init seed), the data's fingerprint and
spec, and the preprocessing, so a second ranking of the same (model, data) extracts nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

import jaxmodels
from scoring import stats as stats_lib
from scoring.hub_data import HubDataset

_CACHE_VERSION = 1
_RANDOM_INIT_CLASSES = 1000  # a random-init model gets an ImageNet-sized head
_HEAD_NAMES = ("fc", "head")  # ResNet, ViT


class SpecError(ValueError):
    """A bad MODEL_SPEC, score list, ground-truth file or option (one-line message)."""


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    """One MODEL_SPEC: `label` (how it is reported), registry `name`, optional checkpoint."""

    label: str
    name: str
    checkpoint: pathlib.Path | None


def parse_model_spec(text: str) -> ModelEntry:
    """`name=checkpoint_path` or a bare `name` (random init); checks both exist."""
    name, sep, path = text.partition("=")
    if name not in jaxmodels.MODEL_NAMES:
        raise SpecError(
            f"unknown model {name!r} in {text!r}; known: {', '.join(jaxmodels.MODEL_NAMES)}"
        )
    if not sep:
        return ModelEntry(name, name, None)
    checkpoint = pathlib.Path(path)
    if not path or not checkpoint.exists():
        raise SpecError(f"checkpoint {path!r} of model spec {text!r} not found")
    return ModelEntry(text, name, checkpoint)


def _digest_path(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        with open(file, "rb") as f:
            for block in iter(lambda f=f: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _build_model(entry: ModelEntry, seed: int):
    """(model, variables, preprocessing) for a spec; load errors become `SpecError`."""
    if entry.checkpoint is None:
        model = jaxmodels.create(entry.name, num_classes=_RANDOM_INIT_CLASSES)
        prep = jaxmodels.spec(entry.name).preprocessing
        dummy = jnp.zeros((1, prep.image_size, prep.image_size, 3), jnp.float32)
        return model, model.init(jax.random.key(seed), dummy), prep
    try:
        model, variables = jaxmodels.load(entry.name, entry.checkpoint)
    except (OSError, ValueError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SpecError(f"cannot load {entry.label!r}: {first}") from err
    prep = jaxmodels.spec(entry.name, image_size=getattr(model, "image_size", None)).preprocessing
    return model, variables, prep


def _cache_key(entry: ModelEntry, data: HubDataset, prep, seed: int, kind: str) -> str:
    weights = (
        f"random-init seed {seed}" if entry.checkpoint is None else _digest_path(entry.checkpoint)
    )
    key = {
        "version": _CACHE_VERSION,
        "kind": kind,
        "model": entry.name,
        "weights": weights,
        "data": data.fingerprint,
        "data_spec": data.spec,
        "preprocessing": dataclasses.asdict(prep),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _preprocessed_batches(data: HubDataset, prep, labels_N: np.ndarray | None = None):
    """Preprocessed float32 image batches [b, S, S, 3], paired with labels when given."""
    for start, images in data.chunks():
        if len({im.shape for im in images}) == 1:
            batch = jaxmodels.preprocess_for_eval(np.stack(images).astype(np.float32), prep)
        else:  # variable-size images (a folder): one at a time
            batch = np.stack(
                [jaxmodels.preprocess_for_eval(im.astype(np.float32), prep) for im in images]
            )
        batch = np.asarray(batch, np.float32)
        yield batch if labels_N is None else (batch, labels_N[start : start + len(images)])


def _head(variables):
    """(kernel [D, K], bias [K]) of the model's linear head."""
    params = variables.get("params", {})
    for name in _HEAD_NAMES:
        if name in params and {"kernel", "bias"} <= set(params[name]):
            return params[name]["kernel"], params[name]["bias"]
    raise SpecError("the model has no linear head ('fc' or 'head'): LEEP and NCE need one")


def _feature_dim(model, variables, prep) -> int:
    dummy = jax.ShapeDtypeStruct((1, prep.image_size, prep.image_size, 3), jnp.float32)
    out = jax.eval_shape(lambda x: model.apply(variables, x, method="features"), dummy)
    return int(out.shape[-1])


def features_for(entry, data, cache_dir, batch_size, seed, log):
    """Features and head logits of one model on the data, from the cache or extracted.

    Args:
        entry: the model (`parse_model_spec`).
        data: the dataset (`scoring.hub_data.open_dataset`).
        cache_dir: `pathlib.Path` of the cache.
        batch_size: global extraction batch (a multiple of the device count).
        seed: seed of a random-init model.
        log: progress printer.

    Returns:
        (features [N, D] float32, logits [N, K] float32, from_cache).

    Raises:
        SpecError: the checkpoint cannot be loaded.
    """
    model, variables, prep = _build_model(entry, seed)
    path = cache_dir / f"{entry.name}-{_cache_key(entry, data, prep, seed, 'features')[:24]}.npz"
    if path.exists():
        log(f"  cached features: {path}")
        with np.load(path) as cached:
            return cached["features"], cached["logits"], True
    feats, logits = jaxmodels.extract_features(
        model,
        variables,
        _preprocessed_batches(data, prep),
        batch_size=batch_size,
        return_logits=True,
    )
    cache_dir.mkdir(parents=True, exist_ok=True)
    np.savez(path, features=feats, logits=logits, labels=data.labels)
    log(f"  extracted {feats.shape[0]} × {feats.shape[1]} features → {path}")
    return feats, logits, False


def _save_tuples(path: pathlib.Path, **tuples) -> None:
    arrays = {}
    for prefix, value in tuples.items():
        if value is not None:
            arrays |= {
                f"{prefix}.{f}": np.asarray(v) for f, v in zip(value._fields, value, strict=True)
            }
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)


def _load_tuple(saved, prefix, cls):
    if f"{prefix}.{cls._fields[0]}" not in saved.files:
        return None
    return cls(*(jnp.asarray(saved[f"{prefix}.{f}"]) for f in cls._fields))


def statistics_for(entry, data, scores, cache_dir, batch_size, seed, log):
    """Streamed statistics of one model on the data, from the cache or accumulated on device.

    Args: as `features_for`, plus `scores`, the names to compute (a subset of logme, hscore,
    leep, nce; leep adds a second pass, leep and nce need the model's linear head).

    Returns:
        (ScoreStats in float32, LeepPass or None, from_cache).

    Raises:
        SpecError: the checkpoint cannot be loaded, or LEEP/NCE asked of a model without a head.
    """
    model, variables, prep = _build_model(entry, seed)
    # "stream-qr": the statistics hold a running R factor (older caches held sums).
    key = _cache_key(entry, data, prep, seed, "stream-qr:" + ",".join(sorted(scores)))
    path = cache_dir / f"{entry.name}-{key[:24]}-stats.npz"
    if path.exists():
        log(f"  cached statistics: {path}")
        with np.load(path) as saved:
            return (
                _load_tuple(saved, "stats", stats_lib.ScoreStats),
                _load_tuple(saved, "leep", stats_lib.LeepPass),
                True,
            )
    classes, index_N = np.unique(data.labels, return_inverse=True)
    with_head = any(s in ("leep", "nce") for s in scores)
    kernel_DK, bias_K = _head(variables) if with_head else (None, None)

    # The head rides in the carry instead of being closed over: embedded as a jit constant, a
    # random-init ViT's all-zero head kernel made XLA:CPU return NaN softmaxes (jax 0.10.2).
    head = (kernel_DK, bias_K) if with_head else ()

    def source_probs(head, feats_BD):
        return jax.nn.softmax(feats_BD @ head[0] + head[1], axis=-1)

    def update(carry, feats_BD, labels_B, valid_B):
        head, acc = carry
        probs_BK = source_probs(head, feats_BD) if with_head else None
        return head, stats_lib.update(acc, feats_BD, labels_B, valid_B, probs_BK)

    def leep_update(carry, feats_BD, labels_B, valid_B):
        head, lp = carry
        probs_BK = source_probs(head, feats_BD)
        return head, stats_lib.leep_pass_update(lp, probs_BK, labels_B, valid_B)

    def batches():
        return _preprocessed_batches(data, prep, index_N)

    # float32 accumulators: a running QR keeps LogME and the H-score within 1e-5 of float64
    # (scoring.stats), on any backend.
    init = stats_lib.init(
        _feature_dim(model, variables, prep),
        len(classes),
        num_source_classes=int(kernel_DK.shape[1]) if with_head else None,
    )
    _, acc = jaxmodels.stream_reduce(
        model, variables, batches(), init=(head, init), update=update, batch_size=batch_size
    )
    second = None
    if "leep" in scores:  # LEEP's second pass needs P̂(y | z) from the first
        _, second = jaxmodels.stream_reduce(
            model,
            variables,
            batches(),
            init=(head, stats_lib.leep_pass_init(acc)),
            update=leep_update,
            batch_size=batch_size,
        )
    _save_tuples(path, stats=acc, leep=second)
    log(f"  streamed {int(acc.num_samples)} images into statistics → {path}")
    return acc, second, False


def scores_from_statistics(acc, second, scores) -> dict[str, float]:
    """{score name: value} from `statistics_for`'s statistics (computed in their dtype)."""
    finish = {
        "logme": lambda: stats_lib.logme_from_stats(acc).score,
        "hscore": lambda: stats_lib.hscore_from_stats(acc),
        "nce": lambda: stats_lib.nce_from_stats(acc),
        "leep": lambda: stats_lib.leep_from_stats(acc, second),
    }
    return {name: float(finish[name]()) for name in scores}
