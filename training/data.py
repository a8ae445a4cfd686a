"""Input pipeline: augmentation, each model's preprocessing, and resumable sharded batches.

Works over any random-access source of ``training.sources``. Training batches follow a permutation drawn from ``(seed, epoch)`` and each example's
augmentation (random-resized-crop, horizontal flip) from ``(seed, epoch, example index)``, so a
run resumed from a :class:`DataPosition` sees exactly the batches of an uninterrupted run, and
the numbers do not depend on how many processes load the data. Evaluation uses resize +
centre crop, exactly as ``jaxmodels.preprocess_for_eval``, with each model's normalisation
(:func:`preprocess_for_model`). Each process loads only its slice of every global batch (multi-host).

References:
    Szegedy et al. "Going Deeper with Convolutions" (random-resized-crop), CVPR 2015.
"""

import dataclasses
import functools
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

import jaxmodels
from jaxmodels.preprocess import Preprocessing, normalize, preprocess_for_eval

IMAGENET_MEAN = jaxmodels.preprocess.IMAGENET_MEAN
IMAGENET_STD = jaxmodels.preprocess.IMAGENET_STD


# ----------------------------------------------------------------------------- transforms


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """Image preprocessing of one model, for training and evaluation.

    Evaluation is exactly ``jaxmodels.preprocess_for_eval`` (resize the short side to
    ``resize_size``, centre-crop ``image_size``, normalise); training replaces resize + crop by a
    random-resized-crop and a random horizontal flip (Inception-style augmentation).

    Attributes:
        image_size: side S of the square model input.
        resize_size: eval resizes the short side to this (default ``floor(S / 0.875)``).
        mean, std: per-channel normalisation on [0, 1] pixel values.
        interpolation: ``"bilinear"`` or ``"bicubic"``.
        scale, ratio: random-resized-crop area fraction and aspect-ratio ranges.
        hflip: random horizontal flips in training.
    """

    image_size: int = 224
    resize_size: int | None = None
    mean: Sequence[float] = IMAGENET_MEAN
    std: Sequence[float] = IMAGENET_STD
    interpolation: str = "bilinear"
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True

    def __post_init__(self):
        if self.image_size < 1:
            raise ValueError(f"image_size must be >= 1; got {self.image_size}")
        if self.resize_size is None:
            object.__setattr__(self, "resize_size", int(np.floor(self.image_size / 0.875)))
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < low <= high <= 1; got {self.scale}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < low <= high; got {self.ratio}")
        # the eval checks (sizes, mean/std, interpolation) live in jaxmodels.Preprocessing
        self.eval_preprocessing()

    def eval_preprocessing(self) -> Preprocessing:
        """The ``jaxmodels.Preprocessing`` used for evaluation."""
        return Preprocessing(
            image_size=self.image_size,
            resize_size=self.resize_size,
            mean=tuple(self.mean),
            std=tuple(self.std),
            interpolation=self.interpolation,
        )


def preprocess_for_model(model_name: str, image_size: int | None = None, **augment) -> Preprocess:
    """The model's own normalisation, resize and interpolation (``jaxmodels.spec``).

    Args:
        model_name: a ``jaxmodels.MODEL_NAMES`` entry.
        image_size: input side (default the model's).
        **augment: ``scale``, ``ratio``, ``hflip`` overrides for training.
    """
    prep = jaxmodels.spec(model_name, image_size=image_size).preprocessing
    return Preprocess(
        image_size=prep.image_size,
        resize_size=prep.resize_size,
        mean=prep.mean,
        std=prep.std,
        interpolation=prep.interpolation,
        **augment,
    )


def _as_rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[:, :, None]
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    return image


_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


