"""Cascade threshold fitting and the Pareto search (jaxmodels.committees.fit) against brute force.

The brute force is written here from the definitions, in float64 NumPy: stage k's prediction is
the mean of members 0..k's logits (or member k's), its confidence a function of the softmax, an
example exits at the first stage with conf_k > t_k, and costs accumulate over the stages run.
Two stages: every threshold between two distinct confidences is tried, so the fit must hit the
exact optimum. Three and four: a fine grid of all thresholds jointly; the fit must be within 1 %.
"""

import itertools
import warnings

import cascade_reference
import numpy as np
import pytest

from jaxmodels.committees import rules as cascade_rules
from jaxmodels.committees.executors import simulate_cascade
from jaxmodels.committees.fit import fit_cascade, search_cascades

CONFIDENCES = ("max_prob", "margin", "neg_entropy")


def synthetic(num_members, n=300, c=6, seed=0):
    """Held-out logits [M, N, C] (members get more accurate with m), labels, rising costs.

    Difficulty is shared, as with real models: an example hard for one member is hard for all.
    """
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, n)
    ease_N = rng.uniform(0.0, 1.0, n)
    logits = [
        rng.normal(0.0, 1.0, (n, c)) + (1.0 + 0.7 * m) * 2.5 * ease_N[:, None] * np.eye(c)[labels]
        for m in range(num_members)
    ]
    costs = 3.0 ** np.arange(num_members)
    return np.stack(logits).astype(np.float32), labels, costs


def reference_stages(logits_MNC, labels_N, rule, confidence):
    """float64 conf_MN and correct_MN from the definitions."""
    combined_MNC, conf_MN = cascade_reference.reference_stages(logits_MNC, rule, confidence)
    return conf_MN, combined_MNC.argmax(-1) == labels_N


def outcomes(conf_MN, correct_MN, costs_M, thresholds_GK):
    """Accuracy and average cost of every threshold row in thresholds_GK [G, M-1]."""
    num_stages, n = conf_MN.shape
    exit_GN = np.full((len(thresholds_GK), n), num_stages - 1)
    undecided_GN = np.ones_like(exit_GN, dtype=bool)
    for k in range(num_stages - 1):
        leaves = undecided_GN & (conf_MN[k][None, :] > thresholds_GK[:, k][:, None])
        exit_GN[leaves] = k
        undecided_GN &= ~leaves
    accuracy_G = correct_MN[exit_GN, np.arange(n)[None, :]].mean(1)
    cost_G = np.cumsum(costs_M)[exit_GN].mean(1)
    return accuracy_G, cost_G


def optimum(accuracy_G, cost_G, target=None, budget=None):
    """(accuracy, cost) of the best row: cheapest reaching target / most accurate in budget."""
    if target is not None:
        ok = accuracy_G >= target - 1e-12
        best_cost = cost_G[ok].min()
        return accuracy_G[ok & (cost_G == best_cost)].max(), best_cost
    ok = cost_G <= budget + 1e-12
    best_accuracy = accuracy_G[ok].max()
    return best_accuracy, cost_G[ok & (accuracy_G == best_accuracy)].min()


def all_thresholds(conf_N):
    """Every distinct split of the examples: between consecutive values, below all, above all."""
    values = np.unique(conf_N)
    return np.concatenate([[values[0] - 1], (values[:-1] + values[1:]) / 2, [values[-1] + 1]])


def grid_thresholds(conf_N, size):
    """`size` thresholds between consecutive confidences at evenly spaced ranks, plus ends."""
    values = np.unique(conf_N)
    ranks = np.unique(np.linspace(0, len(values) - 2, size).round().astype(int))
    mids = (values[ranks] + values[ranks + 1]) / 2
    return np.concatenate([[values[0] - 1], mids, [values[-1] + 1]])


def goals(logits_MNC, labels_N, costs_M, rule, confidence):
    """A target (the costliest member's own accuracy) and a budget (half its cost)."""
    _, correct_MN = reference_stages(logits_MNC, labels_N, rule, confidence)
    return correct_MN[-1].mean(), 0.5 * costs_M[-1]


