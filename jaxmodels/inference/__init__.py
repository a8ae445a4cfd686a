"""Running models over data on every device: evaluation sets (`prepared`), evaluate and predict
(`evaluate`) in the model's or a lower compute dtype (`compute_dtype`),
feature extraction and streamed reductions (`features`), device feeding (`image_batches`,
`row_batches`) and the on-disk artefact cache (`artefact_cache`)."""

from jaxmodels.inference import (
    artefact_cache,
    compute_dtype,
    evaluate,
    features,
    image_batches,
    prepared,
    row_batches,
)

__all__ = [
    "artefact_cache",
    "compute_dtype",
    "evaluate",
    "features",
    "image_batches",
    "prepared",
    "row_batches",
]
