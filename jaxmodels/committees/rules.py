"""What a cascade decides: confidence functions, the per-stage rule and the exit rule.

A cascade of M members (cheapest first) answers each example at the first stage whose
prediction is confident enough (Wang et al., ICLR 2022). This module holds the arithmetic that
the adaptive executor (`jaxmodels.committees.executors.Cascade`), the simulation over precomputed logits
(`simulate_cascade`) and the threshold fitting (`jaxmodels.committees.fit`) must share, so that all
three decide identically on the same logits:

  * stage k's combined logits: with ``rule="ensemble"`` (the paper's) the mean of the logits of
    members 0..k, computed as a running sum ``sum_k = sum_{k-1} + logits_k`` divided by k + 1;
    with ``rule="single"`` member k's own logits;
  * its confidence: a function of ``softmax(combined)`` — ``max_prob`` (the paper's),
    ``margin`` (top-1 − top-2 probability), ``neg_entropy`` (Σ p log p, ≤ 0) or a callable;
  * the exit rule: an example leaves at stage k < M − 1 when ``conf_k > thresholds[k]``
    (strictly; float32 confidences compared with float64 thresholds on the host); the last stage
    answers everything left. So ``thresholds[k] = 1`` never exits at stage k for ``max_prob`` /
    ``margin``, and ``0`` always does for ``max_prob`` (its confidence is ≥ 1/C).
  * cost: an example that exits at stage k ran members 0..k, so it costs Σ_{j≤k} costs_j under
    both rules (the paper reuses earlier members' logits, it never reruns them).

Stage numbers are 0-based everywhere. Shapes: M members (stages), N examples, C classes.

References:
  Wang, Kondratyuk, Christiansen, Kitani, Alon, Eban. "Wisdom of Committees: An Overlooked
  Approach to Faster and More Accurate Models." ICLR 2022. https://arxiv.org/abs/2012.01988
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import xlogy

RULES = ("ensemble", "single")


def max_prob(probs_NC: jax.Array) -> jax.Array:
    """The top-1 probability, conf_N in [1/C, 1]: the paper's confidence."""
    return jnp.max(probs_NC, axis=-1)


def margin(probs_NC: jax.Array) -> jax.Array:
    """Top-1 minus top-2 probability, conf_N in [0, 1]; needs C ≥ 2."""
    if probs_NC.shape[-1] < 2:
        raise ValueError(f"margin confidence needs at least 2 classes; got {probs_NC.shape[-1]}")
    top2_N2 = jax.lax.top_k(probs_NC, 2)[0]
    return top2_N2[..., 0] - top2_N2[..., 1]


def neg_entropy(probs_NC: jax.Array) -> jax.Array:
    """Σ_c p_c log p_c, the negative entropy, conf_N in [−log C, 0] (0 log 0 = 0)."""
    return jnp.sum(xlogy(probs_NC, probs_NC), axis=-1)


CONFIDENCES: dict[str, Callable[[jax.Array], jax.Array]] = {
    "max_prob": max_prob,
    "margin": margin,
    "neg_entropy": neg_entropy,
}
# Confidences that live in [0, 1], whose thresholds are checked against that range.
_UNIT_RANGE = ("max_prob", "margin")


def resolve_confidence(confidence) -> Callable[[jax.Array], jax.Array]:
    """The confidence function for a name in `CONFIDENCES` or a callable probs_NC -> conf_N.

    Raises:
      ValueError: an unknown name.
      TypeError: neither a string nor a callable.
    """
    if isinstance(confidence, str):
        if confidence not in CONFIDENCES:
            raise ValueError(
                f"confidence must be one of {sorted(CONFIDENCES)} or a callable; got {confidence!r}"
            )
        return CONFIDENCES[confidence]
    if callable(confidence):
        return confidence
    raise TypeError(
        f"confidence must be a name in {sorted(CONFIDENCES)} or a callable probs_NC -> conf_N; "
        f"got {type(confidence).__name__}"
    )


