"""Benchmark: evaluating many candidate weights on one prepared held-out set.

A greedy soup scores dozens of candidate variables on one held-out set; each candidate must cost
one forward pass, not a re-decode. This script prepares a set once (`jaxmodels.prepare`, uint8 on
the devices), then times `jaxmodels.evaluate` for several candidates against the floor — one jitted
forward pass over the same device-resident images, each device over its own rows (normalise +
apply, no accuracy or loss) — and
against re-reading the set from its source for every candidate (what evaluation did before).
Everything runs in one process, interleaved, best of `--repeats`; it prints ratios.

    python scripts/benchmarks/eval.py                 # resnet50 layout, width 16, 64 px, 1024 images
    python scripts/benchmarks/eval.py --quick         # seconds: a tiny model and 128 images
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxmodels
from jaxmodels import sharding
from jaxmodels.inference import evaluate as inference
from jaxmodels.inference import row_batches


def _candidates(model, count: int, size: int):
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))
    rng = np.random.default_rng(0)

    def fill(leaf, scale):
        return jnp.asarray(scale * rng.standard_normal(leaf.shape), leaf.dtype)

    return [
        jax.tree.map(lambda leaf, s=0.05 * (1 + i / count): fill(leaf, s), abstract)
        for i in range(count)
    ]


def _forward_floor(model, prep, prepared):
    """jit(variables, images) → logits of every batch: each device runs the forward pass over
    its own rows of the prepared set, batch after batch (`lax.map`), in one call; nothing
    else (no gather, no scatter, no sums, nothing copied back)."""
    forward = inference.forward_fn(model, None, prep, None)
    steps, per_device = prepared.num_batches, prepared.rows.local_buckets[0]

    def run(v, images_nX):  # one device's n = T·b rows
        images_TbX = images_nX.reshape(steps, per_device, *images_nX.shape[1:])
        return jax.lax.map(lambda x: forward(v, x), images_TbX)

    spec = jax.sharding.PartitionSpec(sharding.DATA_AXIS)
    return row_batches.per_device(run, prepared.mesh, (jax.sharding.PartitionSpec(), spec), spec)


def _time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        tick = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - tick)
    return best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--model", default="resnet50", choices=jaxmodels.MODEL_NAMES)
    parser.add_argument("--width", type=int, default=16, help="ResNet/ViT width override")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--images", type=int, default=1024, help="held-out set size")
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny model, 128 images")
    parser.add_argument("--json", default="bench_eval.json", help="where to write the results")
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.width, args.image_size, args.images = "resnet_tiny", 8, 32, 128
        args.candidates, args.repeats = 3, 2

    overrides = {"width": args.width, "image_size": args.image_size}
    model = jaxmodels.create(args.model, num_classes=10, **overrides)
    prep = jaxmodels.spec_of(model).preprocessing
    rng = np.random.default_rng(1)
    raw = rng.integers(0, 256, (args.images, prep.resize_size + 8, prep.resize_size + 8, 3))
    data = (raw.astype(np.uint8), rng.integers(0, 10, args.images))
    candidates = _candidates(model, args.candidates, args.image_size)

    tick = time.perf_counter()
    prepared = jaxmodels.prepare(data, prep, progress=False)
    prepare_s = time.perf_counter() - tick
    floor = _forward_floor(model, prep, prepared)

    def one_forward(v):
        return floor(v, prepared.rows.arrays[0]).block_until_ready()

    def one_evaluate(v):
        return jaxmodels.evaluate(model, v, prepared)

    def one_redecode(v):
        return jaxmodels.evaluate(model, v, data)  # reads and resizes the set again

    for v in candidates[:1]:  # compile everything once, outside the timings
        one_forward(v), one_evaluate(v), one_redecode(v)
    rows = []
    for i, v in enumerate(candidates):
        times = {
            "forward_s": _time(lambda v=v: one_forward(v), args.repeats),
            "evaluate_s": _time(lambda v=v: one_evaluate(v), args.repeats),
            "redecode_s": _time(lambda v=v: one_redecode(v), args.repeats),
        }
        rows.append(times)
        print(
            f"candidate {i}: evaluate {times['evaluate_s']:.3f} s, one forward pass "
            f"{times['forward_s']:.3f} s → {times['evaluate_s'] / times['forward_s']:.2f}×; "
            f"re-decoding the set each time {times['redecode_s']:.3f} s"
        )
    ratio = float(np.median([r["evaluate_s"] / r["forward_s"] for r in rows]))
    redecode = float(np.median([r["redecode_s"] / r["evaluate_s"] for r in rows]))
    print(
        f"\n{args.model} (width {args.width}, {args.image_size} px), {args.images} held-out "
        f"images on {jax.device_count()} device(s): prepared once in {prepare_s:.2f} s; "
        f"evaluate / one forward pass = {ratio:.2f}× (target ≤ 1.1×); re-decoding per "
        f"candidate would cost {redecode:.1f}× an evaluation"
    )
    result = {
        "model": args.model, "width": args.width, "image_size": args.image_size,
        "images": args.images, "devices": jax.device_count(), "prepare_s": prepare_s,
        "candidates": rows, "evaluate_over_forward": ratio, "redecode_over_evaluate": redecode,
    }  # fmt: skip
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {os.path.abspath(args.json)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
