"""Rank a hub of pre-trained models on a target dataset without fine-tuning any of them.

The logic behind `scripts/rank.py`: parse MODEL_SPECs (`name=checkpoint` or a bare `name` for a
random initialisation), extract each model's features (and its head's logits, for LEEP and NCE)
once per (model, data) and cache them on disk under a key of the checkpoint's content hash, the
data's fingerprint and the preprocessing, score them with the requested transferability scores,
rank, and, given fine-tuned accuracies, measure each score's weighted Kendall τ, Kendall τ and
top-1 regret and plot score against accuracy.

With `stream=True` features never leave the device: `jaxmodels.stream_reduce` folds them into
`scoring.ScoreStats` inside the extraction step (LEEP takes a second pass), so only the scores that
streamed statistics determine are available (logme, hscore, leep, nce); the statistics are cached.

Scores are computed in float64 on the host from the float32 features.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable, Sequence

import jax
import numpy as np

from scoring import rank_correlation
from scoring.gbc import gbc
from scoring.hscore import hscore
from scoring.hub_data import DataSpecError, open_dataset
from scoring.hub_features import (
    ModelEntry,
    SpecError,
    features_for,
    parse_model_spec,
    scores_from_statistics,
    statistics_for,
)
from scoring.hub_report import Ranking, format_table, plot_ranking, write_outputs
from scoring.leep import leep
from scoring.logme import logme
from scoring.nce import nce
from scoring.nleep import nleep
from scoring.regularized_hscore import regularized_hscore
from scoring.sfda import sfda
from scoring.transrate import transrate

# name → score(features [N, D] float64, labels [N], source probabilities [N, K] float64).
SCORES: dict[str, Callable[[np.ndarray, np.ndarray, np.ndarray], jax.Array]] = {
    "logme": lambda f, y, p: logme(f, y).score,
    "leep": lambda f, y, p: leep(p, y),
    "nce": lambda f, y, p: nce(np.argmax(p, axis=1), y),
    "hscore": lambda f, y, p: hscore(f, y),
    "regularized_hscore": lambda f, y, p: regularized_hscore(f, y),
    "transrate": lambda f, y, p: transrate(f, y),
    "gbc": lambda f, y, p: gbc(f, y),
    "sfda": lambda f, y, p: sfda(f, y),
    "nleep": lambda f, y, p: nleep(f, y),
}
STREAM_SCORES = ("logme", "hscore", "leep", "nce")
DEFAULT_SCORES = (
    "logme",
    "leep",
    "nce",
    "hscore",
    "regularized_hscore",
    "transrate",
    "gbc",
    "sfda",
)


def parse_scores(text: str | Sequence[str], stream: bool) -> list[str]:
    names = text.split(",") if isinstance(text, str) else list(text)
    names = [n.strip() for n in names if n.strip()]
    unknown = [n for n in names if n not in SCORES]
    if unknown or not names:
        raise SpecError(f"unknown scores {unknown or names}; choose from {', '.join(SCORES)}")
    if stream and any(n not in STREAM_SCORES for n in names):
        bad = [n for n in names if n not in STREAM_SCORES]
        raise SpecError(f"with --stream only {', '.join(STREAM_SCORES)} are available; got {bad}")
    return list(dict.fromkeys(names))


def read_ground_truth(path: str | pathlib.Path, entries: Sequence[ModelEntry]) -> dict[str, float]:
    """{model label: fine-tuned accuracy} from a JSON object keyed by label (or bare name)."""
    try:
        data = json.loads(pathlib.Path(path).read_text())
    except (OSError, ValueError) as err:  # JSONDecodeError, UnicodeDecodeError are ValueErrors
        raise SpecError(f"ground truth {str(path)!r} is not a readable JSON file ({err})") from err
    if not isinstance(data, dict):
        raise SpecError(f"ground truth {str(path)!r} must be a JSON object {{model: accuracy}}")
    accuracies = {}
    for entry in entries:
        value = data.get(entry.label, data.get(entry.name))
        if not isinstance(value, int | float) or isinstance(value, bool) or not np.isfinite(value):
            raise SpecError(
                f"ground truth {str(path)!r} has no numeric accuracy for model {entry.label!r}"
            )
        accuracies[entry.label] = float(value)
    if len(entries) < 2:
        raise SpecError("ground truth needs at least 2 models to correlate rankings")
    return accuracies


def _softmax(logits_NK: np.ndarray) -> np.ndarray:
    z = logits_NK - logits_NK.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def rank_hub(
    model_specs: Sequence[str],
    data_spec: str,
    *,
    scores: str | Sequence[str] = DEFAULT_SCORES,
    ground_truth: str | pathlib.Path | None = None,
    cache_dir: str | pathlib.Path = ".cache/hubtune_features",
    batch_size: int | None = None,
    stream: bool = False,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> Ranking:
    """Scores and ranks models on a dataset (module docstring).

    Args:
        model_specs: MODEL_SPECs, `name=checkpoint_path` or a bare `name` (random init, seeded).
        data_spec: DATA_SPEC (see `scoring.hub_data`).
        scores: score names (comma-separated or a sequence), from `SCORES`.
        ground_truth: optional JSON file {model label or name: fine-tuned accuracy}.
        cache_dir: where features (or streamed statistics) are cached.
        batch_size: global batch size; default 32 per device.
        stream: score from streamed statistics (logme, hscore, leep, nce only).
        seed: seed of random-init models.
        log: progress printer.

    Returns:
        `Ranking`.

    Raises:
        SpecError, DataSpecError: bad specs, unreadable data or ground truth — all checked before
          any model runs.
    """
    if not model_specs:
        raise SpecError("give at least one MODEL_SPEC")
    entries = [parse_model_spec(text) for text in model_specs]
    labels = [e.label for e in entries]
    if len(set(labels)) != len(labels):
        raise SpecError(f"model specs must be distinct; got {labels}")
    names = parse_scores(scores, stream)
    accuracies = None if ground_truth is None else read_ground_truth(ground_truth, entries)
    data = open_dataset(data_spec)
    devices = jax.device_count()
    batch_size = 32 * devices if batch_size is None else batch_size
    if batch_size < 1 or batch_size % devices:
        raise SpecError(
            f"batch size must be a positive multiple of {devices} devices; got {batch_size}"
        )
    cache_dir = pathlib.Path(cache_dir)

    values, cached = {}, {}
    for i, entry in enumerate(entries, 1):
        log(f"[{i}/{len(entries)}] {entry.label} on {data.spec} ({data.num_images} images)")
        if stream:
            acc, second, cached[entry.label] = statistics_for(
                entry, data, names, cache_dir, batch_size, seed, log
            )
            with jax.enable_x64(True):
                values[entry.label] = scores_from_statistics(acc, second, names)
            continue
        feats, logits, cached[entry.label] = features_for(
            entry, data, cache_dir, batch_size, seed, log
        )
        with jax.enable_x64(True):
            feats64, probs64 = feats.astype(np.float64), _softmax(logits.astype(np.float64))
            values[entry.label] = {
                name: float(SCORES[name](feats64, data.labels, probs64)) for name in names
            }
    ranks = {label: {} for label in labels}
    for name in names:
        order = sorted(labels, key=lambda m: -values[m][name])
        for position, label in enumerate(order, 1):
            ranks[label][name] = position
    ranking = Ranking(data.spec, names, labels, values, ranks, cached, accuracies)
    if accuracies is not None:
        accs = [accuracies[m] for m in labels]
        ranking.agreement = {
            name: rank_correlation.rank_agreement([values[m][name] for m in labels], accs)
            for name in names
        }
    return ranking


__all__ = [
    "DEFAULT_SCORES",
    "SCORES",
    "STREAM_SCORES",
    "DataSpecError",
    "ModelEntry",
    "Ranking",
    "SpecError",
    "format_table",
    "parse_model_spec",
    "parse_scores",
    "plot_ranking",
    "rank_hub",
    "read_ground_truth",
    "write_outputs",
]
