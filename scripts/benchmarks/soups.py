"""Benchmark model soups: the streamed uniform soup's memory, and the greedy soup's overhead.

Part (a), uniform soup of 8 checkpoints on disk: random weights shaped like ``--model``
(ViT-B/16 by default) are written with ``jaxmodels.save``. Four methods, each in its own
subprocess so that its peak RSS is its own:
  * ``streamed``: ``training.uniform`` over ``lambda: jaxmodels.load(name, path)[1]`` loaders;
  * ``streamed_orbax``: ``training.uniform`` over loaders that return orbax's NumPy tree
    directly (no ``jaxmodels.load`` checks or copies): the soup with a lean loader;
  * ``load_all``: every checkpoint loaded with ``jaxmodels.load``, then averaged (the baseline);
  * ``load_one``: one ``jaxmodels.load`` (what the loader alone costs).
Each child imports everything and initialises JAX, resets the kernel's peak-RSS counter
(``/proc/self/clear_refs``; else it uses ``ru_maxrss``), notes its resident size, runs, and
reports the peak minus that baseline, as a multiple of one model's float32 bytes (target for
``streamed``: ≤ 2.5×), with the wall time and the MB/s read (checkpoint bytes on disk / time;
the files were just written, so they come from the page cache). Every method runs under two
allocator settings: glibc's default, whose dynamic mmap threshold keeps freed arrays in
per-thread arenas (so the peak RSS counts memory that is free but not returned), and
``mallopt(M_MMAP_THRESHOLD, 1 MiB)``, where every large array is returned when freed.

Part (b), greedy soup of 8 in-memory ingredients of a small model, evaluated by the library's
prepared evaluation (``jaxmodels.prepare`` once, then ``jaxmodels.evaluate``: one jitted pass
over uint8 images held on the device, normalised there): the seconds per candidate (the time
after the ingredients are scored, divided by the number of candidates) against one evaluation
of one model (target: ≤ 1.2×), after a warm-up run that compiles everything.

Examples:
    python scripts/benchmarks/soups.py                  # vit_b16 ×8 on disk; greedy with vit_ti16
    python scripts/benchmarks/soups.py --quick          # vit_tiny ×4, 1 MiB threshold only
    python scripts/benchmarks/soups.py --part a --json bench_soups.json
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxmodels
import training
from training.soups import ingredients

CHILD_METHODS = ("streamed", "streamed_orbax", "load_all", "load_one")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small models; runs in seconds")
    parser.add_argument("--model", default=None, help="checkpoint model (default vit_b16)")
    parser.add_argument("--greedy-model", default=None, help="greedy model (default vit_ti16)")
    parser.add_argument(
        "--heldout", type=int, default=None, help="held-out images (default 64; quick 256)"
    )
    parser.add_argument(
        "--ingredients", type=int, default=None, help="how many ingredients (default 8; quick 4)"
    )
    parser.add_argument("--part", choices=("a", "b", "both"), default="both", help="what to run")
    parser.add_argument("--workdir", default=None, help="where to write the checkpoints")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--child", choices=CHILD_METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--paths", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--mmap-threshold", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.model = args.model or ("vit_tiny" if args.quick else "vit_b16")
    args.greedy_model = args.greedy_model or ("vit_tiny" if args.quick else "vit_ti16")
    args.heldout = args.heldout or (256 if args.quick else 64)
    args.ingredients = args.ingredients or (4 if args.quick else 8)
    if args.ingredients < 2:
        parser.error(f"--ingredients must be at least 2; got {args.ingredients}")
    return args


def _image_size(name: str) -> int:
    return jaxmodels.spec(name).preprocessing.image_size


def _shapes(name: str, num_classes: int = 1000) -> dict:
    model = jaxmodels.create(name, num_classes=num_classes)
    size = _image_size(name)
    return model, dict(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3))))


def _random_tree(shapes: dict, seed: int, scale: float = 0.02) -> dict:
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: scale * rng.standard_normal(s.shape, dtype=np.float32), shapes)


# ------------------------------------------------------------------ (a) memory, in a child


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        return 1024 * int(re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M).group(1))


def _reset_peak() -> str:
    """Resets the peak-RSS counter if the kernel lets us; returns how the peak is measured."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return "VmHWM after clear_refs"
    except OSError:
        return "ru_maxrss"