def check_rule(rule) -> str:
    """Returns `rule` if it is one of `RULES`, else raises ValueError."""
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}; got {rule!r}")
    return rule


def check_thresholds(thresholds, num_members: int, confidence) -> np.ndarray:
    """Validates per-stage thresholds; returns them as float64 [M − 1].

    Raises:
      ValueError: wrong length, NaN, or outside [0, 1] for ``max_prob`` / ``margin``.
    """
    t_K = np.asarray(thresholds, dtype=np.float64)
    if t_K.shape != (num_members - 1,):
        raise ValueError(
            f"thresholds must have one value per stage but the last, shape ({num_members - 1},) "
            f"for {num_members} members; got shape {t_K.shape}"
        )
    if np.isnan(t_K).any():
        raise ValueError(f"thresholds must not be NaN; got {t_K.tolist()}")
    if isinstance(confidence, str) and confidence in _UNIT_RANGE:
        if ((t_K < 0) | (t_K > 1)).any():
            raise ValueError(
                f"thresholds for confidence {confidence!r} must lie in [0, 1]; got {t_K.tolist()}"
            )
    return t_K


def float32_thresholds(thresholds_K: np.ndarray) -> np.ndarray:
    """Thresholds for float32 confidences on a device, deciding as the float64 ones do.

    Each is the largest float32 ≤ t, so for every float32 c, ``c > t32`` exactly when ``c > t``
    in float64 (rounding t to nearest could move a confidence within half an ulp of t to the
    other side of it, and a device run would then disagree with `simulate_cascade`).
    """
    t_K = np.asarray(thresholds_K, np.float64)
    t32_K = t_K.astype(np.float32)
    above = t32_K.astype(np.float64) > t_K
    t32_K[above] = np.nextafter(t32_K[above], np.float32(-np.inf))
    return t32_K


def lowest_threshold(confidence) -> float:
    """A threshold every example passes (conf > it), where one in range exists.

    ``max_prob`` is ≥ 1/C > 0, so 0 lets every example exit; ``margin`` may be exactly 0 on a
    tie, so 0 lets all but ties exit (the lowest value its [0, 1] range allows); other
    confidences use −inf.
    """
    if isinstance(confidence, str) and confidence in _UNIT_RANGE:
        return 0.0
    return -np.inf


def highest_threshold(confidence) -> float:
    """A threshold no example passes: 1 for ``max_prob`` / ``margin``, 0 for ``neg_entropy``
    (both are the confidence's largest value), +inf for a callable."""
    if isinstance(confidence, str) and confidence in _UNIT_RANGE:
        return 1.0
    return 0.0 if confidence == "neg_entropy" else np.inf


def mean_logits(logits_MNC, weights_M=None):
    """A committee's logits: the (weighted) mean of its members' logits, the ensemble rule of
    Wang et al. (the one mean-of-logits combine: `Ensemble`, the serve report and the demo).

    Args:
      logits_MNC: the members' logits [M, N, C], NumPy or JAX (also traced, under jit).
      weights_M: [M] weights summing to 1; default uniform.

    Returns:
      [N, C], NumPy for NumPy input, else JAX.
    """
    xp = jnp if isinstance(logits_MNC, jax.Array) else np
    if weights_M is None:
        return xp.mean(logits_MNC, axis=0)
    return xp.einsum("m,mnc->nc", weights_M, logits_MNC)


def stage_combine(sum_prev_BC, logits_BC, *, stage: int, rule: str):
    """Stage `stage`'s running logit sum and combined logits (jittable).

    Args:
      sum_prev_BC: the running sum of members 0..stage−1's logits, or None at stage 0 (or for
        ``rule="single"``).
      logits_BC: member `stage`'s logits, float32.
      stage: 0-based stage index.
      rule: ``"ensemble"`` (mean of members 0..stage) or ``"single"`` (member `stage` alone).

    Returns:
      (sum_BC, combined_BC). For ``"single"`` both are `logits_BC`.
    """
    if rule == "single":
        return logits_BC, logits_BC
    sum_BC = logits_BC if sum_prev_BC is None else sum_prev_BC + logits_BC
    return sum_BC, sum_BC / jnp.float32(stage + 1)


