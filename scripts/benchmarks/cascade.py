"""Cascades and ensembles that save real time: measured speedups beside FLOPs-predicted ones.

Part 1, adaptive cascades (`jaxmodels.Cascade`, Wang et al., ICLR 2022). Two- and three-stage
cascades of ResNets of different depth and width (resnet18/34/50 layouts at small inputs so
that they run on a CPU), one batch of uint8 images (normalised on the device). For each, the
wall-clock time of the adaptive executor over the batch is compared with the costliest member
alone run through the same executor (a one-stage cascade: same transfer, normalisation and
fetch), as `jaxmodels.committees.timing.time_committees` measures it for `scripts/cascade.py`
(which also times the ensemble of all the stages' members, "ens. s"). Beside the measured
speedup stands the FLOPs-predicted one at the same exit fractions, costliest FLOPs / average
FLOPs. The "padded" prediction also counts the rows each stage computes for bucket padding,
which is part of what the executor really does. The "timed" prediction replaces each member's FLOPs by
its measured time alone on the full batch (small, narrow convolutions run fewer FLOP/s on a
CPU than big ones, so FLOPs overstate the cheap stages' share), in proportion to the rows each
stage runs. The "line" prediction is the one the library deploys by
(`jaxmodels.committees.deploy`): each member's time through the executor as a fixed cost per
stage call plus a cost per image, so it counts what a stage costs whatever its rows; the
issue's target is measured ≥ 0.9 × line.

The weights are random (heads centred and scaled so the softmax is not saturated), so
confidences mean nothing: thresholds are set from the measured stage confidences (rule "ensemble", max_prob) so that a chosen fraction of the examples that
reach each stage exits there (`--exit-fractions`, default 0.5 then 0.7: stage 0 answers 50 %
of the batch, stage 1 answers 70 % of the rest, the last stage the remaining 15 %).

Part 2, same-architecture ensembles (`jaxmodels.Ensemble`): four ResNet-18 layouts, and four
ViT-Tiny (a matmul model), with different weights as one jitted step with the variables stacked
under `vmap`, against a Python loop over the members (a one-member Ensemble each, then the mean;
and, stricter, a loop of one jitted forward per member on images already on the device). Also
timed: ``lax.map`` over the same stack, ``Ensemble(strategy="sequence")`` (the members one after
another inside one jitted step: on XLA:CPU a vmapped convolution with per-member kernels is a
grouped convolution, which is slow there) and the default ``"auto"``, which measures the three.
Targets: auto ≥ 0.95× the loop everywhere; vmap ≥ 1.5× on the ViTs, where batched matmuls can
win (on a CPU the narrow ViT-Tiny gains, its members being too small to use the cores alone).

Timing: every configuration is run once to compile, then the contenders alternate for
`--repeats` rounds and each keeps its best time, so load from other processes hits all alike.
Runs on all local devices (one on a CPU).

Examples:
    python scripts/benchmarks/cascade.py --quick --json bench_cascade.json
    python scripts/benchmarks/cascade.py --repeats 5
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform

import jax
import jax.numpy as jnp
import numpy as np

import jaxmodels
from jaxmodels.committees import deploy
from jaxmodels.committees import online as online_lib
from jaxmodels.committees import rules as cascade_rules
from jaxmodels.committees import timing as cascade_timing
from jaxmodels.committees.executors import Cascade, Ensemble, Member
from jaxmodels.inference import row_batches

NUM_CLASSES = 100


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="small models at 32 px, 1 repeat (seconds on a CPU)"
    )
    parser.add_argument("--batch-size", type=int, default=256, help="images per batch")
    parser.add_argument("--image-size", type=int, default=None, help="side (64; 32 with --quick)")
    parser.add_argument(
        "--two-stage",
        nargs="+",
        default=None,
        help="name:width per stage (default resnet18:16 resnet50:32; widths halved with --quick)",
    )
    parser.add_argument(
        "--three-stage",
        nargs="+",
        default=None,
        help="name:width per stage (default resnet18:16 resnet34:16 resnet50:32)",
    )
    parser.add_argument(
        "--exit-fractions",
        nargs="+",
        type=float,
        default=[0.5, 0.7],
        help="fraction of the examples reaching stage k that exit there, k = 0, 1 (a two-stage "
        "cascade uses the first)",
    )
    parser.add_argument(
        "--ensemble",
        nargs="+",
        default=None,
        help="[MODEL@]image_size:width configs of the 4-member ensemble, MODEL resnet18 unless "
        "given (default 32:8 64:16 vit_tiny@32:32 vit_tiny@32:192; "
        "32:8 vit_tiny@32:32 with --quick)",
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (3; 1 --quick)")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    args = parser.parse_args(argv)
    scale = 2 if args.quick else 1
    args.image_size = args.image_size or (32 if args.quick else 64)
    args.two_stage = args.two_stage or [f"resnet18:{16 // scale}", f"resnet50:{32 // scale}"]
    args.three_stage = args.three_stage or [
        f"resnet18:{16 // scale}",
        f"resnet34:{16 // scale}",
        f"resnet50:{32 // scale}",
    ]
    args.ensemble = args.ensemble or (
        ["32:8", "vit_tiny@32:32"]
        if args.quick
        else ["32:8", "64:16", "vit_tiny@32:32", "vit_tiny@32:192"]
    )
    args.repeats = args.repeats or (1 if args.quick else 3)
    if args.batch_size < 1 or args.repeats < 1:
        parser.error("--batch-size and --repeats must be positive")
    if not all(0.0 < f < 1.0 for f in args.exit_fractions):
        parser.error("--exit-fractions must lie strictly between 0 and 1")
    return args


def random_variables(model, image_size: int, seed: int) -> dict:
    """He-scaled random variables shaped like `model.init`'s (no compiled init needed)."""
    shapes = jax.eval_shape(
        model.init, jax.random.key(0), jnp.zeros((1, image_size, image_size, 3))
    )
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        key = jax.tree_util.keystr(path)
        if key.endswith("['kernel']"):
            scale = np.sqrt(2.0 / np.prod(leaf.shape[:-1]))
            return (scale * rng.standard_normal(leaf.shape)).astype(leaf.dtype)
        if key.endswith("['var']") or key.endswith("['scale']"):
            return np.ones(leaf.shape, leaf.dtype)
        return np.zeros(leaf.shape, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, dict(shapes))


