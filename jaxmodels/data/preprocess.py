"""Evaluation preprocessing for the models in ``jaxmodels``: resize, centre crop, normalise.

Each model family was trained on images prepared in one way: torchvision ResNets on
``resize(shorter side to S/0.875, bilinear) → centre crop S → (x/255 − mean)/std`` with ImageNet
mean/std; timm / big_vision ViTs on the same chain with ``crop_pct`` 0.9, bicubic and
mean = std = 0.5, i.e. scaling to [−1, 1]. A ``Preprocessing`` records those choices.

The one evaluation preprocessing, used identically by ranking, fine-tuning's evaluation and
everything after, is split where the data crosses to the device:

* on the host, `prepare_for_eval`: uint8 [H, W, 3] → resize the shorter side to ``resize_size``
  with PIL on the uint8 image (what torchvision and timm do) → centre crop → uint8 [S, S, 3];
* on the device, inside the jitted forward, `normalize`: ``(x / 255 − mean) / std``.

Prepared images are therefore uint8 [N, S, S, 3] everywhere (4× less host→device traffic than
float32). `preprocess_for_eval` is the two chained on the host, for callers that want floats.

Shapes: images are ``[..., H, W, 3]`` (NHWC or a single HWC image), values in [0, 255].
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# mean = std = 0.5 maps [0, 1] to [-1, 1]: the big_vision / timm-augreg ViT convention.
UNIT_RANGE_MEAN = (0.5, 0.5, 0.5)
UNIT_RANGE_STD = (0.5, 0.5, 0.5)
INTERPOLATIONS = ("bilinear", "bicubic")


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How evaluation images must be prepared for one model.

    Attributes:
      image_size: side S of the square the model consumes (the centre crop).
      resize_size: the shorter image side is resized to this before cropping (≥ image_size).
      mean: per-channel mean in [0, 1] units subtracted after dividing by 255.
      std: per-channel standard deviation in [0, 1] units.
      interpolation: ``'bilinear'`` or ``'bicubic'``, with antialiasing on downscale (like PIL).
    """

    image_size: int
    resize_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str

    def __post_init__(self):
        if self.image_size <= 0 or self.resize_size < self.image_size:
            raise ValueError(
                f"need 0 < image_size <= resize_size; got image_size={self.image_size}, "
                f"resize_size={self.resize_size}"
            )
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"interpolation must be one of {INTERPOLATIONS}; got {self.interpolation!r}"
            )
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean and std need 3 entries, std > 0; got {self.mean}, {self.std}")

    @classmethod
    def from_crop_pct(cls, image_size, crop_pct, mean, std, interpolation) -> Preprocessing:
        """Resize size ``floor(image_size / crop_pct)`` (timm's rule; 224/0.875 = 256)."""
        return cls(image_size, math.floor(image_size / crop_pct), mean, std, interpolation)


def _xp(images):
    return jnp if isinstance(images, jax.Array) else np


def normalize(images, prep: Preprocessing):
    """``(images / 255 − mean) / std`` in float32.

    Args:
      images: [..., 3] uint8 or float in [0, 255]; NumPy or JAX.
      prep: the model's preprocessing.

    Returns:
      float32 array of the same shape and array type (NumPy in, NumPy out).
    """
    xp = _xp(images)
    if images.shape[-1] != 3:
        raise ValueError(f"images must have 3 channels last; got shape {images.shape}")
    x = xp.asarray(images, dtype=xp.float32) / 255.0
    channels = (1,) * (x.ndim - 1) + (3,)  # explicit ranks: no implicit rank promotion
    mean = xp.asarray(prep.mean, dtype=xp.float32).reshape(channels)
    std = xp.asarray(prep.std, dtype=xp.float32).reshape(channels)
    return (x - mean) / std


def center_crop(images, size: int):
    """The central ``size × size`` window of ``[..., H, W, C]`` images (torchvision's rounding)."""
    height, width = images.shape[-3], images.shape[-2]
    if height < size or width < size:
        raise ValueError(f"images of {height}×{width} are smaller than the crop size {size}")
    top = round((height - size) / 2.0)
    left = round((width - size) / 2.0)
    return images[..., top : top + size, left : left + size, :]


