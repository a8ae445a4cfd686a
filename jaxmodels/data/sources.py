"""One data layer: a data spec in, a random-access source of labelled uint8 RGB images out.

Ranking, fine-tuning, evaluation and everything after read data through `open_source`, the one
parser of the one spec grammar:

* ``path/to/data.npz`` with arrays ``images`` and ``labels`` (rules in `jaxmodels.data.array_source`);
* ``path/to/folder`` with one sub-folder per class; class ids follow the sorted sub-folder names
  (hidden ones skipped) and each class folder is searched recursively for files ending in one
  of `IMAGE_SUFFIXES` (like torchvision's ``ImageFolder``);
* ``tfds:NAME``, ``tfds:NAME:SPLIT`` or ``tfds:NAME:VERSION:SPLIT`` (e.g. ``tfds:cifar10:test``,
  ``tfds:cifar100:train[:5000]``, ``tfds:mnist:3.0.1:test``): a TFDS dataset prepared in
  ArrayRecord format, read with random access and no TensorFlow; nothing is ever downloaded
  (`jaxmodels.data.tfds_source`).

Every source is an `ImageSource` — a grain-compatible random-access data source — whose
``source[i]`` is ``{"image": uint8 [H, W, 3], "label": np.int32}`` (grey images repeated to RGB)
and whose ``labels`` [N], ``num_classes`` and ``fingerprint`` are known without decoding an image.

``.npz`` files and in-memory arrays follow the rules of `jaxmodels.data.array_source` (uint8 or
float images with a stated value range, grey or RGB, integer labels); folders and ``.npz`` files
check their labels here (`checked_labels`): a label array of another length than the images,
non-integer or negative labels, fewer than 2 classes and empty data are each one `DataError` at
open.

The number of classes comes from the TFDS metadata, the folder count or ``max(label) + 1`` for
arrays; ``num_classes=`` overrides it and then every label must lie below it.
`check_classes_within` rejects evaluation data whose labels exceed the training classes.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import operator
import os
import pathlib

import numpy as np

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


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


# ----------------------------------------------------------------------------- folders


class FolderSource(ImageSource):
    """``root/<class>/**/<image file>``; class ids follow the sorted class folder names.

    Images are decoded with PIL when read and converted to RGB (grey, palette, RGBA, CMYK).

    Attributes:
      classes: the class folder names, in class-id order.
      files: [N] image paths.
    """

    kind = "folder"

    def __init__(self, root, *, num_classes=None):
        self.root = pathlib.Path(root)
        self.spec = os.fspath(root)
        where = f"data folder {self.spec!r}"
        if not self.root.is_dir():
            raise DataError(f"{where} is not a directory")
        self.classes = sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")
        )
        if len(self.classes) < 2:
            raise DataError(
                f"{where} must hold one sub-folder per class (at least 2); found "
                f"{len(self.classes)}"
            )
        files, labels = [], []
        for label, name in enumerate(self.classes):
            for folder, dirs, names in os.walk(self.root / name):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for file in sorted(names):
                    if file.lower().endswith(IMAGE_SUFFIXES) and not file.startswith("."):
                        files.append(pathlib.Path(folder) / file)
                        labels.append(label)
        if not files:
            raise DataError(
                f"{where} holds no image files (suffixes {', '.join(IMAGE_SUFFIXES)}) in its "
                f"class folders {self.classes[:5]}"
            )
        self.files = files
        self.labels, self.num_classes = checked_labels(
            np.asarray(labels, np.int64), len(files), where, num_classes or len(self.classes)
        )

    def _read_image(self, index: int) -> np.ndarray:
        from PIL import Image

        path = self.files[index]
        try:
            with Image.open(path) as image:
                return np.asarray(image.convert("RGB"))
        except Exception as err:  # PIL raises many kinds for unreadable files
            raise DataError(f"image {os.fspath(path)!r} is not readable ({err})") from err

    def _fingerprint(self) -> str:
        digest = hashlib.sha256(b"folder\n")
        for file in self.files:
            stat = file.stat()
            relative = file.relative_to(self.root).as_posix()
            digest.update(f"{relative}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
        return digest.hexdigest()


# ----------------------------------------------------------------------------- the parser


def open_source(spec, *, split=None, data_dir=None, num_classes=None) -> ImageSource:
    """Opens a data spec (module docstring) as an `ImageSource`.

    Args:
      spec: ``"path/to/data.npz"``, an image folder, ``"tfds:NAME[:VERSION][:SPLIT]"``, or an
        `ImageSource` (returned as it is, or with ``num_classes`` applied).
      split: TFDS split when the spec names none (default ``"train"``); ignored otherwise.
      data_dir: TFDS data directory (default TFDS's own); ignored for files and folders.
      num_classes: the class count, when the data alone does not tell it (e.g. a held-out set
        lacking some classes); every label must be below it.

    Returns:
      The source: ``source[i] -> {"image": uint8 [H, W, 3], "label": np.int32}``.

    Raises:
      DataError: the spec names nothing readable, or the data breaks a rule (one line).
      TypeError: ``spec`` is neither a string, a path nor an `ImageSource`.
    """
    if isinstance(spec, ImageSource):
        return spec if num_classes is None else spec.with_num_classes(num_classes)
    if not isinstance(spec, str | os.PathLike):
        raise TypeError(f"spec must be a str, a path or an ImageSource; got {type(spec).__name__}")
    spec = os.fspath(spec)
    if not spec:
        raise DataError("the data spec is empty; give a .npz file, an image folder or tfds:NAME")
    if spec.startswith("tfds:"):
        from jaxmodels.data import tfds_source  # TFDS is imported only when a tfds spec is opened

        return tfds_source.open_tfds(spec, split=split, data_dir=data_dir, num_classes=num_classes)
    path = pathlib.Path(spec).expanduser()
    if not path.exists():
        raise DataError(
            f"data {spec!r} not found (give a .npz file, an image folder with one sub-folder "
            "per class, or tfds:NAME[:SPLIT])"
        )
    if path.is_dir():
        return FolderSource(path, num_classes=num_classes)
    if path.suffix.lower() == ".npz":
        from jaxmodels.data import array_source

        return array_source.open_npz(path, num_classes=num_classes)
    raise DataError(
        f"data {spec!r} is neither a .npz file, an image folder with one sub-folder per class, "
        "nor tfds:NAME[:SPLIT]"
    )
