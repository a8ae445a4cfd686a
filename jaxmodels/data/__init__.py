"""The data layer: a data spec in, labelled uint8 RGB images out, prepared for a model.

`sources` parses specs (`open_source`: ``.npz`` files, image folders, ``tfds:NAME:SPLIT``) into
random-access `ImageSource`s; `preprocess` is every model's evaluation preprocessing; `pipeline`
builds the grain datasets that training and evaluation iterate over.
"""

from jaxmodels.data import array_source, pipeline, preprocess, sources
from jaxmodels.data.sources import (
    DataError,
    ImageSource,
    cache_root,
    check_classes_within,
    checked_labels,
    open_source,
)

__all__ = [
    "DataError",
    "ImageSource",
    "array_source",
    "cache_root",
    "check_classes_within",
    "checked_labels",
    "open_source",
    "pipeline",
    "preprocess",
    "sources",
]
