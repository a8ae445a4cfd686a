"""Inference in a lower-precision compute dtype (e.g. bfloat16), the same way on every path.

`check` refuses a non-floating dtype in one line; `apply_to_model` clones a model that has a
`dtype` field to compute in it; `cast_floating` casts the floating leaves of variables (integer
leaves such as step counters are kept); `key` names the dtype in compile-cache keys. Outputs
stay float32 (`jaxmodels.inference.evaluate.normalized_forward`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


def check(dtype) -> None:
    """Raises ValueError unless `dtype` is None (the model's own) or a floating dtype."""
    if dtype is None:
        return
    try:
        ok = jnp.issubdtype(np.dtype(dtype), jnp.floating)
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"dtype must be a floating dtype such as jnp.bfloat16; got {dtype!r}")


def key(dtype) -> str | None:
    """A hashable name of `dtype` for compile-cache keys."""
    return None if dtype is None else np.dtype(dtype).name


def apply_to_model(model, dtype):
    """The model computing in `dtype`: cloned when it has a `dtype` field, else unchanged."""
    if dtype is None or not hasattr(model, "dtype") or not hasattr(model, "clone"):
        return model
    return model.clone(dtype=dtype)


def cast_floating(tree: PyTree, dtype) -> PyTree:
    """Casts floating leaves to `dtype` (integer leaves, e.g. step counters, are kept)."""
    if dtype is None:
        return tree

    def cast(x):
        return x.astype(dtype) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x

    return jax.tree.map(cast, tree)
