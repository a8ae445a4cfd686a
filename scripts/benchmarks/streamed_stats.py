"""Streamed score statistics: one QR per batch against one per buffer of ≥ P rows.

    python scripts/benchmarks/streamed_stats.py            # ViT-B sizes: D = 768, C = 100
    python scripts/benchmarks/streamed_stats.py --quick    # D = 256, C = 10

`scoring.stats.update` refactors [R; batch] for every batch (a QR of P + B rows for B new
ones); `scoring.stats.buffered_update` stacks batches into a buffer of L ≥ P rows and refactors
once per buffer. Both are jitted and fed the same float32 batches of B = 32 rows (the default per
device) on one device; the script prints microseconds per row for each, their ratio, and checks
that both give the same LogME (relative 1e-4 in float32).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from scoring import stats as stats_lib


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="D = 256, C = 10, fewer rows")
    parser.add_argument("--batch", type=int, default=32, help="rows per batch (32)")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many passes (3)")
    parser.add_argument("--json", help="write the results here")
    return parser.parse_args(argv)


def _pass(update, init, batches) -> tuple[float, object]:
    tick = time.perf_counter()
    acc = init
    for feats_BD, labels_B in batches:
        acc = update(acc, feats_BD, labels_B)
    jax.block_until_ready(acc)
    return time.perf_counter() - tick, acc


def main(argv=None) -> int:
    args = parse_args(argv)
    dim, classes = (256, 10) if args.quick else (768, 100)
    size = 1 + dim + classes
    capacity = -(-size // args.batch) * args.batch
    num_batches = 2 * capacity // args.batch  # two buffers' worth
    rng = np.random.default_rng(0)
    batches = [
        (
            jnp.asarray(rng.normal(size=(args.batch, dim)), jnp.float32),
            jnp.asarray(rng.integers(0, classes, args.batch), jnp.int32),
        )
        for _ in range(num_batches)
    ]
    init = stats_lib.init(dim, classes)
    per_batch = jax.jit(stats_lib.update)
    buffered = jax.jit(stats_lib.buffered_update)
    contenders = {
        "per batch": (per_batch, init, lambda acc: acc),
        "buffered": (buffered, stats_lib.buffered(init, capacity), stats_lib.flushed),
    }
    seconds, results = {}, {}
    for name, (update, start, finish) in contenders.items():
        _pass(update, start, batches[:2])  # compile
        times = []
        for _ in range(args.repeats):  # interleaving would retrace nothing: same shapes
            elapsed, acc = _pass(update, start, batches)
            times.append(elapsed)
        seconds[name] = min(times)
        results[name] = float(stats_lib.logme_from_stats(finish(acc)).score)
    rows = num_batches * args.batch
    us = {name: 1e6 * s / rows for name, s in seconds.items()}
    ratio = us["per batch"] / us["buffered"]
    agree = abs(results["buffered"] - results["per batch"]) <= 1e-4 * abs(results["per batch"])
    print(f"P = {size} (D = {dim}, C = {classes}), batches of {args.batch}, buffer {capacity} "
          f"rows, {rows} rows, {jax.devices()[0].platform}")  # fmt: skip
    print("| update | µs per row |")
    print("| --- | --- |")
    for name, value in us.items():
        print(f"| {name} | {value:.1f} |")
    print(f"buffered vs per batch: {ratio:.1f}× less time per row; LogME agrees: {agree}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"P": size, "batch": args.batch, "capacity": capacity,
                       "us_per_row": us, "ratio": ratio, "logme": results,
                       "agree": agree}, f, indent=2)  # fmt: skip
    return 0 if agree else 1


if __name__ == "__main__":
    raise SystemExit(main())
