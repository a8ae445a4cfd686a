"""Image batches for device steps: re-cut to a fixed size, padded, transferred ahead.

Callers that run a jitted step over many images (feature extraction, streaming scores) need
every step to see the same batch shape — so nothing recompiles — and the next batch already on
the device while the current one computes. `fixed_batches` turns an array [N, H, W, C] or any
iterable of batches (arrays, dicts with 'image'/'label', or (images, labels) tuples, e.g. from
tfds) into batches of exactly `local_batch` rows, zero-padding the last one and marking real
rows in `valid`. `prefetch_to_device` moves them to a data-parallel mesh from a background
thread and keeps multi-host processes in lock-step.

Shapes: b = rows of an input piece, B_local = rows per process per step, H, W, C = image
height, width, channels.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Iterable, Iterator

import jax
import numpy as np
from jax.sharding import Mesh

from jaxmodels import sharding

# Batches held ready on the device ahead of the one being computed.
_PREFETCH_DEPTH = 2


@dataclasses.dataclass(frozen=True)
class HostBatch:
    """One fixed-size batch of this process's rows, padded at the end."""

    images: np.ndarray  # [B_local, H, W, C], compute dtype
    labels: np.ndarray  # [B_local] int32 (-1 where the input had no labels or for padding)
    valid: np.ndarray  # [B_local] bool, False on padded rows
    count: int  # number of real rows
    has_labels: bool


def fixed_batches(images, labels, local_batch: int, dtype) -> Iterator[HostBatch]:
    """Yields `HostBatch`es of exactly `local_batch` rows from any supported input.

    Args:
      images: an array [N, H, W, C], or an iterable of batches: arrays [b, H, W, C], dicts
        with 'image' [b, H, W, C] and optionally 'label' [b], or (images, labels) tuples.
      labels: labels [N] for an array `images`, else None.
      local_batch: rows per batch (this process's share of the global batch).
      dtype: NumPy dtype the images are cast to (e.g. float32, or ml_dtypes' bfloat16).

    Yields:
      HostBatch with images [B_local, H, W, C], labels [B_local] int32 (-1 where absent or
      padded) and valid [B_local] bool. An array input is checked when this is called; the
      batches of an iterable are checked as they arrive.

    Raises:
      TypeError: `images` is neither an array nor an iterable of batches.
      ValueError: wrong shapes, empty input, inconsistent image shapes or labels.
    """
    return _fixed_batches(_chunks(images, labels), local_batch, np.dtype(dtype))


def _chunks(images, labels):
    """(images [b, H, W, C], labels [b] or None) pieces; arrays and types are checked now."""
    if isinstance(images, np.ndarray | jax.Array):
        images = np.asarray(images)  # a view for NumPy (and memmaps): no copy
        if images.ndim != 4 or images.shape[0] == 0:
            raise ValueError(
                f"images must be a non-empty array [N, H, W, C]; got shape {images.shape}"
            )
        if labels is not None:
            labels = np.asarray(labels)
            if labels.shape != (images.shape[0],):
                raise ValueError(
                    f"labels must have shape [N] = ({images.shape[0]},); got {labels.shape}"
                )
        return iter([(images, labels)])
    if isinstance(images, str | bytes | dict) or not isinstance(images, Iterable):
        raise TypeError(
            "images must be an array [N, H, W, C] or an iterable of batches; got "
            f"{type(images).__name__}"
        )
    return _iterable_chunks(images)


def _iterable_chunks(images: Iterable) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """Pieces of an iterable of batches, each checked as it arrives."""
    for i, item in enumerate(images):
        if isinstance(item, dict):
            if "image" not in item:
                raise ValueError(
                    f"batch {i} is a dict without an 'image' key; keys: {sorted(item)}"
                )
            x, y = item["image"], item.get("label")
        elif isinstance(item, tuple | list):
            if len(item) != 2:
                raise ValueError(f"batch {i} must be (images, labels); got {len(item)} items")
            x, y = item
        else:
            x, y = item, None
        x = np.asarray(x)
        if x.ndim != 4:
            raise ValueError(
                f"batch {i} must be images [b, H, W, C]; got shape {x.shape} "
                "(batch an unbatched dataset first, e.g. ds.batch(256))"
            )
        if y is not None:
            y = np.asarray(y)
            if y.shape != (x.shape[0],):
                raise ValueError(
                    f"batch {i}: labels must have shape ({x.shape[0]},); got {y.shape}"
                )
        yield x, y


