"""Rank a hub of pre-trained models on a target dataset without fine-tuning any of them.

The logic behind `hubtune rank`: parse model references (`jaxmodels.parse_model_ref`:
``[LABEL:]NAME[=CHECKPOINT]``, a run folder, or a bare ``NAME`` for a random initialisation),
check everything cheap first (every checkpoint's header opens, the data's labels are 0..C−1 with
every class present, each requested score's needs hold for the data), extract each model's
features (and its head's logits, for LEEP and NCE) once per (model, data) and cache them on disk
under a key of the weights' content hash and the data's fingerprint, score them with the
requested transferability scores, rank, and, given fine-tuned accuracies, measure each score's
weighted Kendall τ, Kendall τ and top-1 regret and plot score against accuracy.

With `stream=True` features never leave the device: `jaxmodels.stream_reduce` folds them into
`scoring.ScoreStats` inside the extraction step, each device its own rows, merged once at the end
(`scoring.tsqr`; LEEP takes a second pass), so only the scores that streamed statistics determine
are available (logme, hscore, leep, nce); the statistics are cached.

Scores are computed in float64 on the host CPU (pinned, also on accelerator hosts) from the
float32 features.
"""

from __future__ import annotations

import functools
import json
import pathlib
from collections.abc import Callable, Mapping, Sequence

import jax
import numpy as np

import jaxmodels
from jaxmodels import DataError, ModelRefError
from scoring import rank_correlation
from scoring import stats as stats_lib
from scoring.gbc import gbc
from scoring.hscore import hscore
from scoring.hub.features import (
    SpecError,
    default_cache_dir,
    features_for,
    scores_from_statistics,
    statistics_for,
)
from scoring.hub.report import Ranking, format_table, plot_ranking, write_outputs
from scoring.leep import leep
from scoring.logme import logme
from scoring.nce import nce
from scoring.nleep import DEFAULT_COMPONENTS_PER_CLASS, nleep
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


def check_scores_fit_data(names: Sequence[str], counts_C: np.ndarray) -> None:
    """Raises `SpecError` when a requested score cannot be computed on data with these class
    counts (checked before any model runs).
    """
    smallest = int(counts_C.min())
    needs = {
        "nleep": (DEFAULT_COMPONENTS_PER_CLASS * len(counts_C), int(counts_C.sum()),
                  "samples in all (5 mixture components per class)"),
        "gbc": (2, smallest, "samples in every class (a per-class variance)"),
        "sfda": (2, smallest, "samples in every class (a within-class covariance)"),
    }  # fmt: skip
    for name in names:
        if name in needs:
            need, have, what = needs[name]
            if have < need:
                raise SpecError(f"score {name!r} needs at least {need} {what}; the data has {have}")


def parse_scores(text: str | Sequence[str] | None, stream: bool) -> list[str]:
    """The requested score names (default: all in-memory ones, or the streamable ones)."""
    if text is None:
        return list(STREAM_SCORES if stream else DEFAULT_SCORES)
    names = text.split(",") if isinstance(text, str) else list(text)
    names = [n.strip() for n in names if n.strip()]
    unknown = [n for n in names if n not in SCORES]
    if unknown or not names:
        raise SpecError(f"unknown scores {unknown or names}; choose from {', '.join(SCORES)}")
    if stream and any(n not in STREAM_SCORES for n in names):
        bad = [n for n in names if n not in STREAM_SCORES]
        raise SpecError(f"with --stream only {', '.join(STREAM_SCORES)} are available; got {bad}")
    return list(dict.fromkeys(names))