def make_member(name_width: str, image_size: int, seed: int) -> Member:
    name, width = name_width.split(":")
    sized = {"image_size": image_size} if name.startswith("vit") else {}  # ViTs: sized inputs
    model = jaxmodels.create(name, num_classes=NUM_CLASSES, width=int(width), **sized)
    spec = jaxmodels.spec(name, num_classes=NUM_CLASSES, image_size=image_size, width=int(width))
    variables = random_variables(model, image_size, seed)
    return Member(model, variables, spec.flops_per_image, spec.preprocessing, name_width)


def with_calibrated_heads(members, images, batch_size: int) -> list[Member]:
    """The members with their linear heads centred and scaled on `images`.

    Random ResNets give huge logits and saturated softmaxes (max_prob = 1 in float32 for most
    images), so no threshold could split them. Shifting and scaling the head (linear) makes
    each class's logit vary with std 1 over the batch, as a trained model's roughly do.
    """
    logits_MNK = Ensemble(members, batch_size=batch_size).member_logits(images)
    calibrated = []
    for member, logits_NK in zip(members, logits_MNK, strict=True):
        scale = 1.0 / logits_NK.std(axis=0).mean()
        params = dict(member.variables["params"])
        params["fc"] = {
            "kernel": params["fc"]["kernel"] * scale,
            "bias": (params["fc"]["bias"] - logits_NK.mean(axis=0)) * scale,
        }
        variables = {**member.variables, "params": params}
        calibrated.append(dataclasses.replace(member, variables=variables))
    return calibrated