def random_resized_crop(
    image_HWC: np.ndarray,
    size: int,
    rng: np.random.Generator,
    scale=(0.08, 1.0),
    ratio=(3 / 4, 4 / 3),
    interpolation: str = "bilinear",
) -> np.ndarray:
    """Crops a random box of random area/aspect and resizes it to [size, size, C].

    Tries 10 boxes (area fraction ~ U(scale), log aspect ~ U(log ratio)); falls back to the
    largest centred box with the aspect clipped to ``ratio`` (the torchvision recipe).
    """
    height, width = image_HWC.shape[:2]
    area = height * width
    log_ratio = np.log(ratio)
    box = None
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = np.exp(rng.uniform(*log_ratio))
        w = round(np.sqrt(target_area * aspect))
        h = round(np.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            box = (top, left, h, w)
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
    crop = Image.fromarray(np.ascontiguousarray(image_HWC[top : top + h, left : left + w]))
    return np.asarray(crop.resize((size, size), _RESAMPLE[interpolation]))


def train_transform(image, preprocess: Preprocess, rng: np.random.Generator) -> np.ndarray:
    """Random-resized-crop + optional flip + normalisation → float32 [S, S, 3]."""
    image = random_resized_crop(
        _as_rgb(image), preprocess.image_size, rng, preprocess.scale, preprocess.ratio,
        preprocess.interpolation,
    )  # fmt: skip
    if preprocess.hflip and rng.random() < 0.5:
        image = image[:, ::-1]
    return np.asarray(normalize(image, preprocess.eval_preprocessing()), np.float32)


def eval_transform(image, preprocess: Preprocess) -> np.ndarray:
    """``jaxmodels.preprocess_for_eval``: resize + centre crop + normalisation → [S, S, 3]."""
    out = preprocess_for_eval(_as_rgb(image), preprocess.eval_preprocessing())
    return np.asarray(out, np.float32)


# ----------------------------------------------------------------------------- batching


@dataclasses.dataclass(frozen=True)
class DataPosition:
    """Where a training stream stands: the next batch to read is ``batch`` of ``epoch``."""

    epoch: int = 0
    batch: int = 0

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch}

    @classmethod
    def from_dict(cls, data: dict) -> "DataPosition":
        return cls(epoch=int(data["epoch"]), batch=int(data["batch"]))


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The example order of ``epoch``: a permutation of [0, N) drawn from ``(seed, epoch)``."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def steps_per_epoch(num_examples: int, global_batch: int) -> int:
    """Full global batches per epoch (the remainder is dropped in training)."""
    return num_examples // global_batch


def _local_slice(global_batch: int, process_index: int, process_count: int) -> slice:
    if global_batch % process_count:
        raise ValueError(
            f"global batch {global_batch} must be divisible by the process count {process_count}"
        )
    per_process = global_batch // process_count
    return slice(process_index * per_process, (process_index + 1) * per_process)


def train_batches(
    source,
    global_batch: int,
    preprocess: Preprocess,
    seed: int,
    start: DataPosition = DataPosition(),
    process_index: int = 0,
    process_count: int = 1,
    num_workers: int = 0,
) -> Iterator[tuple[DataPosition, dict]]:
    """Endless stream of this process's slices of global training batches.

    Args:
        source: random-access source (``len`` and ``source[i] -> (image, label)``).
        global_batch: batch size over all processes (divisible by ``process_count``).
        preprocess: train transform parameters.
        seed: seeds the order and the augmentation.
        start: position to resume from.
        process_index, process_count: this process's slice of each global batch.
        num_workers: threads decoding/augmenting images (0 = in this thread).

    Yields:
        ``(position_after, batch)``: the position of the *next* batch (save it with a
        checkpoint taken after this batch's step) and ``{"image": [b, S, S, 3] float32,
        "label": [b] int32}`` with b = global_batch / process_count.

    Raises:
        ValueError: the source holds fewer than ``global_batch`` examples.
    """
    n = len(source)
    per_epoch = steps_per_epoch(n, global_batch)
    if per_epoch == 0:
        raise ValueError(f"global_batch {global_batch} exceeds the {n} training examples")
    local = _local_slice(global_batch, process_index, process_count)
    pool = ThreadPoolExecutor(num_workers) if num_workers else None

    def load(epoch, index):
        image, label = source[int(index)]
        rng = np.random.default_rng([seed, epoch, int(index)])
        return train_transform(image, preprocess, rng), label

    epoch, batch = start.epoch, start.batch
    try:
        while True:
            order = epoch_permutation(n, seed, epoch)
            while batch < per_epoch:
                indices = order[batch * global_batch : (batch + 1) * global_batch][local]
                loader = pool.map if pool else map
                examples = list(loader(functools.partial(load, epoch), indices))
                batch += 1
                position = (
                    DataPosition(epoch, batch) if batch < per_epoch else DataPosition(epoch + 1, 0)
                )
                yield (
                    position,
                    {
                        "image": np.stack([x for x, _ in examples]),
                        "label": np.asarray([y for _, y in examples], np.int32),
                    },
                )
            epoch, batch = epoch + 1, 0
    finally:
        if pool:
            pool.shutdown()


def eval_batches(
    source,
    global_batch: int,
    preprocess: Preprocess,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[dict]:
    """This process's slices of evaluation batches in source order, the last padded.

    Yields:
        ``{"image": [b, S, S, 3] float32, "label": [b] int32, "weight": [b] float32}`` where
        ``weight`` is 0 on padding, so sums over weights count each example once.
    """
    local = _local_slice(global_batch, process_index, process_count)
    n = len(source)
    size = preprocess.image_size
    for begin in range(0, n, global_batch):
        indices = np.arange(begin, begin + global_batch)[local]
        images, labels, weights = [], [], []
        for i in indices:
            if i < n:
                image, label = source[int(i)]
                images.append(eval_transform(image, preprocess))
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
