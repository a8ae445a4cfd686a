"""Exact threshold sweeps over one cascade's held-out confidences (`Stages`).

With the other thresholds fixed, moving stage k's threshold only changes which of the examples
reaching stage k exit there; sorted by confidence, the exiting examples form a prefix, so one
cumulative sum gives the exact correct count and cost of every distinct threshold of the stage.
`jaxmodels.committees.fit` builds its threshold fitting and its Pareto search on these sweeps.

Shapes: M stages, N examples, K = M − 1 thresholds, T candidate thresholds.
"""

from __future__ import annotations

import itertools

import numpy as np

from jaxmodels.committees import rules as cascade_rules


class Stages:
    """Per-stage confidences and correctness of one cascade, with exact threshold sweeps.

    Candidate thresholds of a stage are the midpoints between its consecutive distinct
    confidences (each splits the examples where a gap is, with float32 rounding far away),
    plus the lowest and highest thresholds of the confidence (everyone / no one exits).
    """

    def __init__(self, conf_MN, correct_MN, costs_M, lower: float, upper: float):
        self.conf_MN = conf_MN  # float32, compared with float64 thresholds like the executor
        self.correct_MN = correct_MN.astype(np.int64)
        self.cum_cost_M = np.cumsum(costs_M)
        self.num_examples = conf_MN.shape[1]
        self.rows_N = np.arange(self.num_examples)
        # Per stage: examples by falling confidence, candidate thresholds t_T (ascending) and
        # how many examples pass each (conf > t), i.e. the length of the exiting prefix.
        self.order, self.candidates, self.passing = [], [], []
        for conf_N in conf_MN[:-1].astype(np.float64):
            self.order.append(np.argsort(-conf_N, kind="stable"))
            values_D = np.unique(conf_N)
            midpoints = (values_D[:-1] + values_D[1:]) / 2
            t_T = np.unique(np.concatenate([[lower], midpoints, [max(upper, values_D[-1])]]))
            self.candidates.append(t_T)
            passing_T = self.num_examples - np.searchsorted(np.sort(conf_N), t_T, "right")
            self.passing.append(passing_T)

    def cost(self, counts_XM):
        """Summed cost of exit counts [..., M]; a function of the integer counts alone, so one
        threshold setting reached along different paths gets bit-identical costs."""
        return np.sum(counts_XM * self.cum_cost_M, axis=-1)

    def totals(self, thresholds_K):
        """(correct count, summed cost, exit_N) of one threshold vector."""
        exit_N = cascade_rules.exit_stages(self.conf_MN, thresholds_K)
        correct = int(self.correct_MN[exit_N, self.rows_N].sum())
        counts_M = np.bincount(exit_N, minlength=len(self.cum_cost_M))
        return correct, float(self.cost(counts_M)), exit_N

    def sweep(self, stage: int, thresholds_K):
        """Exact (t_T, correct_T, cost_T) over every threshold of `stage`, others fixed.

        Examples that reach `stage` and pass t exit there; the others go where the fixed
        thresholds send them ("down"). Sorted by falling conf_stage, the examples that pass
        form a prefix, so prefix sums give every candidate's totals at once.
        """
        num_stages = len(self.cum_cost_M)
        never_K = np.array(thresholds_K, dtype=np.float64)
        never_K[stage] = np.inf  # where examples go when they do not exit at `stage`
        reach_N = cascade_rules.exit_stages(self.conf_MN[:stage], never_K[:stage]) >= stage
        down_N = cascade_rules.exit_stages(self.conf_MN, never_K)
        down_correct_N = self.correct_MN[down_N, self.rows_N]
        gain_N = np.where(reach_N, self.correct_MN[stage] - down_correct_N, 0)
        # moved_NM[n] = one-hot of the stage example n leaves when it exits at `stage` instead
        moved_NM = np.eye(num_stages, dtype=np.int64)[down_N] * reach_N[:, None]
        order, j_T = self.order[stage], self.passing[stage]
        gain_prefix = np.concatenate([[0], np.cumsum(gain_N[order])])
        moved_prefix = np.concatenate(
            [np.zeros((1, num_stages), np.int64), np.cumsum(moved_NM[order], axis=0)]
        )
        counts_TM = np.bincount(down_N, minlength=num_stages)[None, :] - moved_prefix[j_T]
        counts_TM[:, stage] += moved_prefix[j_T].sum(axis=1)
        correct_T = int(down_correct_N.sum()) + gain_prefix[j_T]
        return self.candidates[stage], correct_T, self.cost(counts_TM)


def grid(stages: Stages, stage: int, grid_size: int) -> np.ndarray:
    """About `grid_size` of `stage`'s candidate thresholds, at quantiles of its confidences."""
    t_T = stages.candidates[stage]
    levels = np.linspace(0.0, 1.0, grid_size - 1)
    quantiles = np.quantile(stages.conf_MN[stage].astype(np.float64), levels)
    picks = np.clip(np.searchsorted(t_T, quantiles), 0, len(t_T) - 1)
    return np.unique(np.append(t_T[picks], t_T[0]))


def grid_sweeps(stages: Stages, grid_size: int):
    """Yields (thresholds_K without the last, t_T, correct_T, cost_T): a grid over the first
    M − 2 thresholds, each with an exact sweep of the last."""
    num_free = stages.conf_MN.shape[0] - 1
    grids = [grid(stages, k, grid_size) for k in range(num_free - 1)]
    for head in itertools.product(*grids):
        t_K = np.array([*head, np.inf])
        yield t_K, *stages.sweep(num_free - 1, t_K)
