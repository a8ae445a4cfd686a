"""Ingredients of a soup or merge: reading them, checking that they can be combined.

An *ingredient* is a variables pytree (e.g. ``{'params': ..., 'batch_stats': ...}``) or a
zero-argument callable that returns one (a lazy loader such as
``lambda: jaxmodels.load(name, path)[1]``), so that streaming methods read one model at a time.

Rules shared by every method of ``training.soups.averaging`` and ``training.soups.merges`` (``TreeLayout``):
  * every ingredient has the structure, leaf shapes and leaf dtypes of the first one; otherwise a
    ``ValueError`` names the first path where they differ;
  * floating leaves are combined in float32 and cast back to their own dtype at the end;
  * integer and boolean leaves (step counters, masks) are not averaged: they are copied from the
    first ingredient and must be equal in all of them (``ValueError`` naming the path if not).

``check_ingredients`` checks what run folders record about the ingredients: one architecture, one
base checkpoint, and — what makes weight averaging work — one starting point. Model soups average
models fine-tuned from one initialisation, head included (Wortsman et al. fine-tune every
ingredient from one linear-probe solution: LP-FT, Kumar et al.); ingredients that started apart
rarely share a loss basin, and their average can be worse than each of them.

References:
  Wortsman, Ilharco, Gadre, et al. "Model soups: averaging weights of multiple fine-tuned models
  improves accuracy without increasing inference time." ICML 2022.
  https://arxiv.org/abs/2203.05482
  Kumar, Raghunathan, Jones, Ma, Liang. "Fine-Tuning can Distort Pretrained Features and
  Underperform Out-of-Distribution." ICLR 2022 (LP-FT). https://arxiv.org/abs/2202.10054
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
Ingredient = PyTree | Callable[[], PyTree]

INFO_KEYS = ("name", "overrides", "base_checkpoint_sha256", "start_sha256")
LP_FT_HINT = (
    "fine-tune every ingredient from one linear-probe run (LP-FT: "
    "--model NAME=LP_RUN/model) so that all of them start from the same weights, head included"
)


def as_sequence(ingredients: Any, arg: str, minimum: int = 1) -> list:
    """``ingredients`` as a list, after checking it is a sequence of at least ``minimum`` items.

    Raises:
      TypeError: ``ingredients`` is a mapping, a string or not a sequence.
      ValueError: fewer than ``minimum`` items.
    """
    if isinstance(ingredients, str | bytes | Mapping) or not isinstance(ingredients, Sequence):
        raise TypeError(
            f"{arg} must be a list of ingredients (variables pytrees or zero-argument loaders); "
            f"got {type(ingredients).__name__}"
        )
    if len(ingredients) < minimum:
        raise ValueError(
            f"{arg} must hold at least {minimum} ingredient(s); got {len(ingredients)}"
        )
    return list(ingredients)


def read(ingredient: Ingredient, where: str) -> PyTree:
    """The variables of one ingredient: the tree itself, or what its loader returns."""
    tree = ingredient() if callable(ingredient) else ingredient
    if not jax.tree.leaves(tree):
        raise ValueError(f"{where} holds no arrays; got {type(tree).__name__}")
    return tree


def _describe_leaf(leaf: Any) -> str:
    return f"{type(leaf).__name__} {getattr(leaf, 'dtype', '?')}{list(getattr(leaf, 'shape', ()))}"


class TreeLayout:
    """The structure, shapes and dtypes that every ingredient must share (from the first one).

    Attributes:
      treedef: the pytree structure.
      paths: ``jax.tree_util.keystr`` of every leaf, in flattening order.
      shapes, dtypes: per leaf.
      float_dtypes: the dtypes of the floating leaves, in order (what results are cast back to).
    """

    def __init__(self, tree: PyTree, where: str):
        flat, self.treedef = jax.tree_util.tree_flatten_with_path(tree)
        self.paths = tuple(jax.tree_util.keystr(path) for path, _ in flat)
        self._where = where
        for path, (_, leaf) in zip(self.paths, flat, strict=True):
            if not (hasattr(leaf, "shape") and hasattr(leaf, "dtype")):
                raise TypeError(
                    f"{where}: leaf {path} must be an array; got {_describe_leaf(leaf)}"
                )
            kind = np.dtype(leaf.dtype)
            if not (jnp.issubdtype(kind, jnp.floating) or jnp.issubdtype(kind, jnp.integer)):
                if kind != np.bool_:
                    raise TypeError(
                        f"{where}: leaf {path} has dtype {kind}; ingredients hold floating, "
                        "integer or boolean arrays"
                    )
        self.shapes = tuple(tuple(leaf.shape) for _, leaf in flat)
        self.dtypes = tuple(np.dtype(leaf.dtype) for _, leaf in flat)
        self._is_float = tuple(bool(jnp.issubdtype(d, jnp.floating)) for d in self.dtypes)
        self.float_dtypes = tuple(d for d, f in zip(self.dtypes, self._is_float, strict=True) if f)
        # copied leaves: host copies of the first ingredient's integer/boolean arrays
        self._copied = {
            i: np.asarray(leaf) for i, (_, leaf) in enumerate(flat) if not self._is_float[i]
        }

    @property
    def float_paths(self) -> tuple[str, ...]:
        return tuple(p for p, f in zip(self.paths, self._is_float, strict=True) if f)

    def float32_bytes(self) -> int:
        """Bytes of the floating leaves held in float32 (one accumulator's size)."""
        return 4 * sum(math.prod(s) for s, f in zip(self.shapes, self._is_float, strict=True) if f)

    def floats(self, tree: PyTree, where: str) -> list:
        """The floating leaves of ``tree`` in order, after checking it matches this layout.

        Raises:
          ValueError: different structure, a leaf of another shape or dtype, or an integer or
            boolean leaf that differs from the first ingredient's; the message names the path.
        """
        flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
        if treedef != self.treedef:
            raise ValueError(self._structure_difference(flat, treedef, where))
        out = []
        for i, (path, (_, leaf)) in enumerate(zip(self.paths, flat, strict=True)):
            if not (hasattr(leaf, "shape") and hasattr(leaf, "dtype")):
                raise TypeError(
                    f"{where}: leaf {path} must be an array; got {_describe_leaf(leaf)}"
                )
            if tuple(leaf.shape) != self.shapes[i] or np.dtype(leaf.dtype) != self.dtypes[i]:
                raise ValueError(
                    f"{where} differs from {self._where} at {path}: "
                    f"{np.dtype(leaf.dtype)}{list(leaf.shape)} vs "
                    f"{self.dtypes[i]}{list(self.shapes[i])}; ingredients must share shapes "
                    "and dtypes"
                )
            if self._is_float[i]:
                out.append(leaf)
            elif not np.array_equal(np.asarray(leaf), self._copied[i]):
                raise ValueError(
                    f"{where} differs from {self._where} at integer leaf {path}; integer and "
                    "boolean leaves are copied from the first ingredient, not averaged, so they "
                    "must be equal in every ingredient"
                )
        return out

    def join(self, float_leaves: Sequence) -> PyTree:
        """A tree of this layout from its floating leaves (copied leaves from the first tree)."""
        floats = iter(float_leaves)
        leaves = [
            next(floats) if is_float else self._copied[i]
            for i, is_float in enumerate(self._is_float)
        ]
        return jax.tree_util.tree_unflatten(self.treedef, leaves)

    def _structure_difference(self, flat, treedef, where: str) -> str:
        paths = [jax.tree_util.keystr(path) for path, _ in flat]
        here, there = set(paths), set(self.paths)
        for path in self.paths:
            if path not in here:
                return (
                    f"{where} differs from {self._where} at {path}: present in {self._where}, "
                    f"missing in {where}; ingredients must share one tree structure"
                )
        for path in paths:
            if path not in there:
                return (
                    f"{where} differs from {self._where} at {path}: present in {where}, missing "
                    f"in {self._where}; ingredients must share one tree structure"
                )
        return (
            f"{where} has the leaf paths of {self._where} but other containers ({treedef} vs "
            f"{self.treedef}, e.g. a FrozenDict for a dict); ingredients must share one structure"
        )


# ------------------------------------------------------------------ float32 leaf arithmetic
# Leaves already on the device are combined in one jitted call per tree (one dispatch; one
# compilation per model layout). Leaves in host memory (a loader's NumPy arrays) go through one
# jitted call per leaf, each result awaited: they are copied to the device one leaf at a time,
# so streaming never holds a second full copy of an ingredient.


def _leaf_to_float32(x):
    return jnp.asarray(x, jnp.float32)


def _leaf_add(acc, x):
    return acc + jnp.asarray(x, jnp.float32)


def _leaf_mean(acc, count, dtype):
    return (acc / count).astype(dtype)


def _leaf_mean_with(acc, x, count, dtype):
    return ((acc + jnp.asarray(x, jnp.float32)) / count).astype(dtype)


_LEAF = {
    "to_float32": jax.jit(_leaf_to_float32),
    "add": jax.jit(_leaf_add, donate_argnums=0),
    "mean_with": jax.jit(_leaf_mean_with, static_argnames="dtype"),
}
_TREE = {
    "to_float32": jax.jit(lambda xs: [_leaf_to_float32(x) for x in xs]),
    "add": jax.jit(
        lambda acc, xs: [_leaf_add(a, x) for a, x in zip(acc, xs, strict=True)],
        donate_argnums=0,
    ),
    "mean_with": jax.jit(
        lambda acc, xs, count, dtypes: [
            _leaf_mean_with(a, x, count, d) for a, x, d in zip(acc, xs, dtypes, strict=True)
        ],
        static_argnames="dtypes",
    ),
}
_mean_tree = jax.jit(
    lambda acc, count, dtypes: [_leaf_mean(a, count, d) for a, d in zip(acc, dtypes, strict=True)],
    static_argnames="dtypes",
)


def _on_device(leaves: Sequence) -> bool:
    return all(isinstance(x, jax.Array) for x in leaves)


def to_float32(leaves: Sequence) -> list:
    """Fresh float32 device copies (never aliases of the caller's arrays: they may be donated)."""
    if _on_device(leaves):
        return _TREE["to_float32"](list(leaves))
    return [_LEAF["to_float32"](x).block_until_ready() for x in leaves]


def add_into(acc_f32: list, leaves: Sequence) -> list:
    """``acc + leaves`` in float32; the accumulator's buffers are reused (donated)."""
    if _on_device(leaves):
        return _TREE["add"](acc_f32, list(leaves))
    return [_LEAF["add"](a, x).block_until_ready() for a, x in zip(acc_f32, leaves, strict=True)]


def mean_of(acc_f32: list, count: int, dtypes: Sequence) -> list:
    """``acc / count`` cast to ``dtypes``."""
    return _mean_tree(acc_f32, count, tuple(dtypes))


def mean_with(acc_f32: list, leaves: Sequence, count: int, dtypes: Sequence) -> list:
    """``(acc + leaves) / count`` cast to ``dtypes``, without touching ``acc``."""
    if _on_device(leaves):
        return _TREE["mean_with"](acc_f32, list(leaves), count, tuple(dtypes))
    return [
        _LEAF["mean_with"](a, x, count, dtype=d).block_until_ready()
        for a, x, d in zip(acc_f32, leaves, dtypes, strict=True)
    ]


def score_of(evaluate: Callable[[PyTree], Any], variables: PyTree, what: str) -> float:
    """``evaluate(variables)`` as a finite Python float.

    Raises:
      TypeError: ``evaluate`` returned something that is not a real number.
      ValueError: the score is NaN or infinite.
    """
    raw = evaluate(variables)
    try:
        score = float(raw)
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"evaluate must return a number (higher is better); for {what} it returned "
            f"{type(raw).__name__}"
        ) from err
    if not math.isfinite(score):
        raise ValueError(f"evaluate returned {score} for {what}; scores must be finite")
    return score


