"""Training and evaluation input pipelines on grain, over any `jaxmodels.data.sources.ImageSource`.

Both pipelines are grain datasets: a random-access ``grain.MapDataset`` of per-example work
(read, decode, augment or prepare), turned into an iterator by ``to_iter_dataset`` with
``grain.ReadOptions`` (decoding in worker threads, prefetching), then batched. Every element is a
pure function of its position, so a training stream resumes at the exact next batch, in O(1),
from the step alone (``train_dataset(..., start_step=s)``) — whatever the process count, which
is why checkpoints need no per-process iterator state.

Training (`train_dataset`): epoch e visits a fresh permutation of the N examples drawn from
(seed, e) (grain's ``index_shuffle``, a bijection computed per index), keeps its first
``steps_per_epoch · G`` positions — each epoch drops its own last partial global batch of G —
and augments each example with a generator keyed by (seed, global position in the stream).
Process p of P reads rows [p·L, (p+1)·L) of every global batch (L = G / P), so the global batch
at every step, pixels included, is the same whatever the process count. (grain's own
``shuffle().repeat()`` cannot drop a remainder per epoch, and its epoch seeds are seed + epoch,
which makes the runs of a seed sweep replay each other's orders; hence the index map here.)

Evaluation (`eval_dataset`): source order, `jaxmodels.data.preprocess.prepare_for_eval` (uint8 out;
normalisation happens on the device), the last global batch padded with zero images, label 0
and ``valid = False`` — the one padding convention.

Threads or processes: PIL decodes and resizes with the GIL released, so worker threads
(``num_threads``, default ``min(8, cpu count)``) scale JPEG decoding and augmentation over the
cores without pickling anything. Processes help when per-example Python work holding the GIL
dominates (tiny images, custom Python transforms) or when one process cannot keep a fast
accelerator fed: wrap the returned dataset with
``data.dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=...))`` (the source must
then pickle; every source here does).

References:
    Szegedy et al. "Going Deeper with Convolutions", CVPR 2015 (random-resized-crop, the
    torchvision ``RandomResizedCrop`` recipe).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os

import grain
import jax
import numpy as np
from PIL import Image

from jaxmodels.data.preprocess import Preprocessing, prepare_for_eval
from jaxmodels.data.sources import ImageSource

_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
# Domain tags keep the order stream and the augmentation stream of one seed independent.
_ORDER_STREAM, _AUGMENT_STREAM = 0x0D3E, 0xA06E


def default_num_threads() -> int:
    """``min(8, cpu count)`` decoding threads."""
    return max(1, min(8, os.cpu_count() or 1))


@dataclasses.dataclass(frozen=True)
class Augment:
    """Training augmentation: random-resized-crop to the model's side, then a random flip.

    uint8 in, uint8 out (PIL resize with the model's interpolation); mixup/cutmix happen on
    the device, in the train step.

    Attributes:
      prep: the model's preprocessing (its ``image_size`` and ``interpolation`` are used).
      scale: range of the crop's area as a fraction of the image's.
      ratio: range of the crop's aspect ratio (width / height), drawn log-uniformly.
      hflip: flip horizontally with probability 1/2.
    """

    prep: Preprocessing
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True

    def __post_init__(self):
        if not isinstance(self.prep, Preprocessing):
            raise TypeError(f"prep must be a Preprocessing; got {type(self.prep).__name__}")
        if len(self.scale) != 2 or not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < low <= high <= 1; got {self.scale}")
        if len(self.ratio) != 2 or not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < low <= high; got {self.ratio}")
        object.__setattr__(self, "scale", tuple(float(x) for x in self.scale))
        object.__setattr__(self, "ratio", tuple(float(x) for x in self.ratio))

    def crop_box(self, height: int, width: int, rng: np.random.Generator):
        """(top, left, h, w) of the random crop: 10 tries, then the centred fallback box."""
        area = height * width
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            w = round(math.sqrt(target_area * aspect))
            h = round(math.sqrt(target_area / aspect))
            if 0 < w <= width and 0 < h <= height:
                top = int(rng.integers(0, height - h + 1))
                left = int(rng.integers(0, width - w + 1))
                return top, left, h, w
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, round(width / self.ratio[0])
        elif in_ratio > self.ratio[1]:
            h, w = height, round(height * self.ratio[1])
        else:
            h, w = height, width
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, image_HW3: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """uint8 [H, W, 3] → uint8 [S, S, 3]."""
        top, left, h, w = self.crop_box(image_HW3.shape[0], image_HW3.shape[1], rng)
        crop = Image.fromarray(np.ascontiguousarray(image_HW3[top : top + h, left : left + w]))
        size = self.prep.image_size
        out = np.asarray(crop.resize((size, size), _RESAMPLE[self.prep.interpolation]))
        if self.hflip and rng.random() < 0.5:
            out = out[:, ::-1]
        return out


def steps_per_epoch(num_examples: int, global_batch: int) -> int:
    """Full global batches per training epoch (each epoch drops its last partial batch)."""
    return num_examples // global_batch


def _processes(global_batch, process_index, process_count) -> tuple[int, int, int]:
    """Validated (local batch L, process index, process count)."""
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    for name, value in (("global_batch", global_batch), ("process_count", process_count)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"{name} must be a positive int; got {value!r}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index must lie in [0, {process_count}); got {process_index}")
    if global_batch % process_count:
        raise ValueError(
            f"global_batch {global_batch} must be divisible by the process count {process_count}"
        )
    return global_batch // process_count, int(process_index), int(process_count)


def _global_position(local_position: int, local_batch: int, global_batch: int, process_index):
    """Position in the global stream of this process's ``local_position``-th row."""
    batch, row = divmod(local_position, local_batch)
    return batch * global_batch + process_index * local_batch + row


@functools.lru_cache(maxsize=64)
def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([_ORDER_STREAM, seed, epoch]).generate_state(1)[0])