def resize_shorter_side(images, size: int, interpolation: str = "bilinear"):
    """Resizes ``[..., H, W, C]`` images so the shorter side is ``size``, keeping aspect ratio.

    NumPy input is resized on the host with PIL (exactly what torchvision/timm use; uint8 stays
    uint8, other dtypes go through float32); JAX input with ``jax.image.resize`` (antialiased), which
    agrees with PIL up to rounding.
    """
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}; got {interpolation!r}")
    height, width = images.shape[-3], images.shape[-2]
    if height <= width:
        new_h, new_w = size, int(size * width / height)
    else:
        new_h, new_w = int(size * height / width), size
    if (new_h, new_w) == (height, width):
        return images
    if isinstance(images, jax.Array):
        shape = (*images.shape[:-3], new_h, new_w, images.shape[-1])
        out = jax.image.resize(images.astype(jnp.float32), shape, interpolation, antialias=True)
        if images.dtype == jnp.uint8:
            out = jnp.clip(jnp.round(out), 0, 255).astype(jnp.uint8)
        return out
    return _resize_pil(np.asarray(images), new_h, new_w, interpolation)


def _resize_pil(images: np.ndarray, new_h: int, new_w: int, interpolation: str) -> np.ndarray:
    from PIL import Image  # pillow comes with matplotlib; imported lazily, only the host needs it

    resample = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}[
        interpolation
    ]
    lead = images.shape[:-3]
    flat = images.reshape(-1, *images.shape[-3:])
    out = []
    for image in flat:
        if image.dtype == np.uint8:
            out.append(np.asarray(Image.fromarray(image).resize((new_w, new_h), resample)))
        else:  # PIL resizes float images one 'F'-mode channel at a time
            channels = [
                np.asarray(
                    Image.fromarray(image[..., c].astype(np.float32)).resize(
                        (new_w, new_h), resample
                    )
                )
                for c in range(image.shape[-1])
            ]
            out.append(np.stack(channels, axis=-1))
    return np.stack(out).reshape(*lead, new_h, new_w, images.shape[-1])


def prepare_for_eval(image_HW3, prep: Preprocessing) -> np.ndarray:
    """The host half of evaluation preprocessing: resize the shorter side, centre-crop.

    The shorter side is resized to ``prep.resize_size`` with PIL on the uint8 image (the
    model's interpolation, antialiased), then the central ``image_size`` square is cut out.
    Normalisation happens on the device (`normalize`, inside the jitted forward).

    Args:
      image_HW3: one image, NumPy uint8 [H, W, 3].
      prep: the model's preprocessing (``jaxmodels.spec(name).preprocessing``).

    Returns:
      uint8 [image_size, image_size, 3], C-contiguous.

    Raises:
      TypeError: not a NumPy uint8 array.
      ValueError: not of shape [H, W, 3].
    """
    if not isinstance(image_HW3, np.ndarray) or image_HW3.dtype != np.uint8:
        got = getattr(image_HW3, "dtype", type(image_HW3).__name__)
        raise TypeError(f"image_HW3 must be a NumPy uint8 array [H, W, 3]; got {got}")
    if image_HW3.ndim != 3 or image_HW3.shape[-1] != 3:
        raise ValueError(f"image_HW3 must have shape [H, W, 3]; got {image_HW3.shape}")
    resized = resize_shorter_side(image_HW3, prep.resize_size, prep.interpolation)
    return np.ascontiguousarray(center_crop(resized, prep.image_size))


def preprocess_for_eval(images, prep: Preprocessing) -> np.ndarray:
    """``normalize(prepare_for_eval(image))`` on the host, for one image or a batch.

    Args:
      images: NumPy [..., H, W, 3] uint8 (a float copy of uint8 pixels — whole numbers in
        [0, 255] — is accepted and converted exactly). Variable-size images are passed one at
        a time.
      prep: the model's preprocessing.

    Returns:
      float32 [..., image_size, image_size, 3].

    Raises:
      TypeError: a JAX array (normalise prepared uint8 images on the device with `normalize`
        instead), or pixels that are not uint8 values.
      ValueError: not [..., H, W, 3].
    """
    if isinstance(images, jax.Array) or not isinstance(images, np.ndarray):
        raise TypeError(
            "images must be a NumPy array (host); on the device, normalize uint8 images from "
            f"prepare_for_eval with preprocess.normalize; got {type(images).__name__}"
        )
    if images.dtype != np.uint8:
        exact = np.issubdtype(images.dtype, np.number) and np.array_equal(
            images, np.clip(np.rint(images), 0, 255)
        )
        if not exact:
            raise TypeError(
                f"images must be uint8 pixels (or whole numbers in [0, 255]); got {images.dtype}"
                " values outside that"
            )
        images = images.astype(np.uint8)
    if images.ndim < 3 or images.shape[-1] != 3:
        raise ValueError(f"images must have shape [..., H, W, 3]; got {images.shape}")
    flat = images.reshape(-1, *images.shape[-3:])
    out = np.stack([normalize(prepare_for_eval(image, prep), prep) for image in flat])
    return out.reshape(*images.shape[:-3], *out.shape[1:])