def thresholds_for(conf_MN: np.ndarray, exit_fractions) -> np.ndarray:
    """Thresholds under which the chosen fraction of the examples reaching each stage exits."""
    reach_N = np.ones(conf_MN.shape[1], bool)
    thresholds = []
    for conf_N, fraction in zip(conf_MN[:-1], exit_fractions, strict=False):
        values = np.sort(conf_N[reach_N])[::-1]
        n_exit = min(max(round(fraction * len(values)), 1), len(values) - 1)
        t = (values[n_exit - 1] + values[n_exit]) / 2  # between the last exiting and the next
        thresholds.append(float(t))
        reach_N &= ~(conf_N > t)
    return np.array(thresholds)


def padded_flops(members, exit_stage_N, buckets) -> float:
    """Average FLOPs per image counting the padding rows of every stage's buckets."""
    total = 0.0
    for stage, member in enumerate(members):
        reaching = int((exit_stage_N >= stage).sum())
        rows = sum(size for _, _, size in row_batches.bucket_chunks(reaching, buckets))
        total += rows * member.flops
    return total / len(exit_stage_N)


def bench_cascade(stage_specs, images, args) -> dict:
    members = [make_member(spec, args.image_size, seed) for seed, spec in enumerate(stage_specs)]
    members = with_calibrated_heads(members, images, args.batch_size)
    logits_MNC = Ensemble(members, batch_size=args.batch_size).member_logits(images)
    _, conf_MN = cascade_rules.stage_outputs(logits_MNC)
    # what scripts/cascade.py measures: each member alone through the same executor (a
    # one-stage cascade), the ensemble of all, the cascade; alternating rounds, best kept
    times = cascade_timing.time_committees(
        members, [images] * len(members), range(len(members)),
        thresholds_for(conf_MN, args.exit_fractions), batch_size=len(images),
        repeats=args.repeats,
    )  # fmt: skip
    out = times.cascade_output
    seconds = dict(enumerate(times.member_seconds)) | {"cascade": times.cascade_seconds}
    buckets = row_batches.mesh_and_buckets(None, len(images), None)[1]
    alone_s = seconds[len(members) - 1]
    predicted = members[-1].flops / out.avg_flops
    # The same prediction with each member's measured full-batch time in place of its FLOPs:
    # what the executor would reach with no overhead and time proportional to rows.
    reaching_M = [(out.exit_stage >= k).mean() for k in range(len(members))]
    timed = alone_s / sum(f * seconds[k] for k, f in enumerate(reaching_M))
    measured = alone_s / seconds["cascade"]
    # The prediction the library deploys by (`deploy.measure_costs`): each member's time as a
    # line, a fixed cost per stage call plus a cost per image, measured through the executor.
    costs = deploy.measure_costs(
        members, [images] * len(members), batch_size=len(images), repeats=args.repeats
    )
    chain = range(len(members))
    line = costs.seconds(len(members) - 1, len(images)) / deploy.predicted_seconds(
        costs, chain, out.exit_stage
    )
    # online: requests of 1..8 images, one jitted call each, the cascade against its last
    # member alone served the same way
    thresholds = thresholds_for(conf_MN, args.exit_fractions)
    requests = 50 if args.quick else 200
    online = {
        name: online_lib.request_latency(
            online_lib.OnlineCascade(Cascade(stage_members, stage_thresholds)), images,
            requests=requests,
        )
        for name, stage_members, stage_thresholds in (
            ("alone", members[-1:], []), ("cascade", members, thresholds),
        )
    }  # fmt: skip
    return {
        "stages": list(stage_specs),
        "mflops_per_image": [m.flops / 1e6 for m in members],
        "member_s": [seconds[k] for k in range(len(members))],
        "exit_fractions": out.exit_fractions.round(4).tolist(),
        "avg_mflops": out.avg_flops / 1e6,
        "alone_s": alone_s,
        "cascade_s": seconds["cascade"],
        "ensemble_s": times.ensemble_seconds,
        "predicted_speedup": predicted,
        "padded_predicted_speedup": members[-1].flops / padded_flops(members, out.exit_stage, buckets),
        "time_predicted_speedup": timed,
        "measured_speedup": measured,
        "measured_over_predicted": measured / predicted,
        "measured_over_time_predicted": measured / timed,
        "line_predicted_speedup": line,
        "measured_over_line_predicted": measured / line,
        "stage_fixed_ms": [1e3 * s for s in costs.fixed_M],
        "stage_ms_per_image": [1e3 * s for s in costs.per_image_M],
        "online_ms": online,
        "online_p50_speedup": online["alone"]["p50_ms"] / online["cascade"]["p50_ms"],
        "online_p99_speedup": online["alone"]["p99_ms"] / online["cascade"]["p99_ms"],
    }  # fmt: skip


