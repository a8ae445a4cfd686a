"""Committees of models (Wisdom of Committees, Wang et al., ICLR 2022): ensembles and adaptive
cascades on a device mesh (`executors`), their members (`members`), the decision rules
(`rules`), fitting thresholds on held-out logits (`fit`) and measured wall time (`timing`)."""

from jaxmodels.committees import executors, fit, members, rules, timing
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
    "executors",
    "fit",
    "fit_cascade",
    "members",
    "rules",
    "search_cascades",
    "simulate_cascade",
    "timing",
]