def _peak_bytes(how: str) -> int:
    if how.startswith("VmHWM"):
        return _status_bytes("VmHWM")
    return 1024 * resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux


def _orbax_loader(path: str):
    """A lean loader: the orbax tree as NumPy, without ``jaxmodels.load``'s checks and copies."""
    import orbax.checkpoint as ocp

    return lambda: ocp.StandardCheckpointer().restore(pathlib.Path(path) / "variables")


def run_child(method: str, name: str, paths: list[str], mmap_threshold: int | None) -> dict:
    """Runs one method in this (fresh) process; returns seconds and peak RSS above baseline."""
    if mmap_threshold is not None and not ingredients.fix_mmap_threshold(mmap_threshold):
        raise RuntimeError("mallopt(M_MMAP_THRESHOLD) is not available here (not glibc?)")
    jnp.zeros(1).block_until_ready()  # backend up before the baseline
    how = _reset_peak()
    baseline = _status_bytes("VmRSS")
    start = time.perf_counter()
    if method == "streamed":
        result = training.uniform([lambda p=p: jaxmodels.load(name, p)[1] for p in paths])
    elif method == "streamed_orbax":
        result = training.uniform([_orbax_loader(p) for p in paths])
    elif method == "load_all":
        trees = [jaxmodels.load(name, p)[1] for p in paths]
        result = jax.tree.map(lambda *xs: jnp.mean(jnp.stack(xs), axis=0), *trees)
    else:
        result = jaxmodels.load(name, paths[0])[1]
    jax.block_until_ready(result)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_bytes": _peak_bytes(how) - baseline, "measured_with": how}


ALLOCATORS = {"default": None, "mmap_1MiB": 2**20}


def bench_uniform(name: str, count: int, workdir: pathlib.Path, allocators: list[str]) -> dict:
    """Writes the checkpoints, runs each method in a subprocess, returns their numbers."""
    _, shapes = _shapes(name)
    model_bytes = sum(int(np.prod(s.shape)) * 4 for s in jax.tree.leaves(shapes))
    paths = []
    for i in range(count):
        path = workdir / f"{name}_{i}"
        jaxmodels.save(path, name, _random_tree(shapes, seed=i))
        paths.append(str(path))
    disk = sum(f.stat().st_size for p in paths for f in pathlib.Path(p).rglob("*") if f.is_file())

    rows: dict = {}
    for allocator in allocators:
        for method in CHILD_METHODS:
            command = [sys.executable, __file__, "--child", method, "--model", name]
            command += ["--paths", ",".join(paths)]
            if ALLOCATORS[allocator] is not None:
                command += ["--mmap-threshold", str(ALLOCATORS[allocator])]
            out = subprocess.run(command, capture_output=True, text=True, check=False)
            if out.returncode != 0:
                raise RuntimeError(f"child {method} failed:\n{out.stderr[-3000:]}")
            row = json.loads(out.stdout.strip().splitlines()[-1])
            read = disk if method != "load_one" else disk / count
            row["peak_x_model"] = row["peak_bytes"] / model_bytes
            row["mb_per_s"] = read / 1e6 / row["seconds"]
            rows.setdefault(allocator, {})[method] = row
    ratios = {
        allocator: {
            "streamed_over_load_all_seconds": r["streamed"]["seconds"] / r["load_all"]["seconds"],
            "streamed_over_load_all_peak": r["streamed"]["peak_bytes"]
            / r["load_all"]["peak_bytes"],
        }
        for allocator, r in rows.items()
    }
    return {
        "model": name,
        "ingredients": count,
        "model_bytes": model_bytes,
        "disk_bytes": disk,
        "methods": rows,
        "ratios": ratios,
        "target_streamed_peak_x_model": 2.5,
    }


# ------------------------------------------------------------------ (b) greedy overhead


