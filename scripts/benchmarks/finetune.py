"""Benchmark fine-tuning modes (full, linear, bitfit, ssf) and SSF folding.

For each mode, the train step a run of that mode compiles (`training.programs.run_programs`, on
one device), on one model and input size (and, as a baseline, full fine-tuning written the
textbook way: gradient of the whole tree, optax AdamW over it): median train-step time, trainable parameter count,
optimizer-state bytes and the step's peak memory as XLA plans it (``compiled.memory_analysis()``:
arguments + outputs + temporaries − aliased, the number JAX exposes on every backend, CPU
included); plus the process's peak RSS at the end. Then the inference time of an SSF model
folded into the plain architecture (``jaxmodels.models.ssf.fold``) against the plain model with its own
weights, timed interleaved in the same process. Checks the issue's targets: SSF optimizer state
≤ 1% of full fine-tuning's, SSF step time ≤ full's, folded/plain inference time ≤ 1.02.

Examples:
    python scripts/benchmarks/finetune.py                       # vit_s16 at 224, batch 8, 3 steps
    python scripts/benchmarks/finetune.py --quick               # vit_s16 at 224, batch 2, 2 steps
    python scripts/benchmarks/finetune.py --model vit_tiny --image-size 32 --batch-size 16
"""

import argparse
import json
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxmodels
from jaxmodels import sharding
from training import masks, optim
from training.config import TrainConfig
from training.programs import run_programs

MODES = ("full", "linear", "bitfit", "ssf")


def _init(model, size: int, seed: int = 0) -> dict:
    variables = jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, size, size, 3)))
    return dict(variables)


def _batch(batch_size: int, size: int, num_classes: int) -> dict:
    rng = np.random.default_rng(0)
    return {
        "image": jnp.asarray(rng.normal(size=(batch_size, size, size, 3)), jnp.float32),
        "label": jnp.asarray(rng.integers(0, num_classes, batch_size), jnp.int32),
    }


def _peak_bytes(compiled) -> int | None:
    analysis = compiled.memory_analysis()
    if analysis is None:
        return None
    return int(
        analysis.argument_size_in_bytes
        + analysis.output_size_in_bytes
        + analysis.temp_size_in_bytes
        - analysis.alias_size_in_bytes
    )


def bench_mode(
    name: str,
    mode: str,
    size: int,
    batch_size: int,
    steps: int,
    num_classes: int,
    compute_dtype: str,
) -> dict:
    """Times ``steps`` train steps of ``mode`` after one compile + warm-up step."""
    model = jaxmodels.create(
        name,
        num_classes=num_classes,
        ssf=mode == "ssf",
        **({} if name.startswith("resnet") else {"image_size": size}),
    )
    variables = _init(model, size)
    config = TrainConfig(mode=mode, bf16=compute_dtype == "bfloat16", augmentation="none")
    # the programs a run of this mode compiles (`training.programs`), on one device
    mesh = sharding.data_mesh(jax.devices()[:1])
    programs = run_programs(
        model, variables, config, num_classes=num_classes,
        preprocessing=jaxmodels.spec_of(model).preprocessing,
        head_name=masks.head_name_for(name), mesh=mesh,
    )  # fmt: skip
    # the schedule of a run of 10 epochs of 100 steps (data: any length times alike)
    state = programs.initial_state(variables, optim.schedule_state(config, 100))
    trainable_params = masks.count_params(state.trainable)  # before the step donates them
    total_params = trainable_params + masks.count_params(state.frozen)
    step = programs.train_step
    batch = sharding.shard_local_batch(_batch(batch_size, size, num_classes), mesh)
    key = jax.random.key(0)
    start = time.perf_counter()
    compiled = step.lower(state, batch, key).compile()
    compile_s = time.perf_counter() - start
    state, metrics = compiled(state, batch, key)  # warm-up
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = compiled(state, batch, key)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - start)
    return {
        "mode": mode,
        "step_s": statistics.median(times),
        "compile_s": compile_s,
        "trainable_params": trainable_params,
        "total_params": total_params,
        "opt_state_bytes": optim.tree_bytes(state.opt_state),
        "xla_peak_bytes": _peak_bytes(compiled),
    }


