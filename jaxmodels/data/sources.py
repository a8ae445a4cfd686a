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

import hashlib
import os
import pathlib

import numpy as np

from jaxmodels.data.image_source import (
    DataError,
    ImageSource,
    cache_root,
    check_classes_within,
    checked_labels,
)

# The base types live in `image_source` (the concrete sources import them from there); they are
# named here too, as every caller reads the data layer through this module.
__all__ = [
    "IMAGE_SUFFIXES",
    "DataError",
    "FolderSource",
    "ImageSource",
    "cache_root",
    "check_classes_within",
    "checked_labels",
    "open_source",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")

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
