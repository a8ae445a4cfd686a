"""Serve a hub's models as a cascade: fit it, find the frontier, measure it, report it.

The logic behind `hubtune serve`, after Wang et al. (ICLR 2022): a cascade of off-the-shelf
models that answers each example at the first stage confident enough matches the largest model's
accuracy at a fraction of its average cost. Given member references, a held-out and a test set:

  1. members are parsed and checked, their logits on both sets read from the cache or computed
     once (`hubtune.serve.members`, `jaxmodels.inference.artefact_cache`), and ordered by cost
     (`jaxmodels.spec` FLOPs per image);
  2. the accuracy/average-cost Pareto frontier over ordered subsets of up to `max_stages`
     members is searched on held-out logits (`search_cascades`);
  3. the cascade is chosen for a goal (`hubtune.serve.choice`) — by default the costliest
     member's held-out accuracy (the paper's), or a target accuracy, or an average-FLOPs budget:
     the frontier point that meets it at the lowest cost (target) or with the highest accuracy
     (budget), its thresholds then refitted for that goal on its members (`fit_cascade`, exact
     for two stages) if that does better. A goal no cascade meets is a message, and the best found is reported;
  4. every single model, the ensemble of all and the chosen cascade are scored on the test set
     from their logits (`simulate_cascade`, the executor's arithmetic), and, unless timing is
     off, timed on the test images with the adaptive executor (`jaxmodels.committees.timing`).

`run_report` returns the report as a JSON-ready dict; `hubtune.serve.output` prints it and
writes ``cascade.json`` and ``cascade.png``.

Shapes: P members (the pool), N examples, K classes.

References:
  Wang, Kondratyuk, Christiansen, Kitani, Alon, Eban. "Wisdom of Committees: An Overlooked
  Approach to Faster and More Accurate Models." ICLR 2022. https://arxiv.org/abs/2012.01988
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
from collections.abc import Callable, Sequence

import jax
import numpy as np

from hubtune.serve import members as cascade_members
from hubtune.serve.choice import GIGA, Goal, choose_cascade, thin_frontier
from hubtune.serve.members import CascadeInputError, Pool
from jaxmodels import host
from jaxmodels.committees import deploy
from jaxmodels.committees import rules as cascade_rules
from jaxmodels.committees import timing as cascade_timing
from jaxmodels.committees.executors import Member
from jaxmodels.committees.fit import MAX_STAGES
from jaxmodels.data import sources as data_lib
from jaxmodels.inference.artefact_cache import LogitsCache
from jaxmodels.weights import model_refs

FORMAT = "hubtune-cascade-v1"
HELDOUT, TEST = "held-out", "test"
# The held-out frontier moves in steps of one example (thousands of points for a large set);
# the report keeps this many, spread evenly over its accuracy range.
MAX_FRONTIER_POINTS = 40


def check_options(
    target_accuracy, flops_budget, rule, confidence, max_stages, repeats, batch_size
) -> None:
    """Raises `CascadeInputError` (one line) for an option out of range."""
    if target_accuracy is not None and flops_budget is not None:
        raise CascadeInputError("give at most one of --target-accuracy and --flops-budget")
    if target_accuracy is not None and not 0.0 < target_accuracy <= 1.0:
        raise CascadeInputError(f"--target-accuracy must lie in (0, 1]; got {target_accuracy}")
    if flops_budget is not None and not (math.isfinite(flops_budget) and flops_budget > 0):
        raise CascadeInputError(
            f"--flops-budget must be a positive GFLOPs figure; got {flops_budget}"
        )
    if rule not in cascade_rules.RULES:
        raise CascadeInputError(
            f"--rule must be one of {', '.join(cascade_rules.RULES)}; got {rule!r}"
        )
    if confidence not in cascade_rules.CONFIDENCES:
        raise CascadeInputError(
            f"--confidence must be one of {', '.join(cascade_rules.CONFIDENCES)}; got {confidence!r}"
        )
    if not 1 <= max_stages <= MAX_STAGES:
        raise CascadeInputError(f"--max-stages must lie in 1..{MAX_STAGES}; got {max_stages}")
    if repeats < 1:
        raise CascadeInputError(f"--repeats must be at least 1; got {repeats}")
    devices = jax.device_count()
    if batch_size is not None and (batch_size < 1 or batch_size % devices):
        raise CascadeInputError(
            f"--batch-size must be a positive multiple of the {devices} devices; got {batch_size}"
        )


def _summary(out: cascade_rules.CascadeOutput, labels_N) -> dict:
    """A cascade's accuracy, average and worst-case GFLOPs and exit fractions on one set."""
    return {
        "accuracy": float(np.mean(out.predictions == labels_N)),
        "gflops": out.avg_flops / GIGA,
        "worst_case_gflops": out.worst_case_flops / GIGA,
        "exit_fractions": [float(f) for f in out.exit_fractions],
    }