def bench_plain_optax(name: str, size: int, batch_size: int, steps: int, num_classes: int) -> dict:
    """Baseline: full fine-tuning the textbook way (whole-tree gradient, optax AdamW on it)."""
    model = jaxmodels.create(
        name, num_classes=num_classes, **({} if name.startswith("resnet") else {"image_size": size})
    )
    variables = _init(model, size)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, weight_decay=0.05))
    has_bn = "batch_stats" in variables

    def step(variables, opt_state, batch):
        def loss_fn(params):
            inputs = {**variables, "params": params}
            if has_bn:
                logits, updates = model.apply(
                    inputs, batch["image"], train=True, mutable=["batch_stats"]
                )
            else:
                logits, updates = model.apply(inputs, batch["image"], train=True), {}
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
            return loss.mean(), updates

        (_, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
        deltas, opt_state = tx.update(grads, opt_state, variables["params"])
        return {
            **variables,
            **updates,
            "params": optax.apply_updates(variables["params"], deltas),
        }, opt_state

    step = jax.jit(step, donate_argnums=(0, 1))
    opt_state = tx.init(variables["params"])
    batch = _batch(batch_size, size, num_classes)
    compiled = step.lower(variables, opt_state, batch).compile()
    variables, opt_state = compiled(variables, opt_state, batch)
    jax.block_until_ready(opt_state)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        variables, opt_state = compiled(variables, opt_state, batch)
        jax.block_until_ready((variables, opt_state))
        times.append(time.perf_counter() - start)
    return {
        "mode": "full (plain optax)",
        "step_s": statistics.median(times),
        "trainable_params": masks.count_params(variables["params"]),
        "total_params": masks.count_params(variables["params"]),
        "opt_state_bytes": optim.tree_bytes(opt_state),
        "xla_peak_bytes": _peak_bytes(compiled),
    }


def _with_random_head(variables: dict, head: str) -> dict:
    """ViT heads start at zero (all logits 0); a random head makes the logit check meaningful."""
    params = dict(variables["params"])
    kernel = params[head]["kernel"]
    params[head] = {
        **params[head],
        "kernel": 0.1 * jax.random.normal(jax.random.key(7), kernel.shape),
    }
    return {**variables, "params": params}


def bench_fold(name: str, size: int, batch_size: int, reps: int, num_classes: int) -> dict:
    """Median inference time of plain(fold(ssf vars)) vs plain(plain vars), interleaved."""
    overrides = {} if name.startswith("resnet") else {"image_size": size}
    ssf_model = jaxmodels.create(name, num_classes=num_classes, ssf=True, **overrides)
    plain_model = jaxmodels.create(name, num_classes=num_classes, ssf=False, **overrides)
    ssf_vars = _with_random_head(_init(ssf_model, size), masks.head_name_for(name))
    folded = jaxmodels.models.ssf.fold(ssf_vars)
    plain_vars = _init(plain_model, size, seed=1)
    images = _batch(batch_size, size, num_classes)["image"]
    plain_fn = jax.jit(lambda v, x: plain_model.apply(v, x))
    ssf_fn = jax.jit(lambda v, x: ssf_model.apply(v, x))
    max_diff = float(jnp.max(jnp.abs(plain_fn(folded, images) - ssf_fn(ssf_vars, images))))
    jax.block_until_ready((plain_fn(plain_vars, images), ssf_fn(ssf_vars, images)))
    runs = {"plain": [], "folded": [], "ssf_unfolded": []}
    calls = {
        "plain": (plain_fn, plain_vars),
        "folded": (plain_fn, folded),
        "ssf_unfolded": (ssf_fn, ssf_vars),
    }
    for _ in range(reps):
        for label, (fn, v) in calls.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(v, images))
            runs[label].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in runs.items()}
    return {
        "plain_s": med["plain"],
        "folded_s": med["folded"],
        "ssf_unfolded_s": med["ssf_unfolded"],
        "folded_over_plain": med["folded"] / med["plain"],
        "ssf_unfolded_over_plain": med["ssf_unfolded"] / med["plain"],
        "max_abs_logit_diff_folded_vs_ssf": max_diff,
    }


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] + " Prints a Markdown table and writes JSON.",
        epilog="examples:" + __doc__.split("Examples:")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default="vit_s16", help="jaxmodels name (default vit_s16)")
    parser.add_argument("--image-size", type=int, default=224, help="input side (default 224)")
    parser.add_argument("--batch-size", type=int, default=8, help="train batch (default 8)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per mode (default 3)")
    parser.add_argument(
        "--reps", type=int, default=10, help="interleaved inference repetitions (default 10)"
    )
    parser.add_argument("--num-classes", type=int, default=10, help="head size (default 10)")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 compute in the steps")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated modes")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="batch 2, 2 steps, 5 inference reps (a couple of minutes on a CPU)",
    )
    parser.add_argument(
        "--no-baseline",
        action="store_true",
        help="skip the textbook full fine-tuning step (whole-tree grad + optax)",
    )
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_size, args.steps, args.reps = 2, 2, 5
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    print(
        f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, model {args.model} "
        f"@ {args.image_size}, batch {args.batch_size}, {args.steps} timed steps"
    )
    rows = []
    for mode in args.modes.split(","):
        row = bench_mode(
            args.model,
            mode,
            args.image_size,
            args.batch_size,
            args.steps,
            args.num_classes,
            "bfloat16" if args.bf16 else "float32",
        )
        rows.append(row)
        print(json.dumps(row), flush=True)
    if not args.no_baseline:
        rows.append(
            bench_plain_optax(
                args.model, args.image_size, args.batch_size, args.steps, args.num_classes
            )
        )
        print(json.dumps(rows[-1]), flush=True)
    fold = bench_fold(args.model, args.image_size, args.batch_size, args.reps, args.num_classes)
    print(json.dumps(fold), flush=True)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    by_mode = {r["mode"]: r for r in rows}
    print()
    print("| mode | trainable params | optimizer state | XLA peak memory | step time | vs full |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    full = by_mode.get("full")
    for r in rows:
        ratio = f"{r['step_s'] / full['step_s']:.2f}" if full else "-"
        peak = f"{r['xla_peak_bytes'] / 2**20:.0f} MiB" if r["xla_peak_bytes"] else "n/a"
        print(
            f"| {r['mode']} | {r['trainable_params']:,} | {r['opt_state_bytes'] / 2**20:.2f} MiB "
            f"| {peak} | {r['step_s'] * 1e3:.0f} ms | {ratio} |"
        )
    print(
        f"\nfolded / plain inference: {fold['folded_over_plain']:.3f} "
        f"(plain {fold['plain_s'] * 1e3:.1f} ms, folded {fold['folded_s'] * 1e3:.1f} ms, "
        f"unfolded SSF {fold['ssf_unfolded_s'] * 1e3:.1f} ms); "
        f"max |logit diff| folded vs SSF {fold['max_abs_logit_diff_folded_vs_ssf']:.2e}"
    )
    print(f"process peak RSS: {peak_rss / 2**20:.0f} MiB")
    checks = {}
    if full and "ssf" in by_mode:
        ssf = by_mode["ssf"]
        checks["ssf_opt_state_over_full"] = ssf["opt_state_bytes"] / full["opt_state_bytes"]
        checks["ssf_step_over_full"] = ssf["step_s"] / full["step_s"]
        print(
            f"target SSF opt state <= 1% of full: {checks['ssf_opt_state_over_full']:.4%} "
            f"{'PASS' if checks['ssf_opt_state_over_full'] <= 0.01 else 'FAIL'}"
        )
        print(
            f"target SSF step <= full step: {checks['ssf_step_over_full']:.2f} "
            f"{'PASS' if checks['ssf_step_over_full'] <= 1 else 'FAIL'}"
        )
    checks["folded_over_plain"] = fold["folded_over_plain"]
    print(
        f"target folded/plain <= 1.02: {fold['folded_over_plain']:.3f} "
        f"{'PASS' if fold['folded_over_plain'] <= 1.02 else 'FAIL'}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "args": vars(args),
                    "modes": rows,
                    "fold": fold,
                    "checks": checks,
                    "peak_rss_bytes": peak_rss,
                },
                f,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
