"""Input pipeline throughput: hubtune's grain data layer against the pipeline it replaced.

Images per second decoded, transformed and batched, on the host only (no model), for

  * training batches: random-resized-crop + flip (grain: `jaxmodels.train_dataset`, uint8 out,
    normalised later on the device; baseline: the old `train_batches`, normalised float32 out),
  * evaluation batches: resize + centre crop (grain: `jaxmodels.eval_dataset`, uint8 out;
    baseline: the old `eval_batches`, float32 out, which decodes one image after another: it
    had no threads),

over (a) a folder of JPEGs of varying size (256–500 px a side, smooth random content, written to
a temporary directory) and (b) an ``.npz`` of uint8 256×256 images, at the model side of 224 px.
Both pipelines use the same thread count. The baseline is `scripts/benchmarks/pipeline_baseline.py`, a
compact copy of the old `training/sources.py` + `training/data.py`. Each timing covers
``--batches`` batches from a fresh iterator (thread start-up included); grain and baseline
alternate within each repeat and the best repeat counts; for evaluation, grain also runs on one
thread, to separate what threads bring from what uint8 output brings. Prints one JSON line per
case, then a table with the ratio grain / baseline.

Examples:
    python scripts/benchmarks/pipeline.py                     # 512 images, batch 64, 3 repeats
    python scripts/benchmarks/pipeline.py --quick             # 64 images, batch 16, 1 repeat
    python scripts/benchmarks/pipeline.py --threads 8 --json bench_pipeline.json
"""

import argparse
import json
import math
import pathlib
import tempfile
import time

import numpy as np
import pipeline_baseline as baseline
from PIL import Image

import jaxmodels
from jaxmodels.data.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocessing


def _smooth_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Photo-like content: bicubically upsampled coarse noise plus fine grain (JPEG-friendly)."""
    coarse = rng.integers(0, 256, (max(2, height // 32), max(2, width // 32), 3), np.uint8)
    image = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC))
    grain = rng.integers(-12, 13, image.shape)
    return np.clip(image.astype(np.int16) + grain, 0, 255).astype(np.uint8)


def make_jpeg_folder(root: pathlib.Path, count: int, classes: int = 8, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for i in range(count):
        folder = root / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        height, width = (int(x) for x in rng.integers(256, 501, 2))
        Image.fromarray(_smooth_image(rng, height, width)).save(folder / f"{i}.jpg", quality=90)


def make_npz(path: pathlib.Path, count: int, side: int = 256, classes: int = 8, seed: int = 1):
    rng = np.random.default_rng(seed)
    images = np.stack([_smooth_image(rng, side, side) for _ in range(count)])
    np.savez(path, images=images, labels=np.arange(count) % classes)


def _time_batches(make_iterator, batches: int) -> float:
    start = time.perf_counter()
    iterator = iter(make_iterator())
    for _ in range(batches):
        next(iterator)
    return time.perf_counter() - start


def bench_case(name, spec, mode, prep, batch, threads, repeats) -> dict:
    """Best-of-`repeats` images/s of grain and of the baseline for one data set and mode."""
    source = jaxmodels.open_source(spec)
    old_source = baseline.open_source(spec)
    old_prep = {
        "image_size": prep.image_size,
        "resize_size": prep.resize_size,
        "mean": prep.mean,
        "std": prep.std,
        "interpolation": prep.interpolation,
    }
    if mode == "train":
        batches = len(source) // batch
        augment = jaxmodels.Augment(prep)
        runs = {
            "grain": lambda: jaxmodels.train_dataset(
                source,
                augment,
                global_batch=batch,
                seed=0,
                process_index=0,
                process_count=1,
                num_threads=threads,
            ),
            "baseline": lambda: baseline.train_batches(
                old_source, batch, old_prep, seed=0, num_workers=threads
            ),
        }
    else:
        batches = math.ceil(len(source) / batch)
        runs = {
            "grain": lambda: jaxmodels.eval_dataset(
                source,
                prep,
                global_batch=batch,
                process_index=0,
                process_count=1,
                num_threads=threads,
            ),
            "baseline": lambda: baseline.eval_batches(old_source, batch, old_prep),
            # The baseline decodes serially; grain on one thread separates the two effects.
            "grain_1_thread": lambda: jaxmodels.eval_dataset(
                source, prep, global_batch=batch, process_index=0, process_count=1, num_threads=1
            ),
        }
    best = {key: math.inf for key in runs}
    for _ in range(repeats):
        for key, make in runs.items():
            best[key] = min(best[key], _time_batches(make, batches))
    images = batches * batch if mode == "train" else len(source)
    grain_rate, base_rate = images / best["grain"], images / best["baseline"]
    return {
        "data": name,
        "mode": mode,
        "images": images,
        "batch": batch,
        "threads": threads,
        "baseline_threads": threads if mode == "train" else 1,
        "grain_images_per_s": round(grain_rate, 1),
        "baseline_images_per_s": round(base_rate, 1),
        "grain_over_baseline": round(grain_rate / base_rate, 2),
        "grain_1_thread_images_per_s": (
            round(images / best["grain_1_thread"], 1) if "grain_1_thread" in best else None
        ),
        "grain_batch_bytes": batch * prep.image_size**2 * 3,  # uint8
        "baseline_batch_bytes": batch * prep.image_size**2 * 3 * 4,  # float32
    }


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=512, help="images per data set (512)")
    parser.add_argument("--batch", type=int, default=64, help="global batch (default 64)")
    parser.add_argument(
        "--threads",
        type=int,
        default=jaxmodels.data.pipeline.default_num_threads(),
        help="decoding threads for both pipelines (default min(8, cpu count))",
    )
    parser.add_argument("--image-size", type=int, default=224, help="model side (default 224)")
    parser.add_argument("--repeats", type=int, default=3, help="repeats, best counts (3)")
    parser.add_argument("--quick", action="store_true", help="64 images, batch 16, 1 repeat")
    parser.add_argument("--workdir", help="where to write the data (default: a temp dir)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()
    if args.quick:
        args.images, args.batch, args.repeats = 64, 16, 1
    prep = Preprocessing.from_crop_pct(
        args.image_size, 0.875, IMAGENET_MEAN, IMAGENET_STD, "bilinear"
    )
    if args.workdir:
        pathlib.Path(args.workdir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        work = pathlib.Path(work)
        start = time.perf_counter()
        make_jpeg_folder(work / "jpegs", args.images)
        make_npz(work / "images.npz", args.images)
        print(f"# wrote {args.images} JPEGs and an npz in {time.perf_counter() - start:.1f} s")
        rows = []
        for name, spec in (("jpeg folder", str(work / "jpegs")), ("npz", str(work / "images.npz"))):
            for mode in ("train", "eval"):
                rows.append(
                    bench_case(name, spec, mode, prep, args.batch, args.threads, args.repeats)
                )
                print(json.dumps(rows[-1]), flush=True)
    print()
    print(
        "| data | mode | images | threads (grain / baseline) | grain img/s | baseline img/s "
        "| grain / baseline | grain 1 thread img/s |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        one = r["grain_1_thread_images_per_s"]
        print(
            f"| {r['data']} | {r['mode']} | {r['images']} | {r['threads']} / {r['baseline_threads']}"
            f" | {r['grain_images_per_s']:.1f} | {r['baseline_images_per_s']:.1f} |"
            f" **{r['grain_over_baseline']:.2f}×** | {'' if one is None else f'{one:.1f}'} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