def epoch_order(num_examples: int, seed: int, epoch: int, position: int) -> int:
    """Example at ``position`` of ``epoch``'s permutation of [0, N), drawn from (seed, epoch)."""
    return int(
        grain.experimental.index_shuffle(
            position, max_index=num_examples - 1, seed=_epoch_seed(seed, epoch), rounds=4
        )
    )


@dataclasses.dataclass(frozen=True)
class PipelineData:
    """An iterable of this process's batches; ``iter()`` gives a ``grain.DatasetIterator``.

    Attributes:
      dataset: the grain ``IterDataset`` (wrap it, e.g. with ``mp_prefetch``, if needed).
      num_batches: batches one pass yields (None: endless).
      global_batch: rows per step over all processes; local_batch: this process's rows.
      steps_per_epoch: training batches per epoch (for evaluation: ``num_batches``).
    """

    dataset: grain.IterDataset
    num_batches: int | None
    global_batch: int
    local_batch: int
    steps_per_epoch: int

    def __iter__(self) -> grain.DatasetIterator:
        return iter(self.dataset)


def _check_source(source) -> None:
    if not isinstance(source, ImageSource):
        raise TypeError(
            "source must be an ImageSource (jaxmodels.data.sources.open_source(spec)); got "
            f"{type(source).__name__}"
        )


def _read_options(num_threads, prefetch, local_batch) -> grain.ReadOptions:
    num_threads = default_num_threads() if num_threads is None else int(num_threads)
    if num_threads < 0:
        raise ValueError(f"num_threads must be >= 0; got {num_threads}")
    prefetch = 2 * local_batch if prefetch is None else int(prefetch)
    return grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)


@dataclasses.dataclass(frozen=True)
class _TrainExample(grain.transforms.MapWithIndex):
    """This process's ``index``-th training example: permuted, read, augmented."""

    source: ImageSource
    augment: Augment
    seed: int
    per_epoch: int  # examples kept per epoch: steps_per_epoch · global_batch
    global_batch: int
    local_batch: int
    process_index: int
    first_index: int = 0  # this process's local position of the stream's first element

    def map_with_index(self, index: int, _) -> dict:
        index += self.first_index
        position = _global_position(index, self.local_batch, self.global_batch, self.process_index)
        epoch, in_epoch = divmod(position, self.per_epoch)
        item = self.source[epoch_order(len(self.source), self.seed, epoch, in_epoch)]
        rng = np.random.default_rng([_AUGMENT_STREAM, self.seed, position])
        return {"image": self.augment(item["image"], rng), "label": item["label"]}


@dataclasses.dataclass(frozen=True)
class _EvalExample(grain.transforms.Map):
    """This process's ``index``-th evaluation row: prepared, or padding past the end."""

    source: ImageSource
    prep: Preprocessing
    global_batch: int
    local_batch: int
    process_index: int

    def map(self, index: int) -> dict:
        position = _global_position(index, self.local_batch, self.global_batch, self.process_index)
        if position >= len(self.source):
            size = self.prep.image_size
            return {
                "image": np.zeros((size, size, 3), np.uint8),
                "label": np.int32(0),
                "valid": np.bool_(False),
            }
        item = self.source[position]
        return {
            "image": prepare_for_eval(item["image"], self.prep),
            "label": item["label"],
            "valid": np.bool_(True),
        }