def check_fit_is_what_it_says(fit, conf_MN, correct_MN, costs_M):
    """The fit's reported accuracy, cost and exits equal a float64 recomputation."""
    accuracy, cost = outcomes(conf_MN, correct_MN, costs_M, fit.thresholds[None, :])
    assert fit.accuracy == accuracy[0]
    assert fit.avg_cost == pytest.approx(cost[0], rel=1e-12)
    assert fit.worst_case_cost == costs_M.sum()


@pytest.mark.parametrize(
    "num_members, n, seed",
    [(1, 300, 0), (2, 300, 0), (3, 300, 0), (3, 300, 3), (4, 300, 4), (4, 200, 7)],
)
def test_synthetic_confidences_are_well_separated(num_members, n, seed):
    """Guards the exact comparisons below (every data set they use): float32 confidences (the
    fit's) and float64 ones (the brute force's) fall on the same side of every threshold placed
    between two distinct float32 values."""
    logits, labels, _ = synthetic(num_members, n=n, seed=seed)
    for rule, confidence in itertools.product(("ensemble", "single"), CONFIDENCES):
        conf, _ = reference_stages(logits, labels, rule, confidence)
        _, conf32 = cascade_rules.stage_outputs(logits, rule=rule, confidence=confidence)
        assert np.abs(conf - conf32).max() < 1e-6
        for c64, c32 in zip(conf, conf32, strict=True):
            t_T = all_thresholds(c32.astype(np.float64))
            np.testing.assert_array_equal(c64[None] > t_T[:, None], c32[None] > t_T[:, None])


@pytest.mark.parametrize("rule", ["ensemble", "single"])
@pytest.mark.parametrize("confidence", CONFIDENCES)
def test_two_stages_are_exact(rule, confidence):
    logits, labels, costs = synthetic(2)
    conf_MN, correct_MN = reference_stages(logits, labels, rule, confidence)
    accuracy_G, cost_G = outcomes(conf_MN, correct_MN, costs, all_thresholds(conf_MN[0])[:, None])
    target, budget = goals(logits, labels, costs, rule, confidence)
    for goal in [dict(target_accuracy=target), dict(flops_budget=budget)]:
        fit = fit_cascade(logits, labels, costs, rule=rule, confidence=confidence, **goal)
        best = optimum(accuracy_G, cost_G, goal.get("target_accuracy"), goal.get("flops_budget"))
        assert fit.reached
        assert fit.accuracy == best[0]
        assert fit.avg_cost == pytest.approx(best[1], rel=1e-12)
        check_fit_is_what_it_says(fit, conf_MN, correct_MN, costs)


@pytest.mark.parametrize("num_members, grid", [(3, 60), (4, 24)])
@pytest.mark.parametrize("rule", ["ensemble", "single"])
def test_three_and_four_stages_within_one_percent_of_brute_force(num_members, grid, rule):
    logits, labels, costs = synthetic(num_members, seed=num_members)
    conf_MN, correct_MN = reference_stages(logits, labels, rule, "max_prob")
    grids = [grid_thresholds(conf_N, grid) for conf_N in conf_MN[:-1]]
    thresholds_GK = np.array(list(itertools.product(*grids)))
    accuracy_G, cost_G = outcomes(conf_MN, correct_MN, costs, thresholds_GK)
    target, budget = goals(logits, labels, costs, rule, "max_prob")

    fit = fit_cascade(logits, labels, costs, target_accuracy=target, rule=rule)
    _, best_cost = optimum(accuracy_G, cost_G, target=target)
    assert fit.reached and fit.accuracy >= target
    assert fit.avg_cost <= 1.01 * best_cost
    check_fit_is_what_it_says(fit, conf_MN, correct_MN, costs)

    fit = fit_cascade(logits, labels, costs, flops_budget=budget, rule=rule)
    best_accuracy, _ = optimum(accuracy_G, cost_G, budget=budget)
    assert fit.reached and fit.avg_cost <= budget
    assert fit.accuracy >= 0.99 * best_accuracy
    check_fit_is_what_it_says(fit, conf_MN, correct_MN, costs)