def read_ground_truth(
    path: str | pathlib.Path | Mapping[str, float], refs: Sequence[jaxmodels.ModelRef]
) -> dict[str, float]:
    """{model label: fine-tuned accuracy} from a JSON object (a file, or the mapping itself, e.g.
    `training.run_folder.ground_truth`'s) keyed by label, reference, name or checkpoint path."""
    if isinstance(path, Mapping):
        data, path = dict(path), "from the runs"
    else:
        try:
            data = json.loads(pathlib.Path(path).read_text())
        except (OSError, ValueError) as err:  # JSONDecodeError, UnicodeDecodeError: ValueErrors
            raise SpecError(
                f"ground truth {str(path)!r} is not a readable JSON file ({err})"
            ) from err
    if not isinstance(data, dict):
        raise SpecError(f"ground truth {str(path)!r} must be a JSON object {{model: accuracy}}")
    accuracies = {}
    for ref in refs:
        keys = [ref.label, ref.text, ref.name]  # the name last: other models may share it
        if ref.checkpoint is not None:
            keys.insert(0, str(pathlib.Path(ref.checkpoint).resolve()))
        value = next((data[k] for k in keys if k in data), None)
        if not isinstance(value, int | float) or isinstance(value, bool) or not np.isfinite(value):
            raise SpecError(
                f"ground truth {str(path)!r} has no numeric accuracy for model {ref.label!r}"
            )
        accuracies[ref.label] = float(value)
    if len(refs) < 2:
        raise SpecError("ground truth needs at least 2 models to correlate rankings")
    if rank_correlation.all_tied(list(accuracies.values())):
        raise SpecError(
            f"ground truth gives every model the same accuracy ({accuracies[refs[0].label]:g}): "
            "it ranks no model above another, so no score can be checked against it"
        )
    return accuracies