# ----------------------------------------------------------------------------- the report


def run_report(
    models: Sequence[str],
    heldout: str,
    test: str,
    *,
    target_accuracy: float | None = None,
    flops_budget: float | None = None,
    rule: str = "ensemble",
    confidence: str = "max_prob",
    max_stages: int = MAX_STAGES,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    data_dir: str | None = None,
    timing: bool = True,
    repeats: int = 3,
    log: Callable[[str], None] = print,
) -> dict:
    """Fits, searches, scores and times cascades of the given models (module docstring).

    Args:
      models: member references (`hubtune.serve.members.parse_members`).
      heldout: data spec of the set thresholds are fitted on.
      test: data spec of the set everything is scored and timed on.
      target_accuracy: held-out accuracy the cascade must reach (default: the costliest
        member's own).
      flops_budget: instead, average GFLOPs per image not to exceed.
      rule, confidence: the cascade's stage rule and confidence (`jaxmodels.Cascade`).
      max_stages: the longest cascade searched, 1..4.
      cache_dir: the logits cache (default `jaxmodels.inference.artefact_cache.default_cache_dir()`).
      batch_size: global batch of the logits passes and the executor (default theirs).
      seed: seed of random initialisations (bare NAME references).
      data_dir: TFDS data directory.
      timing: build the members and time singles, ensemble and cascade on the test images;
        False works from the logits alone (no model is built when they are cached).
      repeats: timed rounds; the best is kept.
      log: progress printer.

    Returns:
      The report, a JSON-ready dict (what ``cascade.json`` holds).

    Raises:
      CascadeInputError, jaxmodels.DataError, jaxmodels.ModelRefError: user errors (one line).
    """
    check_options(target_accuracy, flops_budget, rule, confidence, max_stages, repeats, batch_size)
    refs = cascade_members.parse_members(models)
    sources = {
        HELDOUT: data_lib.open_source(heldout, data_dir=data_dir),
        TEST: data_lib.open_source(test, data_dir=data_dir),
    }
    for role, source in sources.items():
        log(f"{role}: {source.describe()}")
    if sources[HELDOUT].fingerprint == sources[TEST].fingerprint:
        log(
            "warning: the held-out and the test data are the same images; the test scores then "
            "judge thresholds on the data they were fitted on (optimistic)"
        )
    prepared = cascade_members.PreparedSets(sources, batch_size, log)
    members = cascade_members.member_logits(
        refs, prepared, LogitsCache(cache_dir), seed=seed, log=log
    )
    members.sort(key=lambda m: m.facts.flops_per_image)  # stable: ties keep the given order
    pool = Pool(
        members,
        {role: np.stack([m.logits[role] for m in members]) for role in sources},
        {role: np.asarray(source.labels) for role, source in sources.items()},
        np.array([m.facts.flops_per_image for m in members], np.float64),
        rule,
        confidence,
    )
    heldout_accuracy = pool.single_accuracy(HELDOUT)
    if target_accuracy is not None:
        goal = Goal(target_accuracy, None, "--target-accuracy")
    elif flops_budget is not None:
        goal = Goal(None, flops_budget * GIGA, "--flops-budget")
    else:
        goal = Goal(heldout_accuracy[-1], None, f"the costliest model's, {pool.names[-1]}")
    log(
        f"searching cascades of up to {min(max_stages, len(members))} of {len(members)} models "
        f"for {goal.describe()}"
    )
    frontier, chosen, thresholds, heldout_out = choose_cascade(
        pool.logits[HELDOUT],
        pool.labels[HELDOUT],
        pool.costs,
        goal,
        rule=rule,
        confidence=confidence,
        max_stages=max_stages,
    )
    heldout_summary = _summary(heldout_out, pool.labels[HELDOUT])
    num_heldout = len(pool.labels[HELDOUT])
    correct = round(heldout_summary["accuracy"] * num_heldout)
    reached = goal.rank(correct, heldout_out.avg_flops, num_heldout)[0]
    message = ""
    if not reached:
        message = (
            f"no cascade reaches {goal.describe()}; reporting the "
            f"{'most accurate' if goal.target_accuracy is not None else 'cheapest'} found: "
            f"held-out accuracy {heldout_summary['accuracy']:.4f} at "
            f"{heldout_summary['gflops']:.4g} GFLOPs per image"
        )
        log(message)
    report = {
        "format": FORMAT,
        "data": {role: _data_json(s, members[0].facts.num_classes) for role, s in sources.items()},
        "rule": rule,
        "confidence": confidence,
        "goal": {
            "target_accuracy": goal.target_accuracy,
            "flops_budget_gflops": None if goal.flops_budget is None else goal.flops_budget / GIGA,
            "reason": goal.reason,
            "reached": bool(reached),
            "message": message,
        },
        "members": _members_json(pool, heldout_accuracy),
        "ensembles": [
            {
                "members": pool.names[: k + 1],
                "gflops": float(pool.costs[: k + 1].sum()) / GIGA,
                "heldout_accuracy": pool.ensemble_accuracy(HELDOUT, range(k + 1)),
                "test_accuracy": pool.ensemble_accuracy(TEST, range(k + 1)),
            }
            for k in range(len(members))
        ],
        "frontier": [
            {
                "members": [pool.names[i] for i in point.members],
                "thresholds": [float(t) for t in point.thresholds],
                "heldout_accuracy": point.accuracy,
                "heldout_gflops": point.avg_cost / GIGA,
                "test": _summary(
                    pool.cascade(TEST, point.members, point.thresholds), pool.labels[TEST]
                ),
            }
            for point in thin_frontier(frontier, MAX_FRONTIER_POINTS)
        ],
        "frontier_points_found": len(frontier),
        "cascade": {
            "members": [pool.names[i] for i in chosen],
            "thresholds": [float(t) for t in thresholds],
            "heldout": heldout_summary,
            "test": _summary(pool.cascade(TEST, chosen, thresholds), pool.labels[TEST]),
        },
        "timing": None,
        "devices": [str(d) for d in jax.devices()],
        "machine": platform.platform(),
        "cpu": host.cpu_description(),  # the timings are this CPU's
        "jax": jax.__version__,
    }
    if timing:
        report["timing"] = _timing(
            pool, chosen, thresholds, prepared, batch_size, seed, repeats, log, goal
        )
        report["timing"]["cascade_flops_speedup_over_costliest"] = (
            report["members"][-1]["gflops"] / report["cascade"]["test"]["gflops"]
        )
    return report