def stage_confidence(combined_BC, confidence_fn) -> jax.Array:
    """conf_B = confidence_fn(softmax(combined_BC)), float32; checks the callable's shape."""
    conf_B = confidence_fn(jax.nn.softmax(combined_BC, axis=-1))
    if conf_B.shape != combined_BC.shape[:1]:
        raise ValueError(
            f"confidence must map probs [N, C] to conf [N]; for probs of shape "
            f"{combined_BC.shape} it returned shape {conf_B.shape}"
        )
    return conf_B.astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("stage", "rule", "confidence_fn"))
def stage_step(sum_prev_NC, logits_NC, *, stage: int, rule: str, confidence_fn):
    """One stage on precomputed logits: (sum_NC, combined_NC, conf_N), jitted."""
    sum_NC, combined_NC = stage_combine(sum_prev_NC, logits_NC, stage=stage, rule=rule)
    return sum_NC, combined_NC, stage_confidence(combined_NC, confidence_fn)


def check_logits(logits_MNC, name: str = "logits_MNC") -> np.ndarray:
    """Validates member logits [M, N, C] (finite, non-empty); returns them as float32 NumPy."""
    logits = np.asarray(logits_MNC)
    if logits.ndim != 3 or 0 in logits.shape:
        raise ValueError(
            f"{name} must be a non-empty array [M members, N examples, C classes]; "
            f"got shape {logits.shape}"
        )
    if not np.issubdtype(logits.dtype, np.floating):
        raise TypeError(f"{name} must be floating point; got dtype {logits.dtype}")
    logits = logits.astype(np.float32, copy=False)
    bad = ~np.isfinite(logits)
    if bad.any():
        m, n, _ = np.argwhere(bad)[0]
        raise ValueError(
            f"{name} must be finite; member {m} has {int(bad[m].sum())} NaN/inf values "
            f"(first at example {n})"
        )
    return logits


def stage_outputs(logits_MNC, *, rule: str = "ensemble", confidence="max_prob"):
    """Every stage's combined logits and confidence for all examples.

    Args:
      logits_MNC: member logits [M, N, C], members in stage order.
      rule: ``"ensemble"`` or ``"single"``.
      confidence: a name in `CONFIDENCES` or a callable probs_NC -> conf_N.

    Returns:
      (combined_MNC float32, conf_MN float32) NumPy arrays.
    """
    logits = check_logits(logits_MNC)
    check_rule(rule)
    confidence_fn = resolve_confidence(confidence)
    sum_NC, combined, conf = None, [], []
    for stage in range(logits.shape[0]):
        sum_NC, combined_NC, conf_N = stage_step(
            sum_NC, logits[stage], stage=stage, rule=rule, confidence_fn=confidence_fn
        )
        combined.append(np.asarray(combined_NC))
        conf.append(np.asarray(conf_N))
    return np.stack(combined), np.stack(conf)


def exit_stages(conf_MN: np.ndarray, thresholds_K: np.ndarray) -> np.ndarray:
    """The 0-based stage at which each example exits: the first k with conf_k > t_k, else M−1."""
    num_stages = len(thresholds_K) + 1
    exit_N = np.full(conf_MN.shape[1], num_stages - 1, dtype=np.int32)
    undecided_N = np.ones(conf_MN.shape[1], dtype=bool)
    for stage in range(num_stages - 1):
        leaves_N = undecided_N & (conf_MN[stage] > thresholds_K[stage])
        exit_N[leaves_N] = stage
        undecided_N &= ~leaves_N
    return exit_N


