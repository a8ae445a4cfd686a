"""Labelled images held in arrays: in memory (`ArraySource`) or in a ``.npz`` file (`open_npz`).

Rules (the ``.npz`` form of `jaxmodels.data.sources.open_source`):

* ``images`` [N, H, W] (grey, as MNIST-style arrays come), [N, H, W, 1] or [N, H, W, 3];
  ``labels`` [N] of any integer dtype, all ≥ 0 (`jaxmodels.data.sources.checked_labels`).
* uint8 images are used as they are. Other images say their value range ``(lo, hi)``: an array
  ``value_range`` in the file (``np.savez(path, images=x, labels=y, value_range=[0, 1])``) or
  the ``value_range=`` argument; pixels become ``rint((x − lo) / (hi − lo) · 255)`` (round half
  to even) and a value outside ``[lo, hi]`` is an error, not clipped. Float images in [0, 1] are
  the common case (``value_range=[0, 1]``); a float array whose range is not said is an error,
  because [0, 1] pixels read as [0, 255] are silently near-black. The one implicit conversion:
  integer images of another dtype whose values all lie in [0, 255] are cast to uint8 exactly.
* NaN or infinite pixels, a wrong rank or channel count, and labels breaking the rules are each
  one `DataError` when the data is opened, before any model runs.

Images are converted to uint8 [N, H, W, C] once, at open (grey stays one channel in memory and
is repeated to RGB when read).
"""

from __future__ import annotations

import hashlib
import os
import pathlib

import numpy as np

from jaxmodels.data.image_source import DataError, ImageSource, checked_labels

_CHECK_ROWS = 1024  # rows per chunk when checking/converting big image arrays (bounds memory)


def _parse_value_range(value_range, where: str) -> tuple[float, float] | None:
    if value_range is None:
        return None
    bounds = np.asarray(value_range, dtype=np.float64).reshape(-1)
    if bounds.shape != (2,) or not np.all(np.isfinite(bounds)) or not bounds[0] < bounds[1]:
        raise DataError(
            f"{where}: value_range must be two finite numbers lo < hi, e.g. [0, 1] or [0, 255]; "
            f"got {value_range!r}"
        )
    return float(bounds[0]), float(bounds[1])


def _images_as_uint8(images: np.ndarray, value_range, where: str) -> np.ndarray:
    """Checks images [N, H, W(, C)] and returns them as uint8 [N, H, W, C] (module rules)."""
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise DataError(
            f"{where}: images must be [N, H, W] (grey), [N, H, W, 1] or [N, H, W, 3]; got "
            f"shape {images.shape}"
        )
    if images.dtype == np.bool_ or not (
        np.issubdtype(images.dtype, np.integer) or np.issubdtype(images.dtype, np.floating)
    ):
        raise DataError(f"{where}: images must be uint8, integers or floats; got {images.dtype}")
    if images.dtype == np.uint8:
        if value_range not in (None, (0.0, 255.0)):
            raise DataError(
                f"{where}: uint8 images always span [0, 255]; value_range={list(value_range)} "
                "contradicts that (drop it)"
            )
        return images
    is_float = np.issubdtype(images.dtype, np.floating)
    out = np.empty(images.shape, np.uint8)
    lowest, highest = np.inf, -np.inf
    for start in range(0, images.shape[0], _CHECK_ROWS):
        chunk = images[start : start + _CHECK_ROWS]
        if is_float and not np.all(np.isfinite(chunk)):
            bad = int(np.count_nonzero(~np.isfinite(images)))
            raise DataError(f"{where}: images hold {bad} NaN or infinite values; fix the data")
        lowest = min(lowest, float(chunk.min()))
        highest = max(highest, float(chunk.max()))
        if value_range is not None:
            lo, hi = value_range
            scaled = (chunk.astype(np.float64) - lo) * (255.0 / (hi - lo))
            out[start : start + _CHECK_ROWS] = np.clip(np.rint(scaled), 0, 255)
        elif not is_float:
            out[start : start + _CHECK_ROWS] = np.clip(chunk, 0, 255)
    if value_range is not None:
        lo, hi = value_range
        if lowest < lo or highest > hi:
            raise DataError(
                f"{where}: images lie in [{lowest:g}, {highest:g}], outside the stated "
                f"value_range [{lo:g}, {hi:g}]; state the range they use or clip them"
            )
        return out
    hint = (
        "save an array value_range=[0, 1] or [0, 255] beside images in the .npz "
        "(np.savez(path, images=..., labels=..., value_range=[0, 1])) or pass value_range=, "
        "or save uint8 images"
    )
    if is_float:
        raise DataError(
            f"{where}: float images must say their value range (values here lie in "
            f"[{lowest:g}, {highest:g}]); {hint}"
        )
    if lowest < 0 or highest > 255:
        raise DataError(
            f"{where}: {images.dtype} images lie in [{lowest:g}, {highest:g}], outside [0, 255]; "
            f"{hint}"
        )
    return out  # integers within [0, 255]: the exact cast


