"""Benchmark scaling out: per-device memory of fully sharded training state, multi-process steps.

1. Memory. ViT-B/16 full fine-tuning (AdamW: weights, first and second moments; EMA optional) on
   8 fake CPU devices: the bytes one device holds of the parameters and optimizer state,
   replicated (the default) and fully sharded (``--shard-params``). The train-state initializer
   of `training.programs.run_programs` — the very jit a run uses — is lowered and compiled on
   abstract inputs and never run (ViT-B/16 replicated 8 times with Adam would take 11 GB here):
   the bytes are the shard shapes its outputs' shardings give (`Sharding.shard_shape` per
   leaf, `jaxmodels.sharding.bytes_per_device`), checked against XLA's own memory analysis of
   the compiled initializer (output bytes per device). The flat sharded state of
   `training.flat_sharded` (what multi-process CPU runs use) is counted too, from its shardings.
2. Step time. One train step of a small ViT (it has to run on this CPU), the same global batch,
   as 1 process × 8 CPU devices and as 2 processes × 4 CPU devices joined by gloo
   (`training.launch`): median step time of each and the ratio (target ≤ 1.3); then 2 × 4 with
   the state fully sharded, flat (one all-gather, one reduce-scatter) and XLA's per-leaf
   collectives, as ratios to the replicated 1 × 8 step (target ≤ 1.5).
3. GPU, when one is visible: the ViT-B/16 full fine-tuning step's time on one GPU (bfloat16) and
   the fraction of the device's matmul rate it reaches (XLA's FLOP count of the compiled step /
   step time / the rate of a large bfloat16 matmul timed on the same device).

Prints one JSON object on stdout (and writes it to --out), then a line on stderr: "memory check: OK",
or what disagrees (exit status 1) — the bytes from the shardings against XLA's, or a sharded share
(per-leaf or flat) above 1.05/n.

Examples:
    python scripts/benchmarks/scale.py                 # all parts; 20 timed steps each
    python scripts/benchmarks/scale.py --quick         # 20 timed steps of a smaller step model
    python scripts/benchmarks/scale.py --skip-steps    # memory (and GPU) only
"""

import argparse
import contextlib
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from jaxmodels import distributed  # noqa: E402

MEMORY_MODEL = "vit_b16"
STEP_MODEL = dict(image_size=32, patch_size=4, width=64, depth=4, num_heads=4, mlp_dim=128)
QUICK_STEP_MODEL = dict(image_size=32, patch_size=8, width=32, depth=2, num_heads=2, mlp_dim=64)
NUM_CLASSES = 10


def _run_programs(
    name: str,
    overrides: dict,
    mesh,
    *,
    shard: bool,
    ema: bool = False,
    dtype: str = "float32",
    flat: bool | None = None,
):
    """(model, `training.programs.RunPrograms` of its full fine-tuning — the very programs a run
    compiles —, its abstract variables placed as a run places them, a replicated schedule)."""
    import jax
    import jax.numpy as jnp

    import jaxmodels
    from jaxmodels import sharding
    from training import masks, optim
    from training.config import TrainConfig
    from training.programs import run_programs

    model = jaxmodels.create(name, num_classes=NUM_CLASSES, **overrides)
    size = model.image_size
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))
    variables = dict(variables)
    # 10 epochs of 100 steps, 10 of them warmup (the schedule is data: any length times alike)
    config = TrainConfig(mode="full", epochs=10, warmup_epochs=0.1, augmentation="none",
                         ema_decay=0.9999 if ema else None, bf16=dtype == "bfloat16",
                         shard_params=shard)  # fmt: skip
    programs = run_programs(
        model, variables, config, num_classes=NUM_CLASSES,
        preprocessing=jaxmodels.spec_of(model).preprocessing,
        head_name=masks.head_name_for(name), mesh=mesh, flat=flat,
    )  # fmt: skip
    placed = jax.tree.map(
        lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
        variables,
        programs.variable_shardings,
    )
    schedule = sharding.put(optim.schedule_state(config, 100), sharding.replicated_sharding(mesh))
    return model, programs, placed, schedule


