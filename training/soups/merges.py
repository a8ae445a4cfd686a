"""Weight-space merges around a base model: WiSE-FT, task arithmetic, TIES and DARE.

With a base ``θ_0`` (the pre-trained or starting model) and fine-tuned models ``θ_t``, the task
vector of model t is ``τ_t = θ_t − θ_0``:

  * ``interpolate(a, b, α) = (1 − α)·a + α·b``; WiSE-FT interpolates the zero-shot / pre-trained
    model ``a`` with its fine-tuned version ``b`` (``sweep_interpolation`` picks α on held-out
    data).
  * ``task_arithmetic``: ``θ_0 + λ Σ_t τ_t``.
  * ``ties``: TIES-Merging: trim each task vector to its ``density`` fraction of largest
    magnitudes (over the whole model), elect each entry's sign as the sign of the trimmed
    vectors' sum (total mass), and average only the trimmed entries that carry the elected sign
    (disjoint mean): ``θ_0 + λ τ_merged``.
  * ``dare``: DARE: drop each task-vector entry with probability ``p`` and rescale the rest by
    ``1/(1 − p)`` (unbiased), then add them: ``θ_0 + λ Σ_t m_t ⊙ τ_t / (1 − p)``.

The rules of ``training.soups.ingredients.TreeLayout`` apply: the base and every fine-tuned model
share structure, shapes and dtypes; the arithmetic runs in float32 and is cast back; integer and
boolean leaves are copied from the base and must be equal in all models.

Task arithmetic, TIES and DARE add task vectors to the weights only: a variables tree's
``params`` collection (a tree without one is all weights). Every other collection — BatchNorm's
running ``batch_stats`` above all — is the base's, unchanged: adding differences of running
variances can make them negative (six runs whose variances fell from 1.0 to 0.8 give 1 − 6·0.2).
Recompute them on data afterwards (`training.soups.batch_stats.recompute_batch_stats`).
`interpolate` is a convex mix for α in [0, 1] and mixes every floating leaf, statistics
included. Models may be given as zero-argument loaders; every method except ``ties`` (two
passes) reads each one once.

References:
  Wortsman, Kim, Li, et al. "Robust fine-tuning of zero-shot models." CVPR 2022 (WiSE-FT).
  https://arxiv.org/abs/2109.01903
  Ilharco, Ribeiro, Wortsman, et al. "Editing Models with Task Arithmetic." ICLR 2023.
  https://arxiv.org/abs/2212.04089
  Yadav, Tam, Choshen, Raffel, Bansal. "TIES-Merging: Resolving Interference When Merging
  Models." NeurIPS 2023, Section 3. https://arxiv.org/abs/2306.01708
  Yu, Yu, Yu, Huang, Li. "Language Models are Super Mario: Absorbing Abilities from Homologous
  Models as a Free Lunch." ICML 2024 (DARE). https://arxiv.org/abs/2311.03099
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from training.soups import ingredients as ing

PyTree = Any
WISE_FT_ALPHAS = tuple(i / 10 for i in range(11))


def _finite(value: Any, arg: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.floating | np.integer):
        raise TypeError(f"{arg} must be a real number; got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{arg} must be finite; got {value}")
    return float(value)


def _finetuned_list(finetuned: Any) -> list:
    """One fine-tuned model (a mapping or loader) or a list of them, as a list."""
    if isinstance(finetuned, Mapping) or callable(finetuned):
        return [finetuned]
    return ing.as_sequence(finetuned, "finetuned")


class _Base(NamedTuple):
    """The base model: its tree, the layout every model must share (the whole tree, statistics
    included), and its weights — the floating leaves of ``params`` — in float32."""

    tree: PyTree
    layout: ing.TreeLayout
    picks: tuple[int, ...]  # which floating leaves are weights
    weights_f32: list

    def weights(self, ingredient: ing.Ingredient, where: str) -> list:
        """The weights of one model (checked against the whole layout)."""
        leaves = self.layout.floats(ing.read(ingredient, where), where)
        return [leaves[i] for i in self.picks]

    def result(self, merged_f32: list, scale) -> PyTree:
        """``base + scale·merged`` on the weights; every other leaf is the base's."""
        dtypes = tuple(self.layout.float_dtypes[i] for i in self.picks)
        floats = list(self.layout.floats(self.tree, "base"))
        merged = _apply(self.weights_f32, merged_f32, scale, dtypes)
        for i, leaf in zip(self.picks, merged, strict=True):
            floats[i] = leaf
        return self.layout.join(floats)


