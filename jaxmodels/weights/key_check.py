"""Whether a checkpoint fits a model: every key known, present and of the model's shape.

`jaxmodels.weights.checkpoint_io.load` reads a checkpoint into flat ``{key: array}`` form and
calls `check_against_model` before any weight is placed, so a checkpoint that does not fit fails
with every offending key named, and nothing is silently left at its random initialisation.
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp

from jaxmodels import jit_cache
from jaxmodels.models import paths

# Keys listed per kind of problem; the rest are counted.
MAX_LISTED = 12


def expected_shapes(model) -> dict[str, tuple[int, ...]]:
    """``{flat key: shape}`` of `model`'s variables, traced once per architecture (memoised in
    `jit_cache` with the compiled initialisers): a soup loads one architecture many times, and
    tracing `init` takes a second or more for a ViT-B."""
    return dict(jit_cache.cached(("variable_shapes", model), lambda: _trace_shapes(model)))


def _trace_shapes(model) -> dict[str, tuple[int, ...]]:
    size = getattr(model, "image_size", 32)
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))
    return {k: tuple(v.shape) for k, v in paths.flatten(flax.core.unfreeze(abstract)).items()}


def check_against_model(model, flat, sources, unknown, path, head_optional=None) -> None:
    """Raises ValueError naming unknown, missing and mis-shaped keys (all of them).

    Args:
      model: the module the checkpoint should fill.
      flat: the checkpoint as ``{model key: array}``, after its format's renaming.
      sources: ``{model key: checkpoint key}``, to name entries as the checkpoint does.
      unknown: checkpoint keys the format's renaming could not place at all.
      path: the checkpoint, for the message.
      head_optional: a key prefix (the head of a headless checkpoint) not reported as missing.
    """
    expected = expected_shapes(model)
    missing = sorted(
        k
        for k in set(expected) - set(flat)
        if head_optional is None or not k.startswith(head_optional)
    )
    unexpected = sorted(
        f"{sources[k]} (→ {k})" if sources[k] != k else k for k in set(flat) - set(expected)
    )
    misshaped = sorted(
        f"{sources[k]}: checkpoint {tuple(flat[k].shape)} → {k} expects {expected[k]}"
        for k in set(flat) & set(expected)
        if tuple(flat[k].shape) != expected[k]
    )
    problems = []
    for title, items in (
        ("unknown keys", sorted(unknown) + unexpected),
        ("missing keys", missing),
        ("mis-shaped keys", misshaped),
    ):
        if items:
            listed = ", ".join(items[:MAX_LISTED])
            more = f" and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
            problems.append(f"{len(items)} {title}: {listed}{more}")
    if problems:
        raise ValueError(
            f"checkpoint {str(path)!r} does not fit {model.__class__.__name__}"
            f"({describe(model)}): " + "; ".join(problems)
        )


def describe(model) -> str:
    fields = (
        "num_classes",
        "stage_sizes",
        "block",
        "width",
        "image_size",
        "patch_size",
        "depth",
        "num_heads",
        "mlp_dim",
    )
    return ", ".join(f"{f}={getattr(model, f)!r}" for f in fields if hasattr(model, f))
