"""TFDS datasets as `jaxmodels.data.sources.ImageSource`s: random access, no TensorFlow, no downloads.

``tfds:NAME[:VERSION][:SPLIT]`` is read with ``tfds.data_source``, which serves records of a
dataset prepared in ArrayRecord format from TFDS's data directory and decodes them with NumPy
and PIL. Nothing is downloaded or prepared here: an unprepared dataset is one `DataError`
saying how to prepare it.

Labels come from one pass over the records in which every feature except the label is left
undecoded (``tfds.decode.SkipDecoding``), cached as ``cache_root()/labels/tfds-<fingerprint>.npy``
so the pass happens once per dataset, split and version. The class count comes from the
label feature's metadata (``ClassLabel.num_classes``).
"""

from __future__ import annotations

import hashlib
import os
import re

import numpy as np

from jaxmodels.atomic_files import write_atomic
from jaxmodels.data import image_source as data
from jaxmodels.data.image_source import DataError

_VERSION = re.compile(r"^(\d+\.\d+\.\d+)(?::(.*))?$")
_NAME = re.compile(r"^[A-Za-z0-9_./-]+$")


def parse_tfds_spec(spec: str, split: str | None = None) -> tuple[str, str]:
    """``"tfds:NAME[:VERSION][:SPLIT]"`` → (``"NAME[:VERSION]"``, split).

    The split defaults to ``split``, else ``"train"``; it may be sliced (``train[:5000]``).

    Raises:
      DataError: not of that form.
    """
    name, _, rest = spec[len("tfds:") :].partition(":")
    version = _VERSION.match(rest)
    if version:
        name, rest = f"{name}:{version[1]}", version[2] or ""
    if not name or not _NAME.match(name.split(":")[0]):
        raise DataError(
            f"tfds data must be written tfds:NAME, tfds:NAME:SPLIT or tfds:NAME:VERSION:SPLIT "
            f"(e.g. tfds:cifar10:test); got {spec!r}"
        )
    return name, rest or split or "train"


def _data_dir_text(data_dir) -> str:
    if data_dir is not None:
        return os.fspath(data_dir)
    from tensorflow_datasets.core import constants

    return constants.DATA_DIR


def _open_data_source(tfds, spec, name, split, data_dir, decoders=None):
    """``tfds.data_source`` without downloading; every failure becomes one `DataError`."""
    try:
        return tfds.data_source(
            name, split=split, data_dir=data_dir, download=False, decoders=decoders
        )
    except tfds.core.registered.DatasetNotFoundError as err:
        raise DataError(
            f"tfds data {spec!r}: no TFDS dataset {name!r} is registered or prepared under "
            f"{_data_dir_text(data_dir)!r}; check the name (tfds.list_builders()) and data_dir"
        ) from err
    except Exception as err:  # unprepared, wrong format, unknown split: TFDS raises many kinds
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if not _is_prepared(tfds, name, data_dir):
            where = _data_dir_text(data_dir)
            base = name.split(":")[0]
            raise DataError(
                f"tfds data {spec!r} is not prepared under {where!r} (nothing is downloaded "
                f"here); prepare it once in ArrayRecord format: tfds build {base} --data_dir "
                f"{where} --file_format array_record, or in Python tfds.builder({name!r}, "
                f"data_dir={where!r}, file_format='array_record').download_and_prepare()"
            ) from err
        hint = (
            " (random access needs the ArrayRecord format: tfds build NAME --file_format "
            "array_record)"
            if isinstance(err, NotImplementedError)
            else ""
        )
        raise DataError(f"tfds data {spec!r} cannot be read: {first}{hint}") from err


def _is_prepared(tfds, name, data_dir) -> bool:
    try:
        return bool(tfds.builder(name, data_dir=data_dir).is_prepared())
    except Exception:  # the builder itself cannot be made: treat as not prepared
        return False


