"""Feature-extraction throughput: `jaxmodels.extract_features` against PyTorch on the same machine.

For each model (resnet50, vit_b16 at 224 px, random weights), batch size and dtype, measures
images/s of `jaxmodels.extract_features` (features only: the penultimate representation) and,
when torch (+ torchvision, timm) is importable in this Python, of the same architecture in
PyTorch eval mode under `torch.inference_mode()` (torchvision `resnet50` and timm
`vit_base_patch16_224`, heads removed, bfloat16 by converting weights and inputs, as the JAX
side does). Both run in this process, interleaved per configuration, so the ratio
JAX / PyTorch compares like with like. It also prints the achieved GFLOP/s from the model's
FLOPs per image (`jaxmodels.spec`) and, as "of peak", that rate over the device's measured
matmul rate in the same dtype (a square jitted matmul, the best of a few runs): the issue's
accelerator target is bfloat16 ViT-B/16 at >= 40% of peak on a GPU.

Timing: one warm-up call per configuration (one full batch for JAX, which compiles; two images
for PyTorch, which does not), then `--batches` batches timed end to end (host→device transfer,
compute, copy back), best of `--repeats`, JAX and PyTorch runs alternating so that load from
other processes hits both alike. Both frameworks use all CPU cores.

Examples:
    python scripts/benchmarks/features.py --quick --json bench_features.json
    python scripts/benchmarks/features.py --quick   # in an environment that also has torch, timm, torchvision
    python scripts/benchmarks/features.py --models vit_b16 --batch-sizes 128 --dtypes bfloat16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxmodels

TORCH_MODELS = {"resnet50": "torchvision resnet50", "vit_b16": "timm vit_base_patch16_224"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--models",
        nargs="+",
        default=["resnet50", "vit_b16"],
        choices=sorted(TORCH_MODELS),
        help="models to time",
    )
    parser.add_argument(
        "--batch-sizes",
        nargs="+",
        type=int,
        default=[32, 128],
        help="global batch sizes (default: 32 128)",
    )
    parser.add_argument(
        "--dtypes",
        nargs="+",
        default=["float32", "bfloat16"],
        choices=["float32", "bfloat16"],
        help="compute dtypes",
    )
    parser.add_argument("--image-size", type=int, default=224, help="input side in pixels")
    parser.add_argument(
        "--batches",
        type=int,
        default=None,
        help="timed batches per config (default 3, or 1 with --quick)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed runs per framework, best kept (default 2, or 1 with --quick)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="defaults for a shared CPU: 1 timed batch, 1 repeat"
    )
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch baseline")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.batches is None:
        args.batches = 1 if args.quick else 3
    if args.repeats is None:
        args.repeats = 1 if args.quick else 2
    if min(args.batch_sizes) < 1 or args.batches < 1 or args.repeats < 1:
        parser.error("--batch-sizes, --batches and --repeats must be positive")
    return args


def _seconds(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def matmul_gflops(dtype: str) -> float:
    """The device's measured matmul rate in GFLOP/s for `dtype` (square, jitted, best of 5)."""
    side = 2048 if jax.devices()[0].platform == "cpu" else 8192
    x = jnp.ones((side, side), jnp.dtype(dtype))
    matmul = jax.jit(lambda a, b: a @ b)
    matmul(x, x).block_until_ready()
    seconds = min(_seconds(lambda: matmul(x, x).block_until_ready()) for _ in range(5))
    return 2 * side**3 / seconds / 1e9


def jax_runner(name, batch, dtype, args, images_NHWC):
    """A warmed-up (compiled) call of `extract_features` over all of `images_NHWC`."""
    model = jaxmodels.create(name, num_classes=1000)
    size = args.image_size
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, size, size, 3)))
    compute = None if dtype == "float32" else jnp.bfloat16

    def run(x):
        return jaxmodels.extract_features(
            model, variables, x, batch_size=batch, dtype=compute, progress=False
        )

    run(images_NHWC[:batch])  # compile + one batch
    return lambda: run(images_NHWC)