def _base(base: ing.Ingredient) -> _Base:
    tree = ing.read(base, "base")
    layout = ing.TreeLayout(tree, "base")
    has_params = isinstance(tree, Mapping) and "params" in tree
    picks = tuple(
        i for i, path in enumerate(layout.float_paths)
        if not has_params or path.startswith("['params']")
    )  # fmt: skip
    floats = layout.floats(tree, "base")
    return _Base(tree, layout, picks, ing.to_float32([floats[i] for i in picks]))


# ------------------------------------------------------------------ interpolation (WiSE-FT)


@functools.partial(jax.jit, static_argnames="dtypes")
def _lerp(a_leaves: list, b_leaves: list, alpha, dtypes: tuple) -> list:
    return [
        ((1 - alpha) * jnp.asarray(a, jnp.float32) + alpha * jnp.asarray(b, jnp.float32)).astype(d)
        for a, b, d in zip(a_leaves, b_leaves, dtypes, strict=True)
    ]


def interpolate(a: ing.Ingredient, b: ing.Ingredient, alpha: float) -> PyTree:
    """``(1 − α)·a + α·b`` leaf by leaf in float32 (WiSE-FT with a pre-trained, b fine-tuned).

    Args:
      a, b: variables pytrees (or loaders) of one layout.
      alpha: the weight of ``b``; 0 gives ``a``, 1 gives ``b``; values outside [0, 1]
        extrapolate.

    Returns:
      The interpolated variables in ``a``'s dtypes; integer leaves copied from ``a``.

    Raises:
      TypeError, ValueError: a non-finite or non-numeric ``alpha``; trees that do not match.
    """
    alpha = _finite(alpha, "alpha")
    tree_a = ing.read(a, "a")
    layout = ing.TreeLayout(tree_a, "a")
    leaves_b = layout.floats(ing.read(b, "b"), "b")
    return layout.join(_lerp(layout.floats(tree_a, "a"), leaves_b, alpha, layout.float_dtypes))


class InterpolationSweep(NamedTuple):
    """Scores of ``interpolate(a, b, α)`` over α; JSON-able through ``_asdict()``.

    Attributes:
      alphas: the α tried, in the caller's order.
      scores: ``evaluate`` of each interpolation.
      best_alpha: the α with the highest score (the first one on ties).
    """

    alphas: tuple[float, ...]
    scores: tuple[float, ...]
    best_alpha: float


def sweep_interpolation(
    a: ing.Ingredient,
    b: ing.Ingredient,
    evaluate: Callable[[PyTree], float],
    *,
    alphas: Sequence[float] = WISE_FT_ALPHAS,
) -> tuple[PyTree, InterpolationSweep]:
    """Evaluates ``interpolate(a, b, α)`` for every α and keeps the best (WiSE-FT's α choice).

    Args:
      a, b: variables pytrees (or loaders, each read once) of one layout.
      evaluate: ``evaluate(variables) -> float`` on held-out data, higher is better.
      alphas: the mixing weights of ``b`` to try (default 0, 0.1, …, 1).

    Returns:
      ``(best, sweep)``: the best interpolation and an ``InterpolationSweep``.

    Raises:
      TypeError, ValueError: as ``interpolate``; empty ``alphas``; a non-finite score.
    """
    if isinstance(alphas, str | bytes) or not isinstance(alphas, Sequence) or not alphas:
        raise ValueError(f"alphas must be a non-empty sequence of numbers; got {alphas!r}")
    alphas = tuple(_finite(x, f"alphas[{i}]") for i, x in enumerate(alphas))
    tree_a = ing.read(a, "a")
    layout = ing.TreeLayout(tree_a, "a")
    leaves_a = layout.floats(tree_a, "a")
    leaves_b = layout.floats(ing.read(b, "b"), "b")
    best, best_score, scores = None, -math.inf, []
    for alpha in alphas:
        mixed = layout.join(_lerp(leaves_a, leaves_b, alpha, layout.float_dtypes))
        scores.append(ing.score_of(evaluate, mixed, f"alpha={alpha}"))
        if scores[-1] > best_score:
            best, best_score = mixed, scores[-1]
        del mixed
    best_alpha = alphas[scores.index(best_score)]
    return best, InterpolationSweep(alphas=alphas, scores=tuple(scores), best_alpha=best_alpha)


# ------------------------------------------------------------------ task vectors


