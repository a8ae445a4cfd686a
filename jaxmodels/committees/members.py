"""Committee members: what a member is, how its images reach it, how it runs on the device.

Shared by `jaxmodels.committees.executors.Ensemble` and `Cascade`. A `Member` is an apply
function (any jittable function, or a Flax module's logits) with its variables, forward cost and
preprocessing. Images come as one host array [N, H, W, 3] for all
members or one per member; uint8 images travel to the device as they are (a quarter of the
bytes of float32) and are normalised there, inside the jitted step.

Shapes: N images, B rows of one device batch, K classes, H, W image side.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxmodels.data.preprocess import Preprocessing
from jaxmodels.inference import evaluate as inference

PyTree = Any


@dataclasses.dataclass(frozen=True)
class ModuleLogits:
    """A Flax Linen module's logits as an apply function: ``module.apply(v, x, train=False)``.

    Hashable and equal by module, so members of one architecture share compiled steps.
    """

    module: Any

    def __call__(self, variables, images_BHWC):
        return self.module.apply(variables, images_BHWC, train=False)


@dataclasses.dataclass(frozen=True, eq=False)
class Member:
    """One model of a committee: an apply function, its variables, preprocessing and cost.

    Attributes:
      apply_fn: ``apply_fn(variables, images_BHWC) -> logits_BK``, any jittable function (a
        user's own module joins a committee through its apply). A Flax Linen module is taken
        as its logits, ``module.apply(variables, x, train=False)`` (`ModuleLogits`). Members
        with equal apply functions and variable shapes run stacked in an `Ensemble`.
      variables: its variables, e.g. ``{'params': ..., 'batch_stats': ...}``.
      flops: forward cost per image, e.g. ``jaxmodels.spec(name, ...).flops_per_image``; the
        executors order and report by it, `jaxmodels.committees.deploy` measures time.
      preprocessing: how its images are normalised; required when images are uint8.
      name: a short label for reports.
    """

    apply_fn: Callable
    variables: PyTree
    flops: float
    preprocessing: Preprocessing | None = None
    name: str = ""

    def __post_init__(self):
        if isinstance(self.apply_fn, nn.Module):
            object.__setattr__(self, "apply_fn", ModuleLogits(self.apply_fn))
        if not callable(self.apply_fn):
            raise TypeError(
                "apply_fn must be a function (variables, images) -> logits or a Flax module; "
                f"got {type(self.apply_fn).__name__}"
            )
        if isinstance(self.flops, bool) or not isinstance(self.flops, int | float | np.number):
            raise TypeError(f"flops must be a number; got {type(self.flops).__name__}")
        if not math.isfinite(self.flops) or self.flops <= 0:
            raise ValueError(f"flops must be positive and finite; got {self.flops}")
        if self.preprocessing is not None and not isinstance(self.preprocessing, Preprocessing):
            raise TypeError(
                "preprocessing must be a jaxmodels.Preprocessing or None; got "
                f"{type(self.preprocessing).__name__}"
            )
        if not isinstance(self.name, str):
            raise TypeError(f"name must be a str; got {type(self.name).__name__}")


# ----------------------------------------------------------------------------- checks


def check_members(members) -> tuple[Member, ...]:
    """A non-empty sequence of `Member` as a tuple; TypeError / ValueError otherwise."""
    if isinstance(members, Member) or not isinstance(members, Sequence):
        raise TypeError(f"members must be a sequence of Member; got {type(members).__name__}")
    if not members:
        raise ValueError("members must not be empty")
    for i, member in enumerate(members):
        if not isinstance(member, Member):
            raise TypeError(f"members[{i}] must be a Member; got {type(member).__name__}")
    return tuple(members)


def member_inputs(images, members: tuple[Member, ...]) -> list[np.ndarray]:
    """One host array [N, H, W, 3] per member (the same object where images are shared).

    Raises:
      TypeError: not an array or a sequence of arrays; a dtype other than uint8 or floating.
      ValueError: a sequence of the wrong length, wrong shapes, different N, uint8 images for a
        member without preprocessing.
    """
    if isinstance(images, np.ndarray | jax.Array):
        arrays = [images] * len(members)
    elif isinstance(images, Sequence) and not isinstance(images, str | bytes):
        if len(images) != len(members):
            raise ValueError(
                f"images must be one array for all members or one per member ({len(members)}); "
                f"got a sequence of {len(images)}"
            )
        arrays = list(images)
    else:
        raise TypeError(
            "images must be an array [N, H, W, 3] or a sequence of such arrays, one per member; "
            f"got {type(images).__name__}"
        )
    host: dict[int, np.ndarray] = {}  # converted once per distinct array object
    result = []
    for i, (x, member) in enumerate(zip(arrays, members, strict=True)):
        if id(x) not in host:
            if not isinstance(x, np.ndarray | jax.Array):
                raise TypeError(f"images[{i}] must be an array; got {type(x).__name__}")
            host[id(x)] = np.asarray(x)
        x = host[id(x)]
        if x.ndim != 4 or x.shape[-1] != 3 or x.shape[0] == 0:
            raise ValueError(f"images for member {i} must be [N>0, H, W, 3]; got {x.shape}")
        if result and x.shape[0] != result[0].shape[0]:
            raise ValueError(
                f"every member's images must have the same N; member 0 has "
                f"{result[0].shape[0]}, member {i} has {x.shape[0]}"
            )
        if x.dtype == np.uint8:
            if member.preprocessing is None:
                raise ValueError(
                    f"member {i} ({member.name or 'unnamed'}) gets uint8 images but has no "
                    "preprocessing to normalise them; pass Member(preprocessing=...) or floats"
                )
        elif not np.issubdtype(x.dtype, np.floating):
            raise TypeError(f"images for member {i} must be uint8 or floating; got {x.dtype}")
        result.append(x)
    return result


def check_finite(logits: np.ndarray, what: str) -> np.ndarray:
    """`logits` unchanged if finite; ValueError naming `what` otherwise (never NaN silently)."""
    if not np.isfinite(logits).all():
        raise ValueError(f"{what} produced non-finite logits (NaN or inf)")
    return logits


# ----------------------------------------------------------------------------- device steps


def forward(apply_fn, preprocessing, variables, images_BHWC) -> jax.Array:
    """logits_BK float32 of one member; uint8 images are normalised here, on the device (the
    normalisation every inference path uses, `jaxmodels.inference.evaluate.normalized_forward`)."""
    return inference.normalized_forward(apply_fn, preprocessing)(variables, images_BHWC)


def stacking_signature(member: Member):
    """What members must share to be stacked under one vmap."""
    leaves, treedef = jax.tree.flatten(member.variables)
    shapes = tuple((np.shape(x), jnp.result_type(x)) for x in leaves)
    return member.apply_fn, treedef, shapes, member.preprocessing
