"""Benchmark every transferability score against LogME, and the streamed path against extraction.

Run:
    python scripts/benchmarks/scores.py            # (N, D, C) = (10000, 1024, 100), a few minutes on 2 CPU cores
    python scripts/benchmarks/scores.py --quick    # (2000, 256, 20), well under a minute

Part 1 times, in one process and on the same generated features (float32, class means plus a
decaying spectrum, as deep features look) and source-head probabilities (K = 1000 classes), warm
calls of `scoring.logme` and of each peer: hscore, regularized_hscore, transrate, gbc, sfda, nleep,
leep, nce. It prints each score's time and its speed relative to LogME (LogME time / score time;
> 1 means faster than LogME). The regularised H-score paper (Ibrahim et al. 2022) reports it
3–10× faster than LogME; that LogME was the reference NumPy code, so the run also times a float64
NumPy LogME that follows the reference's steps (row `logme_numpy_reference`) and prints the
regularised H-score's speed against both.
Scores are timed in interleaved rounds (each score once per round, median over rounds), so load
from other processes on a shared machine hits all of them alike. N-LEEP fits a 5·C-component
full-covariance Gaussian mixture with scikit-learn on the host; it is timed once (no warm-up,
sklearn's EM dominates), and can be skipped with --no-nleep.

Part 2 times feature extraction alone (`jaxmodels.extract_features`) against the streamed path
(`jaxmodels.stream_reduce` folding features into `scoring.ScoreStats`, then LogME and H-score from
the statistics) on random images for a random-init model, and prints the overhead of streamed
scoring over extraction (target ≤ 5%).

Agreement checks, built in (the script exits non-zero when one fails): every score computed in
float32 (as timed) against the same score in float64 on the same features, relative difference
≤ 1e-3 (N-LEEP excepted: its mixture fit by EM from a k-means start is not a continuous function
of the data, so float32 and float64 may land in different local optima); float32 LogME against
the reference-style NumPy LogME; and the streamed float32 statistics' LogME and H-score against the
in-memory float64 scores of the extracted features.

Writes all numbers to --out (JSON).
"""

import argparse
import json
import math
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from logme_numpy_baseline import numpy_reference_logme

import jaxmodels
import scoring
from scoring import stats as stats_lib

FULL = (10000, 1024, 100)
QUICK = (2000, 256, 20)
SOURCE_CLASSES = 1000
AGREEMENT = 1e-3  # largest relative difference float32 vs float64 (and streamed vs in-memory)


def score_calls(feats, labels, probs, c):
    """{name: () -> score} on the given arrays, in their dtype (labels 0..c−1)."""
    source = np.asarray(probs).argmax(axis=1)
    return {
        "logme": lambda: scoring.logme(feats, labels, num_classes=c).score,
        "hscore": lambda: scoring.hscore(feats, labels, num_classes=c),
        "regularized_hscore": lambda: scoring.regularized_hscore(feats, labels, num_classes=c),
        "transrate": lambda: scoring.transrate(feats, labels),
        "gbc": lambda: scoring.gbc(feats, labels, num_classes=c),
        "sfda": lambda: scoring.sfda(feats, labels, num_classes=c),
        "leep": lambda: scoring.leep(probs, labels, num_classes=c),
        "nce": lambda: scoring.nce(
            source, labels, num_classes=c, num_source_classes=SOURCE_CLASSES
        ),
    }


def relative_difference(got, want) -> float:
    return abs(float(got) - float(want)) / max(abs(float(want)), 1e-30)


def check_float32_agreement(n, d, c):
    """{name: (float32 value, float64 value, relative difference)} on the benchmark's features."""
    feats, labels, probs = make_task(n, d, c)
    values32 = {name: float(call()) for name, call in score_calls(feats, labels, probs, c).items()}
    values32["logme_numpy_reference"] = values32["logme"]
    with jax.enable_x64(True):
        f64, p64 = feats.astype(np.float64), probs.astype(np.float64)
        p64 = p64 / p64.sum(axis=1, keepdims=True)
        values64 = {name: float(call()) for name, call in score_calls(f64, labels, p64, c).items()}
    values64["logme_numpy_reference"] = numpy_reference_logme(feats, labels)
    return {
        name: (values32[name], values64[name], relative_difference(values32[name], values64[name]))
        for name in values32
    }