class ArraySource(ImageSource):
    """Images and labels held in memory (also what a ``.npz`` spec opens to).

    Args:
      images: [N, H, W], [N, H, W, 1] or [N, H, W, 3]; uint8, or another dtype whose
        ``value_range`` is stated (module docstring). Converted to uint8 once, here.
      labels: [N] integers ≥ 0.
      num_classes: class count (default ``max(label) + 1``).
      value_range: ``(lo, hi)`` of non-uint8 images.
      name: what to call the data in messages and ``spec``.

    Raises:
      DataError: the data breaks a rule of the module docstring.
    """

    kind = "arrays"

    def __init__(self, images, labels, *, num_classes=None, value_range=None, name="arrays"):
        where = f"data {name!r}"
        images = np.asarray(images)
        # The labels are checked first, so a label array of the wrong length is blamed on the
        # labels, not on the images.
        num_images = images.shape[0] if images.ndim else 0
        self.labels, self.num_classes = checked_labels(labels, num_images, where, num_classes)
        self.value_range = _parse_value_range(value_range, where)
        self.images = _images_as_uint8(images, self.value_range, where)  # [N, H, W, C] uint8
        self.spec = str(name)
        self._file: pathlib.Path | None = None

    def _read_image(self, index: int) -> np.ndarray:
        return self.images[index]

    def _fingerprint(self) -> str:
        digest = hashlib.sha256()
        if self._file is not None:  # the file's bytes identify it (cheaper than the pixels)
            digest.update(b"npz|" + _file_digest(self._file).encode())
            digest.update(f"|value_range={self.value_range}".encode())
        else:
            digest.update(f"arrays|{self.images.shape}|".encode())
            digest.update(np.ascontiguousarray(self.images).data)
        digest.update(self.labels.astype("<i8").tobytes())
        return digest.hexdigest()


def _file_digest(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def open_npz(path, *, num_classes=None, value_range=None) -> ArraySource:
    """Opens a ``.npz`` of ``images`` and ``labels`` (optionally ``value_range``).

    Raises:
      DataError: unreadable file, missing arrays, contradicting value ranges, or data breaking
        the rules of the module docstring.
    """
    spec = os.fspath(path)
    where = f"data {spec!r}"
    try:
        with np.load(spec, allow_pickle=False) as data:
            missing = [k for k in ("images", "labels") if k not in data.files]
            if missing:
                raise DataError(
                    f"{where} lacks the array{'s' if len(missing) > 1 else ''} "
                    f"{' and '.join(missing)}; it holds {sorted(data.files)} (save "
                    "np.savez(path, images=..., labels=...))"
                )
            images, labels = data["images"], data["labels"]
            stored_range = data["value_range"] if "value_range" in data.files else None
    except DataError:
        raise
    except Exception as err:  # a corrupt or non-npz file: NumPy raises many kinds
        raise DataError(f"{where} is not a readable .npz file ({type(err).__name__})") from err
    stored = _parse_value_range(stored_range, where)
    given = _parse_value_range(value_range, where)
    if stored is not None and given is not None and stored != given:
        raise DataError(
            f"{where} says value_range={list(stored)} but value_range={list(given)} was passed; "
            "drop one"
        )
    source = ArraySource(
        images, labels, num_classes=num_classes, value_range=given or stored, name=spec
    )
    source.kind = "npz"
    source._file = pathlib.Path(spec)
    return source
