"""jaxmodels: what a model is and how it runs — architectures, SSF, weight import, the data layer,
inference, ensembles and cascades."""

from jaxmodels import preprocess, ssf
from jaxmodels.features import extract_features, stream_reduce
from jaxmodels.inference import EvalResult, Prepared, evaluate, predict, prepare
from jaxmodels.load import content_digest, load, model_info, save
from jaxmodels.model_refs import BuiltModel, ModelRef, ModelRefError, build, parse_model_ref
from jaxmodels.preprocess import Preprocessing, preprocess_for_eval
from jaxmodels.registry import MODEL_NAMES, ModelSpec, create, spec, spec_of

__all__ = [
    "MODEL_NAMES",
    "BuiltModel",
    "EvalResult",
    "ModelRef",
    "ModelRefError",
    "ModelSpec",
    "Prepared",
    "Preprocessing",
    "build",
    "content_digest",
    "create",
    "evaluate",
    "extract_features",
    "load",
    "model_info",
    "parse_model_ref",
    "predict",
    "prepare",
    "preprocess",
    "preprocess_for_eval",
    "save",
    "spec",
    "spec_of",
    "ssf",
    "stream_reduce",
]