def _fixed_batches(chunks, local_batch: int, dtype: np.dtype) -> Iterator[HostBatch]:
    """Re-cuts pieces of any size into `local_batch` rows; pads and marks the last batch."""
    pending: list[tuple[np.ndarray, np.ndarray | None]] = []
    pending_rows = 0
    image_shape = None

    def emit(pieces):
        xs = [np.asarray(x, dtype=dtype) for x, _ in pieces]
        has_labels = all(y is not None for _, y in pieces)
        if not has_labels and any(y is not None for _, y in pieces):
            raise ValueError("either all batches must carry labels or none")
        count = sum(len(x) for x in xs)
        labels = np.full((local_batch,), -1, np.int32)
        valid = np.arange(local_batch) < count
        if len(xs) == 1 and count == local_batch:  # a whole batch in one piece: no copy needed
            if has_labels:
                labels[:] = pieces[0][1]
            return HostBatch(np.ascontiguousarray(xs[0]), labels, valid, count, has_labels)
        images = np.zeros((local_batch, *image_shape), dtype)
        offset = 0
        for x, (_, y) in zip(xs, pieces, strict=True):
            images[offset : offset + len(x)] = x
            if has_labels:
                labels[offset : offset + len(x)] = y
            offset += len(x)
        return HostBatch(images, labels, valid, count, has_labels)

    for x, y in chunks:
        if image_shape is None:
            image_shape = x.shape[1:]
        elif x.shape[1:] != image_shape:
            raise ValueError(
                f"every batch must have the image shape of the first, "
                f"{image_shape}; got {x.shape[1:]}"
            )
        start = 0
        if pending_rows:
            take = min(local_batch - pending_rows, len(x))
            pending.append((x[:take], None if y is None else y[:take]))
            pending_rows += take
            start = take
            if pending_rows == local_batch:
                yield emit(pending)
                pending, pending_rows = [], 0
        while len(x) - start >= local_batch:
            stop = start + local_batch
            yield emit([(x[start:stop], None if y is None else y[start:stop])])
            start = stop
        if start < len(x):
            pending.append((x[start:], None if y is None else y[start:]))
            pending_rows += len(x) - start
    if image_shape is None:
        raise ValueError("images must not be empty; the iterable yielded no batches")
    if pending_rows:
        yield emit(pending)


def prefetch_to_device(
    batches: Iterator[HostBatch], mesh: Mesh, with_labels: bool, num_batches: int | None = None
):
    """Yields (device batch dict, host batch), transferring ahead in a background thread.

    Multi-host: all processes step together; a process that has run out of images feeds
    fully padded batches until every process is done. With `num_batches` — the number of steps,
    the same on every process (a prepared or streamed set knows it from its length) — that is
    all decided here, with no collective; without it (an iterable of unknown length) the
    processes agree after every batch whether any still has images, a blocking host round trip
    per step.
    """
    ready: queue.Queue = queue.Queue(maxsize=_PREFETCH_DEPTH)
    stop = threading.Event()
    end = object()

    def put(item):
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def produce():
        try:
            for batch in batches:
                if with_labels and not batch.has_labels:
                    raise ValueError(
                        "return_labels=True needs labels in the batches (dict "
                        "'label' or (images, labels) tuples)"
                    )
                arrays = {"images": batch.images, "labels": batch.labels, "valid": batch.valid}
                put((sharding.shard_local_batch(arrays, mesh), batch))
            put(end)
        except BaseException as err:  # re-raised in the consumer thread
            put(err)

    thread = threading.Thread(target=produce, daemon=True, name="prefetch_to_device")
    thread.start()
    template = None
    local_done = False
    steps = 0
    try:
        while True:
            if not local_done:
                item = ready.get()
                if isinstance(item, BaseException):
                    raise item
                local_done = item is end
            if num_batches is None:
                if not sharding.any_process(not local_done):
                    return
            elif steps == num_batches:
                if not local_done:
                    raise ValueError(f"the batches outnumber num_batches={num_batches}")
                return
            steps += 1
            if not local_done:
                template = item[1]
                yield item
                continue
            # This process has run out of images but others have not: step with padding only.
            if template is None:
                raise ValueError("every process must supply at least one image")
            padding = dataclasses.replace(
                template,
                images=np.zeros_like(template.images),
                labels=np.full_like(template.labels, -1),
                valid=np.zeros_like(template.valid),
                count=0,
            )
            arrays = {"images": padding.images, "labels": padding.labels, "valid": padding.valid}
            yield sharding.shard_local_batch(arrays, mesh), padding
    finally:
        stop.set()
