"""Models named on a command line: ``[LABEL:]NAME[=CHECKPOINT]`` or a folder, parsed and built once.

Ranking a hub, fine-tuning, soups and cascades all take models as text. `parse_model_ref` reads
one and checks it cheaply (the name is known, the checkpoint exists and its header opens), before
any heavy work; `build` turns it into a module and its variables, with a new head of the asked
size and fresh SSF parameters when asked, all drawn from one `init_seed`.

Forms:
  * ``NAME`` — a random initialisation of a registered architecture (seeded), for trying things;
  * ``NAME=CHECKPOINT`` — ``.safetensors`` (torchvision/timm), ``.npz`` (big_vision /
    vision_transformer) or a directory `jaxmodels.save` wrote;
  * ``FOLDER`` — a directory `jaxmodels.save` wrote, or a fine-tuning run folder (its ``model/``):
    the architecture is read from its ``model.json``;
  * any of these behind ``LABEL:`` — the short name used in tables, JSON and plots. Without one the
    label is NAME for a bare name, the run folder's name for a folder, and the file's stem for a
    file.
"""

from __future__ import annotations

import dataclasses
import pathlib
import zipfile

import jax
import jax.numpy as jnp

from jaxmodels.file_digests import content_digest
from jaxmodels.models import registry
from jaxmodels.models import ssf as ssf_lib
from jaxmodels.weights.checkpoint_io import MODEL_JSON, load, model_dir, model_info


class ModelRefError(ValueError):
    """A model reference that names nothing loadable (a one-line user error)."""


@dataclasses.dataclass(frozen=True)
class ModelRef:
    """A parsed model reference.

    Attributes:
      label: short name for tables and plots.
      name: the registered architecture.
      checkpoint: the weights' path, or None for a random initialisation.
      text: the reference as given.
    """

    label: str
    name: str
    checkpoint: pathlib.Path | None
    text: str


@dataclasses.dataclass(frozen=True)
class BuiltModel:
    """What `build` returns.

    Attributes:
      model: the Flax module.
      variables: its variables (`jax.Array`s).
      ref: the reference it was built from.
      checkpoint_sha256: content hash of the checkpoint (None for a random initialisation).
    """

    model: object
    variables: dict
    ref: ModelRef
    checkpoint_sha256: str | None


def parse_model_ref(text: str) -> ModelRef:
    """Parses and checks one reference (module docstring); no weights are read.

    Raises:
      ModelRefError: unknown name, missing path, a checkpoint whose header does not open, or a
        folder without a model description.
    """
    if not isinstance(text, str) or not text.strip():
        raise ModelRefError(f"a model reference must be a non-empty string; got {text!r}")
    label, body = _split_label(text)
    name, sep, path = body.partition("=")
    if sep and name not in registry.MODEL_NAMES and pathlib.Path(body).is_dir():
        name, sep = body, ""  # a folder whose name holds '=': a sweep's run, lr=0.001_seed=0
    if not sep and name in registry.MODEL_NAMES:
        return ModelRef(label or name, name, None, text)
    if not sep:  # a folder described by its model.json
        folder = pathlib.Path(body)
        if not folder.is_dir():
            raise ModelRefError(
                f"model {text!r} is neither a known name ({', '.join(registry.MODEL_NAMES)}) "
                "nor a model or run folder"
            )
        try:
            info = model_info(folder)
        except ValueError as err:
            raise ModelRefError(
                f"model folder {body!r} has no readable model.json ({err})"
            ) from err
        checkpoint = model_dir(folder)
        return ModelRef(label or _folder_label(checkpoint), info["name"], checkpoint, text)
    if name not in registry.MODEL_NAMES:
        raise ModelRefError(
            f"unknown model {name!r} in {text!r}; known: {', '.join(registry.MODEL_NAMES)}"
        )
    checkpoint = pathlib.Path(path)
    if not path or not checkpoint.exists():
        raise ModelRefError(f"checkpoint {path!r} of model {text!r} not found")
    check_checkpoint(checkpoint)
    if checkpoint.is_dir():
        checkpoint = model_dir(checkpoint)  # a run folder names its weights' folder
        default_label = _folder_label(checkpoint)
    else:
        default_label = checkpoint.stem
    return ModelRef(label or default_label, name, checkpoint, text)