def bench_greedy(name: str, count: int, heldout: int, repeats: int = 5) -> dict:
    model, shapes = _shapes(name, num_classes=10)
    size = _image_size(name)
    base = _random_tree(shapes, seed=0)
    rng = np.random.default_rng(1)

    def perturbed(x):
        return x + 0.002 * rng.standard_normal(x.shape, np.float32)

    ingredients = [jax.device_put(jax.tree.map(perturbed, base)) for _ in range(count)]
    images = rng.integers(0, 256, (heldout, size, size, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, heldout).astype(np.int32)
    # the library's prepared evaluation: decoded once, on the device, one jitted call per pass
    prepared = jaxmodels.prepare((images, labels), jaxmodels.spec_of(model).preprocessing,
                                 placement="device", progress=False)  # fmt: skip
    stamps: list[float] = []

    def evaluate(variables) -> float:
        score = jaxmodels.evaluate(model, variables, prepared).accuracy  # waits for the result
        stamps.append(time.perf_counter())
        return score

    training.greedy(ingredients, evaluate)  # warm-up: compiles the forward and the arithmetic
    forward = []
    for i in range(repeats):
        start = time.perf_counter()
        evaluate(ingredients[i % count])
        forward.append(time.perf_counter() - start)
    stamps.clear()
    start = time.perf_counter()
    _, report = training.greedy(ingredients, evaluate)
    end = time.perf_counter()
    scored = stamps[count - 1]  # after the individual evaluations
    per_candidate = (end - scored) / (count - 1)
    forward_s = statistics.median(forward)
    return {
        "model": name,
        "parameters": sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes)),
        "ingredients": count,
        "heldout_images": heldout,
        "forward_seconds": forward_s,
        "scoring_seconds_per_ingredient": (scored - start) / count,
        "seconds_per_candidate": per_candidate,
        "candidate_over_forward": per_candidate / forward_s,
        "accepted": list(report.accepted),
        "target_candidate_over_forward": 1.2,
    }


def _summary(results: dict) -> list[str]:
    lines = []
    u, g = results.get("uniform"), results.get("greedy")
    if u:
        for allocator, rows in u["methods"].items():
            for method, row in rows.items():
                lines.append(
                    f"(a) {allocator:9s} {method:14s} {u['model']} x{u['ingredients']}: "
                    f"{row['seconds']:.2f} s, {row['mb_per_s']:.1f} MB/s, peak RSS "
                    f"+{row['peak_bytes'] / 1e6:.0f} MB = {row['peak_x_model']:.2f}x one model "
                    f"({u['model_bytes'] / 1e6:.2f} MB)"
                )
    if g:
        lines.append(
            f"(b) greedy {g['model']} x{g['ingredients']} on {g['heldout_images']} held-out "
            f"images: {g['seconds_per_candidate']:.3f} s per candidate vs "
            f"{g['forward_seconds']:.3f} s per forward pass = {g['candidate_over_forward']:.2f}x "
            "(target <= 1.2x)"
        )
    return lines


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        row = run_child(args.child, args.model, args.paths.split(","), args.mmap_threshold)
        print(json.dumps(row))
        return
    results: dict = {
        "meta": {
            "quick": args.quick,
            "backend": jax.default_backend(),
            "devices": jax.device_count(),
            "cpus": os.cpu_count(),
        }
    }
    if args.part in ("a", "both"):
        workdir = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="bench_soups_"))
        workdir.mkdir(parents=True, exist_ok=True)
        try:
            allocators = ["mmap_1MiB"] if args.quick else list(ALLOCATORS)
            results["uniform"] = bench_uniform(args.model, args.ingredients, workdir, allocators)
        finally:
            if args.workdir is None:
                shutil.rmtree(workdir, ignore_errors=True)
        _report({"uniform": results["uniform"]})  # as soon as it is known: part (b) is long
    if args.part in ("b", "both"):
        results["greedy"] = bench_greedy(args.greedy_model, args.ingredients, args.heldout)
        _report({"greedy": results["greedy"]})
    print(json.dumps(results, indent=2))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(results, indent=2))


def _report(part: dict) -> None:
    for line in _summary(part):
        print(line, file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
