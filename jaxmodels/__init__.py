"""jaxmodels: what a model is and how it runs — Flax architectures, SSF, weight import, features."""

from jaxmodels import preprocess, ssf
from jaxmodels.features import extract_features, stream_reduce
from jaxmodels.load import load, save
from jaxmodels.preprocess import Preprocessing, preprocess_for_eval
from jaxmodels.registry import MODEL_NAMES, ModelSpec, create, spec

__all__ = [
    "MODEL_NAMES",
    "ModelSpec",
    "Preprocessing",
    "create",
    "extract_features",
    "load",
    "preprocess",
    "preprocess_for_eval",
    "save",
    "spec",
    "ssf",
    "stream_reduce",
]
