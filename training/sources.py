"""Random-access image sources: TFDS (without TensorFlow), image folders and ``.npz`` arrays.

Every source has ``len(source)``, ``source.num_classes`` and ``source[i] -> (image, label)`` with
``image`` [H, W, C] uint8 (C = 1 or 3) and ``label`` an int in [0, num_classes). Random access is
what makes a seeded shuffle and an exact resume cheap (``training.data``).

- ``tfds:NAME[:SPLIT]``: ``tfds.data_source`` over the dataset's ArrayRecord files (prepared
  beforehand in the TFDS data directory); no TensorFlow is imported;
- a folder with one sub-folder per class (class ids follow the sorted folder names);
- a ``.npz`` file with ``images`` [N, H, W, C] uint8 and ``labels`` [N] int.
"""

import os

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class ArraySource:
    """In-memory images [N, H, W, C] uint8 and labels [N] int."""

    def __init__(
        self, images_NHWC: np.ndarray, labels_N: np.ndarray, num_classes: int | None = None
    ):
        images_NHWC = np.asarray(images_NHWC)
        labels_N = np.asarray(labels_N)
        if images_NHWC.ndim != 4 or images_NHWC.shape[-1] not in (1, 3):
            raise ValueError(
                f"images must be [N, H, W, C] with C in (1, 3); got shape {images_NHWC.shape}"
            )
        if images_NHWC.dtype != np.uint8:
            raise TypeError(f"images must be uint8; got {images_NHWC.dtype}")
        if labels_N.shape != (images_NHWC.shape[0],) or not np.issubdtype(
            labels_N.dtype, np.integer
        ):
            raise ValueError(
                f"labels must be [N={images_NHWC.shape[0]}] integers; "
                f"got shape {labels_N.shape} dtype {labels_N.dtype}"
            )
        if len(labels_N) and labels_N.min() < 0:
            raise ValueError(f"labels must be >= 0; found {labels_N.min()}")
        self.images = images_NHWC
        self.labels = labels_N.astype(np.int64)
        self.num_classes = int(num_classes or (labels_N.max() + 1 if len(labels_N) else 0))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return self.images[index], int(self.labels[index])


def load_npz(path: str) -> ArraySource:
    """Reads a ``.npz`` with arrays ``images`` [N, H, W, C] uint8 and ``labels`` [N] int."""
    with np.load(path) as data:
        missing = {"images", "labels"} - set(data.files)
        if missing:
            raise ValueError(f"{path} must hold arrays 'images' and 'labels'; missing {missing}")
        return ArraySource(data["images"], data["labels"])


class ImageFolderSource:
    """``root/<class name>/<image file>``; class ids follow the sorted sub-folder names."""

    def __init__(self, root: str):
        if not os.path.isdir(root):
            raise ValueError(f"image folder {root!r} is not a directory")
        self.classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        if not self.classes:
            raise ValueError(f"image folder {root!r} has no class sub-folders")
        self.files: list[tuple[str, int]] = []
        for label, name in enumerate(self.classes):
            folder = os.path.join(root, name)
            for file in sorted(os.listdir(folder)):
                if file.lower().endswith(IMAGE_EXTENSIONS):
                    self.files.append((os.path.join(folder, file), label))
        if not self.files:
            raise ValueError(f"image folder {root!r} has no images ({IMAGE_EXTENSIONS})")
        self.num_classes = len(self.classes)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        path, label = self.files[index]
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB")), label


class TfdsSource:
    """A TFDS split read through ``tfds.data_source`` (random access, no TensorFlow)."""

    def __init__(
        self,
        name: str,
        split: str = "train",
        data_dir: str | None = None,
        image_key: str = "image",
        label_key: str = "label",
    ):
        import tensorflow_datasets as tfds  # heavy import; only when a tfds source is asked for

        self.source = tfds.data_source(name, split=split, data_dir=data_dir)
        self.image_key, self.label_key = image_key, label_key
        feature = self.source.dataset_info.features[label_key]
        self.num_classes = int(feature.num_classes)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        record = self.source[int(index)]
        return np.asarray(record[self.image_key]), int(record[self.label_key])


def open_source(spec: str, split: str = "train", data_dir: str | None = None):
    """Opens ``tfds:NAME[:SPLIT]``, a ``.npz`` file or an image folder.

    Args:
        spec: ``"tfds:cifar10"``, ``"tfds:cifar10:test"``, ``"data/train.npz"`` or a folder.
        split: TFDS split used when ``spec`` names none.
        data_dir: TFDS data directory (default: TFDS's own).

    Raises:
        ValueError: ``spec`` names nothing readable.
    """
    if spec.startswith("tfds:"):
        parts = spec.split(":")
        if len(parts) not in (2, 3) or not parts[1]:
            raise ValueError(f"tfds data must be 'tfds:NAME' or 'tfds:NAME:SPLIT'; got {spec!r}")
        return TfdsSource(parts[1], parts[2] if len(parts) == 3 else split, data_dir=data_dir)
    if spec.endswith(".npz"):
        if not os.path.isfile(spec):
            raise ValueError(f"data file {spec!r} does not exist")
        return load_npz(spec)
    if os.path.isdir(spec):
        return ImageFolderSource(spec)
    raise ValueError(
        f"data must be 'tfds:NAME[:SPLIT]', a .npz file or an image folder; got {spec!r}"
    )
