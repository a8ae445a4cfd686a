"""What to deploy: a cascade only when its measured time beats the best single model.

FLOPs are not time: a narrow early model runs far fewer FLOP/s than a wide one (on a 2-core CPU
a ResNet of width 8 has 0.35 of width 16's FLOPs but takes 0.51 of its time), so a cascade
chosen by FLOPs can run slower than the model it replaces. Here every member's time is measured
on the device it runs on, through the executor that serves it, as a straight line in the number
of images it is given (a fixed cost per stage call plus a cost per image), and a cascade is
predicted from its held-out reach fractions: stage k runs on the n_k examples that reach it.

`choose` deploys the cascade of least predicted time that meets the goal when it is predicted
at least `min_speedup` (1.1×) faster than the fastest single model that meets it; otherwise that
single model, with a message that says why. Members that run one program (fine-tunes of one
architecture: a sweep, a soup's ingredients) are timed once and share the time, so that noise
does not pick among them: of equally fast members, the more accurate on held-out data serves.

Shapes: M members (cheapest first), N held-out examples, C classes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from jaxmodels.committees import rules as cascade_rules
from jaxmodels.committees.executors import Cascade, Member
from jaxmodels.committees.fit import MAX_STAGES, search_cascades
from jaxmodels.committees.members import check_members, stacking_signature
from jaxmodels.committees.timing import best_seconds

MIN_SPEEDUP = 1.1


@dataclasses.dataclass(frozen=True)
class StageCosts:
    """Measured time of each member as a one-stage cascade: t_k(n) = fixed_k + per_image_k · n.

    Attributes:
      per_image_M: [M] seconds per image (the slope).
      fixed_M: [M] seconds per stage call, whatever its size (the intercept, ≥ 0).
    """

    per_image_M: np.ndarray
    fixed_M: np.ndarray

    def seconds(self, member: int, num_images: float) -> float:
        """Predicted seconds of `member` on `num_images` images (0 when none reach it)."""
        if num_images <= 0:
            return 0.0
        return float(self.fixed_M[member] + self.per_image_M[member] * num_images)


def measure_costs(
    members: Sequence[Member],
    inputs: Sequence[np.ndarray],
    *,
    batch_size: int | None = None,
    repeats: int = 3,
) -> StageCosts:
    """Times each member alone on all N images and on N/4 of them; fits the line through both.

    Every member runs as a one-stage `Cascade` (the executor that serves it: same transfer,
    normalisation and bucketed batches), compiled first; the runs alternate, best of `repeats`
    (`best_seconds`), so load from other processes hits all alike. Members that run one program
    (one `stacking_signature`: apply function, variable shapes, preprocessing) differ in weights
    alone, which do not change the time: the first of them is timed and the others share its
    line.

    Args:
      members: the `Member`s.
      inputs: one image array [N, S, S, 3] per member (N ≥ 4).
      batch_size: rows of the largest device step (default `Cascade`'s).
      repeats: timed rounds; the best is kept.

    Returns:
      `StageCosts`.
    """
    members = check_members(members)  # before the signatures read them
    num_images = len(inputs[0])
    if num_images < 4:
        raise ValueError(f"measuring costs needs at least 4 images; got {num_images}")
    small = num_images // 4
    # each member's timed stand-in: the first member of its program
    first_of: dict = {}
    timed_M = [first_of.setdefault(stacking_signature(m), i) for i, m in enumerate(members)]
    runs = {}
    for i in sorted(set(timed_M)):
        single = Cascade([members[i]], [], batch_size=batch_size)
        runs[(i, num_images)] = lambda s=single, x=inputs[i]: s.run(x)
        runs[(i, small)] = lambda s=single, x=inputs[i][:small]: s.run(x)
    for run in runs.values():  # compile every shape the timed rounds use
        run()
    seconds = best_seconds(runs, repeats)
    big_M = np.array([seconds[(i, num_images)] for i in timed_M])
    small_M = np.array([seconds[(i, small)] for i in timed_M])
    # Noise can make the small run look slower per image than the large one's slope allows;
    # the line is clipped so neither part is negative.
    per_image_M = np.maximum(big_M - small_M, 0.0) / (num_images - small)
    per_image_M = np.maximum(per_image_M, 1e-3 * big_M / num_images)
    fixed_M = np.maximum(big_M - per_image_M * num_images, 0.0)
    return StageCosts(per_image_M=per_image_M, fixed_M=fixed_M)


def predicted_seconds(costs: StageCosts, chain: Sequence[int], exit_N: np.ndarray) -> float:
    """Predicted seconds of a cascade over len(exit_N) images: stage k runs on those that reach
    it (exit stage ≥ k), at its member's measured line."""
    exit_N = np.asarray(exit_N)
    return sum(costs.seconds(m, int((exit_N >= k).sum())) for k, m in enumerate(chain))


@dataclasses.dataclass(frozen=True)
class Deployment:
    """What `choose` deploys.

    Attributes:
      members: pool indices of the deployed stages (one for a single model).
      thresholds: [len(members) − 1] exit thresholds.
      single: pool index of the fastest single model meeting the goal (the baseline; of
        equally fast ones, the most accurate on held-out data).
      predicted_seconds: predicted time of `members` on the N held-out images.
      single_seconds: predicted time of `single` on them.
      heldout_accuracy: the deployed committee's held-out accuracy.
      best_cascade: (members, thresholds, predicted speed-up) of the best cascade found, or None.
      message: why a single model is served ("" when a cascade is deployed).
    """

    members: tuple[int, ...]
    thresholds: np.ndarray
    single: int
    predicted_seconds: float
    single_seconds: float
    heldout_accuracy: float
    best_cascade: tuple[tuple[int, ...], np.ndarray, float] | None
    message: str

    @property
    def is_cascade(self) -> bool:
        return len(self.members) > 1

    @property
    def predicted_speedup(self) -> float:
        """Predicted speed-up of the deployment over the baseline single model."""
        return self.single_seconds / self.predicted_seconds


def choose(
    logits_MNC,
    labels_N,
    costs: StageCosts,
    target_accuracy: float,
    *,
    flops_M=None,
    rule: str = "ensemble",
    confidence="max_prob",
    max_stages: int = MAX_STAGES,
    min_speedup: float = MIN_SPEEDUP,
    names: Sequence[str] | None = None,
) -> Deployment:
    """The cascade or single model to deploy for a held-out accuracy target (module docstring).

    Args:
      logits_MNC: held-out logits [M, N, C] of the pool, cheapest first.
      labels_N: held-out labels [N].
      costs: the pool's measured `StageCosts`.
      target_accuracy: held-out accuracy to meet (e.g. the costliest member's).
      flops_M: [M] FLOPs per image; when given, a cascade whose stages are not in FLOPs order is
        not deployed (the executor runs stages in cost order).
      rule, confidence: the cascade's (`jaxmodels.Cascade`).
      max_stages: the longest cascade searched.
      min_speedup: a cascade must be predicted at least this much faster than the baseline.
      names: member names for the message (default "member i").

    Returns:
      A `Deployment`.
    """
    logits = cascade_rules.check_logits(logits_MNC)
    labels = np.asarray(labels_N)
    num_members, num_examples, _ = logits.shape
    names = list(names) if names is not None else [f"member {i}" for i in range(num_members)]
    accuracy_M = (logits.argmax(-1) == labels).mean(axis=1)
    single_seconds_M = np.array([costs.seconds(i, num_examples) for i in range(num_members)])
    meeting = [i for i in range(num_members) if accuracy_M[i] >= target_accuracy]
    # The baseline: the fastest single model that meets the goal (of equally fast ones, the most
    # accurate), else the most accurate.
    single = (
        min(meeting, key=lambda i: (single_seconds_M[i], -accuracy_M[i]))
        if meeting
        else int(np.argmax(accuracy_M))
    )
    frontier = search_cascades(
        logits,
        labels,
        costs.per_image_M,
        max_members=min(max_stages, num_members),
        rule=rule,
        confidence=confidence,
    )
    best = None  # (seconds, members, thresholds, accuracy)
    for point in frontier:
        if len(point.members) < 2 or point.accuracy < target_accuracy:
            continue
        if flops_M is not None and np.any(np.diff(np.asarray(flops_M)[list(point.members)]) < 0):
            continue
        out = cascade_rules.simulate_cascade(
            logits[list(point.members)], point.thresholds, rule=rule, confidence=confidence
        )
        seconds = predicted_seconds(costs, point.members, out.exit_stage)
        if best is None or seconds < best[0]:
            best = (seconds, tuple(point.members), point.thresholds, point.accuracy)
    baseline = float(single_seconds_M[single])
    best_cascade = None if best is None else (best[1], best[2], baseline / best[0])
    if best is not None and baseline / best[0] >= min_speedup:
        return Deployment(best[1], best[2], single, best[0], baseline, best[3], best_cascade, "")
    if best is None:
        why = f"no cascade meets held-out accuracy {target_accuracy:.4f}"
    else:
        chain = " → ".join(names[i] for i in best[1])
        why = (
            f"the best cascade, {chain}, is predicted at {baseline / best[0]:.2f}× "
            f"(< {min_speedup}×) the speed of {names[single]} alone"
        )
    return Deployment(
        (single,),
        np.zeros(0),
        single,
        baseline,
        baseline,
        float(accuracy_M[single]),
        best_cascade,
        f"serving {names[single]} alone: {why}",
    )
