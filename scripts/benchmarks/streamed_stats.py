"""Streamed score statistics: one QR per batch against one per buffer; one R per device.

    python scripts/benchmarks/streamed_stats.py            # ViT-B sizes: D = 768, C = 100
    python scripts/benchmarks/streamed_stats.py --quick    # D = 256, C = 10

One device: `scoring.stats.update` refactors [R; batch] for every batch (a QR of P + B rows for B
new ones); `scoring.stats.buffered_update` stacks batches into a buffer of L ≥ P rows and refactors
once per buffer. Both are jitted and fed the same float32 batches of B = 32 rows (the default per
device) on one device; the script prints microseconds per row for each, their ratio, and checks
that both give the same LogME (relative 1e-4 in float32).

A mesh of M CPU devices (8 fake ones, `--devices`): `jaxmodels.stream_reduce` folds the same rows,
batches of 32 per device, into a replicated buffered R (every device gathers every batch and runs
the same QR) or, with `merge=scoring.tsqr.merge_buffered`, into one buffered R per device (each
device factors its own rows; the M factors are merged once at the end, TSQR). Features are the
rows themselves (a model that flattens its input), so the time is the statistics' and the feeding's.
"""

from __future__ import annotations

import argparse
import json
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jaxmodels
from jaxmodels import sharding
from scoring import stats as stats_lib
from scoring import tsqr


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="D = 256, C = 10, fewer rows")
    parser.add_argument("--batch", type=int, default=32, help="rows per batch (32)")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many passes (3)")
    parser.add_argument("--devices", type=int, default=8, help="CPU devices of the mesh (8)")
    parser.add_argument("--json", help="write the results here")
    return parser.parse_args(argv)


def _pass(update, init, batches) -> tuple[float, object]:
    tick = time.perf_counter()
    acc = init
    for feats_BD, labels_B in batches:
        acc = update(acc, feats_BD, labels_B)
    jax.block_until_ready(acc)
    return time.perf_counter() - tick, acc


class _Rows(nn.Module):
    """A model whose features are its input, flattened: images [B, 1, 1, D] → [B, D]."""

    def features(self, images_BHWC):
        return images_BHWC.reshape(images_BHWC.shape[0], -1)

    def __call__(self, images_BHWC, train=False):
        return self.features(images_BHWC)


def _mesh_pass(mesh, dim, classes, per_device_rows, rows_NF, labels_N, per_device):
    """`stream_reduce` of the rows into a buffered R: replicated, or one per device merged once."""
    shards = sharding.data_parallel_size(mesh)
    rows = per_device_rows if per_device else per_device_rows * shards  # rows one update sees
    init = stats_lib.init(dim, classes)
    capacity = -(-init.r_factor.shape[0] // rows) * rows
    tick = time.perf_counter()
    acc = jaxmodels.stream_reduce(
        _Rows(),
        {},
        rows_NF,
        labels=labels_N,
        init=stats_lib.buffered(init, capacity),
        update=stats_lib.buffered_update,
        merge=tsqr.merge_buffered if per_device else None,
        batch_size=per_device_rows * shards,
        mesh=mesh,
        progress=False,
    )
    acc = jax.block_until_ready(acc if per_device else jax.jit(stats_lib.flushed)(acc))
    return time.perf_counter() - tick, acc


def _mesh_contest(args, dim, classes) -> dict:
    """Seconds and LogME of the replicated and the per-device stream on a CPU mesh."""
    mesh = sharding.data_mesh(jax.devices("cpu")[: args.devices])
    shards = sharding.data_parallel_size(mesh)
    size = 1 + dim + classes
    # many replicated buffers' worth of rows: the merge, once per stream, is paid off over N ≫ M·P
    buffers = 16 if args.quick else 32
    num_rows = buffers * -(-size // (args.batch * shards)) * args.batch * shards
    rng = np.random.default_rng(1)
    rows_NF = rng.normal(size=(num_rows, 1, 1, dim)).astype(np.float32)
    labels_N = rng.integers(0, classes, num_rows)
    seconds, logme = {}, {}
    for name, per_device in (("replicated", False), ("per device", True)):
        contest = (mesh, dim, classes, args.batch, rows_NF, labels_N, per_device)
        _mesh_pass(*contest)  # compile
        times = []
        for _ in range(args.repeats):
            elapsed, acc = _mesh_pass(*contest)
            times.append(elapsed)
        seconds[name] = min(times)
        logme[name] = float(stats_lib.logme_from_stats(sharding.host_copy(acc)).score)
    return {"devices": shards, "rows": num_rows, "seconds": seconds, "logme": logme}


def main(argv=None) -> int:
    args = parse_args(argv)
    try:  # the mesh's fake CPU devices: before any array is made
        jax.config.update("jax_num_cpu_devices", args.devices)
    except RuntimeError:  # backends already up (imported into a session): take what is there
        pass
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

    mesh = _mesh_contest(args, dim, classes)
    mesh_us = {name: 1e6 * s / mesh["rows"] for name, s in mesh["seconds"].items()}
    mesh["ratio"] = mesh["seconds"]["replicated"] / mesh["seconds"]["per device"]
    got, want = mesh["logme"]["per device"], mesh["logme"]["replicated"]
    mesh["agree"] = abs(got - want) <= 1e-4 * abs(want)
    print(f"\n{mesh['devices']} CPU devices, stream_reduce, batches of {args.batch} per device, "
          f"{mesh['rows']} rows")  # fmt: skip
    print("| buffered R | µs per row |")
    print("| --- | --- |")
    for name, value in mesh_us.items():
        print(f"| {name} | {value:.1f} |")
    print(f"per device (TSQR) vs replicated: {mesh['ratio']:.1f}× less time per row; "
          f"LogME agrees: {mesh['agree']}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"P": size, "batch": args.batch, "capacity": capacity,
                       "us_per_row": us, "ratio": ratio, "logme": results,
                       "agree": agree, "mesh": mesh | {"us_per_row": mesh_us}},
                      f, indent=2)  # fmt: skip
    return 0 if agree and mesh["agree"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
