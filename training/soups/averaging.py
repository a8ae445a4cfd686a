"""Model soups: the uniform, greedy and learned averages of models fine-tuned from one start.

A model soup averages the weights of several fine-tuned models instead of their predictions:
one model's inference cost, often better accuracy than the best of them — when every ingredient
was fine-tuned from the same starting point (see ``training.soups.ingredients``).

  * ``uniform``: ``θ = (1/n) Σ_i θ_i``, streamed: ingredients given as loaders are read one at a
    time into a float32 accumulator, so about two models are in memory whatever ``n``.
  * ``greedy``: sort the ingredients by held-out score, start from the best and add each next
    one only if the soup's held-out score does not drop (the paper's Recipe 1, ``accept=">="``)
    or rises (``accept=">"``, the reference code's test). Candidates come from the running
    float32 sum of the accepted ingredients, never from re-reading them.
  * ``learned``: ``θ = Σ_i softmax(w)_i θ_i`` with the mixing logits ``w`` (one vector, or one
    per parameter tensor) optimised on held-out data with Adam (the paper: 5 epochs, learning
    rate 0.05). Needs every ingredient in memory at once.

Every method follows the rules of ``training.soups.ingredients.TreeLayout``: one structure, shape and
dtype per leaf, floating leaves combined in float32 and cast back, integer and boolean leaves
copied from the first ingredient (and required equal). BatchNorm statistics are floating leaves
and are averaged like the weights; ``training.soups.batch_stats.recompute_batch_stats`` re-estimates
them for a soup instead.

References:
  Wortsman, Ilharco, Gadre, Roelofs, Gontijo-Lopes, Morcos, Namkoong, Farhadi, Carmon,
  Kornblith, Schmidt. "Model soups: averaging weights of multiple fine-tuned models improves
  accuracy without increasing inference time." ICML 2022, Recipe 1 (greedy soup) and
  Appendix (learned soup). https://arxiv.org/abs/2203.05482
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from training.soups import ingredients as ing

PyTree = Any
ACCEPT_RULES = (">=", ">")


def uniform(ingredients: Sequence[ing.Ingredient]) -> PyTree:
    """The uniform soup ``(1/n) Σ_i θ_i``, reading one ingredient at a time.

    Peak memory is one float32 accumulator plus one ingredient being read (plus whatever the
    loader itself holds while reading), whatever the number of ingredients, when they are given
    as loaders; in-memory trees are of course all held by the caller.

    Args:
      ingredients: a non-empty list of variables pytrees or zero-argument callables returning
        one (each callable is called exactly once).

    Returns:
      The averaged variables, with the first ingredient's structure and dtypes (``jax.Array``
      leaves); integer and boolean leaves copied from the first ingredient.

    Raises:
      TypeError: ``ingredients`` is not a list, or holds non-array leaves.
      ValueError: no ingredients; trees that differ in structure, shape or dtype, or integer
        leaves that differ (the message names the first differing path).
    """
    ingredients = ing.as_sequence(ingredients, "ingredients")
    layout, acc = None, None
    for i, ingredient in enumerate(ingredients):
        tree = ing.read(ingredient, f"ingredients[{i}]")
        if layout is None:
            layout = ing.TreeLayout(tree, "ingredients[0]")
            acc = ing.to_float32(layout.floats(tree, "ingredients[0]"))
        else:
            acc = ing.add_into(acc, layout.floats(tree, f"ingredients[{i}]"))
        del tree  # before the next read: the streamed peak is one accumulator + one ingredient
    return layout.join(ing.mean_of(acc, len(ingredients), layout.float_dtypes))


class GreedyReport(NamedTuple):
    """What ``greedy`` did; JSON-able through ``_asdict()`` (tuples become lists).

    Attributes:
      scores: held-out score of each ingredient, in the caller's order.
      order: ingredient indices sorted by score, best first (ties keep the caller's order): the
        order in which they were tried.
      candidate_scores: ``candidate_scores[t]`` is the score of the soup tried at step t (step
        0: the best ingredient alone).
      soup_scores: the score of the kept soup after step t (non-decreasing).
      accepted: indices (into the caller's list) of the soup's ingredients, in the order added.
      accept: the acceptance rule, ``">="`` or ``">"``.
    """

    scores: tuple[float, ...]
    order: tuple[int, ...]
    candidate_scores: tuple[float, ...]
    soup_scores: tuple[float, ...]
    accepted: tuple[int, ...]
    accept: str


def greedy(
    ingredients: Sequence[ing.Ingredient],
    evaluate: Callable[[PyTree], float],
    *,
    accept: str = ">=",
    scores: Sequence[float] | None = None,
) -> tuple[PyTree, GreedyReport]:
    """The greedy soup (Wortsman et al. 2022, Recipe 1).

    Every ingredient is scored alone, then tried in order of decreasing score: the candidate
    is the mean of the accepted ingredients and the next one, formed from the running float32
    sum; it replaces the soup when its score is ``>=`` the soup's (the paper: "if it does not
    hurt") or ``>`` it (the reference implementation). Each ingredient is read twice (scored,
    then tried), or once when ``scores`` are given; about four models are held at once (sum,
    soup, candidate, ingredient).

    Args:
      ingredients: a non-empty list of variables pytrees or zero-argument loaders.
      evaluate: ``evaluate(variables) -> float``, the held-out score, higher is better (pass a
        negated loss to minimise it). Called ``2n - 1`` times, or ``n - 1`` with ``scores``.
      accept: ``">="`` (the paper's rule; the soup's score never drops) or ``">"``.
      scores: the ingredients' own held-out scores when the caller already has them (e.g.
        computed while predicting each ingredient for an ensemble), in the caller's order and on
        ``evaluate``'s scale; then no ingredient is scored again.

    Returns:
      ``(soup, report)``: the soup exactly as evaluated last (ingredient dtypes), and a
      ``GreedyReport``.

    Raises:
      TypeError, ValueError: as ``uniform``; an unknown ``accept``; ``evaluate`` returning a
        non-number or a non-finite score; ``scores`` not one finite number per ingredient.
    """
    if accept not in ACCEPT_RULES:
        raise ValueError(f"accept must be one of {ACCEPT_RULES}; got {accept!r}")
    if not callable(evaluate):
        raise TypeError(f"evaluate must be callable (variables -> score); got {type(evaluate)}")
    ingredients = ing.as_sequence(ingredients, "ingredients")
    layout = None
    if scores is None:
        scores = []
        for i, ingredient in enumerate(ingredients):
            tree = ing.read(ingredient, f"ingredients[{i}]")
            if layout is None:
                layout = ing.TreeLayout(tree, "ingredients[0]")
            layout.floats(tree, f"ingredients[{i}]")  # check before spending an evaluation
            scores.append(ing.score_of(evaluate, tree, f"ingredients[{i}]"))
            del tree
    else:
        scores = _given_scores(scores, len(ingredients))
    order = sorted(range(len(ingredients)), key=lambda i: -scores[i])  # stable for ties

    best = order[0]
    where = f"ingredients[{best}]"
    tree = ing.read(ingredients[best], where)
    layout = layout or ing.TreeLayout(tree, where)
    dtypes = layout.float_dtypes
    total = ing.to_float32(layout.floats(tree, where))
    del tree
    soup = layout.join(ing.mean_of(total, 1, dtypes))
    count, soup_score = 1, scores[best]
    candidate_scores, soup_scores, accepted = [soup_score], [soup_score], [best]
    for i in order[1:]:
        where = f"ingredients[{i}]"
        leaves = layout.floats(ing.read(ingredients[i], where), where)
        candidate = layout.join(ing.mean_with(total, leaves, count + 1, dtypes))
        score = ing.score_of(evaluate, candidate, f"the soup with {where}")
        candidate_scores.append(score)
        if score > soup_score or (accept == ">=" and score == soup_score):
            total = ing.add_into(total, leaves)
            count, soup, soup_score = count + 1, candidate, score
            accepted.append(i)
        soup_scores.append(soup_score)
        del leaves, candidate
    report = GreedyReport(
        scores=tuple(scores),
        order=tuple(order),
        candidate_scores=tuple(candidate_scores),
        soup_scores=tuple(soup_scores),
        accepted=tuple(accepted),
        accept=accept,
    )
    return soup, report


def _given_scores(scores: Any, count: int) -> list[float]:
    """``scores`` as finite floats, one per ingredient (``greedy``'s precomputed scores)."""
    if isinstance(scores, str | bytes | Mapping) or not isinstance(scores, Sequence):
        raise TypeError(f"scores must be a list of numbers; got {type(scores).__name__}")
    if len(scores) != count:
        raise ValueError(f"scores must hold one score per ingredient ({count}); got {len(scores)}")
    out = []
    for i, score in enumerate(scores):
        if isinstance(score, bool) or not isinstance(score, numbers.Real):
            raise TypeError(f"scores[{i}] must be a number; got {type(score).__name__}")
        if not math.isfinite(score):
            raise ValueError(f"scores[{i}] is {score}; scores must be finite")
        out.append(float(score))
    return out


class LearnedReport(NamedTuple):
    """What ``learned`` found; JSON-able through ``_asdict()``.

    Attributes:
      weights: the final mixing weights: one list of n weights (summing to 1), or with
        ``by_layer`` a dict ``{leaf path: n weights}`` over the floating leaves.
      losses: mean ``loss_fn`` over the batches of each epoch (with the weights of that step).
      by_layer: whether there is one weight vector per parameter tensor.
      logit_scale: the learned inverse temperature β (``learn_temperature``), else None.
    """

    weights: tuple[float, ...] | dict[str, tuple[float, ...]]
    losses: tuple[float, ...]
    by_layer: bool
    logit_scale: float | None = None


def learned(
    ingredients: Sequence[ing.Ingredient],
    loss_fn: Callable[[PyTree, Any], jax.Array],
    batches: Iterable,
    *,
    max_bytes: int,
    by_layer: bool = False,
    learning_rate: float = 0.05,
    epochs: int = 5,
    learn_temperature: bool = False,
) -> tuple[PyTree, LearnedReport]:
    """The learned soup: mixing weights ``softmax(w)`` optimised on held-out data.

    ``θ(w) = Σ_i softmax(w)_i θ_i`` (with ``by_layer``, a separate ``w`` per floating leaf),
    ``w`` initialised to zeros (the uniform soup) and trained with ``optax.adam`` on
    ``loss_fn(θ(w), batch)``, one step per batch, ``epochs`` passes over ``batches``. With
    ``learn_temperature`` an inverse temperature β = exp(b), b initialised to 0, is learned with
    ``w`` (as in the paper's code) and passed as ``loss_fn(θ(w), batch, β)``, which scales its
    logits by β: a mix of models is less confident than its parts, and without β the weights
    would also have to correct the calibration.

    Memory: unlike ``uniform`` and ``greedy`` this needs every ingredient in memory at once —
    a float32 stack of all n of them (``n × float32 size of one model``), plus about one model
    while reading; it refuses to start when that stack exceeds ``max_bytes``.

    Args:
      ingredients: a non-empty list of variables pytrees or zero-argument loaders.
      loss_fn: ``loss_fn(variables, batch) -> scalar``, differentiable in the floating leaves
        (e.g. cross-entropy of the model in eval mode on a held-out batch).
      batches: a re-iterable collection of batches (e.g. a list), iterated once per epoch.
      max_bytes: the largest float32 stack allowed, in bytes (required: the caller knows its
        memory).
      by_layer: one mixing vector per parameter tensor instead of one for the whole model.
      learning_rate: Adam's learning rate (the paper: 0.05).
      epochs: passes over ``batches`` (the paper: 5).
      learn_temperature: also learn the logits' scale β (``loss_fn`` then takes it third).

    Returns:
      ``(soup, report)``: the soup at the final weights (ingredient dtypes) and a
      ``LearnedReport``.

    Raises:
      TypeError, ValueError: as ``uniform``; bad ``max_bytes``, ``learning_rate`` or ``epochs``;
        ``max_bytes`` below the stack's size; an epoch without batches (a one-shot iterator);
        a non-finite loss.
    """
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0:
        raise ValueError(f"max_bytes must be a positive int; got {max_bytes!r}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs <= 0:
        raise ValueError(f"epochs must be a positive int; got {epochs!r}")
    if not (isinstance(learning_rate, int | float) and learning_rate > 0):
        raise ValueError(f"learning_rate must be a positive number; got {learning_rate!r}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable (variables, batch) -> scalar; got {loss_fn!r}")
    ingredients = ing.as_sequence(ingredients, "ingredients")
    n = len(ingredients)
    first = ing.read(ingredients[0], "ingredients[0]")
    layout = ing.TreeLayout(first, "ingredients[0]")
    needed = n * layout.float32_bytes()
    if needed > max_bytes:
        raise ValueError(
            f"learned soups hold all {n} ingredients in memory: {needed / 1e6:.1f} MB in "
            f"float32 > max_bytes = {max_bytes / 1e6:.1f} MB; use uniform or greedy (streamed), "
            "fewer ingredients, or a larger max_bytes"
        )
    columns = [[x] for x in ing.to_float32(layout.floats(first, "ingredients[0]"))]
    del first
    for i in range(1, n):
        where = f"ingredients[{i}]"
        leaves = ing.to_float32(layout.floats(ing.read(ingredients[i], where), where))
        for column, leaf in zip(columns, leaves, strict=True):
            column.append(leaf)
        del leaves
    stacked = []  # leaf j: [n, *shape_j]; each column freed once stacked (peak: n + 1 leaf)
    for j, column in enumerate(columns):
        stacked.append(jnp.stack(column))
        columns[j] = None
    del columns, column

    num_vectors = len(stacked) if by_layer else 1
    # the mixing logits, and log β (unused without learn_temperature)
    learnt = {"mix_VN": jnp.zeros((num_vectors, n), jnp.float32), "log_scale": jnp.zeros(())}
    optimizer = optax.adam(learning_rate)
    opt_state = optimizer.init(learnt)
    dtypes = layout.float_dtypes

    def mix(logits_VN, stacked):
        weights_VN = jax.nn.softmax(logits_VN, axis=-1)
        return [
            jnp.tensordot(weights_VN[j if by_layer else 0], s, axes=1).astype(d)
            for j, (s, d) in enumerate(zip(stacked, dtypes, strict=True))
        ]

    def loss_of(learnt, stacked, batch):
        variables = layout.join(mix(learnt["mix_VN"], stacked))
        if learn_temperature:
            return loss_fn(variables, batch, jnp.exp(learnt["log_scale"]))
        return loss_fn(variables, batch)

    @jax.jit
    def step(learnt, opt_state, stacked, batch):
        loss, grads = jax.value_and_grad(loss_of)(learnt, stacked, batch)
        updates, opt_state = optimizer.update(grads, opt_state, learnt)
        return optax.apply_updates(learnt, updates), opt_state, loss

    losses = []
    for epoch in range(epochs):
        epoch_losses = []
        for b, batch in enumerate(batches):
            learnt, opt_state, loss = step(learnt, opt_state, stacked, batch)
            epoch_losses.append(float(loss))
            if not math.isfinite(epoch_losses[-1]):
                raise ValueError(f"loss_fn returned {epoch_losses[-1]} at epoch {epoch}, batch {b}")
        if not epoch_losses:
            raise ValueError(
                f"batches yielded nothing in epoch {epoch}; pass a re-iterable collection "
                "(e.g. a list), not a one-shot iterator"
            )
        losses.append(sum(epoch_losses) / len(epoch_losses))

    soup = layout.join(jax.jit(mix)(learnt["mix_VN"], stacked))
    softmax_VN = jax.nn.softmax(learnt["mix_VN"], axis=-1)
    weights_VN = [tuple(float(w) for w in row) for row in softmax_VN]
    weights = dict(zip(layout.float_paths, weights_VN, strict=True)) if by_layer else weights_VN[0]
    scale = float(jnp.exp(learnt["log_scale"])) if learn_temperature else None
    report = LearnedReport(weights, tuple(losses), by_layer, scale)
    return soup, report
