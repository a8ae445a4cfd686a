"""What every image source is: `ImageSource`, its label checks, `DataError` and the cache root.

The concrete sources (`jaxmodels.data.array_source`, `jaxmodels.data.tfds_source` and the folder
source in `jaxmodels.data.sources`) build on these; `jaxmodels.data.sources.open_source` picks one
from a data spec.
"""

from __future__ import annotations

import copy
import functools
import operator
import os
import pathlib

import numpy as np


class DataError(ValueError):
    """A user error about data: one line that names the spec or path and says what to do."""


def cache_root() -> pathlib.Path:
    """The one directory where hubtune caches live (labels, features): not created here.

    ``$HUBTUNE_CACHE`` if set, else ``$XDG_CACHE_HOME/hubtune``, else ``~/.cache/hubtune``.
    """
    if os.environ.get("HUBTUNE_CACHE"):
        return pathlib.Path(os.environ["HUBTUNE_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return pathlib.Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "hubtune"
    return pathlib.Path("~/.cache/hubtune").expanduser()


class ImageSource:
    """Labelled images with random access: ``len(source)`` and ``source[i]``.

    A grain random-access data source (``grain.MapDataset.source(source)`` works). Subclasses
    set ``spec``, ``labels`` and ``num_classes`` and implement ``_read_image`` and
    ``_fingerprint``.

    Attributes:
      spec: where the data came from (the spec string, or a name for in-memory arrays).
      labels: [N] int64, read without decoding any image.
      num_classes: K; every label is < K.
      fingerprint: hex digest of the content (cache keys), computed once on first use.
    """

    spec: str
    labels: np.ndarray
    num_classes: int
    kind: str = "images"

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index) -> dict:
        """``{"image": uint8 [H, W, 3], "label": np.int32}`` of example ``index``."""
        i = operator.index(index)
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {index} out of range for {n} images of {self.spec!r}")
        return {"image": _as_rgb(self._read_image(i)), "label": np.int32(self.labels[i])}

    def _read_image(self, index: int) -> np.ndarray:
        raise NotImplementedError

    def _fingerprint(self) -> str:
        raise NotImplementedError

    @functools.cached_property
    def fingerprint(self) -> str:
        return self._fingerprint()

    def describe(self) -> str:
        """One line for logs: kind, spec, image count and classes."""
        return f"{self.kind} {self.spec!r}: {len(self)} images, {self.num_classes} classes"

    def with_num_classes(self, num_classes: int) -> ImageSource:
        """This source declaring ``num_classes`` classes (a shallow copy; images are shared).

        Raises:
          DataError: a label is ≥ ``num_classes``, or ``num_classes`` < 2.
        """
        num_classes = _check_num_classes(self.labels, num_classes, f"data {self.spec!r}")
        if num_classes == self.num_classes:
            return self
        other = copy.copy(self)
        other.num_classes = num_classes
        return other

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"


def _as_rgb(image: np.ndarray) -> np.ndarray:
    """uint8 [H, W] / [H, W, 1] / [H, W, 3] → uint8 [H, W, 3] (grey repeated to RGB)."""
    if image.ndim == 2:
        image = image[:, :, None]
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    return image


def _check_num_classes(labels: np.ndarray, num_classes, where: str) -> int:
    """Validates a given class count against the labels; returns it as an int."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int | np.integer):
        raise TypeError(f"num_classes must be an int; got {type(num_classes).__name__}")
    num_classes = int(num_classes)
    if num_classes < 2:
        raise DataError(f"{where}: needs at least 2 classes; num_classes={num_classes}")
    beyond = labels >= num_classes
    if beyond.any():
        raise DataError(
            f"{where}: labels must lie in [0, {num_classes}) for num_classes={num_classes}; "
            f"found {_count_listing(labels[beyond])}"
        )
    return num_classes


def _count_listing(values: np.ndarray, limit: int = 8) -> str:
    """'label 12 (3 images), label 15 (1 image)' for the distinct values, at most `limit`."""
    distinct, counts = np.unique(values, return_counts=True)
    parts = [
        f"label {v} ({c} image{'s' if c != 1 else ''})"
        for v, c in zip(distinct[:limit], counts[:limit], strict=True)
    ]
    more = f" and {len(distinct) - limit} more labels" if len(distinct) > limit else ""
    return ", ".join(parts) + more


def checked_labels(labels, num_images: int, where: str, num_classes=None) -> tuple[np.ndarray, int]:
    """Validates labels for ``num_images`` images; returns (labels [N] int64, num_classes).

    Args:
      labels: [N] integers ≥ 0.
      num_images: how many images they label.
      where: message prefix naming the data, e.g. ``"data 'x.npz'"``.
      num_classes: the class count if known (else ``max(label) + 1``).

    Raises:
      DataError: non-integer, wrongly shaped, negative or too-large labels, a length other than
        ``num_images``, no data, or fewer than 2 classes.
    """
    labels = np.asarray(labels)
    if labels.dtype == np.bool_ or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"{where}: labels must be integers; got dtype {labels.dtype} (cast them, e.g. "
            "labels.astype(np.int64))"
        )
    if labels.ndim != 1:
        raise DataError(f"{where}: labels must have shape [N]; got {labels.shape}")
    if labels.shape[0] != num_images:
        raise DataError(
            f"{where}: labels has {labels.shape[0]} entries but images has {num_images}; "
            "give exactly one label per image"
        )
    if num_images == 0:
        raise DataError(f"{where}: holds no images")
    if labels.min() < 0:
        raise DataError(f"{where}: labels must be >= 0; found {_count_listing(labels[labels < 0])}")
    labels = labels.astype(np.int64)
    if num_classes is None:
        num_classes = int(labels.max()) + 1
        if num_classes < 2:
            raise DataError(
                f"{where}: needs at least 2 classes; every label is 0 (pass num_classes= if "
                "this is part of a larger label set)"
            )
        return labels, num_classes
    return labels, _check_num_classes(labels, num_classes, where)


def check_classes_within(source: ImageSource, num_classes: int, role: str = "evaluation") -> None:
    """Raises unless every label of ``source`` is a class of a ``num_classes``-way model.

    Evaluation data whose labels exceed training's classes is an error, not a silently wrong
    head.

    Args:
      source: the data to check.
      num_classes: the model's (training data's) class count.
      role: what the data is for, for the message (e.g. ``"evaluation"``, ``"held-out"``).

    Raises:
      DataError: naming the offending labels and how many images carry each.
    """
    if not isinstance(source, ImageSource):
        raise TypeError(f"source must be an ImageSource; got {type(source).__name__}")
    beyond = source.labels >= num_classes
    if beyond.any():
        raise DataError(
            f"{role} data {source.spec!r} has labels beyond the {num_classes} classes of "
            f"training: {_count_listing(source.labels[beyond])}; use data labelled with the "
            "training classes"
        )