def memory(ema: bool) -> dict:
    """Part 1: per-device bytes of ViT-B/16's train state, replicated vs fully sharded."""
    import jax

    from jaxmodels import sharding

    mesh = sharding.data_mesh(jax.devices("cpu")[:8])
    out = {"model": MEMORY_MODEL, "devices": int(mesh.size), "ema": ema}
    for layout, shard in (("replicated", False), ("sharded", True)):
        # the sharded layout also counts the flat state (multi-process CPU runs use it)
        _, programs, placed, schedule = _run_programs(
            MEMORY_MODEL, {}, mesh, shard=shard, ema=ema, flat=shard
        )
        flat = programs.flat
        start = time.perf_counter()
        compiled = programs.init.lower(placed, schedule).compile()
        state = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            jax.eval_shape(programs.init, placed, schedule),
            compiled.output_shardings,
        )
        held = {"trainable": state.trainable, "opt_state": state.opt_state, "ema": state.ema}
        analysis = compiled.memory_analysis()
        out[layout] = {
            "params_and_optimizer_bytes_per_device": sharding.bytes_per_device(held),
            "params_bytes_per_device": sharding.bytes_per_device(state.trainable),
            "optimizer_bytes_per_device": sharding.bytes_per_device(state.opt_state),
            "whole_state_bytes_per_device": sharding.bytes_per_device(state),
            "xla_output_bytes_per_device": None if analysis is None
            else int(analysis.output_size_in_bytes),
            "compile_s": round(time.perf_counter() - start, 2),
        }  # fmt: skip
        if shard:
            # the flat sharded state (multi-process CPU runs): vectors padded to a multiple of n
            flat_state = jax.tree.map(
                lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                jax.eval_shape(flat.to_flat, state),
                flat.shardings,
            )
            held = [flat_state.trainable, flat_state.opt_state, flat_state.ema]
            out["sharded_flat"] = {
                "params_and_optimizer_bytes_per_device": sharding.bytes_per_device(held),
                "whole_state_bytes_per_device": sharding.bytes_per_device(flat_state),
            }
            out["sharded_leaves"] = sum(
                not s.is_fully_replicated for s in jax.tree.leaves(compiled.output_shardings)
            )
            out["leaves"] = len(jax.tree.leaves(compiled.output_shardings))
    key = "params_and_optimizer_bytes_per_device"
    out["sharded_over_replicated"] = out["sharded"][key] / out["replicated"][key]
    out["sharded_flat_over_replicated"] = out["sharded_flat"][key] / out["replicated"][key]
    return out


def memory_problems(memory: dict) -> list[str]:
    """Disagreements of part 1 with XLA's memory analysis or with the 1/n the sharding promises."""
    problems = []
    for layout in ("replicated", "sharded"):
        ours = memory[layout]["whole_state_bytes_per_device"]
        xla = memory[layout]["xla_output_bytes_per_device"]
        if xla is not None and abs(xla - ours) > 1e-3 * ours:
            problems.append(f"{layout}: {ours} bytes from the shardings, {xla} from XLA")
    for layout in ("sharded", "sharded_flat"):
        share = memory[f"{layout}_over_replicated"]
        if share > 1.05 / memory["devices"]:
            problems.append(
                f"{layout} holds {share:.4f} of replicated, not about 1/{memory['devices']}"
            )
    return problems


