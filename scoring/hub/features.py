"""Features and streamed statistics of hub models on a target dataset, cached on disk.

For `scoring.hub.ranking`: builds each model reference (`jaxmodels.build`: a checkpoint, a run
folder, or a seeded random initialisation) and either extracts features and head logits over the
data (`jaxmodels.extract_features`, with the model's own evaluation preprocessing — the one every
package uses) or folds them into `scoring.ScoreStats` inside the extraction step
(`jaxmodels.stream_reduce`; each device keeps its own R factor, merged once: `scoring.tsqr`).
Results are cached under a key of the weights' content hash (or the random-init seed) and the
data's fingerprint; the key is computed without building the model, so a second ranking of the
same (model, data) compiles and extracts nothing.

Multi-process, every process extracts together and writes its own copy of the cache (hosts often
cache on local disks); the cache is used only when every process has it, so no process extracts
alone and waits forever for the others.
"""

from __future__ import annotations

import hashlib
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

import jaxmodels
from jaxmodels import sharding
from jaxmodels.atomic_files import write_atomic
from scoring import stats as stats_lib
from scoring import tsqr

_CACHE_VERSION = 2
_RANDOM_INIT_CLASSES = 1000  # a random-init model gets an ImageNet-sized head


class SpecError(ValueError):
    """A bad score list, ground-truth file or option (one-line message)."""


def default_cache_dir() -> pathlib.Path:
    """Where features are cached by default: ``jaxmodels.cache_root() / "features"``."""
    return jaxmodels.cache_root() / "features"


def weights_digest(ref: jaxmodels.ModelRef, seed: int, cache_dir: pathlib.Path) -> str:
    """The content hash of a reference's weights (memoised by path, size and mtime), or the
    random initialisation's seed."""
    if ref.checkpoint is None:
        return f"random-init seed {seed}"
    return jaxmodels.content_digest(ref.checkpoint, memo=cache_dir / "digests.json")