# ------------------------------------------------------------------ run-level checks


def check_ingredients(infos: Sequence[Mapping[str, Any]], *, allow_mixed: bool = False) -> None:
    """Checks that runs can be averaged: one architecture, one base checkpoint, one start.

    Args:
      infos: one plain dict per ingredient, as its run folder describes it: ``"name"`` (the
        architecture, a ``jaxmodels`` name), ``"overrides"`` (dict of architecture overrides),
        ``"base_checkpoint_sha256"`` (str, or None for a model trained from scratch) and
        ``"start_sha256"`` (hash of the starting variables, head and SSF initialisation
        included: equal exactly when the runs started from one point; None if unknown).
      allow_mixed: accept different architectures or base checkpoints (the tree checks of the
        merging methods still apply).

    Warns:
      UserWarning: the start hashes differ or are unknown; names the LP-FT recipe.

    Raises:
      TypeError: ``infos`` is not a sequence of mappings.
      ValueError: empty ``infos``, a missing key, or — unless ``allow_mixed`` — two ingredients
        with different architectures (name or overrides) or base checkpoints.
    """
    if isinstance(infos, str | bytes | Mapping) or not isinstance(infos, Sequence):
        raise TypeError(
            f"infos must be a list of dicts, one per ingredient; got {type(infos).__name__}"
        )
    if not infos:
        raise ValueError("infos must describe at least one ingredient; got an empty list")
    for i, info in enumerate(infos):
        if not isinstance(info, Mapping):
            raise TypeError(f"infos[{i}] must be a dict; got {type(info).__name__}")
        missing = [k for k in INFO_KEYS if k not in info]
        if missing:
            raise ValueError(f"infos[{i}] lacks {missing}; expected the keys {list(INFO_KEYS)}")
    first = infos[0]
    if not allow_mixed:
        for i, info in enumerate(infos[1:], start=1):
            for key, what in (
                ("name", "architecture"),
                ("overrides", "architecture overrides"),
                ("base_checkpoint_sha256", "base checkpoint"),
            ):
                if info[key] != first[key]:
                    raise ValueError(
                        f"ingredients 0 and {i} have different {what} ({key} {first[key]!r} vs "
                        f"{info[key]!r}); weight averaging needs one model fine-tuned several "
                        "times (pass allow_mixed=True to combine them anyway)"
                    )
    starts = [info["start_sha256"] for info in infos]
    if len(starts) < 2:
        return
    unknown = [i for i, start in enumerate(starts) if start is None]
    apart = [i for i, start in enumerate(starts) if start != starts[0]]
    if unknown or apart:
        which = (
            f"the starting weights of ingredient {unknown[0]} are unknown (start_sha256 None)"
            if unknown
            else f"ingredients 0 and {apart[0]} started from different weights (start_sha256)"
        )
        warnings.warn(
            f"{which}, and soups of runs that started apart are often worse than their best "
            f"run: {LP_FT_HINT}.",
            UserWarning,
            stacklevel=2,
        )


def fix_mmap_threshold(threshold_bytes: int = 1 << 20) -> bool:
    """glibc ``mallopt(M_MMAP_THRESHOLD, threshold_bytes)``; True if it took effect.

    Why: glibc raises its mmap threshold each time a large block is freed, after which freed
    arrays stay in per-thread arenas instead of returning to the system, so a process streaming
    checkpoints (a soup) keeps the memory of earlier ones in its resident size. A fixed threshold
    gives every array above it its own mapping, unmapped when freed (the same as starting with
    ``MALLOC_MMAP_THRESHOLD_=1048576``). Call it at start-up, before large allocations; a no-op
    (False) where the C library is not glibc.
    """
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, int(threshold_bytes)))  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False