@pytest.mark.parametrize("num_members", [3, 4])
def test_fit_is_optimal_along_every_threshold(num_members):
    """No single threshold, moved anywhere with the others fixed, gives a better cascade."""
    logits, labels, costs = synthetic(num_members, seed=num_members)
    conf_MN, correct_MN = reference_stages(logits, labels, "ensemble", "max_prob")
    target, budget = goals(logits, labels, costs, "ensemble", "max_prob")
    for goal in [dict(target=target), dict(budget=budget)]:
        key = "target_accuracy" if "target" in goal else "flops_budget"
        fit = fit_cascade(logits, labels, costs, **{key: next(iter(goal.values()))})
        for k in range(num_members - 1):
            thresholds_GK = np.repeat(fit.thresholds[None, :], len(conf_MN[k]) + 1, axis=0)
            thresholds_GK[:, k] = all_thresholds(conf_MN[k])
            best = optimum(*outcomes(conf_MN, correct_MN, costs, thresholds_GK), **goal)
            if "target" in goal:
                assert fit.avg_cost <= best[1] * (1 + 1e-12)
            else:
                assert fit.accuracy >= best[0]


def test_fitted_thresholds_drive_the_simulated_cascade():
    logits, labels, costs = synthetic(3)
    fit = fit_cascade(logits, labels, costs, flops_budget=4.0)
    out = simulate_cascade(logits, fit.thresholds, costs=costs)
    assert np.mean(out.predictions == labels) == fit.accuracy
    assert out.avg_flops == pytest.approx(fit.avg_cost)
    np.testing.assert_allclose(out.exit_fractions, fit.exit_fractions)


def test_unreachable_goals_are_reported():
    logits, labels, costs = synthetic(2)
    conf_MN, correct_MN = reference_stages(logits, labels, "ensemble", "max_prob")
    accuracy_G, _ = outcomes(conf_MN, correct_MN, costs, all_thresholds(conf_MN[0])[:, None])
    with pytest.warns(UserWarning, match="no thresholds reach the target accuracy 1.0"):
        fit = fit_cascade(logits, labels, costs, target_accuracy=1.0)
    assert not fit.reached and "most accurate" in fit.message
    assert fit.accuracy == accuracy_G.max()
    with pytest.warns(UserWarning, match="average cost budget"):
        fit = fit_cascade(logits, labels, costs, flops_budget=0.5)
    assert not fit.reached and fit.avg_cost == costs[0]  # everyone exits at stage 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fit_cascade(logits, labels, costs, flops_budget=costs.sum()).reached


def test_single_member_fit():
    logits, labels, costs = synthetic(1)
    fit = fit_cascade(logits, labels, costs, target_accuracy=0.0)
    assert fit.thresholds.shape == (0,) and fit.avg_cost == costs[0]
    assert fit.accuracy == np.mean(logits[0].argmax(-1) == labels)