def torch_runner(name, batch, dtype, args, images_NHWC):
    """A warmed-up PyTorch eval-mode pass over all of `images_NHWC` (None without torch)."""
    try:
        import timm
        import torch
        import torchvision
    except ImportError:
        return None
    if name == "resnet50":
        model = torchvision.models.resnet50(weights=None)
        model.fc = torch.nn.Identity()
    else:
        model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
    torch_dtype = torch.float32 if dtype == "float32" else torch.bfloat16
    model = model.eval().to(torch_dtype)
    x = torch.from_numpy(np.ascontiguousarray(images_NHWC.transpose(0, 3, 1, 2)))
    x = x.to(torch_dtype)

    def run(inputs):
        with torch.inference_mode():
            for start in range(0, len(inputs), batch):
                model(inputs[start : start + batch]).float().numpy()

    run(x[:2])  # warm-up: PyTorch compiles nothing, a small batch loads the kernels
    return lambda: run(x)


def images_per_second(runners: dict, num_images: int, repeats: int) -> dict:
    """Best images/s of each runner; runs alternate so load changes hit both alike."""
    best = dict.fromkeys(runners, float("inf"))
    for _ in range(repeats):
        for key, run in runners.items():
            best[key] = min(best[key], _seconds(run))
    return {key: num_images / seconds for key, seconds in best.items()}


def main(argv=None) -> None:
    args = parse_args(argv)
    use_torch = not args.no_torch
    if use_torch:
        try:
            import torch

            torch_version = torch.__version__
        except ImportError:
            print("torch is not importable here: JAX numbers only (run with the torch venv)")
            use_torch, torch_version = False, None
    else:
        torch_version = None
    rng = np.random.default_rng(0)
    results = []
    header = (
        f"{'model':9} {'batch':>5} {'dtype':9} {'jax img/s':>10} {'torch img/s':>11} "
        f"{'jax/torch':>9} {'jax GFLOP/s':>11} {'of peak':>7}"
    )
    print(f"devices: {jax.devices()}; cpu cores: {os.cpu_count()}; torch: {torch_version}")
    peak = {dtype: matmul_gflops(dtype) for dtype in args.dtypes}
    print("measured matmul GFLOP/s: " + ", ".join(f"{d} {g:.1f}" for d, g in peak.items()))
    print(header, flush=True)
    for name in args.models:
        flops = jaxmodels.spec(name, image_size=args.image_size).flops_per_image
        for batch in args.batch_sizes:
            images = rng.normal(size=(batch * args.batches, args.image_size, args.image_size, 3))
            images = images.astype(np.float32)
            for dtype in args.dtypes:
                runners = {"jax": jax_runner(name, batch, dtype, args, images)}
                if use_torch:
                    runners["torch"] = torch_runner(name, batch, dtype, args, images)
                rates = images_per_second(runners, len(images), args.repeats)
                jax_rate, torch_rate = rates["jax"], rates.get("torch")
                ratio = None if torch_rate is None else jax_rate / torch_rate
                record = {
                    "model": name,
                    "batch": batch,
                    "dtype": dtype,
                    "jax_images_per_s": jax_rate,
                    "torch_images_per_s": torch_rate,
                    "jax_over_torch": ratio,
                    "jax_gflops_per_s": jax_rate * flops / 1e9,
                    "fraction_of_matmul_peak": jax_rate * flops / 1e9 / peak[dtype],
                }
                results.append(record)
                torch_text = "-" if torch_rate is None else f"{torch_rate:11.2f}"
                ratio_text = "-" if ratio is None else f"{ratio:9.2f}"
                print(
                    f"{name:9} {batch:5d} {dtype:9} {jax_rate:10.2f} {torch_text:>11} "
                    f"{ratio_text:>9} {record['jax_gflops_per_s']:11.1f} "
                    f"{record['fraction_of_matmul_peak']:7.0%}",
                    flush=True,
                )
    if args.json:
        meta = {
            "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
            "jax": jax.__version__,
            "torch": torch_version,
            "devices": str(jax.devices()),
            "cpu_count": os.cpu_count(),
            "machine": platform.processor() or platform.machine(),
            "timed_batches": args.batches,
            "repeats": args.repeats,
            "matmul_gflops_per_s": peak,
        }
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