def _softmax(logits_NK: np.ndarray) -> np.ndarray:
    z = logits_NK - logits_NK.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def rank_hub(
    model_specs: Sequence[str],
    data_spec: str,
    *,
    scores: str | Sequence[str] | None = None,
    ground_truth: str | pathlib.Path | None = None,
    cache_dir: str | pathlib.Path | None = None,
    batch_size: int | None = None,
    stream: bool = False,
    seed: int = 0,
    data_dir: str | None = None,
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> Ranking:
    """Scores and ranks models on a dataset (module docstring).

    Args:
        model_specs: model references (`jaxmodels.parse_model_ref`), e.g. `name=checkpoint`,
          `label:name=checkpoint`, a run folder, or a bare `name` (random init, seeded).
        data_spec: a data spec (`jaxmodels.open_source`), e.g. `tfds:cifar100:train[:5000]`.
        scores: score names (comma-separated or a sequence), from `SCORES`; default all the
          in-memory ones, or with `stream` the streamable ones.
        ground_truth: optional JSON file {model label, name or checkpoint path: fine-tuned
          accuracy}, or that mapping itself.
        cache_dir: where features (or streamed statistics) are cached; default
          `default_cache_dir()` (under the user's cache folder).
        batch_size: global batch size; default 32 per device.
        stream: score from streamed statistics (logme, hscore, leep, nce only).
        seed: seed of random-init models.
        data_dir: TFDS data directory.
        log: progress printer.
        progress: show a progress bar while features are extracted.

    Returns:
        `Ranking`; if a score raises on some model, the ranking holds what finished and
        `Ranking.error` says what failed.

    Raises:
        SpecError, jaxmodels.DataError, jaxmodels.ModelRefError: bad references, data, scores or
          ground truth — all checked before any model runs.
    """
    if not model_specs:
        raise SpecError("give at least one model")
    refs = [jaxmodels.parse_model_ref(text) for text in model_specs]
    labels = [r.label for r in refs]
    if len(set(labels)) != len(labels):
        raise SpecError(f"model labels must be distinct; got {labels} (name them LABEL:...)")
    names = parse_scores(scores, stream)
    accuracies = None if ground_truth is None else read_ground_truth(ground_truth, refs)
    data = jaxmodels.open_source(data_spec, split="train", data_dir=data_dir)
    counts = np.bincount(data.labels, minlength=data.num_classes)
    if (counts == 0).any():
        listed = ", ".join(f"label {c}: {n}" for c, n in enumerate(counts) if n)
        raise SpecError(
            f"data {data.spec!r} has no example of {int((counts == 0).sum())} of its "
            f"{data.num_classes} classes (labels must be 0..C−1, every class present); "
            f"counts: {listed}"
        )
    check_scores_fit_data(names, counts)
    devices = jax.device_count()
    batch_size = 32 * devices if batch_size is None else batch_size
    if batch_size < 1 or batch_size % devices:
        raise SpecError(
            f"batch size must be a positive multiple of {devices} devices; got {batch_size}"
        )
    cache_dir = default_cache_dir() if cache_dir is None else pathlib.Path(cache_dir)

    values = {label: {} for label in labels}
    cached, failed = {}, {}  # failed: score → the first error it raised
    for i, ref in enumerate(refs, 1):
        log(f"[{i}/{len(refs)}] {ref.label} on {data.spec} ({len(data)} images)")
        wanted = [n for n in names if n not in failed]
        if stream:
            acc, second, cached[ref.label] = statistics_for(
                ref, data, names, cache_dir, batch_size, seed, log, progress
            )
            # small statistics, fetched once: the float64 scores below run on the host CPU
            acc, second = jax.device_get((acc, second))
            compute = {
                n: lambda n=n, a=acc, b=second: scores_from_statistics(a, b, [n])[n] for n in wanted
            }
        else:
            feats, logits, cached[ref.label] = features_for(
                ref, data, cache_dir, batch_size, seed, log, progress
            )
            feats64, probs64 = feats.astype(np.float64), _softmax(logits.astype(np.float64))
            compute = {
                n: lambda n=n, f=feats64, p=probs64: SCORES[n](f, data.labels, p) for n in wanted
            }
            # LogME and the H-score from one QR of [1 | F | Y] (`scoring.stats`), not one each
            factored = [n for n in ("logme", "hscore") if n in compute]
            if len(factored) == 2:  # made on first use, under the x64 below
                shared = functools.cache(
                    lambda f=feats64: stats_lib.update(
                        stats_lib.init(f.shape[1], data.num_classes, dtype=np.float64),
                        f,
                        data.labels,
                    )
                )
                compute["logme"] = lambda s=shared: stats_lib.logme_from_stats(s()).score
                compute["hscore"] = lambda s=shared: stats_lib.hscore_from_stats(s())
        # float64 on the host CPU: on an accelerator host the default device would be a GPU
        # (slow or emulated float64) or a TPU (none).
        with jax.enable_x64(True), jax.default_device(jax.local_devices(backend="cpu")[0]):
            for name, score in compute.items():
                try:
                    values[ref.label][name] = float(score())
                except ValueError as err:  # a score that cannot be computed on these features
                    first = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
                    failed[name] = f"score {name!r} failed on model {ref.label!r}: {first}"
    error = "; ".join(failed.values()) or None
    done = [n for n in names if all(n in values[m] for m in labels)]
    ranks = {label: {} for label in labels}
    for name in done:
        order = sorted(labels, key=lambda m: -values[m][name])
        for position, label in enumerate(order, 1):
            ranks[label][name] = position
    ranking = Ranking(data.spec, done, labels, values, ranks, cached, accuracies)
    ranking.error = error
    if accuracies is not None and error is None:
        ranking.agreement = agreement(ranking, accuracies)
    return ranking


def agreement(ranking: Ranking, accuracies: dict[str, float]) -> dict:
    """{score: RankAgreement of its values with `accuracies`}, None for a score equal for every
    model (a saturated H-score, say): it correlates with nothing."""
    accs = [accuracies[m] for m in ranking.models]
    out = {}
    for name in ranking.scores:
        scores = [ranking.values[m][name] for m in ranking.models]
        tied = rank_correlation.all_tied(scores)
        out[name] = None if tied else rank_correlation.rank_agreement(scores, accs)
    return out


__all__ = [
    "DEFAULT_SCORES",
    "SCORES",
    "STREAM_SCORES",
    "DataError",
    "ModelRefError",
    "Ranking",
    "SpecError",
    "agreement",
    "format_table",
    "parse_scores",
    "plot_ranking",
    "rank_hub",
    "read_ground_truth",
    "write_outputs",
]