def _feature_keys(info, spec: str) -> tuple[str, str]:
    """(image key, label key): the supervised keys if the dataset has them, else image/label."""
    features = info.features
    keys = info.supervised_keys
    if (
        isinstance(keys, tuple)
        and len(keys) == 2
        and all(isinstance(k, str) and k in features for k in keys)
    ):
        return keys
    if "image" in features and "label" in features:
        return "image", "label"
    raise DataError(
        f"tfds data {spec!r} has no (image, label) features; its features are "
        f"{sorted(features.keys())}"
    )


class TfdsSource(data.ImageSource):
    """A TFDS split (module docstring); ``source[i]`` decodes record ``i``.

    Attributes:
      name: the TFDS name (with version if the spec gave one); split: the split string.
      data_dir: the data directory passed (None: TFDS's default).
    """

    kind = "tfds"

    def __init__(self, spec: str, *, split=None, data_dir=None, num_classes=None):
        import tensorflow_datasets as tfds  # heavy; only when a tfds spec is opened

        self.spec = spec
        self.name, self.split = parse_tfds_spec(spec, split)
        self.data_dir = None if data_dir is None else os.fspath(data_dir)
        self._source = _open_data_source(tfds, spec, self.name, self.split, self.data_dir)
        info = self._source.dataset_info
        self.image_key, self.label_key = _feature_keys(info, spec)
        image_feature = info.features[self.image_key]
        shape = getattr(image_feature, "shape", None)
        if (
            np.dtype(getattr(image_feature, "np_dtype", np.uint8)) != np.uint8
            or not shape
            or len(shape) != 3
            or shape[-1] not in (1, 3)
        ):
            raise DataError(
                f"tfds data {spec!r}: feature {self.image_key!r} must be uint8 images with 1 or "
                f"3 channels; got {image_feature!r}"
            )
        self._version = str(info.version)
        self._info_dir = os.fspath(info.data_dir)
        self._count = len(self._source)
        metadata_classes = getattr(info.features[self.label_key], "num_classes", None)
        labels = self._cached_labels(tfds)
        where = f"tfds data {spec!r}"
        self.labels, self.num_classes = data.checked_labels(
            labels, self._count, where, num_classes or metadata_classes
        )

    def _fingerprint(self) -> str:
        key = f"tfds|{self.name}|{self.split}|{self._version}|{self._info_dir}|{self._count}"
        return hashlib.sha256(key.encode()).hexdigest()

    def _cached_labels(self, tfds) -> np.ndarray:
        """Labels [N] from the cache, or one pass over the records without decoding images."""
        path = data.cache_root() / "labels" / f"tfds-{self.fingerprint[:32]}.npy"
        if path.is_file():
            labels = np.load(path, allow_pickle=False)
            if labels.shape == (self._count,):
                return labels
        labels = self._label_pass(tfds)
        # atomic: a concurrent reader sees all or nothing
        write_atomic(path, lambda tmp: np.save(tmp, labels))
        return labels

    def _label_pass(self, tfds) -> np.ndarray:
        features = self._source.dataset_info.features
        skip = {
            key: tfds.decode.SkipDecoding()
            for key, feature in features.items()
            if key != self.label_key
            and not isinstance(
                feature, tfds.features.FeaturesDict | tfds.features.Sequence | tfds.features.Dataset
            )
        }
        source = _open_data_source(
            tfds, self.spec, self.name, self.split, self.data_dir, decoders=skip
        )
        # One record at a time: parsing (not reading) dominates, ~0.5 ms a record on a laptop
        # core, and it is paid once per dataset, split and version.
        return np.fromiter(
            (source[i][self.label_key] for i in range(self._count)), np.int64, self._count
        )

    def _read_image(self, index: int) -> np.ndarray:
        return np.asarray(self._source[index][self.image_key])


def open_tfds(spec: str, *, split=None, data_dir=None, num_classes=None) -> TfdsSource:
    """Opens ``tfds:NAME[:VERSION][:SPLIT]`` (module docstring); see `jaxmodels.data.sources.open_source`."""
    return TfdsSource(spec, split=split, data_dir=data_dir, num_classes=num_classes)
