"""The goal a served cascade must meet on held-out data, and the cascade chosen for it.

`choose_cascade` searches the accuracy/average-cost frontier of ordered member subsets
(`jaxmodels.committees.fit.search_cascades`), takes the frontier point that best meets the
`Goal` (its ranking is `fit.Objective`'s, the one `fit_cascade` uses), and keeps its thresholds
or those `fit_cascade` refits on its members, whichever the goal ranks higher on held-out data.

Shapes: P members (the pool), N examples, K classes.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence

import numpy as np

from jaxmodels.committees import rules as cascade_rules
from jaxmodels.committees.fit import Objective, fit_cascade, search_cascades

GIGA = 1e9


@dataclasses.dataclass(frozen=True)
class Goal:
    """What the chosen cascade must do on held-out data: exactly one of the two.

    Attributes:
      target_accuracy: reach this accuracy at the lowest average cost.
      flops_budget: stay within this average cost (FLOPs per image), most accurately.
      reason: where the goal came from, for the report.
    """

    target_accuracy: float | None
    flops_budget: float | None
    reason: str

    def rank(self, correct: int, cost: float, num_examples: int) -> tuple:
        """A key to maximise (`fit.Objective.rank`, the one ranking `fit_cascade` also uses);
        `cost` is the average per example."""
        objective = Objective(num_examples, self.target_accuracy, self.flops_budget)
        return objective.rank(correct, cost * num_examples)

    def describe(self) -> str:
        if self.target_accuracy is not None:
            return f"held-out accuracy ≥ {self.target_accuracy:.4f} ({self.reason})"
        return f"average ≤ {self.flops_budget / GIGA:.4g} GFLOPs per image ({self.reason})"


def choose_cascade(logits_PNK, labels_N, costs_P, goal: Goal, *, rule, confidence, max_stages):
    """The frontier on held-out logits and the cascade chosen from it for `goal` (module doc).

    Returns:
      (frontier: list of `FrontierPoint`, members: tuple of pool indices by cost,
      thresholds [len(members) − 1], held-out `CascadeOutput` of the choice).
    """
    num_examples = len(labels_N)
    frontier = search_cascades(
        logits_PNK,
        labels_N,
        costs_P,
        max_members=min(max_stages, len(costs_P)),
        rule=rule,
        confidence=confidence,
    )
    best = max(
        frontier,
        key=lambda p: goal.rank(round(p.accuracy * num_examples), p.avg_cost, num_examples),
    )
    members = tuple(best.members)
    candidates = [best.thresholds]
    if len(members) > 1:
        with warnings.catch_warnings():  # an unmet goal is reported by the caller, once
            warnings.simplefilter("ignore")
            fit = fit_cascade(
                logits_PNK[list(members)],
                labels_N,
                costs_P[list(members)],
                target_accuracy=goal.target_accuracy,
                flops_budget=goal.flops_budget,
                rule=rule,
                confidence=confidence,
            )
        candidates.append(fit.thresholds)

    def score(thresholds):
        out = cascade_rules.simulate_cascade(
            logits_PNK[list(members)],
            thresholds,
            confidence=confidence,
            rule=rule,
            costs=costs_P[list(members)],
        )
        return goal.rank(int((out.predictions == labels_N).sum()), out.avg_flops, num_examples), out

    scored = [score(t) for t in candidates]
    pick = max(range(len(candidates)), key=lambda i: scored[i][0])
    return frontier, members, np.asarray(candidates[pick], np.float64), scored[pick][1]


def thin_frontier(frontier: Sequence, max_points: int) -> list:
    """At most `max_points` of a frontier (sorted by rising cost and accuracy), spread evenly
    over its accuracy range: for each of `max_points` equally spaced accuracy levels, the
    cheapest point reaching it. The cheapest and the most accurate points are always kept."""
    if len(frontier) <= max_points:
        return list(frontier)
    accuracy = np.array([p.accuracy for p in frontier])
    levels = np.linspace(accuracy[0], accuracy[-1], max_points)
    keep = np.unique(np.searchsorted(accuracy, levels - 1e-12, side="left"))
    return [frontier[i] for i in keep]
