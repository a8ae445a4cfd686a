"""jaxmodels: what a model is and how it runs — Flax architectures, SSF, weight import, features,
ensembles and cascades."""

from jaxmodels import committees, preprocess, ssf
from jaxmodels.committees import (
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
from jaxmodels.features import extract_features, stream_reduce
from jaxmodels.load import load, save
from jaxmodels.preprocess import Preprocessing, preprocess_for_eval
from jaxmodels.registry import MODEL_NAMES, ModelSpec, create, spec

__all__ = [
    "MODEL_NAMES",
    "Cascade",
    "CascadeFit",
    "CascadeOutput",
    "Ensemble",
    "FrontierPoint",
    "Member",
    "ModelSpec",
    "Preprocessing",
    "committees",
    "create",
    "extract_features",
    "fit_cascade",
    "load",
    "preprocess",
    "preprocess_for_eval",
    "save",
    "search_cascades",
    "simulate_cascade",
    "spec",
    "ssf",
    "stream_reduce",
]
