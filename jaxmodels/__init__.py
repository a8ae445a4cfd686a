"""jaxmodels: what a model is and how it runs — architectures, SSF, weight import, the data layer
(specs → sources → grain pipelines), inference, ensembles and cascades."""

from jaxmodels import committees, data, paths, pipeline, preprocess, ssf
from jaxmodels.array_source import ArraySource
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
from jaxmodels.data import (
    DataError,
    ImageSource,
    cache_root,
    check_classes_within,
    open_source,
)
from jaxmodels.features import extract_features, stream_reduce
from jaxmodels.inference import EvalResult, Prepared, evaluate, evaluate_logits, predict, prepare
from jaxmodels.load import content_digest, load, model_info, save
from jaxmodels.model_refs import BuiltModel, ModelRef, ModelRefError, build, parse_model_ref
from jaxmodels.pipeline import Augment, eval_dataset, train_dataset
from jaxmodels.preprocess import Preprocessing, prepare_for_eval, preprocess_for_eval
from jaxmodels.registry import MODEL_NAMES, ModelSpec, create, spec, spec_of

__all__ = [
    "MODEL_NAMES",
    "ArraySource",
    "Augment",
    "BuiltModel",
    "Cascade",
    "CascadeFit",
    "CascadeOutput",
    "DataError",
    "Ensemble",
    "EvalResult",
    "FrontierPoint",
    "ImageSource",
    "Member",
    "ModelRef",
    "ModelRefError",
    "ModelSpec",
    "Prepared",
    "Preprocessing",
    "build",
    "cache_root",
    "check_classes_within",
    "committees",
    "content_digest",
    "create",
    "data",
    "eval_dataset",
    "evaluate",
    "evaluate_logits",
    "extract_features",
    "fit_cascade",
    "load",
    "model_info",
    "open_source",
    "parse_model_ref",
    "paths",
    "pipeline",
    "predict",
    "prepare",
    "prepare_for_eval",
    "preprocess",
    "preprocess_for_eval",
    "save",
    "search_cascades",
    "simulate_cascade",
    "spec",
    "spec_of",
    "ssf",
    "stream_reduce",
    "train_dataset",
]