def test_fit_bad_input():
    logits, labels, costs = synthetic(3)
    with pytest.raises(
        ValueError, match=r"labels_N must have one label per example, shape \(300,\)"
    ):
        fit_cascade(logits, labels[:-1], costs, target_accuracy=0.5)
    with pytest.raises(ValueError, match="costs_M must have one cost per member"):
        fit_cascade(logits, labels, costs[:2], target_accuracy=0.5)
    with pytest.raises(ValueError, match="exactly one of target_accuracy and flops_budget"):
        fit_cascade(logits, labels, costs)
    with pytest.raises(ValueError, match="exactly one"):
        fit_cascade(logits, labels, costs, target_accuracy=0.5, flops_budget=2.0)
    with pytest.raises(ValueError, match=r"target_accuracy must lie in \[0, 1\]"):
        fit_cascade(logits, labels, costs, target_accuracy=1.5)
    with pytest.raises(ValueError, match="flops_budget must be positive"):
        fit_cascade(logits, labels, costs, flops_budget=-1.0)
    with pytest.raises(ValueError, match="up to 4 members"):
        fit_cascade(*synthetic(5)[:2], np.ones(5), target_accuracy=0.5)
    with pytest.raises(ValueError, match=r"labels_N must lie in \[0, 6\)"):
        fit_cascade(logits, labels + 1, costs, target_accuracy=0.5)
    with pytest.raises(TypeError, match="integers"):
        fit_cascade(logits, labels.astype(float), costs, target_accuracy=0.5)
    nan = logits.copy()
    nan[2, 0, 0] = np.nan
    with pytest.raises(ValueError, match="must be finite"):
        fit_cascade(nan, labels, costs, target_accuracy=0.5)


# ----------------------------------------------------------------------------- search


@pytest.fixture(scope="module")
def pool():
    """Four models given out of cost order."""
    logits, labels, costs = synthetic(4, n=200, seed=7)
    order = [2, 0, 3, 1]
    return logits[order], labels, costs[order]


@pytest.mark.parametrize("rule", ["ensemble", "single"])
def test_frontier_is_monotone_and_true(pool, rule):
    logits, labels, costs = pool
    frontier = search_cascades(logits, labels, costs, rule=rule)
    accuracy = np.array([p.accuracy for p in frontier])
    avg_cost = np.array([p.avg_cost for p in frontier])
    assert len(frontier) > 3
    assert (np.diff(avg_cost) > 0).all() and (np.diff(accuracy) > 0).all()
    for point in frontier:
        members = list(point.members)
        assert (np.diff(costs[members]) >= 0).all()  # stage order is cost order
        conf_MN, correct_MN = reference_stages(logits[members], labels, rule, "max_prob")
        acc, cost = outcomes(conf_MN, correct_MN, costs[members], point.thresholds[None, :])
        assert point.accuracy == acc[0] and point.avg_cost == pytest.approx(cost[0], rel=1e-12)
        assert point.worst_case_cost == costs[members].sum()


def dominated(frontier, accuracy, cost):
    return any(p.accuracy >= accuracy and p.avg_cost <= cost * (1 + 1e-12) for p in frontier)


def test_frontier_dominates_every_single_model_and_every_pair(pool):
    logits, labels, costs = pool
    frontier = search_cascades(logits, labels, costs)
    for m in range(len(costs)):
        assert dominated(frontier, np.mean(logits[m].argmax(-1) == labels), costs[m])
    for pair in itertools.combinations(np.argsort(costs), 2):
        members = list(pair)
        conf_MN, correct_MN = reference_stages(logits[members], labels, "ensemble", "max_prob")
        thresholds = all_thresholds(conf_MN[0])[:, None]
        for acc, cost in zip(
            *outcomes(conf_MN, correct_MN, costs[members], thresholds), strict=True
        ):
            assert dominated(frontier, acc, cost)


def test_search_limits(pool):
    logits, labels, costs = pool
    singles = search_cascades(logits, labels, costs, max_members=1)
    assert all(len(p.members) == 1 for p in singles)
    budget = np.sort(costs)[:2].sum()
    capped = search_cascades(logits, labels, costs, worst_case_budget=budget)
    assert capped and all(p.worst_case_cost <= budget for p in capped)
    assert search_cascades(logits, labels, costs, worst_case_budget=0.5 * costs.min()) == []
    with pytest.raises(ValueError, match=r"max_members must be an int in 1..4"):
        search_cascades(logits, labels, costs, max_members=5)
    with pytest.raises(ValueError, match="costs_M must have one cost per member"):
        search_cascades(logits, labels, costs[:3])
    with pytest.raises(ValueError, match="labels_N"):
        search_cascades(logits, labels[:5], costs)
