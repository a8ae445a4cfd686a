"""Target datasets for ranking a model hub: a `.npz` file, an image folder, or a TFDS split.

`open_dataset(spec)` turns a DATA_SPEC string into a `HubDataset`: the labels in memory, the images
read lazily in chunks (so an image folder or a TFDS split larger than memory streams through), and
a fingerprint of the data for the feature cache. Every failure to find or read the data raises
`DataSpecError` with a one-line message, before any model runs.

DATA_SPEC forms:
  * `path/to/data.npz` with arrays `images` [N, H, W, 3] (uint8, or floats in [0, 255]) and
    `labels` [N] (integers);
  * `path/to/folder/` with one sub-folder per class (sorted names → labels 0, 1, …) holding image
    files that PIL reads (.jpg, .jpeg, .png, .bmp, .gif, .webp);
  * `tfds:NAME:SPLIT`, e.g. `tfds:cifar100:train[:5000]`, read with `tfds.data_source` (no
    TensorFlow needed; the dataset must already be prepared in ArrayRecord format under
    TFDS's data_dir — nothing is downloaded).
"""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib
from collections.abc import Callable, Iterator

import numpy as np

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
_CHUNK = 256


class DataSpecError(ValueError):
    """A DATA_SPEC that names no readable labelled image data."""


@dataclasses.dataclass(frozen=True)
class HubDataset:
    """Labelled images, read lazily.

    Attributes:
        spec: the DATA_SPEC string it came from.
        labels: [N] int64 labels.
        fingerprint: hex digest identifying the data's content (cache key part).
        read: `read(start, stop)` → list of `stop − start` images, each [H, W, 3] in [0, 255].
    """

    spec: str
    labels: np.ndarray
    fingerprint: str
    read: Callable[[int, int], list[np.ndarray]]

    @property
    def num_images(self) -> int:
        return int(self.labels.shape[0])

    def chunks(self, size: int = _CHUNK) -> Iterator[tuple[int, list[np.ndarray]]]:
        """Yields (start, images) over the whole dataset in order."""
        for start in range(0, self.num_images, size):
            yield start, self.read(start, min(start + size, self.num_images))


def open_dataset(spec: str) -> HubDataset:
    """Opens a DATA_SPEC (module docstring).

    Raises:
        DataSpecError: missing path, unreadable file, missing/invalid `images` or `labels`, empty
          data, or an unavailable TFDS dataset.
    """
    if not isinstance(spec, str) or not spec:
        raise DataSpecError(f"DATA_SPEC must be a non-empty string; got {spec!r}")
    if spec.startswith("tfds:"):
        return _open_tfds(spec)
    path = pathlib.Path(spec)
    if not path.exists():
        raise DataSpecError(f"data {spec!r} not found (expected a .npz file, a folder, or tfds:…)")
    if path.is_dir():
        return _open_folder(spec, path)
    if path.suffix == ".npz":
        return _open_npz(spec, path)
    raise DataSpecError(
        f"data {spec!r} is neither a .npz file, a folder of class sub-folders, nor tfds:NAME:SPLIT"
    )


def _check_labels(labels, spec: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataSpecError(
            f"data {spec!r}: labels must be integers of shape [N]; got {labels.dtype} "
            f"{labels.shape}"
        )
    if labels.shape[0] < 2:
        raise DataSpecError(
            f"data {spec!r}: needs at least 2 labelled images; got {labels.shape[0]}"
        )
    if np.unique(labels).size < 2:
        raise DataSpecError(f"data {spec!r}: labels must contain at least 2 classes")
    return labels.astype(np.int64)


def _open_npz(spec: str, path: pathlib.Path) -> HubDataset:
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in ("images", "labels") if k not in data.files]
            if missing:
                raise DataSpecError(
                    f"data {spec!r} lacks {' and '.join(missing)}; it has {sorted(data.files)}"
                )
            images, labels = data["images"], data["labels"]
    except DataSpecError:
        raise
    except Exception as err:  # a corrupt or non-npz file: numpy raises many kinds
        raise DataSpecError(f"data {spec!r} is not a readable .npz file ({err})") from err
    labels = _check_labels(labels, spec)
    if images.ndim != 4 or images.shape[-1] != 3 or images.shape[0] != labels.shape[0]:
        raise DataSpecError(
            f"data {spec!r}: images must have shape [N={labels.shape[0]}, H, W, 3]; got "
            f"{images.shape}"
        )
    if not (np.issubdtype(images.dtype, np.integer) or np.issubdtype(images.dtype, np.floating)):
        raise DataSpecError(f"data {spec!r}: images must be numeric; got dtype {images.dtype}")
    fingerprint = _file_digest(path)
    return HubDataset(spec, labels, fingerprint, lambda a, b: list(images[a:b]))


def _open_folder(spec: str, path: pathlib.Path) -> HubDataset:
    classes = sorted(p for p in path.iterdir() if p.is_dir())
    if len(classes) < 2:
        raise DataSpecError(
            f"data folder {spec!r} must hold one sub-folder per class (at least 2); found "
            f"{len(classes)}"
        )
    files, labels = [], []
    for index, folder in enumerate(classes):
        for file in sorted(folder.iterdir()):
            if file.suffix.lower() in IMAGE_SUFFIXES:
                files.append(file)
                labels.append(index)
    if not files:
        raise DataSpecError(
            f"data folder {spec!r} holds no image files ({', '.join(IMAGE_SUFFIXES)})"
        )
    labels = _check_labels(np.asarray(labels), spec)
    digest = hashlib.sha256()
    for file in files:
        stat = file.stat()
        digest.update(f"{file.relative_to(path)}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())

    def read(start, stop):
        from PIL import Image

        out = []
        for file in files[start:stop]:
            try:
                with Image.open(file) as image:
                    out.append(np.asarray(image.convert("RGB")))
            except Exception as err:  # PIL raises many kinds for unreadable files
                raise DataSpecError(f"image {str(file)!r} is not readable ({err})") from err
        return out

    return HubDataset(spec, labels, digest.hexdigest(), read)


def _open_tfds(spec: str) -> HubDataset:
    parts = spec.split(":", 2)
    if len(parts) != 3 or not parts[1] or not parts[2]:
        raise DataSpecError(f"tfds data must be written tfds:NAME:SPLIT; got {spec!r}")
    _, name, split = parts
    try:
        import tensorflow_datasets as tfds

        source = tfds.data_source(name, split=split, download=False)
        labels = np.asarray([source[i]["label"] for i in range(len(source))])
    except Exception as err:  # unknown dataset, not prepared, no ArrayRecord files, no labels
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataSpecError(f"tfds data {spec!r} is not available: {message}") from err
    labels = _check_labels(labels, spec)
    fingerprint = hashlib.sha256(f"tfds|{name}|{split}|{len(source)}".encode()).hexdigest()
    return HubDataset(
        spec,
        labels,
        fingerprint,
        lambda a, b: [np.asarray(source[i]["image"]) for i in range(a, b)],
    )


def _file_digest(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
