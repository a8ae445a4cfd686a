"""jaxmodels: what a model is and how it runs — Flax architectures, SSF, weight import, features,
and the data layer (specs → sources → grain pipelines)."""

from jaxmodels import data, pipeline, preprocess, ssf
from jaxmodels.array_source import ArraySource
from jaxmodels.data import (
    DataError,
    ImageSource,
    cache_root,
    check_classes_within,
    open_source,
)
from jaxmodels.features import extract_features, stream_reduce
from jaxmodels.load import load, save
from jaxmodels.pipeline import Augment, eval_dataset, train_dataset
from jaxmodels.preprocess import Preprocessing, prepare_for_eval, preprocess_for_eval
from jaxmodels.registry import MODEL_NAMES, ModelSpec, create, spec

__all__ = [
    "MODEL_NAMES",
    "ArraySource",
    "Augment",
    "DataError",
    "ImageSource",
    "ModelSpec",
    "Preprocessing",
    "cache_root",
    "check_classes_within",
    "create",
    "data",
    "eval_dataset",
    "extract_features",
    "load",
    "open_source",
    "pipeline",
    "prepare_for_eval",
    "preprocess",
    "preprocess_for_eval",
    "save",
    "spec",
    "ssf",
    "stream_reduce",
    "train_dataset",
]
