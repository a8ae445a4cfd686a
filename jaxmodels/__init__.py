"""jaxmodels: what a model is and how it runs, in layers (each imports only those below it):

- `jaxmodels.data`: data specs → sources of uint8 images → evaluation preprocessing, grain pipelines;
- `jaxmodels.models`: architectures (ResNet, ViT), the registry, SSF, parameter paths;
- `jaxmodels.weights`: checkpoint import and export, model references;
- `jaxmodels.inference`: prepared sets, evaluate/predict, features, device feeding, the artefact cache;
- `jaxmodels.committees`: ensembles and cascades (Wang et al., ICLR 2022), their fitting and timing;

with the basics every layer may use at the root: `sharding`, `distributed`, `atomic_files`,
`file_digests`, `jit_cache`, `host`. This module curates the names most callers need.
"""

from jaxmodels import committees, data, inference, models, weights
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
from jaxmodels.data.array_source import ArraySource
from jaxmodels.data.pipeline import Augment, eval_dataset, train_dataset
from jaxmodels.data.preprocess import Preprocessing, prepare_for_eval, preprocess_for_eval
from jaxmodels.data.sources import (
    DataError,
    ImageSource,
    cache_root,
    check_classes_within,
    open_source,
)
from jaxmodels.file_digests import content_digest
from jaxmodels.inference.evaluate import EvalResult, evaluate, evaluate_logits, predict
from jaxmodels.inference.features import extract_features, stream_reduce
from jaxmodels.inference.prepared import Prepared, prepare
from jaxmodels.models import paths, ssf
from jaxmodels.models.registry import MODEL_NAMES, ModelSpec, create, spec, spec_of
from jaxmodels.weights.checkpoint_io import load, model_info, save
from jaxmodels.weights.model_refs import BuiltModel, ModelRef, ModelRefError, build, parse_model_ref

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
    "inference",
    "load",
    "model_info",
    "models",
    "open_source",
    "parse_model_ref",
    "paths",
    "predict",
    "prepare",
    "prepare_for_eval",
    "preprocess_for_eval",
    "save",
    "search_cascades",
    "simulate_cascade",
    "spec",
    "spec_of",
    "ssf",
    "stream_reduce",
    "train_dataset",
    "weights",
]