def bench_ensemble(config: str, args) -> dict:
    name, _, size_width = config.rpartition("@")
    name = name or "resnet18"
    image_size, width = (int(v) for v in size_width.split(":"))
    members = [make_member(f"{name}:{width}", image_size, seed) for seed in range(4)]
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (args.batch_size, image_size, image_size, 3), dtype=np.uint8)
    stacked = Ensemble(members, batch_size=args.batch_size, strategy="vmap")
    mapped = Ensemble(members, batch_size=args.batch_size, strategy="lax.map")
    sequential = Ensemble(members, batch_size=args.batch_size, strategy="sequence")
    auto = Ensemble(members, batch_size=args.batch_size)
    singles = [Ensemble([m], batch_size=args.batch_size) for m in members]
    prep, apply_fn = members[0].preprocessing, members[0].apply_fn

    @jax.jit
    def forward(variables, images_BHWC):
        return apply_fn(variables, jaxmodels.data.preprocess.normalize(images_BHWC, prep))

    device_images = jax.device_put(images)
    device_variables = [jax.device_put(m.variables) for m in members]
    runs = {
        "vmap": lambda: stacked.logits(images),
        "lax_map": lambda: mapped.logits(images),
        "sequential": lambda: sequential.logits(images),
        "auto": lambda: auto.logits(images),
        "loop": lambda: np.mean([single.logits(images) for single in singles], axis=0),
        "loop_on_device": lambda: np.mean(
            [np.asarray(forward(v, device_images)) for v in device_variables], axis=0
        ),
    }
    reference = runs["loop_on_device"]()
    for run in runs.values():  # compile, and check that all three agree
        np.testing.assert_allclose(run(), reference, rtol=1e-4, atol=1e-4)
    seconds = cascade_timing.best_seconds(runs, args.repeats)
    return {
        "model": name,
        "image_size": image_size,
        "width": width,
        "members": 4,
        **{f"{key}_s": value for key, value in seconds.items()},
        "vmap_speedup_over_loop": seconds["loop"] / seconds["vmap"],
        "vmap_speedup_over_loop_on_device": seconds["loop_on_device"] / seconds["vmap"],
        "sequential_speedup_over_loop": seconds["loop"] / seconds["sequential"],
        "lax_map_speedup_over_loop": seconds["loop"] / seconds["lax_map"],
        "auto_speedup_over_loop": seconds["loop"] / seconds["auto"],
        "auto_strategy": auto.chosen_strategy,
    }


def figures(cascades, ensembles) -> list[dict]:
    """The headline ratios for docs/benchmarks.md (the "figures" every benchmark writes)."""
    out = []
    for r in cascades:
        name = " -> ".join(r["stages"])
        for key, target, what in (
            ("measured_speedup", None, "realized speed-up of the cascade over its last stage"),
            ("time_predicted_speedup", None, "speed-up predicted by measured stage times"),
            ("predicted_speedup", None, "speed-up predicted by FLOPs"),
            ("line_predicted_speedup", None, "speed-up predicted by the deploy cost lines"),
            ("measured_over_time_predicted", None, "realized / time-proportional speed-up"),
            ("measured_over_line_predicted", ">= 0.9", "realized / deploy-predicted speed-up"),
        ):
            out.append({"name": f"{name}: {key}", "value": r[key], "unit": "x",
                        "target": target, "what": what})  # fmt: skip
    for r in ensembles:
        name = f"ensemble of 4 {r['model']}, {r['image_size']} px width {r['width']}"
        matmul = r["model"].startswith("vit")  # where vmap wins: batched matmuls
        for key in ("vmap", "lax_map", "sequential", "auto"):
            target = {"auto": ">= 0.95", "vmap": ">= 1.5" if matmul else None}.get(key)
            out.append({
                "name": f"{name}: {key} / loop",
                "value": r[f"{key}_speedup_over_loop"],
                "unit": "x",
                "target": target,
                "what": f"Ensemble(strategy={key!r}) speed over a Python loop over members",
            })  # fmt: skip
    return out