def time_steps(
    overrides: dict, global_batch: int, steps: int, mesh=None, dtype="float32", shard=False
) -> dict:
    """Median time of the full fine-tuning train step (every process calls this together);
    `shard`: fully sharded state, flat (`training.flat_sharded`) where flat collectives pay."""
    import jax
    import numpy as np

    from jaxmodels import sharding

    mesh = sharding.data_mesh() if mesh is None else mesh
    name = "vit_tiny" if overrides else MEMORY_MODEL
    # the flat state where flat collectives pay, as `training.loop.fit` chooses
    model, programs, placed, schedule = _run_programs(name, overrides, mesh, shard=shard,
                                                      dtype=dtype)  # fmt: skip
    variables = jax.tree.map(
        lambda a: np.asarray(np.random.default_rng(0).normal(0, 0.02, a.shape), a.dtype), placed
    )
    state = programs.to_flat(programs.initial_state(variables, schedule))
    step = programs.train_step
    local = sharding.check_batch_size(global_batch, mesh)
    rng = np.random.default_rng(jax.process_index())
    size = model.image_size
    batch = sharding.shard_local_batch(
        {
            "image": rng.integers(0, 256, (local, size, size, 3), dtype=np.uint8),
            "label": rng.integers(0, NUM_CLASSES, local).astype(np.int32),
        },
        mesh,
    )
    key = jax.jit(lambda: jax.random.key(0), out_shardings=sharding.replicated_sharding(mesh))()
    compiled = step.lower(state, batch, key).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    for _ in range(2):  # warm-up
        state, metrics = step(state, batch, key)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = step(state, batch, key)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - start)
    return {
        "median_step_s": statistics.median(times),
        "min_step_s": min(times),
        "flops_per_step": None if not cost else float(cost.get("flops", 0.0)) or None,
        "loss": float(sharding.host_copy(metrics)["loss"]),
    }


def _worker(args) -> None:
    """Run by `training.launch` in each process of part 2; process 0 writes the timing."""
    distributed.initialize()
    import jax

    overrides = QUICK_STEP_MODEL if args.quick else STEP_MODEL
    result = time_steps(overrides, args.batch_size, args.steps, shard=args.shard_params)
    if jax.process_index() == 0:
        result |= {"processes": jax.process_count(), "devices": jax.device_count()}
        pathlib.Path(args.worker).write_text(json.dumps(result))


def steps_part(args) -> dict:
    """Part 2: the step as 1 process × 8 devices and as 2 processes × 4 devices."""
    from training import launch

    out = {"model": "vit_tiny", "overrides": QUICK_STEP_MODEL if args.quick else STEP_MODEL,
           "global_batch": args.batch_size, "timed_steps": args.steps}  # fmt: skip
    # 2x4: the default (the flat all-reduce of training.flat_reduce on CPU); 2x4_xla: XLA's
    # per-leaf all-reduce, the path before it (HUBTUNE_FLAT_REDUCE=0); the same two with the
    # state fully sharded: the flat sharded state of training.flat_sharded (one all-gather,
    # one reduce-scatter), and XLA's per-leaf all-gathers and reduce-scatters
    runs = (("1x8", 1, 8, None, False), ("2x4", 2, 4, None, False),
            ("2x4_xla", 2, 4, "0", False), ("2x4_sharded", 2, 4, None, True),
            ("2x4_sharded_xla", 2, 4, "0", True))  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for label, processes, devices, forced, shard in runs:
            target = os.path.join(tmp, f"{label}.json")
            command = [__file__, "--worker", target, "--batch-size", str(args.batch_size),
                       "--steps", str(args.steps)] + (["--quick"] if args.quick else []) + (
                       ["--shard-params"] if shard else [])  # fmt: skip
            previous = os.environ.pop("HUBTUNE_FLAT_REDUCE", None)
            if forced is not None:
                os.environ["HUBTUNE_FLAT_REDUCE"] = forced
            try:
                with contextlib.redirect_stdout(sys.stderr):  # stdout: the JSON result alone
                    status = launch.launch(command, processes, devices)
            finally:
                os.environ.pop("HUBTUNE_FLAT_REDUCE", None)
                if previous is not None:
                    os.environ["HUBTUNE_FLAT_REDUCE"] = previous
            if status != 0:
                raise SystemExit(f"bench_scale.py: the {label} run failed with status {status}")
            out[label] = json.loads(pathlib.Path(target).read_text())
    out["ratio_2x4_over_1x8"] = out["2x4"]["median_step_s"] / out["1x8"]["median_step_s"]
    out["ratio_2x4_xla_over_1x8"] = out["2x4_xla"]["median_step_s"] / out["1x8"]["median_step_s"]
    out["flat_speedup_over_xla_2x4"] = out["2x4_xla"]["median_step_s"] / out["2x4"]["median_step_s"]
    out["target_met"] = out["ratio_2x4_over_1x8"] <= 1.3
    for label in ("2x4_sharded", "2x4_sharded_xla"):
        out[f"ratio_{label}_over_1x8"] = out[label]["median_step_s"] / out["1x8"]["median_step_s"]
    out["sharded_target_met"] = out["ratio_2x4_sharded_over_1x8"] <= 1.5
    print(
        f"2x4 / 1x8 step time: flat {out['ratio_2x4_over_1x8']:.2f}×, XLA per-leaf "
        f"{out['ratio_2x4_xla_over_1x8']:.2f}× (flat is {out['flat_speedup_over_xla_2x4']:.2f}× "
        f"faster; target ≤ 1.3×: {'met' if out['target_met'] else 'NOT met'})",
        file=sys.stderr,
    )
    print(
        f"2x4 sharded / 1x8 replicated step time: flat {out['ratio_2x4_sharded_over_1x8']:.2f}×, "
        f"XLA per-leaf {out['ratio_2x4_sharded_xla_over_1x8']:.2f}× (target ≤ 1.5×: "
        f"{'met' if out['sharded_target_met'] else 'NOT met'})",
        file=sys.stderr,
    )
    return out