def _data_json(source, num_classes: int) -> dict:
    return {
        "spec": source.spec,
        "fingerprint": source.fingerprint,
        "images": len(source),
        "classes": int(num_classes),
    }


def _members_json(pool: Pool, heldout_accuracy) -> list[dict]:
    test_accuracy = pool.single_accuracy(TEST)
    return [
        {
            "label": m.ref.label,
            "reference": m.ref.text,
            "name": m.ref.name,
            "weights": m.weights_key,
            "gflops": m.facts.flops_per_image / GIGA,
            "preprocessing": dataclasses.asdict(m.facts.preprocessing),
            "heldout_accuracy": heldout_accuracy[p],
            "test_accuracy": test_accuracy[p],
            "logits_cache": {role: str(path) for role, path in m.cache_files.items()},
            "from_cache": m.from_cache,
        }
        for p, m in enumerate(pool.candidates)
    ]


def _timing(
    pool: Pool, chosen, thresholds, prepared, batch_size, seed, repeats, log, goal: Goal
) -> dict:
    """Builds the members and times them, the ensemble and the chosen cascade (test images);
    for an accuracy goal, also what the library deploys by measured time (`deploy.choose`)."""
    log(
        f"timing {len(pool.candidates)} models, their ensemble and the cascade on the test images "
        f"(best of {repeats})"
    )
    classes = pool.candidates[0].facts.num_classes
    members = []
    for m in pool.candidates:
        built = model_refs.build(m.ref, init_seed=seed, random_init_classes=classes)
        members.append(
            Member(
                built.model,
                built.variables,
                m.facts.flops_per_image,
                m.facts.preprocessing,
                m.ref.label,
            )
        )
    inputs = prepared.member_inputs(TEST, [m.facts.preprocessing for m in pool.candidates])
    times = cascade_timing.time_committees(
        members,
        inputs,
        chosen,
        thresholds,
        rule=pool.rule,
        confidence=pool.confidence,
        batch_size=batch_size,
        repeats=repeats,
    )
    n, out = times.num_images, times.cascade_output
    simulated = pool.cascade(TEST, chosen, thresholds)
    deployment = None
    if goal.target_accuracy is not None:
        deployment = _deployment(pool, members, prepared, goal, batch_size, repeats)
        log(deployment["message"] or f"deploying {' → '.join(deployment['members'])}")
    return {
        "deployment": deployment,
        "repeats": repeats,
        "images": n,
        "member_ms_per_image": [1e3 * s / n for s in times.member_seconds],
        "ensemble_ms_per_image": 1e3 * times.ensemble_seconds / n,
        "cascade_ms_per_image": 1e3 * times.cascade_seconds / n,
        "cascade_speedup_over_costliest": times.member_seconds[-1] / times.cascade_seconds,
        # The executor ran the models again at its own batch shapes: its answers equal the
        # simulation on the cached logits up to float rounding right at a threshold.
        "executor": {
            **_summary(out, pool.labels[TEST]),
            "agreement_with_simulation": float(np.mean(out.predictions == simulated.predictions)),
            "same_exit_stage": float(np.mean(out.exit_stage == simulated.exit_stage)),
        },
    }