def main(argv=None) -> None:
    args = parse_args(argv)
    print(
        f"devices: {jax.devices()}; cpu cores: {os.cpu_count()}; batch {args.batch_size}; "
        f"{args.image_size} px; repeats {args.repeats}",
        flush=True,
    )
    rng = np.random.default_rng(0)
    size = args.image_size
    images = rng.integers(0, 256, (args.batch_size, size, size, 3), dtype=np.uint8)
    cascades = []
    print(
        f"{'cascade':42} {'exits':>15} {'alone s':>7} {'casc. s':>7} {'ens. s':>7} {'predicted':>9} "
        f"{'padded':>7} {'timed':>6} {'line':>6} {'measured':>8} {'meas/pred':>9} "
        f"{'meas/timed':>10} {'meas/line':>9}"
    )
    for stage_specs in (args.two_stage, args.three_stage):
        r = bench_cascade(stage_specs, images, args)
        cascades.append(r)
        exits = "/".join(f"{f:.2f}" for f in r["exit_fractions"])
        print(
            f"{' -> '.join(r['stages']):42} {exits:>15} {r['alone_s']:7.3f} {r['cascade_s']:7.3f} "
            f"{r['ensemble_s']:7.3f} "
            f"{r['predicted_speedup']:8.2f}x {r['padded_predicted_speedup']:6.2f}x "
            f"{r['time_predicted_speedup']:5.2f}x {r['line_predicted_speedup']:5.2f}x "
            f"{r['measured_speedup']:7.2f}x {r['measured_over_predicted']:8.2f}x "
            f"{r['measured_over_time_predicted']:9.2f}x {r['measured_over_line_predicted']:8.2f}x",
            flush=True,
        )
    print(f"{'online, requests of 1-8 images':42} {'alone p50':>9} {'p99':>6} {'cascade p50':>11} "
          f"{'p99':>6} {'p50 speed-up':>12} {'p99 speed-up':>12}")  # fmt: skip
    for r in cascades:
        alone, casc = r["online_ms"]["alone"], r["online_ms"]["cascade"]
        print(
            f"{' -> '.join(r['stages']):42} {alone['p50_ms']:7.2f}ms {alone['p99_ms']:4.1f}ms "
            f"{casc['p50_ms']:9.2f}ms {casc['p99_ms']:4.1f}ms {r['online_p50_speedup']:11.2f}x "
            f"{r['online_p99_speedup']:11.2f}x",
            flush=True,
        )
    ensembles = []
    print(f"{'ensemble of 4':26} {'vmap s':>7} {'seq. s':>7} {'loop s':>7} "
          f"{'dev. loop s':>11} {'loop/vmap':>9} {'dev.loop/vmap':>13} {'loop/seq.':>9}")  # fmt: skip
    for config in args.ensemble:
        r = bench_ensemble(config, args)
        ensembles.append(r)
        print(
            f"{r['model']:<8} {r['image_size']:>3} px w {r['width']:<6} {r['vmap_s']:7.3f} "
            f"{r['sequential_s']:7.3f} {r['loop_s']:7.3f} {r['loop_on_device_s']:11.3f} "
            f"{r['vmap_speedup_over_loop']:8.2f}x {r['vmap_speedup_over_loop_on_device']:12.2f}x "
            f"{r['sequential_speedup_over_loop']:8.2f}x; lax.map/loop "
            f"{r['lax_map_speedup_over_loop']:.2f}x, auto ({r['auto_strategy']}) "
            f"{r['auto_speedup_over_loop']:.2f}x",
            flush=True,
        )
    if args.json:
        record = {
            "args": vars(args),
            "devices": [str(d) for d in jax.devices()],
            "machine": platform.platform(),
            "cpu_count": os.cpu_count(),
            "jax": jax.__version__,
            "cascades": cascades,
            "ensembles": ensembles,
            "figures": figures(cascades, ensembles),
        }
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