def make_task(n, d, c, seed=0):
    """float32 features with class structure and a decaying spectrum; source probabilities [N, K]."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, size=n)
    means = rng.normal(size=(c, d)) / math.sqrt(d) * 4
    scales = np.exp(-np.arange(d) / (d / 8))
    feats = (means[labels] + rng.normal(size=(n, d)) * scales).astype(np.float32)
    logits = rng.normal(size=(n, SOURCE_CLASSES)) + 3 * np.eye(c, SOURCE_CLASSES)[labels]
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    return feats, labels, (probs / probs.sum(axis=1, keepdims=True)).astype(np.float32)


def timed(fn, repeats, warmup=True):
    """Median wall time of `repeats` calls (after one warm-up call that compiles)."""
    if warmup:
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved(calls, repeats):
    """Median wall time per call, timing every call once per round so that load changes on a
    shared machine hit all of them alike."""
    for call in calls.values():
        jax.block_until_ready(call())  # compile
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            jax.block_until_ready(call())
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def bench_scores(n, d, c, repeats, with_nleep):
    feats, labels, probs = make_task(n, d, c)
    feats_j, labels_j = jnp.asarray(feats), jnp.asarray(labels)
    calls = score_calls(feats_j, labels_j, probs, c)
    calls["logme_numpy_reference"] = lambda: numpy_reference_logme(feats, labels)
    rows = interleaved(calls, repeats)
    if with_nleep:
        rows["nleep"] = timed(lambda: scoring.nleep(feats, labels), 1, warmup=False)
    return {name: {"seconds": t, "speed_vs_logme": rows["logme"] / t} for name, t in rows.items()}


def bench_stream(model_name, num_images, batch_size, repeats):
    spec = jaxmodels.spec(model_name, num_classes=10)
    size = spec.preprocessing.image_size
    model = jaxmodels.create(model_name, num_classes=10)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(num_images, size, size, 3)).astype(np.float32)
    labels = rng.integers(0, 10, size=num_images)
    # the library's init, compiled once and cheaply: run op by op, resnet_tiny's init took 10 s
    variables = jaxmodels.models.registry.init_variables(model, 0)
    dim = spec.feature_dim

    def extract():
        return jaxmodels.extract_features(
            model, variables, images, batch_size=batch_size, progress=False
        )

    def streamed():
        acc = jaxmodels.stream_reduce(
            model,
            variables,
            images,
            labels=labels,
            init=stats_lib.init(dim, 10),
            update=stats_lib.update,
            batch_size=batch_size,
            progress=False,
        )
        return scoring.logme_from_stats(acc).score, scoring.hscore_from_stats(acc)

    times = interleaved({"extract": extract, "stream": streamed}, repeats)
    t_extract, t_stream = times["extract"], times["stream"]
    # The float32 streamed statistics against float64 in-memory scores of the same features.
    streamed_logme, streamed_hscore = (float(v) for v in streamed())
    with jax.enable_x64(True):
        feats64 = np.asarray(extract(), np.float64)
        in_memory_logme = float(scoring.logme(feats64, labels, num_classes=10).score)
        in_memory_hscore = float(scoring.hscore(feats64, labels, num_classes=10))
    return {
        "model": model_name,
        "num_images": num_images,
        "batch_size": batch_size,
        "extract_seconds": t_extract,
        "stream_and_score_seconds": t_stream,
        "overhead": t_stream / t_extract - 1,
        "agreement": {
            "logme": relative_difference(streamed_logme, in_memory_logme),
            "hscore": relative_difference(streamed_hscore, in_memory_hscore),
        },
    }


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help=f"(N, D, C) = {QUICK} instead of {FULL}"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed warm calls per score (median)"
    )
    parser.add_argument("--no-nleep", action="store_true", help="skip N-LEEP (slow: host GMM)")
    parser.add_argument("--stream-model", default="resnet18", help="model for part 2 (random init)")
    parser.add_argument("--stream-images", type=int, default=512, help="images for part 2")
    parser.add_argument("--out", default="bench_scores.json", help="JSON output path")
    args = parser.parse_args()

    n, d, c = QUICK if args.quick else FULL
    print(f"Part 1: scores at (N, D, C) = ({n}, {d}, {c}), float32, {jax.devices()[0].platform}")
    scores = bench_scores(n, d, c, args.repeats, not args.no_nleep)
    print(f"\n{'score':<20s} {'seconds':>9s} {'speed vs LogME':>15s}")
    for name, row in scores.items():
        print(f"{name:<20s} {row['seconds']:9.3f} {row['speed_vs_logme']:14.2f}x")

    reference = scores["logme_numpy_reference"]["seconds"]
    print(
        "regularized_hscore vs the reference-style NumPy LogME: "
        f"{reference / scores['regularized_hscore']['seconds']:.2f}x faster "
        "(the paper's claim: 3-10x faster than LogME)"
    )

    model = "resnet_tiny" if args.quick else args.stream_model
    num_images = 256 if args.quick else args.stream_images
    print(f"\nPart 2: streamed scoring vs extraction alone ({model}, {num_images} images)")
    stream = bench_stream(model, num_images, 64, 1 if args.quick else 3)
    print(
        f"extract {stream['extract_seconds']:.3f} s, stream + LogME + H-score "
        f"{stream['stream_and_score_seconds']:.3f} s: overhead {100 * stream['overhead']:+.1f}%"
    )
    agreement = check_float32_agreement(n, d, c)
    print(f"\n{'score':<22s} {'float32':>14s} {'float64':>14s} {'rel. diff':>10s}")
    for name, (v32, v64, rel) in agreement.items():
        print(f"{name:<22s} {v32:14.7g} {v64:14.7g} {rel:10.1e}")
    worst = [rel for _, _, rel in agreement.values()] + list(stream["agreement"].values())
    passed = max(worst) <= AGREEMENT
    line = (
        f"float32 vs float64 agreement (every score but N-LEEP; streamed vs in-memory "
        f"LogME {stream['agreement']['logme']:.1e}, H-score {stream['agreement']['hscore']:.1e}): "
        f"max relative difference {max(worst):.1e} (limit {AGREEMENT:.0e}): "
        + ("OK" if passed else "FAILED")
    )
    print(line)
    result = {
        "size": {"N": n, "D": d, "C": c},
        "scores": scores,
        "stream": stream,
        "agreement": {
            name: {"float32": a, "float64": b, "relative": r}
            for name, (a, b, r) in agreement.items()
        },
        "agreement_limit": AGREEMENT,
        "agreement_ok": passed,
    }
    pathlib.Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    if not passed:
        sys.exit(f"bench_scores: {line}")


if __name__ == "__main__":
    main()
