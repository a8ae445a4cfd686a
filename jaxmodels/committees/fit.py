"""Choosing cascade thresholds and members from held-out logits.

Wang et al. (ICLR 2022) pick a cascade's thresholds on held-out data: either the cheapest
thresholds that keep the accuracy of the most accurate single model, or the most accurate
cascade within a cost budget; and they search over ordered subsets of a model pool for the
accuracy/cost Pareto frontier. Everything here works on member logits [M, N, C] computed once
per member (e.g. `jaxmodels.committees.executors.Ensemble.member_logits`) and decides exactly as the
executor does (`jaxmodels.committees.rules`: exit at stage k when conf_k > t_k, strictly).

How thresholds are searched. With the other thresholds fixed, moving t_k only changes which of
the examples reaching stage k exit there; sorted by conf_k, the exit set is a prefix, so one
cumulative sum gives the exact accuracy and cost of every distinct threshold (a "sweep",
O(N) after one sort per stage). Two stages: one sweep is the exact optimum. Three or four:
a grid over the first M − 2 thresholds (quantiles of each stage's confidence) with an exact
sweep of the last, then coordinate descent, one exact sweep per threshold, until nothing
improves. Accuracy is counted in integers, so targets are compared exactly. The sweeps are
`jaxmodels.committees.sweeps.Stages`.

Shapes: M members (stages), P models in a pool, N examples, C classes, T candidate thresholds.

References:
  Wang, Kondratyuk, Christiansen, Kitani, Alon, Eban. "Wisdom of Committees: An Overlooked
  Approach to Faster and More Accurate Models." ICLR 2022. https://arxiv.org/abs/2012.01988
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np

from jaxmodels.committees import rules as cascade_rules
from jaxmodels.committees import sweeps

MAX_STAGES = 4


@dataclasses.dataclass(frozen=True)
class CascadeFit:
    """Thresholds chosen on held-out logits and what they achieve there.

    Attributes:
      thresholds: [M − 1] float64 (exit at stage k when conf_k > thresholds[k]).
      accuracy: held-out accuracy of the cascade.
      avg_cost: mean cost per example (in the units of `costs_M`).
      worst_case_cost: Σ costs_M, an example that runs every stage.
      exit_fractions: [M] fraction of examples answered by each stage.
      reached: whether the target accuracy (or the budget) could be met.
      message: empty when reached, else what was returned instead.
    """

    thresholds: np.ndarray
    accuracy: float
    avg_cost: float
    worst_case_cost: float
    exit_fractions: np.ndarray
    reached: bool
    message: str = ""


@dataclasses.dataclass(frozen=True)
class FrontierPoint:
    """One cascade on the accuracy/average-cost Pareto frontier of a pool.

    Attributes:
      members: indices into the pool, in stage order (by cost).
      thresholds: [len(members) − 1] float64.
      accuracy: held-out accuracy.
      avg_cost: mean cost per example.
      worst_case_cost: Σ of the members' costs.
    """

    members: tuple[int, ...]
    thresholds: np.ndarray
    accuracy: float
    avg_cost: float
    worst_case_cost: float


class Objective:
    """Ranks (correct, cost) candidates: feasible first, then the goal, then the tie-break.

    The one goal ranking of the committees: `fit_cascade` and the serve report both use it.
    Accuracy is compared in integer counts of correct answers; cost is the total over the
    `num_examples` examples (the budget is per example).
    """

    def __init__(self, num_examples: int, target_accuracy, flops_budget):
        self.num_examples = num_examples
        self.target = target_accuracy
        self.budget = flops_budget
        if target_accuracy is not None:  # integers: accuracy ≥ target exactly
            self.need = math.ceil(target_accuracy * num_examples - 1e-9)

    def keys(self, correct_T, cost_T):
        """Three arrays to maximise lexicographically."""
        correct_T, cost_T = np.asarray(correct_T), np.asarray(cost_T, dtype=np.float64)
        if self.target is not None:  # cheapest reaching the target; else the most accurate
            feasible_T = correct_T >= self.need
            return (
                feasible_T,
                np.where(feasible_T, -cost_T, correct_T),
                np.where(feasible_T, correct_T, -cost_T),
            )
        feasible_T = cost_T <= self.budget * self.num_examples * (1 + 1e-12)
        return (
            feasible_T,
            np.where(feasible_T, correct_T, -cost_T),
            np.where(feasible_T, -cost_T, correct_T),
        )

    def best(self, correct_T, cost_T) -> int:
        k1, k2, k3 = self.keys(correct_T, cost_T)
        return int(np.lexsort((k3, k2, k1))[-1])

    def rank(self, correct: int, cost: float) -> tuple:
        """A key to maximise for one candidate; its first element says whether the goal is met."""
        return tuple(k[0].item() for k in self.keys([correct], [cost]))

    def better(self, a, b) -> bool:
        """Whether (correct, cost) `a` ranks strictly above `b`."""
        return self.rank(*a) > self.rank(*b)


def _check_labels(labels_N, num_examples: int, num_classes: int) -> np.ndarray:
    labels = np.asarray(labels_N)
    if labels.shape != (num_examples,):
        raise ValueError(
            f"labels_N must have one label per example, shape ({num_examples},) to match the "
            f"logits; got shape {labels.shape}"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"labels_N must be integers; got dtype {labels.dtype}")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(
            f"labels_N must lie in [0, {num_classes}); got range [{labels.min()}, {labels.max()}]"
        )
    return labels


def _check_grid_size(grid_size) -> int:
    if isinstance(grid_size, bool) or not isinstance(grid_size, int) or grid_size < 2:
        raise ValueError(f"grid_size must be an int ≥ 2; got {grid_size!r}")
    return grid_size


def _fit_stages(stages: sweeps.Stages, objective: Objective, grid_size: int):
    """The best threshold vector for `objective`; exact for M = 2."""
    num_free = stages.conf_MN.shape[0] - 1
    best_t, best = None, None
    for t_K, t_T, correct_T, cost_T in sweeps.grid_sweeps(stages, grid_size):
        i = objective.best(correct_T, cost_T)
        if best is None or objective.better((correct_T[i], cost_T[i]), best):
            best_t, best = np.append(t_K[:-1], t_T[i]), (correct_T[i], cost_T[i])
    improved = num_free > 1
    while improved:  # coordinate descent: each step is an exact 1-D optimum, never worse
        improved = False
        for stage in range(num_free):
            t_T, correct_T, cost_T = stages.sweep(stage, best_t)
            i = objective.best(correct_T, cost_T)
            if objective.better((correct_T[i], cost_T[i]), best):
                best_t, best = best_t.copy(), (correct_T[i], cost_T[i])
                best_t[stage] = t_T[i]
                improved = True
    return best_t


def fit_cascade(
    logits_MNC,
    labels_N,
    costs_M,
    *,
    target_accuracy: float | None = None,
    flops_budget: float | None = None,
    rule: str = "ensemble",
    confidence="max_prob",
    grid_size: int = 32,
) -> CascadeFit:
    """Thresholds for a cascade of the M given members, fitted on held-out logits.

    Exactly one goal: `target_accuracy` — the cheapest thresholds (lowest average cost) whose
    held-out accuracy is ≥ the target, e.g. the costliest member's own accuracy; or
    `flops_budget` — the most accurate thresholds whose average cost is ≤ the budget. Ties go
    to the more accurate, then the cheaper. A goal no thresholds meet is reported (a warning,
    ``reached=False`` and `message`) and the best found is returned: the most accurate for a
    target, the cheapest for a budget.

    Args:
      logits_MNC: held-out logits [M, N, C] of the members, cheapest first (M ≤ 4).
      labels_N: held-out labels [N], integers in [0, C).
      costs_M: per-member cost [M], e.g. FLOPs per image; positive.
      target_accuracy: accuracy to reach, in [0, 1].
      flops_budget: average cost per example not to exceed, in the units of `costs_M`.
      rule: ``"ensemble"`` (stage k = mean logits of members 0..k) or ``"single"``.
      confidence: ``"max_prob"``, ``"margin"``, ``"neg_entropy"`` or a callable.
      grid_size: thresholds tried per stage for the first M − 2 stages (M ≥ 3).

    Returns:
      A `CascadeFit`. For M = 2 it is the exact optimum over all thresholds; for M = 3, 4 a
      grid + coordinate-descent result (within 1 % of a brute-force grid optimum in the tests).

    Raises:
      ValueError: shapes that disagree (logits vs labels vs costs), non-finite logits, bad
        labels, both or neither goal, a goal out of range, more than 4 members.
      TypeError: non-integer labels, non-floating logits, a bad confidence.
    """
    logits = cascade_rules.check_logits(logits_MNC)
    num_members, num_examples, num_classes = logits.shape
    labels = _check_labels(labels_N, num_examples, num_classes)
    costs = cascade_rules.check_costs(costs_M, num_members)
    if (target_accuracy is None) == (flops_budget is None):
        raise ValueError(
            "give exactly one of target_accuracy and flops_budget; got "
            f"target_accuracy={target_accuracy!r}, flops_budget={flops_budget!r}"
        )
    if target_accuracy is not None and not 0.0 <= target_accuracy <= 1.0:
        raise ValueError(f"target_accuracy must lie in [0, 1]; got {target_accuracy}")
    if flops_budget is not None and not (math.isfinite(flops_budget) and flops_budget > 0):
        raise ValueError(f"flops_budget must be positive and finite; got {flops_budget}")
    if num_members > MAX_STAGES:
        raise ValueError(f"fit_cascade fits up to {MAX_STAGES} members; got {num_members}")
    grid_size = _check_grid_size(grid_size)
    combined_MNC, conf_MN = cascade_rules.stage_outputs(logits, rule=rule, confidence=confidence)
    bounds = cascade_rules.lowest_threshold(confidence), cascade_rules.highest_threshold(confidence)
    stages = sweeps.Stages(conf_MN, np.argmax(combined_MNC, axis=-1) == labels, costs, *bounds)
    objective = Objective(num_examples, target_accuracy, flops_budget)
    t_K = _fit_stages(stages, objective, grid_size) if num_members > 1 else np.zeros(0)
    correct, cost, exit_N = stages.totals(t_K)
    reached = bool(objective.keys([correct], [cost])[0][0])
    message = ""
    if not reached:
        goal = (
            f"target accuracy {target_accuracy}"
            if target_accuracy is not None
            else f"average cost budget {flops_budget}"
        )
        message = (
            f"no thresholds reach the {goal}; returning the "
            f"{'most accurate' if target_accuracy is not None else 'cheapest'} cascade found "
            f"(accuracy {correct / num_examples:.4f}, average cost {cost / num_examples:.4g})"
        )
        warnings.warn(message, stacklevel=2)
    return CascadeFit(
        thresholds=t_K,
        accuracy=correct / num_examples,
        avg_cost=cost / num_examples,
        worst_case_cost=float(costs.sum()),
        exit_fractions=np.bincount(exit_N, minlength=num_members) / num_examples,
        reached=reached,
        message=message,
    )


def _pareto(correct_T, cost_T) -> np.ndarray:
    """Indices of the Pareto-optimal points, by rising cost with strictly rising accuracy."""
    order = np.lexsort((-np.asarray(correct_T), np.asarray(cost_T)))
    best_before = np.maximum.accumulate(np.asarray(correct_T)[order])
    keep = np.concatenate([[True], best_before[1:] > best_before[:-1]])
    return order[keep]


def _subset_points(stages: sweeps.Stages, grid_size: int):
    """Pareto-optimal (correct, cost, thresholds_K) of one cascade's threshold settings."""
    if stages.conf_MN.shape[0] == 1:
        correct, cost, _ = stages.totals(np.zeros(0))
        return [(correct, cost, np.zeros(0))]
    points = []
    for t_K, t_T, correct_T, cost_T in sweeps.grid_sweeps(stages, grid_size):
        for i in _pareto(correct_T, cost_T):
            points.append((int(correct_T[i]), float(cost_T[i]), np.append(t_K[:-1], t_T[i])))
    keep = _pareto([p[0] for p in points], [p[1] for p in points])
    return [points[i] for i in keep]