def train_dataset(
    source: ImageSource,
    augment: Augment,
    *,
    global_batch: int,
    seed: int,
    epochs: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    num_threads: int | None = None,
    prefetch: int | None = None,
    start_step: int = 0,
) -> PipelineData:
    """Shuffled, augmented training batches (module docstring), resumable from any step.

    Args:
      source: the training data.
      augment: random-resized-crop + flip to the model's side.
      global_batch: G, rows per step over all processes.
      seed: the data seed (order and augmentation), an int ≥ 0.
      epochs: passes over the data; None for an endless stream.
      process_index, process_count: this process and how many (default: JAX's).
      num_threads: decoding/augmentation threads (default ``min(8, cpu count)``; 0: inline).
      prefetch: examples decoded ahead (default two local batches).
      start_step: the first batch is global batch number `start_step` of the stream (a resumed
        run's step): the same batches an uninterrupted stream yields from there on.

    Returns:
      `PipelineData` whose batches are ``{"image": uint8 [L, S, S, 3], "label": int32 [L]}``,
      L = G / process_count; ``num_batches = epochs · steps_per_epoch`` (those from
      `start_step` on are yielded).

    Raises:
      TypeError: ``source`` is not an `ImageSource` or ``augment`` not an `Augment`.
      ValueError: bad batch/process/seed/epochs values, or G larger than the data.
    """
    _check_source(source)
    if not isinstance(augment, Augment):
        raise TypeError(f"augment must be an Augment; got {type(augment).__name__}")
    local_batch, process_index, process_count = _processes(
        global_batch, process_index, process_count
    )
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be an int >= 0; got {seed!r}")
    if epochs is not None and (not isinstance(epochs, int | np.integer) or epochs < 1):
        raise ValueError(f"epochs must be a positive int or None; got {epochs!r}")
    n = len(source)
    steps = steps_per_epoch(n, global_batch)
    if steps == 0:
        raise ValueError(
            f"global_batch {global_batch} exceeds the {n} training examples of {source.spec!r}"
        )
    total = None if epochs is None else int(epochs) * steps
    if isinstance(start_step, bool) or not isinstance(start_step, int | np.integer):
        raise ValueError(f"start_step must be an int; got {start_step!r}")
    if start_step < 0 or (total is not None and start_step > total):
        raise ValueError(f"start_step must lie in [0, {total}]; got {start_step}")
    first = int(start_step) * local_batch
    example = _TrainExample(
        source, augment, int(seed), steps * global_batch, global_batch, local_batch,
        process_index, first,
    )  # fmt: skip
    positions = grain.MapDataset.range(steps * local_batch).repeat(epochs)[first:]
    dataset = (
        positions.map_with_index(example)
        .to_iter_dataset(_read_options(num_threads, prefetch, local_batch))
        .batch(local_batch, drop_remainder=True)
    )
    return PipelineData(
        dataset=dataset,
        num_batches=total,
        global_batch=int(global_batch),
        local_batch=local_batch,
        steps_per_epoch=steps,
    )


def eval_dataset(
    source: ImageSource,
    prep: Preprocessing,
    *,
    global_batch: int,
    process_index: int | None = None,
    process_count: int | None = None,
    num_threads: int | None = None,
    prefetch: int | None = None,
) -> PipelineData:
    """Evaluation batches in source order, the last global batch padded (module docstring).

    Args:
      source: the data.
      prep: the model's preprocessing; images go through `prepare_for_eval`.
      global_batch: G, rows per step over all processes.
      process_index, process_count: this process and how many (default: JAX's).
      num_threads: decoding threads (default ``min(8, cpu count)``; 0: inline).
      prefetch: examples decoded ahead (default two local batches).

    Returns:
      `PipelineData` whose batches are ``{"image": uint8 [L, S, S, 3], "label": int32 [L],
      "valid": bool [L]}``; padded rows have a zero image, label 0 and ``valid`` False, and
      concatenating the processes' slices of each batch gives the source order.
      ``num_batches = ceil(N / G)``.

    Raises:
      TypeError: ``source`` is not an `ImageSource` or ``prep`` not a `Preprocessing`.
      ValueError: bad batch/process values.
    """
    _check_source(source)
    if not isinstance(prep, Preprocessing):
        raise TypeError(f"prep must be a Preprocessing; got {type(prep).__name__}")
    local_batch, process_index, process_count = _processes(
        global_batch, process_index, process_count
    )
    n = len(source)
    num_batches = -(-n // global_batch)
    example = _EvalExample(source, prep, global_batch, local_batch, process_index)
    dataset = (
        grain.MapDataset.range(num_batches * local_batch)
        .map(example)
        .to_iter_dataset(_read_options(num_threads, prefetch, local_batch))
        .batch(local_batch, drop_remainder=True)
    )
    return PipelineData(
        dataset=dataset,
        num_batches=num_batches,
        global_batch=int(global_batch),
        local_batch=local_batch,
        steps_per_epoch=num_batches,
    )