@functools.partial(jax.jit, donate_argnums=0)
def _add_task_vector(acc: list, base: list, leaves: list, keep: list | None = None) -> list:
    """``acc + keep ⊙ (leaves − base)`` in float32 (``keep`` already holds any rescaling)."""
    out = []
    for j, (a, b, x) in enumerate(zip(acc, base, leaves, strict=True)):
        tau = jnp.asarray(x, jnp.float32) - b
        out.append(a + (tau if keep is None else tau * keep[j]))
    return out


@functools.partial(jax.jit, static_argnames="dtypes")
def _apply(base: list, tau: list, scale, dtypes: tuple) -> list:
    return [(b + scale * t).astype(d) for b, t, d in zip(base, tau, dtypes, strict=True)]


def task_arithmetic(base: ing.Ingredient, finetuned: Any, scale: float) -> PyTree:
    """``θ_0 + λ Σ_t (θ_t − θ_0)``: task arithmetic (Ilharco et al. 2023).

    Args:
      base: the base variables (or loader).
      finetuned: one fine-tuned model (pytree or loader) or a list of them; read one at a time.
      scale: λ.

    Returns:
      The merged variables in the base's dtypes; collections other than ``params`` are the
      base's (module docstring).

    Raises:
      TypeError, ValueError: non-finite ``scale``; trees that do not match the base.
    """
    scale = _finite(scale, "scale")
    finetuned = _finetuned_list(finetuned)
    base = _base(base)
    base_f32 = base.weights_f32
    acc = [jnp.zeros_like(b) for b in base_f32]
    for t, model in enumerate(finetuned):
        where = f"finetuned[{t}]"
        acc = _add_task_vector(acc, base_f32, base.weights(model, where))
    return base.result(acc, scale)


@jax.jit
def _magnitude_threshold(base: list, leaves: list, keep_count) -> jax.Array:
    """The ``keep_count``-th largest ``|θ − θ_0|`` over all entries of all leaves."""
    mags = jnp.concatenate(
        [
            jnp.abs(jnp.asarray(x, jnp.float32) - b).ravel()
            for b, x in zip(base, leaves, strict=True)
        ]
    )
    return jnp.sort(mags)[mags.size - keep_count]


@jax.jit
def _trimmed(base: list, leaves: list, threshold) -> list:
    out = []
    for b, x in zip(base, leaves, strict=True):
        tau = jnp.asarray(x, jnp.float32) - b
        out.append(jnp.where(jnp.abs(tau) >= threshold, tau, 0.0))
    return out


@functools.partial(jax.jit, donate_argnums=(0, 1))
def _add_agreeing(total: list, count: list, trimmed: list, mass: list) -> tuple[list, list]:
    """Adds the trimmed entries whose sign is the elected one (the sign of ``mass``)."""
    new_total, new_count = [], []
    for s, c, tau, m in zip(total, count, trimmed, mass, strict=True):
        agrees = tau * jnp.sign(m) > 0  # zero entries and zero mass never agree
        new_total.append(s + jnp.where(agrees, tau, 0.0))
        new_count.append(c + agrees.astype(jnp.float32))
    return new_total, new_count