def check_checkpoint(path: pathlib.Path) -> None:
    """Opens a checkpoint's header (safetensors header, npz directory, model.json) or raises.

    Raises:
      ModelRefError: an empty, garbage or truncated file, or a folder without weights.
    """
    path = pathlib.Path(path)
    where = str(path)
    try:
        if path.is_dir():
            folder = model_dir(path)
            if (folder / MODEL_JSON).exists():
                model_info(folder)
                if not (folder / "variables").is_dir():
                    raise ModelRefError(f"model folder {where!r} has no variables/ directory")
            return
        if path.stat().st_size == 0:
            raise ModelRefError(f"checkpoint {where!r} is empty")
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "numpy") as f:
                f.keys()
        elif path.suffix == ".npz":
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
                if bad is not None:
                    raise ModelRefError(f"checkpoint {where!r} has a corrupt entry {bad!r}")
        else:
            raise ModelRefError(
                f"checkpoint {where!r} must be a .safetensors or .npz file or a model folder"
            )
    except ModelRefError:
        raise
    except Exception as err:  # safetensors/zipfile/json raise many kinds for broken files
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelRefError(f"checkpoint {where!r} cannot be read: {first}") from err


def build(
    ref: ModelRef | str,
    *,
    num_classes: int | None = None,
    ssf: bool = False,
    init_seed: int = 0,
    image_size: int | None = None,
    random_init_classes: int = 1000,
) -> BuiltModel:
    """The module and variables a reference names, ready to evaluate or fine-tune.

    Args:
      ref: a `ModelRef` or its text.
      num_classes: head size; default the checkpoint's (a new size re-initialises the head
        from `init_seed`; a random initialisation gets `random_init_classes`).
      ssf: add SSF parameters (drawn from `init_seed`, `jaxmodels.models.ssf.with_fresh_ssf`).
      init_seed: seeds every freshly initialised leaf (random init, a new head, SSF), so runs
        that share it start from identical parameters.
      image_size: input side (a ViT's position embedding is resized); default the checkpoint's.
      random_init_classes: head size of a random initialisation when `num_classes` is None.

    Returns:
      A `BuiltModel`.

    Raises:
      ModelRefError: the reference or its checkpoint cannot be loaded (one line).
    """
    ref = parse_model_ref(ref) if isinstance(ref, str) else ref
    overrides = {} if image_size is None else {"image_size": image_size}
    if ref.checkpoint is None:
        model = registry.create(
            ref.name, num_classes=num_classes or random_init_classes, ssf=ssf, **overrides
        )
        variables = registry.init_variables(model, init_seed)
        return BuiltModel(model, dict(variables), ref, None)
    try:
        plain, loaded = load(
            ref.name, ref.checkpoint, num_classes=num_classes, image_size=image_size,
            seed=init_seed,
        )  # fmt: skip
    except (OSError, ValueError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelRefError(f"cannot load {ref.label!r}: {first}") from err
    digest = content_digest(ref.checkpoint)
    if not ssf:
        return BuiltModel(plain, loaded, ref, digest)
    model = plain.clone(ssf=True)
    # shapes only: every leaf but SSF's comes from the checkpoint, so compiling init is waste
    abstract = jax.eval_shape(model.init, jax.random.key(0), _dummy(model))
    return BuiltModel(model, ssf_lib.with_fresh_ssf(dict(abstract), loaded, init_seed), ref, digest)


def _dummy(model) -> jax.Array:
    size = model.image_size
    return jnp.zeros((1, size, size, 3), jnp.float32)


def _split_label(text: str) -> tuple[str | None, str]:
    """``LABEL:REST`` → (LABEL, REST); a colon inside a path or after '=' is not a label."""
    head, sep, rest = text.partition(":")
    if not sep or "=" in head or "/" in head or not head or not rest:
        return None, text
    return head, rest


def _folder_label(model_dir: pathlib.Path) -> str:
    """A run folder's name for `RUN/model`, else the folder's own name."""
    model_dir = pathlib.Path(model_dir).absolute()
    return model_dir.parent.name if model_dir.name == "model" else model_dir.name