def gpu_part(args) -> dict:
    """Part 3: ViT-B/16 full fine-tuning step on one GPU, and its fraction of the matmul rate."""
    import jax
    import jax.numpy as jnp

    from jaxmodels import sharding

    gpus = [d for d in jax.devices() if d.platform == "gpu"]
    if not gpus:
        return {"skipped": "no GPU visible"}
    mesh = sharding.data_mesh(gpus[:1])
    timing = time_steps({}, args.gpu_batch_size, args.steps, mesh=mesh, dtype="bfloat16")
    n = 8192
    a = jax.device_put(jnp.ones((n, n), jnp.bfloat16), gpus[0])
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    times = []
    for _ in range(10):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        times.append(time.perf_counter() - start)
    peak = 2 * n**3 / min(times)
    achieved = (timing["flops_per_step"] or 0) / timing["median_step_s"]
    return {
        "device": gpus[0].device_kind,
        "model": MEMORY_MODEL,
        "batch": args.gpu_batch_size,
        "dtype": "bfloat16",
        **timing,
        "matmul_flops_per_s": peak,
        "step_flops_per_s": achieved,
        "fraction_of_matmul_rate": achieved / peak,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smaller step model (its steps take ~20 ms: 20 timed, as in full)",
    )
    parser.add_argument("--steps", type=int, help="timed steps (default 20)")
    parser.add_argument("--batch-size", type=int, default=64, help="global batch of part 2")
    parser.add_argument("--gpu-batch-size", type=int, default=64, help="batch of part 3")
    parser.add_argument("--ema", action="store_true", help="count an EMA copy in part 1")
    parser.add_argument("--skip-steps", action="store_true", help="skip part 2")
    parser.add_argument("--out", help="also write the JSON result here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # part 2's processes
    parser.add_argument("--shard-params", action="store_true", help=argparse.SUPPRESS)  # workers
    args = parser.parse_args(argv)
    args.steps = args.steps or 20  # fewer made the quick median swing (1.1× to 2.3×)
    if args.worker:
        _worker(args)
        return 0
    import jax

    jax.config.update("jax_num_cpu_devices", 8)  # before any backend starts
    result = {"memory": memory(args.ema)}
    if not args.skip_steps:
        result["steps"] = steps_part(args)
    result["gpu"] = gpu_part(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        pathlib.Path(args.out).write_text(text + "\n")
    problems = memory_problems(result["memory"])
    print(f"memory check: {'; '.join(problems) or 'OK'}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
