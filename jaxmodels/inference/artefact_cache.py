"""Member logits over a data set, computed once and kept on disk.

Fitting a cascade, searching its frontier and reporting it all work on every member's logits
[N, K] over a held-out and a test set (Wang et al., ICLR 2022, fit thresholds on held-out
predictions computed once per model). The forward passes are the expensive part, so their
results are cached under ``jaxmodels.cache_root() / "logits"`` (like ranking's features), one
``.npz`` per (model, data set), keyed by what determines them:

  * the architecture name and the weights' content hash (`jaxmodels.content_digest`, memoised by
    file size and modification time so an unchanged checkpoint is not re-read); a random
    initialisation by its seed and class count;
  * the data's fingerprint (`ImageSource.fingerprint`, its content);
  * the evaluation preprocessing (`jaxmodels.Preprocessing`) the images were prepared with.

The key is computed without building the model: a member's preprocessing, cost and class count
(`ModelFacts`) come from the reference itself — a registered name, or the ``model.json`` of a
model or run folder — or, for a checkpoint file, from a note written the first time that file
was built (``facts.json``). So a cache hit reads one file and builds nothing.

Shapes: N examples, K classes.

References:
  Wang, Kondratyuk, Christiansen, Kitani, Alon, Eban. "Wisdom of Committees: An Overlooked
  Approach to Faster and More Accurate Models." ICLR 2022. https://arxiv.org/abs/2012.01988
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib

import numpy as np

from jaxmodels.atomic_files import write_atomic
from jaxmodels.data import sources as data_lib
from jaxmodels.data.preprocess import Preprocessing
from jaxmodels.file_digests import content_digest
from jaxmodels.models import registry
from jaxmodels.weights.checkpoint_io import MODEL_JSON, model_dir, model_info
from jaxmodels.weights.model_refs import ModelRef

# Bump when what a cached file holds, or how logits are computed, changes.
CACHE_VERSION = 1
_FACTS_JSON = "facts.json"
_DIGESTS_JSON = "digests.json"


def default_cache_dir() -> pathlib.Path:
    """Where logits are cached by default: ``jaxmodels.cache_root() / "logits"``."""
    return data_lib.cache_root() / "logits"


@dataclasses.dataclass(frozen=True)
class ModelFacts:
    """What a committee needs to know about a member besides its logits.

    Attributes:
      num_classes: K, the width of its logits.
      flops_per_image: forward cost at its input size (`jaxmodels.ModelSpec.flops_per_image`).
      preprocessing: its evaluation preprocessing.
    """

    num_classes: int
    flops_per_image: int
    preprocessing: Preprocessing

    @classmethod
    def of_model(cls, model) -> ModelFacts:
        """The facts of a built jaxmodels module (`jaxmodels.spec_of`)."""
        spec = registry.spec_of(model)
        return cls(int(model.num_classes), int(spec.flops_per_image), spec.preprocessing)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, value: dict) -> ModelFacts:
        prep = dict(value["preprocessing"])
        prep["mean"], prep["std"] = tuple(prep["mean"]), tuple(prep["std"])
        return cls(int(value["num_classes"]), int(value["flops_per_image"]), Preprocessing(**prep))


class LogitsCache:
    """The on-disk cache of member logits (module docstring).

    Args:
      cache_dir: the directory; default `default_cache_dir()`. Created on the first write.
    """

    def __init__(self, cache_dir: str | os.PathLike | None = None):
        self.dir = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()

    def weights_key(self, ref: ModelRef, *, seed: int, random_init_classes: int) -> str:
        """The content hash of the reference's weights, or its random initialisation's seed."""
        if ref.checkpoint is None:
            return f"random-init seed {seed}, {random_init_classes} classes"
        return content_digest(ref.checkpoint, memo=self.dir / _DIGESTS_JSON)

    def facts(
        self, ref: ModelRef, weights_key: str, *, random_init_classes: int
    ) -> ModelFacts | None:
        """The member's facts without building it, or None when only a build can tell (a
        checkpoint file never built with this cache).

        Raises:
          ValueError: a model folder whose ``model.json`` does not describe a valid model.
        """
        if ref.checkpoint is None:
            spec = registry.spec(ref.name, num_classes=random_init_classes)
            return ModelFacts(random_init_classes, int(spec.flops_per_image), spec.preprocessing)
        folder = model_dir(ref.checkpoint)
        if folder.is_dir() and (folder / MODEL_JSON).is_file():
            meta = model_info(folder)
            if meta.get("num_classes") and meta.get("image_size"):  # format v2
                overrides = {
                    k: tuple(v) if isinstance(v, list) else v
                    for k, v in meta.get("overrides", {}).items()
                    if k not in ("dtype", "image_size")
                }  # as `jaxmodels.load` reads them back
                spec = registry.spec(
                    meta["name"],
                    num_classes=meta["num_classes"],
                    image_size=meta["image_size"],
                    **overrides,
                )
                return ModelFacts(
                    int(meta["num_classes"]), int(spec.flops_per_image), spec.preprocessing
                )
        noted = _read_json(self.dir / _FACTS_JSON).get(f"{ref.name}|{weights_key}")
        return None if noted is None else ModelFacts.from_json(noted)

    def note_facts(self, ref: ModelRef, weights_key: str, facts: ModelFacts) -> None:
        """Remembers a built checkpoint's facts, so its next lookup needs no build."""
        if ref.checkpoint is None:
            return
        notes = _read_json(self.dir / _FACTS_JSON)
        notes[f"{ref.name}|{weights_key}"] = facts.to_json()
        write_atomic(self.dir / _FACTS_JSON, lambda tmp: tmp.write_text(json.dumps(notes)))

    def path(self, ref: ModelRef, weights_key: str, facts: ModelFacts, source) -> pathlib.Path:
        """The cache file of this member's logits over `source` (an `ImageSource`)."""
        key = {
            "version": CACHE_VERSION,
            "model": ref.name,
            "weights": weights_key,
            "data": source.fingerprint,
            "preprocessing": dataclasses.asdict(facts.preprocessing),
        }
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
        return self.dir / f"{ref.name}-{digest}.npz"

    @staticmethod
    def read(path: pathlib.Path, source) -> np.ndarray | None:
        """The cached logits_NK float32, or None when absent or not of this data (a file
        whose labels differ from the source's is ignored, not trusted)."""
        try:
            with np.load(path) as cached:
                logits_NK, labels_N = cached["logits"], cached["labels"]
        except (OSError, ValueError, KeyError):
            return None
        if logits_NK.ndim != 2 or not np.array_equal(labels_N, np.asarray(source.labels)):
            return None
        return logits_NK.astype(np.float32, copy=False)

    def write(self, path: pathlib.Path, logits_NK: np.ndarray, source) -> None:
        """Stores logits with the source's labels, atomically (never a half-written file)."""
        write_atomic(
            path,
            lambda tmp: np.savez(
                tmp, logits=np.asarray(logits_NK, np.float32), labels=np.asarray(source.labels)
            ),
        )


def _read_json(path: pathlib.Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}
