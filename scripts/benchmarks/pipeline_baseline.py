"""The input pipeline hubtune had before its grain data layer: the baseline of bench_pipeline.py.

A compact copy of the replaced `training/sources.py` (image-folder and ``.npz`` sources) and
`training/data.py` (`train_batches`: a permutation per (seed, epoch), random-resized-crop + flip +
normalisation to float32 per example in a ``ThreadPoolExecutor``; `eval_batches`: resize +
centre crop + normalisation, one example after another, the last batch padded with a ``weight``
of 0). Only PIL and NumPy: importing it changes nothing in the caller's configuration.

    python scripts/benchmarks/pipeline_baseline.py FOLDER_OR_NPZ --batch 64 --threads 4
"""

import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


class ArraySource:
    """images [N, H, W, C] uint8, labels [N]; ``source[i] -> (image, label)``."""

    def __init__(self, images, labels):
        self.images, self.labels = np.asarray(images), np.asarray(labels, np.int64)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return self.images[index], int(self.labels[index])


def load_npz(path):
    with np.load(path) as data:
        return ArraySource(data["images"], data["labels"])


class ImageFolderSource:
    """``root/<class>/<image>``; decodes with PIL on every read."""

    def __init__(self, root):
        classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        self.files = [
            (os.path.join(root, name, file), label)
            for label, name in enumerate(classes)
            for file in sorted(os.listdir(os.path.join(root, name)))
            if file.lower().endswith(IMAGE_EXTENSIONS)
        ]

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        path, label = self.files[index]
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB")), label


def open_source(spec):
    return load_npz(spec) if spec.endswith(".npz") else ImageFolderSource(spec)


def _as_rgb(image):
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[:, :, None]
    return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image


def _normalize(image, mean, std):
    return ((np.asarray(image, np.float32) / 255.0 - np.float32(mean)) / np.float32(std)).astype(
        np.float32
    )


def random_resized_crop(image, size, rng, scale, ratio, interpolation):
    height, width = image.shape[:2]
    area = height * width
    log_ratio = np.log(ratio)
    box = None
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = np.exp(rng.uniform(*log_ratio))
        w = round(np.sqrt(target_area * aspect))
        h = round(np.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            box = (int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w)
            break
    if box is None:
        in_ratio = width / height
        if in_ratio < min(ratio):
            w, h = width, round(width / min(ratio))
        elif in_ratio > max(ratio):
            h, w = height, round(height * max(ratio))
        else:
            w, h = width, height
        box = ((height - h) // 2, (width - w) // 2, h, w)
    top, left, h, w = box
    crop = Image.fromarray(np.ascontiguousarray(image[top : top + h, left : left + w]))
    return np.asarray(crop.resize((size, size), _RESAMPLE[interpolation]))


def train_transform(image, prep, rng):
    image = random_resized_crop(
        _as_rgb(image), prep["image_size"], rng, (0.08, 1.0), (3 / 4, 4 / 3), prep["interpolation"]
    )
    if rng.random() < 0.5:
        image = image[:, ::-1]
    return _normalize(image, prep["mean"], prep["std"])


def eval_transform(image, prep):
    image = _as_rgb(image)
    height, width = image.shape[:2]
    size = prep["resize_size"]
    new_h, new_w = (size, int(size * width / height)) if height <= width else (
        int(size * height / width), size)  # fmt: skip
    if (new_h, new_w) != (height, width):
        image = np.asarray(
            Image.fromarray(image).resize((new_w, new_h), _RESAMPLE[prep["interpolation"]])
        )
    crop = prep["image_size"]
    top, left = round((new_h - crop) / 2.0), round((new_w - crop) / 2.0)
    return _normalize(image[top : top + crop, left : left + crop], prep["mean"], prep["std"])


def train_batches(source, global_batch, prep, seed, num_workers=0):
    """Endless ``{"image": float32 [B, S, S, 3], "label": int32 [B]}`` (one process)."""
    n = len(source)
    per_epoch = n // global_batch
    pool = ThreadPoolExecutor(num_workers) if num_workers else None

    def load(epoch, index):
        image, label = source[int(index)]
        return train_transform(image, prep, np.random.default_rng([seed, epoch, int(index)])), label

    epoch = 0
    try:
        while True:
            order = np.random.default_rng([seed, epoch]).permutation(n)
            for batch in range(per_epoch):
                indices = order[batch * global_batch : (batch + 1) * global_batch]
                loader = pool.map if pool else map
                examples = list(loader(lambda i, e=epoch: load(e, i), indices))
                yield {
                    "image": np.stack([x for x, _ in examples]),
                    "label": np.asarray([y for _, y in examples], np.int32),
                }
            epoch += 1
    finally:
        if pool:
            pool.shutdown()


def eval_batches(source, global_batch, prep):
    """``{"image": float32 [B, S, S, 3], "label", "weight"}`` in order, the last padded."""
    n, size = len(source), prep["image_size"]
    for begin in range(0, n, global_batch):
        images, labels, weights = [], [], []
        for i in range(begin, begin + global_batch):
            if i < n:
                image, label = source[i]
                images.append(eval_transform(image, prep))
                labels.append(label)
                weights.append(1.0)
            else:
                images.append(np.zeros((size, size, 3), np.float32))
                labels.append(0)
                weights.append(0.0)
        yield {
            "image": np.stack(images),
            "label": np.asarray(labels, np.int32),
            "weight": np.asarray(weights, np.float32),
        }


def main():
    import argparse
    import time

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("data", help="an image folder (one sub-folder per class) or a .npz")
    parser.add_argument("--batch", type=int, default=64, help="batch size (default 64)")
    parser.add_argument("--threads", type=int, default=4, help="training threads (default 4)")
    parser.add_argument("--image-size", type=int, default=224, help="model input side")
    args = parser.parse_args()
    prep = {
        "image_size": args.image_size,
        "resize_size": math.floor(args.image_size / 0.875),
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "interpolation": "bilinear",
    }
    source = open_source(args.data)
    batches = len(source) // args.batch
    start = time.perf_counter()
    stream = train_batches(source, args.batch, prep, seed=0, num_workers=args.threads)
    for _ in range(batches):
        next(stream)
    print(f"train: {batches * args.batch / (time.perf_counter() - start):.1f} images/s")
    start = time.perf_counter()
    count = sum(int(b["weight"].sum()) for b in eval_batches(source, args.batch, prep))
    print(f"eval: {count / (time.perf_counter() - start):.1f} images/s")


if __name__ == "__main__":
    main()
