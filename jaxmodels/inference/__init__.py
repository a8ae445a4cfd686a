"""Running models over data on every device: prepared sets, evaluate and predict (`evaluate`),
feature extraction and streamed reductions (`features`), device feeding (`image_batches`,
`row_batches`) and the on-disk artefact cache (`artefact_cache`)."""

from jaxmodels.inference import artefact_cache, evaluate, features, image_batches, row_batches

__all__ = ["artefact_cache", "evaluate", "features", "image_batches", "row_batches"]
