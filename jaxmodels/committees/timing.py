"""Measured wall time of single models, an ensemble and an adaptive cascade on the same images.

Wang et al. (ICLR 2022) report that a cascade's FLOPs savings become real latency savings; this
module measures them. Every contender runs through the committee executors of
`jaxmodels.committees.executors` over one host array of prepared images per member: each single model as
a one-stage `Cascade` (the same transfer, normalisation, bucketed batches and fetch as the
cascade, so the comparison is fair), the full ensemble as one `Ensemble` step, the cascade with
`Cascade.run`, the adaptive executor. Each is run once to compile, then the contenders alternate
for `repeats` rounds and each keeps its best time, so load from other processes hits all alike.

Shapes: M members, N images, S image side.

References:
  Wang, Kondratyuk, Christiansen, Kitani, Alon, Eban. "Wisdom of Committees: An Overlooked
  Approach to Faster and More Accurate Models." ICLR 2022. https://arxiv.org/abs/2012.01988
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import numpy as np

from jaxmodels.committees.executors import Cascade, Ensemble, Member
from jaxmodels.committees.rules import CascadeOutput


def best_seconds(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """The best wall time of each run over `repeats` rounds; the runs alternate within a round,
    so load from other processes hits all alike. Results are fetched to the host inside each
    run (the executors return NumPy), so the time covers the whole computation."""
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int; got {repeats!r}")
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(repeats):
        for key, run in runs.items():
            start = time.perf_counter()
            run()
            best[key] = min(best[key], time.perf_counter() - start)
    return best


@dataclasses.dataclass(frozen=True)
class CommitteeTimes:
    """What `time_committees` measured.

    Attributes:
      member_seconds: [M] best time of each member alone over the N images.
      ensemble_seconds: best time of the ensemble of all members.
      cascade_seconds: best time of the cascade (`Cascade.run`).
      cascade_output: the cascade's answers on the images (predictions, exit stages, FLOPs).
      num_images: N.
    """

    member_seconds: list[float]
    ensemble_seconds: float
    cascade_seconds: float
    cascade_output: CascadeOutput
    num_images: int


def time_committees(
    members: Sequence[Member],
    inputs: Sequence[np.ndarray],
    cascade_members: Sequence[int],
    thresholds,
    *,
    rule: str = "ensemble",
    confidence="max_prob",
    batch_size: int | None = None,
    repeats: int = 3,
) -> CommitteeTimes:
    """Times every member alone, the ensemble of all, and one cascade, on the same images.

    Args:
      members: the `Member`s, cheapest first.
      inputs: one image array [N, S, S, 3] per member (uint8, normalised on the device with the
        member's preprocessing); members of equal preprocessing may share one array.
      cascade_members: indices into `members` of the cascade's stages, by cost.
      thresholds: its [len(cascade_members) − 1] exit thresholds.
      rule, confidence: the cascade's (`jaxmodels.Cascade`).
      batch_size: rows of the largest device step (default `Cascade`'s).
      repeats: timed rounds after the compiling one; the best time is kept.

    Returns:
      `CommitteeTimes`.
    """
    stages = list(cascade_members)
    singles = [Cascade([m], [], batch_size=batch_size) for m in members]
    # On XLA:CPU a vmapped convolution with per-member kernels is a slow grouped convolution;
    # members one after another in one step are faster there (docs/benchmarks.md).
    ensemble = Ensemble(members, batch_size=batch_size, strategy="auto")
    cascade = Cascade(
        [members[i] for i in stages],
        thresholds,
        rule=rule,
        confidence=confidence,
        batch_size=batch_size,
    )
    stage_inputs = [inputs[i] for i in stages]
    runs = {i: (lambda i=i: singles[i].run(inputs[i])) for i in range(len(members))}
    runs["ensemble"] = lambda: ensemble.logits(list(inputs))
    runs["cascade"] = lambda: cascade.run(stage_inputs)
    for key, run in runs.items():  # compile every shape the timed rounds will use
        output = run()
        if key == "cascade":
            cascade_output = output
    seconds = best_seconds(runs, repeats)
    return CommitteeTimes(
        member_seconds=[seconds[i] for i in range(len(members))],
        ensemble_seconds=seconds["ensemble"],
        cascade_seconds=seconds["cascade"],
        cascade_output=cascade_output,
        num_images=len(inputs[0]),
    )
