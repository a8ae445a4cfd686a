"""Committees of models (Wisdom of Committees, Wang et al., ICLR 2022): ensembles and adaptive
cascades on a device mesh (`executors`, `cascade`), their members (`members`), the decision rules
(`rules`), fitting thresholds on held-out logits (`fit`, on the exact sweeps of `sweeps`), measured
wall time (`timing`) and the choice of what to deploy by that time (`deploy`), and requests of a
few images in one call (`online`)."""

from jaxmodels.committees import (
    cascade,
    deploy,
    executors,
    fit,
    members,
    online,
    rules,
    sweeps,
    timing,
)
from jaxmodels.committees.executors import (
    Cascade,
    CascadeFit,
    CascadeOutput,
    Ensemble,
    FrontierPoint,
    Member,
    fit_cascade,
    search_cascades,
    simulate_cascade,
)

__all__ = [
    "Cascade",
    "CascadeFit",
    "CascadeOutput",
    "Ensemble",
    "FrontierPoint",
    "Member",
    "cascade",
    "deploy",
    "executors",
    "fit",
    "fit_cascade",
    "members",
    "online",
    "rules",
    "search_cascades",
    "simulate_cascade",
    "sweeps",
    "timing",
]