def ties(
    base: ing.Ingredient, finetuned: Any, *, density: float = 0.2, scale: float = 1.0
) -> PyTree:
    """TIES-Merging (Yadav et al. 2023): trim, elect sign by mass, disjoint mean.

    For each task vector ``τ_t = θ_t − θ_0``: keep its ``k = max(1, round(density·N))`` entries
    of largest magnitude over all N floating weight entries of the model (entries tied with the k-th
    magnitude are kept too) and zero the rest (``τ̂_t``). The elected sign of each entry is
    ``sign(Σ_t τ̂_t)``. The merged vector is, per entry, the mean of the ``τ̂_t`` that are
    non-zero with the elected sign (0 where none is, including where ``Σ_t τ̂_t = 0``). Result:
    ``θ_0 + λ·τ_merged``.

    Memory: two passes over ``finetuned`` (loaders are called twice), holding the base, the
    summed mass, the agreeing sum and count and one model; each trim sorts the model's N
    magnitudes.

    Args:
      base: the base variables (or loader).
      finetuned: one fine-tuned model (pytree or loader) or a list of them.
      density: fraction of each task vector kept, in (0, 1] (the paper: 0.2).
      scale: λ (the paper tunes it; 1.0 with the disjoint mean is its default).

    Returns:
      The merged variables in the base's dtypes; collections other than ``params`` are the
      base's (module docstring).

    Raises:
      TypeError, ValueError: ``density`` outside (0, 1]; non-finite ``scale``; trees that do
        not match the base.
    """
    density = _finite(density, "density")
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1]; got {density}")
    scale = _finite(scale, "scale")
    finetuned = _finetuned_list(finetuned)
    base = _base(base)
    base_f32 = base.weights_f32
    entries = sum(int(b.size) for b in base_f32)
    keep_count = max(1, round(density * entries))

    thresholds, mass = [], [jnp.zeros_like(b) for b in base_f32]
    for t, model in enumerate(finetuned):  # pass 1: trim, and sum the trimmed vectors
        where = f"finetuned[{t}]"
        leaves = base.weights(model, where)
        thresholds.append(_magnitude_threshold(base_f32, leaves, keep_count))
        mass = ing.add_into(mass, _trimmed(base_f32, leaves, thresholds[t]))
    total = [jnp.zeros_like(b) for b in base_f32]
    count = [jnp.zeros_like(b) for b in base_f32]
    for t, model in enumerate(finetuned):  # pass 2: disjoint sum over the agreeing entries
        where = f"finetuned[{t}]"
        leaves = base.weights(model, where)
        total, count = _add_agreeing(total, count, _trimmed(base_f32, leaves, thresholds[t]), mass)
    merged = [s / jnp.maximum(c, 1.0) for s, c in zip(total, count, strict=True)]
    return base.result(merged, scale)


def _dare_keep(key, base: list, drop: float) -> list:
    """Per leaf: ``Bernoulli(1 − drop) / (1 − drop)``, from ``fold_in(key, leaf index)``.

    One small program per leaf shape, each drawing the mask flat and reshaping it (the same
    bits: threefry counts entries in row-major order). A program for the whole list took 8 s to
    compile for resnet_tiny's 38 leaves on a 2-core CPU, growing with depth, and a
    multi-dimensional draw compiles 6× slower than a flat one.
    """
    return [_dare_keep_leaf(key, j, b.shape, drop) for j, b in enumerate(base)]


@functools.partial(jax.jit, static_argnames=("shape", "drop"))
def _dare_keep_leaf(key, index, shape: tuple, drop: float) -> jax.Array:
    keep = jax.random.bernoulli(jax.random.fold_in(key, index), 1.0 - drop, (math.prod(shape),))
    return (keep.astype(jnp.float32) / (1.0 - drop)).reshape(shape)


def dare(
    base: ing.Ingredient, finetuned: Any, *, drop: float = 0.9, seed: int, scale: float = 1.0
) -> PyTree:
    """DARE (Yu et al. 2024): drop task-vector entries at random, rescale, add.

    ``θ_0 + λ Σ_t m_t ⊙ τ_t / (1 − p)`` with ``m_t`` i.i.d. Bernoulli(1 − p) masks, so each
    rescaled task vector equals ``τ_t`` in expectation. The mask of model t, leaf j is drawn
    from ``fold_in(fold_in(key(seed), t), j)``: reproducible per seed.

    Args:
      base: the base variables (or loader).
      finetuned: one fine-tuned model (pytree or loader) or a list of them; read one at a time.
      drop: p, the probability of dropping an entry, in [0, 1) (the paper: 0.9).
      seed: the PRNG seed (required, so that merges are reproducible).
      scale: λ.

    Returns:
      The merged variables in the base's dtypes; collections other than ``params`` are the
      base's (module docstring).

    Raises:
      TypeError, ValueError: ``drop`` outside [0, 1); a non-int ``seed``; non-finite ``scale``;
        trees that do not match the base.
    """
    drop = _finite(drop, "drop")
    if not 0 <= drop < 1:
        raise ValueError(f"drop must be in [0, 1); got {drop}")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise TypeError(f"seed must be an int; got {type(seed).__name__}")
    scale = _finite(scale, "scale")
    finetuned = _finetuned_list(finetuned)
    base = _base(base)
    base_f32 = base.weights_f32
    key = jax.random.key(int(seed))
    acc = [jnp.zeros_like(b) for b in base_f32]
    for t, model in enumerate(finetuned):
        where = f"finetuned[{t}]"
        leaves = base.weights(model, where)
        keep = _dare_keep(jax.random.fold_in(key, t), base_f32, drop)
        acc = _add_task_vector(acc, base_f32, leaves, keep)
    return base.result(acc, scale)