def _cache_path(ref, data, seed, cache_dir, kind: str) -> pathlib.Path:
    key = {
        "version": _CACHE_VERSION,
        "kind": kind,
        "model": ref.name,
        "weights": weights_digest(ref, seed, cache_dir),
        "data": data.fingerprint,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return cache_dir / f"{ref.name}-{digest}{'' if kind == 'features' else '-stats'}.npz"


def _cached(path: pathlib.Path) -> bool:
    """Whether every process has `path` (a collective with several processes)."""
    return not sharding.any_process(not path.exists())


def _build(ref, seed):
    built = jaxmodels.build(ref, init_seed=seed, random_init_classes=_RANDOM_INIT_CLASSES)
    return built.model, built.variables


def _head(model, variables):
    """(kernel [D, K], bias [K]) of the model's linear head (its spec names it)."""
    head = jaxmodels.spec_of(model).head
    params = variables["params"][head]
    return params["kernel"], params["bias"]


def features_for(ref, data, cache_dir, batch_size, seed, log, progress=True):
    """Features and head logits of one model on the data, from the cache or extracted.

    Args:
        ref: the model (`jaxmodels.parse_model_ref`).
        data: the dataset (`jaxmodels.open_source`).
        cache_dir: `pathlib.Path` of the cache.
        batch_size: global extraction batch (a multiple of the device count).
        seed: seed of a random-init model.
        log: progress printer.

    Returns:
        (features [N, D] float32, logits [N, K] float32, from_cache).

    Raises:
        jaxmodels.ModelRefError: the checkpoint cannot be loaded.
    """
    path = _cache_path(ref, data, seed, cache_dir, "features")
    if _cached(path):
        log(f"  cached features: {path}")
        with np.load(path) as cached:
            return cached["features"], cached["logits"], True
    model, variables = _build(ref, seed)
    feats, logits = jaxmodels.extract_features(
        model, variables, data, batch_size=batch_size, return_logits=True, progress=progress
    )
    write_atomic(path, lambda tmp: np.savez(tmp, features=feats, logits=logits, labels=data.labels))
    log(f"  extracted {feats.shape[0]} × {feats.shape[1]} features → {path}")
    return feats, logits, False


def _save_tuples(path: pathlib.Path, **tuples) -> None:
    arrays = {}
    for prefix, value in tuples.items():
        if value is not None:
            arrays |= {
                f"{prefix}.{f}": np.asarray(v) for f, v in zip(value._fields, value, strict=True)
            }
    write_atomic(path, lambda tmp: np.savez(tmp, **arrays))


def _load_tuple(saved, prefix, cls):
    if f"{prefix}.{cls._fields[0]}" not in saved.files:
        return None
    return cls(*(jnp.asarray(saved[f"{prefix}.{f}"]) for f in cls._fields))


def statistics_for(ref, data, scores, cache_dir, batch_size, seed, log, progress=True):
    """Streamed statistics of one model on the data, from the cache or accumulated on device.

    Args: as `features_for`, plus `scores`, the names to compute (a subset of logme, hscore,
    leep, nce; leep adds a second pass, leep and nce need the model's linear head).

    Returns:
        (ScoreStats in float32, LeepPass or None, from_cache).

    Raises:
        SpecError: the checkpoint cannot be loaded, or LEEP/NCE asked of a model without a head.
    """
    # "stream-qr": the statistics hold a running R factor (older caches held sums).
    path = _cache_path(ref, data, seed, cache_dir, "stream-qr:" + ",".join(sorted(scores)))
    if _cached(path):
        log(f"  cached statistics: {path}")
        with np.load(path) as saved:
            return (
                _load_tuple(saved, "stats", stats_lib.ScoreStats),
                _load_tuple(saved, "leep", stats_lib.LeepPass),
                True,
            )
    model, variables = _build(ref, seed)
    classes = np.unique(data.labels)
    with_head = any(s in ("leep", "nce") for s in scores)
    kernel_DK, bias_K = _head(model, variables) if with_head else (None, None)

    # The head rides in the carry instead of being closed over: embedded as a jit constant, a
    # random-init ViT's all-zero head kernel made XLA:CPU return NaN softmaxes (jax 0.10.2).
    head = (kernel_DK, bias_K) if with_head else ()

    def source_probs(head, feats_BD):
        return jax.nn.softmax(feats_BD @ head[0] + head[1][None, :], axis=-1)

    def update(carry, feats_BD, labels_B, valid_B):
        head, acc = carry
        probs_BK = source_probs(head, feats_BD) if with_head else None
        return head, stats_lib.buffered_update(acc, feats_BD, labels_B, valid_B, probs_BK)

    def leep_update(carry, feats_BD, labels_B, valid_B):
        head, lp = carry
        probs_BK = source_probs(head, feats_BD)
        return head, stats_lib.leep_pass_update(lp, probs_BK, labels_B, valid_B)

    # float32 accumulators: a running QR keeps LogME and the H-score within 1e-5 of float64
    # (scoring.stats), on any backend.
    init = stats_lib.init(
        jaxmodels.spec_of(model).feature_dim,
        len(classes),
        num_source_classes=int(kernel_DK.shape[1]) if with_head else None,
    )
    # Every device folds its own rows of each batch into its own R, a buffer of ≥ P rows at a
    # time (one QR per buffer, not one per batch; whole per-device batches fill it), and the
    # devices' factors are merged once at the end (scoring.tsqr): no step moves rows between
    # devices. (stream_reduce's default batch: 32 per device.)
    rows = (batch_size or 32 * jax.device_count()) // jax.device_count()
    capacity = -(-init.r_factor.shape[0] // rows) * rows
    acc = jaxmodels.stream_reduce(
        model,
        variables,
        data,
        init=(head, stats_lib.buffered(init, capacity)),
        update=update,
        merge=lambda carry_M: tsqr.merge_buffered(carry_M[1]),
        batch_size=batch_size,
        progress=progress,
    )
    # host copies: global arrays of a multi-process run cannot mix with local ones below
    acc = sharding.host_copy(acc)
    second = None
    if "leep" in scores:  # LEEP's second pass needs P̂(y | z) from the first
        _, second = jaxmodels.stream_reduce(
            model,
            variables,
            data,
            init=(head, stats_lib.leep_pass_init(acc)),
            update=leep_update,
            batch_size=batch_size,
            progress=progress,
        )
        second = sharding.host_copy(second)
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