def _deployment(pool: Pool, members, prepared, goal: Goal, batch_size, repeats) -> dict:
    """What `deploy.choose` deploys for the accuracy goal, by each member's time measured on the
    held-out images through the executor (FLOPs order kept: the executor runs stages by cost)."""
    inputs = prepared.member_inputs(HELDOUT, [m.facts.preprocessing for m in pool.candidates])
    costs = deploy.measure_costs(members, inputs, batch_size=batch_size, repeats=repeats)
    chosen = deploy.choose(
        pool.logits[HELDOUT],
        pool.labels[HELDOUT],
        costs,
        goal.target_accuracy,
        flops_M=pool.costs,
        rule=pool.rule,
        confidence=pool.confidence,
        names=pool.names,
    )
    return {
        "members": [pool.names[i] for i in chosen.members],
        "thresholds": [float(t) for t in chosen.thresholds],
        "baseline": pool.names[chosen.single],
        "predicted_speedup_over_baseline": chosen.predicted_speedup,
        "best_cascade_predicted_speedup": (
            None if chosen.best_cascade is None else chosen.best_cascade[2]
        ),
        "member_ms_per_image": [1e3 * s for s in costs.per_image_M],
        "member_fixed_ms": [1e3 * s for s in costs.fixed_M],
        "heldout_accuracy": chosen.heldout_accuracy,
        "message": chosen.message,
    }
