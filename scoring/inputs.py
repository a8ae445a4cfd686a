"""Boundary checks shared by the transferability scores.

Every public score validates its inputs here, before any heavy work, and raises a `ValueError` or
`TypeError` that names the argument, what was expected and what came. Inside `jax.jit` the inputs are
abstract: shapes and dtypes are still checked, values (finiteness, label sets) cannot be and are not.
"""

import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


def is_traced(x) -> bool:
    """True when `x` is an abstract value inside a jax transformation (its values are unknown)."""
    return isinstance(x, jax.core.Tracer)


def compute_dtype(dtype) -> jnp.dtype:
    """The float dtype scores compute in: float64 for float64 input (when x64 is on), else float32.

    Half precision and integer inputs are promoted to float32: eigendecompositions and log-evidences
    are not meaningful in bfloat16.
    """
    if jnp.dtype(dtype) == jnp.float64 and jax.config.jax_enable_x64:
        return jnp.dtype(jnp.float64)
    return jnp.dtype(jnp.float32)


def _as_array(x, name: str):
    if is_traced(x) or isinstance(x, jax.Array | np.ndarray):
        return x
    if isinstance(x, list | tuple) or np.isscalar(x):
        return np.asarray(x)
    raise TypeError(f"{name} must be an array (NumPy or JAX); got {type(x).__name__}")


# The checks below read values where they lie: NumPy input on the host, a JAX array by one jitted
# program. Dispatched op by op, JAX compiles a program per op and new shape (isfinite, all, a
# dtype conversion: ~0.1 s together, per score call on features of a new shape), for checks
# that take microseconds.


@jax.jit
def _count_nonfinite(x) -> jax.Array:
    return jnp.count_nonzero(~jnp.isfinite(x))


@jax.jit
def _min_and_max(x) -> tuple[jax.Array, jax.Array]:
    return jnp.min(x), jnp.max(x)


def _check_finite(x, name: str) -> None:
    if is_traced(x):
        return
    bad = np.count_nonzero(~np.isfinite(x)) if isinstance(x, np.ndarray) else _count_nonfinite(x)
    if bad:
        raise ValueError(f"{name} must be finite; found {int(bad)} NaN or infinite values")


@jax.jit
def _some_column_varies(feats_ND) -> jax.Array:
    return jnp.any(jnp.ptp(feats_ND, axis=0) > 0)


def check_not_constant(feats_ND) -> None:
    """Raises ValueError when every column of [N, D] features is constant (eager calls only):
    the scores built on class covariances are undefined there."""
    if not is_traced(feats_ND) and not _some_column_varies(feats_ND):
        raise ValueError("features must not be constant: every column has zero variance")


def _as_jax_array(x, dtype) -> jax.Array:
    """`x` as a JAX array of `dtype`; NumPy input is converted on the host, then put."""
    if isinstance(x, np.ndarray):
        return jax.device_put(np.asarray(x, dtype))
    return jnp.asarray(x, dtype)


def check_features(features, name: str = "features", min_samples: int = 2) -> jax.Array:
    """Checks a feature matrix and returns it as a JAX array in its compute dtype.

    Args:
        features: [N, D] real array, N ≥ 2 samples and D ≥ 1 dimensions, all finite.
        name: the argument's name, for error messages.
        min_samples: the smallest N accepted.

    Returns:
        [N, D] array of dtype `compute_dtype(features.dtype)`.

    Raises:
        TypeError: not an array, or not of a real numeric dtype.
        ValueError: wrong rank, N < 2, D == 0, or NaN/inf values.
    """
    features = _as_array(features, name)
    if not (
        jnp.issubdtype(features.dtype, jnp.floating) or jnp.issubdtype(features.dtype, jnp.integer)
    ):
        raise TypeError(f"{name} must be a real-valued array; got dtype {features.dtype}")
    if features.ndim != 2:
        raise ValueError(f"{name} must have shape [N, D]; got shape {tuple(features.shape)}")
    n, d = features.shape
    if n < min_samples:
        raise ValueError(f"{name} needs at least {min_samples} samples (rows); got N={n}")
    if d == 0:
        raise ValueError(f"{name} needs at least 1 dimension (column); got D=0")
    _check_finite(features, name)
    return _as_jax_array(features, compute_dtype(features.dtype))


class Labels(NamedTuple):
    """Class labels mapped to contiguous indices.

    Attributes:
        index: [N] int32 class index of each sample, in [0, num_classes).
        classes: [C] the original label value of each index (sorted), or None when unknown (traced input).
        num_classes: C.
    """

    index: jax.Array
    classes: np.ndarray | None
    num_classes: int


class LabelWarning(UserWarning):
    """Labels that are not 0..C−1 with every class present: each distinct value became a class."""


def _class_counts_text(classes: np.ndarray, counts: np.ndarray, limit: int = 12) -> str:
    """'{label: count, ...}', the rarest first when there are more than `limit` classes."""
    pairs = list(zip(classes.tolist(), counts.tolist(), strict=True))
    if len(pairs) > limit:
        rarest = sorted(pairs, key=lambda p: p[1])[:limit]
        return "{" + ", ".join(f"{c}: {n}" for c, n in rarest) + f", ... ({len(pairs)} classes)}}"
    return "{" + ", ".join(f"{c}: {n}" for c, n in pairs) + "}"