def check_costs(costs_M, num_members: int, name: str = "costs_M") -> np.ndarray:
    """Validates per-member costs (positive, finite, one per member); returns float64 [M]."""
    costs = np.asarray(costs_M, dtype=np.float64)
    if costs.shape != (num_members,):
        raise ValueError(
            f"{name} must have one cost per member, shape ({num_members},); got shape {costs.shape}"
        )
    if not np.isfinite(costs).all() or (costs <= 0).any():
        raise ValueError(f"{name} must be positive and finite; got {costs.tolist()}")
    return costs


@dataclasses.dataclass(frozen=True)
class CascadeOutput:
    """What a cascade answered, per example and per run.

    Attributes:
      predictions: [N] int32, argmax of `logits`.
      exit_stage: [N] int32, the 0-based stage that answered each example.
      logits: [N, C] float32, the answering stage's combined logits (for ``rule="ensemble"``
        the mean of members 0..exit_stage; for ``"single"`` that member's logits).
      avg_flops: mean over examples of the cost of the members each one ran (Σ_{j≤exit} flops_j).
      worst_case_flops: the largest such cost among this run's examples.
      wall_seconds: wall-clock time of the run (None for a simulation).
      exit_fractions: [M] float64, the fraction of examples answered by each stage.
    """

    predictions: np.ndarray
    exit_stage: np.ndarray
    logits: np.ndarray
    avg_flops: float
    worst_case_flops: float
    wall_seconds: float | None
    exit_fractions: np.ndarray


def cascade_output(exit_N, logits_NC, costs_M, wall_seconds) -> CascadeOutput:
    """Assembles a `CascadeOutput` from exit stages, answering logits and member costs."""
    cost_N = np.cumsum(costs_M)[exit_N]
    return CascadeOutput(
        predictions=np.argmax(logits_NC, axis=-1).astype(np.int32),
        exit_stage=np.asarray(exit_N, dtype=np.int32),
        logits=logits_NC,
        avg_flops=float(cost_N.mean()),
        worst_case_flops=float(cost_N.max()),
        wall_seconds=wall_seconds,
        exit_fractions=np.bincount(exit_N, minlength=len(costs_M)) / len(exit_N),
    )


def simulate_cascade(
    logits_MNC,
    thresholds,
    *,
    confidence="max_prob",
    rule: str = "ensemble",
    costs=None,
) -> CascadeOutput:
    """What a cascade would answer on precomputed member logits (no models run).

    Uses the same stage arithmetic and exit rule as the adaptive executor, so on the same logits
    both give the same predictions and exit stages.

    Args:
      logits_MNC: member logits [M, N, C], members in stage order (cheapest first).
      thresholds: [M − 1]; an example exits at stage k when its confidence is > thresholds[k].
      confidence: ``"max_prob"`` (default), ``"margin"``, ``"neg_entropy"`` or a jittable
        callable probs_NC -> conf_N.
      rule: ``"ensemble"`` (stage k = mean of members 0..k's logits, the paper's) or
        ``"single"`` (member k alone).
      costs: per-member cost [M] (e.g. FLOPs per image); default 1 each, so that `avg_flops`
        counts the members an example ran on average.

    Returns:
      A `CascadeOutput` with ``wall_seconds=None``.

    Raises:
      ValueError: bad shapes, non-finite logits, thresholds of the wrong length / NaN / out of
        [0, 1] for max_prob and margin, costs not one positive value per member, unknown rule.
      TypeError: non-floating logits, a confidence that is neither a name nor a callable.
    """
    logits = check_logits(logits_MNC)
    num_members = logits.shape[0]
    t_K = check_thresholds(thresholds, num_members, confidence)
    costs_M = np.ones(num_members) if costs is None else check_costs(costs, num_members, "costs")
    combined_MNC, conf_MN = stage_outputs(logits, rule=rule, confidence=confidence)
    exit_N = exit_stages(conf_MN, t_K)
    answer_NC = combined_MNC[exit_N, np.arange(logits.shape[1])]
    return cascade_output(exit_N, answer_NC, costs_M, None)