def search_cascades(
    pool_logits_MNC,
    labels_N,
    costs_M,
    *,
    max_members: int = 4,
    worst_case_budget: float | None = None,
    rule: str = "ensemble",
    confidence="max_prob",
    grid_size: int = 16,
) -> list[FrontierPoint]:
    """The accuracy/average-cost Pareto frontier over ordered subsets of a model pool.

    Every subset of 1..`max_members` pool models, in stage order by cost (ties by pool index),
    is a candidate cascade; for each, every threshold setting of an exact sweep (two stages) or
    of the grid-and-sweep of `fit_cascade` (three, four) is a point. The frontier keeps the
    points no other point beats: sorted by rising average cost, each strictly more accurate
    than the one before. Subsets are enumerated depth-first so each prefix's stage (for
    ``rule="ensemble"``, the mean of its members' logits) is computed once.

    Args:
      pool_logits_MNC: held-out logits [P, N, C] of the pool's models, in any order.
      labels_N: held-out labels [N].
      costs_M: per-model cost [P].
      max_members: the largest cascade tried, 1..4.
      worst_case_budget: if given, only subsets whose Σ cost (an example running every stage)
        is ≤ this are tried.
      rule: ``"ensemble"`` or ``"single"``.
      confidence: ``"max_prob"``, ``"margin"``, ``"neg_entropy"`` or a callable.
      grid_size: thresholds tried per stage for the first M − 2 stages of a cascade.

    Returns:
      The frontier, a list of `FrontierPoint` by rising `avg_cost` (and strictly rising
      `accuracy`); empty when no subset fits `worst_case_budget`.

    Raises:
      ValueError / TypeError: as `fit_cascade`; `max_members` outside 1..4; a non-positive
        `worst_case_budget`.
    """
    logits = cascade_rules.check_logits(pool_logits_MNC, "pool_logits_MNC")
    num_models, num_examples, num_classes = logits.shape
    labels = _check_labels(labels_N, num_examples, num_classes)
    costs = cascade_rules.check_costs(costs_M, num_models)
    if (
        isinstance(max_members, bool)
        or not isinstance(max_members, int)
        or not 1 <= max_members <= MAX_STAGES
    ):
        raise ValueError(f"max_members must be an int in 1..{MAX_STAGES}; got {max_members!r}")
    if worst_case_budget is not None and not worst_case_budget > 0:
        raise ValueError(f"worst_case_budget must be positive; got {worst_case_budget}")
    budget = np.inf if worst_case_budget is None else float(worst_case_budget)
    grid_size = _check_grid_size(grid_size)
    cascade_rules.check_rule(rule)
    confidence_fn = cascade_rules.resolve_confidence(confidence)
    bounds = cascade_rules.lowest_threshold(confidence), cascade_rules.highest_threshold(confidence)
    by_cost = [int(i) for i in np.argsort(costs, kind="stable")]

    points = []  # (correct, cost sum, members, thresholds)

    def visit(prefix, sum_NC, conf_stack, correct_stack):
        start = by_cost.index(prefix[-1]) + 1 if prefix else 0
        for model in by_cost[start:]:
            members = (*prefix, model)
            if costs[list(members)].sum() > budget:
                break  # the models after this one cost at least as much
            sum_next, combined_NC, conf_N = cascade_rules.stage_step(
                sum_NC, logits[model], stage=len(prefix), rule=rule, confidence_fn=confidence_fn
            )
            confs = [*conf_stack, np.asarray(conf_N)]
            corrects = [*correct_stack, np.argmax(np.asarray(combined_NC), -1) == labels]
            stages = sweeps.Stages(
                np.stack(confs), np.stack(corrects), costs[list(members)], *bounds
            )
            for correct, cost, t_K in _subset_points(stages, grid_size):
                points.append((correct, cost, members, t_K))
            if len(members) < max_members:
                visit(members, sum_next, confs, corrects)

    visit((), None, [], [])
    keep = _pareto([p[0] for p in points], [p[1] for p in points]) if points else []
    return [
        FrontierPoint(
            members=points[i][2],
            thresholds=points[i][3],
            accuracy=points[i][0] / num_examples,
            avg_cost=points[i][1] / num_examples,
            worst_case_cost=float(costs[list(points[i][2])].sum()),
        )
        for i in keep
    ]