def check_labels(
    labels,
    num_samples: int,
    *,
    num_classes: int | None = None,
    name: str = "labels",
    expect_range: bool = True,
) -> Labels:
    """Checks integer class labels and maps them to contiguous indices.

    Args:
        labels: [N] integer labels. Without `num_classes` the classes are the sorted distinct values
          present; they should be 0..C−1 with every class present. Any other set (e.g. a stray 99
          among 0–4, a −1 for "unlabelled", or 1-based labels) is still scored with one class per
          distinct value ({3, 7, 9} → indices {0, 1, 2}), after a `LabelWarning` that lists the
          class counts: a stray value silently becoming a class of its own can move a score a lot.
        num_samples: N, the number of feature rows the labels must match.
        num_classes: if given, labels must lie in [0, num_classes) and all `num_classes` classes are
          used (absent ones are empty). Required inside `jax.jit`, where the distinct values cannot
          be read.
        name: the argument's name, for error messages.
        expect_range: warn about labels that are not 0..C−1 (False for labels such as a source
          model's argmax classes, where gaps are normal).

    Returns:
        `Labels` with the class index per sample.

    Raises:
        TypeError: labels are not integers.
        ValueError: wrong shape or length, fewer than 2 classes, labels outside [0, num_classes).

    Warns:
        LabelWarning: without `num_classes`, labels that are not exactly 0..C−1.
    """
    labels = _as_array(labels, name)
    if not (jnp.issubdtype(labels.dtype, jnp.integer) or labels.dtype == bool):
        raise TypeError(
            f"{name} must be integer class labels [N]; got dtype {labels.dtype}. For real-valued or "
            "multi-label targets pass regression=True; for float-coded classes cast with .astype(int)"
        )
    if labels.ndim != 1:
        raise ValueError(f"{name} must have shape [N]; got shape {tuple(labels.shape)}")
    if labels.shape[0] != num_samples:
        raise ValueError(
            f"{name} has {labels.shape[0]} entries but features have N={num_samples} rows"
        )
    if num_classes is not None:
        if not isinstance(num_classes, int | np.integer) or num_classes < 2:
            raise ValueError(f"num_classes must be an int ≥ 2; got {num_classes!r}")
        if not is_traced(labels):
            lo, hi = (
                (labels.min(), labels.max())
                if isinstance(labels, np.ndarray)
                else _min_and_max(labels)
            )
            if lo < 0 or hi >= num_classes:
                raise ValueError(
                    f"{name} must lie in [0, num_classes={num_classes}); found values in "
                    f"[{int(lo)}, {int(hi)}]"
                )
            classes = np.arange(num_classes)
        else:
            classes = None
        return Labels(_as_jax_array(labels, jnp.int32), classes, int(num_classes))
    if is_traced(labels):
        raise ValueError(
            f"{name} is abstract (inside jax.jit), so its class set cannot be read: pass num_classes "
            "(as a static argument) with labels in [0, num_classes)"
        )
    classes, index, counts = np.unique(np.asarray(labels), return_inverse=True, return_counts=True)
    if classes.size < 2:
        raise ValueError(f"{name} must contain at least 2 classes; found {classes.size}")
    if expect_range and not (classes[0] == 0 and classes[-1] == classes.size - 1):
        warnings.warn(
            f"{name} are not the classes 0..C−1 with every class present: found {classes.size} "
            f"distinct values with counts {_class_counts_text(classes, counts)}; each value is "
            "scored as a class of its own. Remap them to 0..C−1 (or pass num_classes) if that "
            "is what you meant.",
            LabelWarning,
            stacklevel=3,
        )
    return Labels(_as_jax_array(index.reshape(-1), jnp.int32), classes, int(classes.size))


def check_targets(targets, num_samples: int, dtype, name: str = "targets") -> jax.Array:
    """Checks real-valued regression (or multi-label 0/1) targets.

    Args:
        targets: [N] or [N, C] real targets, finite.
        num_samples: N, the number of feature rows the targets must match.
        dtype: the compute dtype to cast to.
        name: the argument's name, for error messages.

    Returns:
        [N, C] array of `dtype` (a [N] input becomes [N, 1]).

    Raises:
        TypeError: not a numeric array.
        ValueError: wrong shape or length, C == 0, or NaN/inf values.
    """
    targets = _as_array(targets, name)
    if not (jnp.issubdtype(targets.dtype, jnp.number) or targets.dtype == bool):
        raise TypeError(f"{name} must be a numeric array; got dtype {targets.dtype}")
    if targets.ndim not in (1, 2):
        raise ValueError(f"{name} must have shape [N] or [N, C]; got shape {tuple(targets.shape)}")
    if targets.shape[0] != num_samples:
        raise ValueError(
            f"{name} has {targets.shape[0]} rows but features have N={num_samples} rows"
        )
    if targets.ndim == 2 and targets.shape[1] == 0:
        raise ValueError(f"{name} must have at least one column; got shape {tuple(targets.shape)}")
    _check_finite(targets, name)
    targets = _as_jax_array(targets, dtype)
    return targets[:, None] if targets.ndim == 1 else targets
