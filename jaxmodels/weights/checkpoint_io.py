"""Load pre-trained weights into jaxmodels' architectures, or fail loudly.

`load(path)` or `load(name, path)` reads three kinds of checkpoint and returns `(model, variables)`:
  * `.safetensors` — a torchvision/timm ResNet or timm ViT state dict, read with
    `safetensors.numpy` (no torch needed; see `jaxmodels.weights.from_torch` for the layout changes);
  * `.npz` — a google-research/vision_transformer or big_vision ViT (`jaxmodels.weights.from_npz`);
  * a directory — hubtune's own format as written by `save` (`variables/`, an orbax checkpoint,
    beside `model.json`, which names the architecture so `load(path)` needs no name), a run
    folder holding such a directory as `model/`, or a bare orbax checkpoint of
    `{'params': ..., 'batch_stats': ...}` (`orbax.checkpoint.StandardCheckpointer().save`).

Only what the architectures express can load: class-token ViTs without a pre-logits layer,
global-average pooling, MAP head, layer scale or register tokens, and torchvision-style
ResNets (v1.5, 1×1 conv shortcuts). Other checkpoints are rejected with their unknown keys.

The architecture comes from `name` (or `model.json`) and `**overrides` (as in
`jaxmodels.create`); the number of classes and, for a ViT, the image size are read from the
checkpoint. Every parameter of the model must come from the checkpoint and every checkpoint entry
must land in the model with the right shape, otherwise `ValueError` lists the offending keys —
nothing is silently left at its random initialisation. Then, as fine-tuning needs:
  * `num_classes` different from the checkpoint's → the head is re-initialised (seeded) with
    the model's own initialiser;
  * `image_size` different from the checkpoint's (ViT) → the position embedding of the patch
    grid is resized bilinearly (half-pixel centres, as torch's `align_corners=False`), the
    class token's entry is kept.
"""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmodels import sharding
from jaxmodels.models import paths, registry
from jaxmodels.weights import from_npz as load_npz
from jaxmodels.weights import from_torch as load_torch
from jaxmodels.weights import key_check
from jaxmodels.weights.orbax_files import quiet_orbax, restore_as_numpy

MODEL_JSON = "model.json"
_VARIABLES_DIR = "variables"
_FORMAT = "hubtune-variables-v2"
_FORMATS = ("hubtune-variables-v1", _FORMAT)
_POS_EMBEDDING = "params/Transformer/posembed_input/pos_embedding"


def load(
    name_or_path: str | pathlib.Path,
    path: str | pathlib.Path | None = None,
    *,
    num_classes: int | None = None,
    image_size: int | None = None,
    seed: int = 0,
    **overrides: Any,
):
    """Builds a model and fills it with the weights at `path`.

    Called as `load(path)` for hubtune's own directories (the name comes from `model.json`) or
    as `load(name, path)` for any checkpoint.

    Args:
      name_or_path: a `jaxmodels.MODEL_NAMES` entry, e.g. 'resnet50' or 'vit_b16' (then `path`
        is the checkpoint), or the checkpoint path itself when it is a directory written by
        `save` or a run folder holding one as `model/`.
      path: a `.safetensors` file (torchvision/timm state dict), a `.npz` file
        (vision_transformer/big_vision ViT) or a directory (see the module docstring).
      num_classes: K of the returned model; default the checkpoint's. A different K
        re-initialises the head from `seed`; required for a checkpoint without a head
        (e.g. timm `num_classes=0` backbones), whose head is then initialised.
      image_size: input side of the returned model; default the checkpoint's. For a ViT a
        different size resizes the position embedding; a ResNet records it as its eval size.
      seed: PRNG seed for a re-initialised head.
      **overrides: architecture fields passed to `jaxmodels.create` (e.g. `width=8,
        stage_sizes=(1, 1, 1, 1)` or `num_heads=2`); `.npz` checkpoints default to
        `gelu_approximate=True` (their GELU), safetensors to exact GELU (timm). timm's fused
        qkv does not record the number of heads: for safetensors ViTs `num_heads` comes from
        `name`/overrides and cannot be checked against the weights (`.npz` kernels can).

    Returns:
      `(model, variables)`: the Flax module and `{'params': ..., 'batch_stats': ...}` (ResNet)
      or `{'params': ...}` (ViT) as float32 `jax.Array`s.

    Raises:
      FileNotFoundError: `path` does not exist.
      ValueError: unknown name or file type; a directory without `model.json` and no name given;
        checkpoint keys that are unknown, missing or of the wrong shape (all named); bad
        `num_classes`/`image_size`.
      TypeError: an override the architecture has no field for.
    """
    if path is None:
        path, name = pathlib.Path(name_or_path), None
    else:
        path, name = pathlib.Path(path), name_or_path
    if not path.exists():
        raise FileNotFoundError(f"checkpoint path {str(path)!r} does not exist")
    path = model_dir(path)
    if name is None:
        if not (path / MODEL_JSON).is_file():
            raise ValueError(
                f"{str(path)!r} has no {MODEL_JSON} naming its architecture; call "
                f"load(NAME, {str(path)!r}) with NAME one of {', '.join(registry.MODEL_NAMES)}"
            )
        name = model_info(path)["name"]
    if name not in registry.MODEL_NAMES:
        raise ValueError(f"name must be one of {', '.join(registry.MODEL_NAMES)}; got {name!r}")
    _check_optional_positive("num_classes", num_classes)
    _check_optional_positive("image_size", image_size)
    family = registry.family_of(name)

    flat, sources, unknown, defaults = _read(path, name, family, overrides)
    config = {**defaults, **overrides}
    head = registry.HEAD_NAMES[family]
    headless = not any(k.startswith(f"params/{head}/") for k in flat)
    if headless and num_classes is None:
        raise ValueError(
            f"checkpoint {str(path)!r} has no classification head "
            f"('{head}'); pass num_classes to initialise one"
        )
    ckpt_classes = None if headless else _checkpoint_classes(flat, head)
    if family == "vit":
        config.setdefault("image_size", _checkpoint_image_size(flat, name, config))
    model = registry.create(name, num_classes=ckpt_classes or num_classes or 1, **config)
    key_check.check_against_model(
        model, flat, sources, unknown, path, head_optional=f"params/{head}/" if headless else None
    )

    # One flat dict owns the host arrays; each leaf is moved to the device and dropped in turn,
    # so peak memory stays near one model (a soup streams many checkpoints through here).
    flat = {k: np.asarray(v, np.float32) for k, v in flat.items()}
    if image_size is not None and image_size != model.image_size:
        if family == "vit":
            grid = image_size // model.patch_size
            flat[_POS_EMBEDDING] = resize_position_embedding(flat[_POS_EMBEDDING], grid)
        config["image_size"] = image_size
    classes = ckpt_classes if num_classes is None else num_classes
    model = registry.create(name, num_classes=classes, **config)
    if classes != ckpt_classes:
        flat = {k: v for k, v in flat.items() if not k.startswith(f"params/{head}/")}
        flat.update(paths.flatten({"params": {head: _fresh_head(model, head, seed)}}))
    on_device = {}
    for key in list(flat):
        on_device[key] = jnp.asarray(flat.pop(key))
    return model, paths.unflatten(on_device)


def model_dir(path: str | pathlib.Path) -> pathlib.Path:
    """The directory `save` wrote: `path` itself, or `path/model` for a run folder."""
    path = pathlib.Path(path)
    if (
        path.is_dir()
        and not (path / MODEL_JSON).is_file()
        and (path / "model" / MODEL_JSON).is_file()
    ):
        return path / "model"
    return path


def model_info(path: str | pathlib.Path) -> dict[str, Any]:
    """The description `save` wrote beside the weights (`model.json`), without reading weights.

    Args:
      path: a directory written by `save`, or a run folder holding one as `model/`.

    Returns:
      A dict with `name`, `overrides`, and (format v2) `num_classes`, `image_size` and `info`
      (whatever the writer recorded, e.g. a fine-tuning run's mode and starting point).

    Raises:
      ValueError: no readable `model.json` there, or one of an unknown format.
    """
    file = model_dir(path) / MODEL_JSON
    try:
        meta = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{str(file)!r} is not a readable model description ({err})") from err
    if not isinstance(meta, dict) or meta.get("format") not in _FORMATS or "name" not in meta:
        raise ValueError(
            f"{str(file)!r} is not a hubtune model description (format {_FORMAT!r} expected)"
        )
    return meta


def save(
    path: str | pathlib.Path,
    name: str,
    variables,
    *,
    info: dict[str, Any] | None = None,
    **overrides: Any,
) -> None:
    """Writes `variables` in hubtune's format, which `load(path)` reads back.

    Layout: `path/variables/` (orbax `StandardCheckpointer`, the variables pytree) and
    `path/model.json` (`format`, `name`, `overrides`, `num_classes`, `image_size`, `info`), so
    `load` rebuilds the same architecture without being told anything.

    Multi-process, every process calls `save` with the same arguments (orbax's save is
    collective): arrays that span several processes' devices — replicated or sharded, e.g. a
    fully sharded fine-tuning run's weights — are written shard by shard by the processes that
    hold them, never gathered; process 0 writes `model.json`, and every process returns once
    both are complete.

    Args:
      path: a directory that does not exist yet.
      name: the `jaxmodels.MODEL_NAMES` entry the variables belong to.
      variables: `{'params': ..., 'batch_stats': ...}` as from `model.init` or `load`: NumPy
        or `jax.Array`s.
      info: extra JSON facts to record (fine-tuning records its mode, seeds and starting point).
      **overrides: the architecture overrides the model was created with (JSON values only).

    Raises:
      ValueError: unknown name, `path` exists, or `variables` lacks 'params' or a head.
      TypeError: an override or info value that JSON cannot store (e.g. a dtype).
    """
    import orbax.checkpoint as ocp

    path = pathlib.Path(path).absolute()
    if name not in registry.MODEL_NAMES:
        raise ValueError(f"name must be one of {', '.join(registry.MODEL_NAMES)}; got {name!r}")
    # decided together: otherwise a process looking after another one started writing would
    # raise while the others wait for it in orbax's barrier
    if sharding.any_process(path.exists()):
        raise ValueError(f"path {str(path)!r} already exists; save writes a new directory")
    if not isinstance(variables, dict) or "params" not in variables:
        raise ValueError("variables must be a dict with a 'params' collection")
    head = registry.HEAD_NAMES[registry.family_of(name)]
    kernel = variables["params"].get(head, {}).get("kernel")
    if kernel is None:
        raise ValueError(f"variables have no classifier head params/{head}/kernel")
    meta = {
        "format": _FORMAT,
        "name": name,
        "overrides": overrides,
        "num_classes": int(kernel.shape[-1]),
        "image_size": registry.spec(name, **_architecture_only(overrides)).preprocessing.image_size,
        "info": info or {},
    }
    try:
        text = json.dumps(meta, indent=2)
    except TypeError as err:
        raise TypeError(f"overrides and info must be JSON values; {err}") from err
    # arrays this process holds whole go as NumPy (no per-shape device copy in orbax); global
    # arrays spanning other processes go as they are, each shard written by its holder
    local = lambda x: not isinstance(x, jax.Array) or x.is_fully_addressable
    with ocp.StandardCheckpointer() as checkpointer:  # closed: no async machinery left behind
        checkpointer.save(
            path / _VARIABLES_DIR,
            jax.tree.map(lambda x: np.asarray(x) if local(x) else x, variables),
        )
        checkpointer.wait_until_finished()
    if jax.process_index() == 0:
        (path / MODEL_JSON).write_text(text)
    if jax.process_count() > 1:  # no process returns before model.json exists
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"jaxmodels.save {path}")


def resize_position_embedding(pos_1ND, grid: int) -> np.ndarray:
    """Resizes a ViT position embedding to a `grid` × `grid` patch grid, keeping the class row.

    Args:
      pos_1ND: [1, 1 + g², D], the class token's entry first, then the g × g grid row-major.
      grid: the new side g'.

    Returns:
      [1, 1 + g'², D] float32: the class entry unchanged, the grid resized bilinearly with
      half-pixel centres and no antialiasing (torch `interpolate(mode='bilinear',
      align_corners=False)`, the rule timm applies when loading at another size).
    """
    pos_1ND = np.asarray(pos_1ND, np.float32)
    old = math.isqrt(pos_1ND.shape[1] - 1)
    width = pos_1ND.shape[2]
    grid_ggD = pos_1ND[0, 1:].reshape(old, old, width)
    resized = jax.image.resize(grid_ggD, (grid, grid, width), "bilinear", antialias=False)
    resized = np.asarray(resized, np.float32).reshape(1, grid * grid, width)
    return np.concatenate([pos_1ND[:, :1], resized], axis=1)


# ----------------------------------------------------------------------------- reading


def _read(path: pathlib.Path, name: str, family: str, overrides: dict):
    """Returns (flat, sources, unknown, default overrides) for any supported checkpoint."""
    if path.is_dir():
        return _read_orbax(path, name)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        state = load_torch.read_safetensors(path)
        if family == "resnet":
            return (*load_torch.resnet_from_torch(state), {})
        heads = registry.create(name, num_classes=1, **_architecture_only(overrides)).num_heads
        return (*load_torch.vit_from_timm(state, heads), {})
    if suffix == ".npz":
        if family != "vit":
            raise ValueError(
                f"'.npz' checkpoints are read for ViT models only; {name!r} is a {family}"
            )
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        return (*load_npz.vit_from_npz(arrays), {"gelu_approximate": True})
    raise ValueError(
        f"path must be a '.safetensors' or '.npz' file or an orbax checkpoint "
        f"directory; got {str(path)!r}"
    )


def _read_orbax(path: pathlib.Path, name: str):
    defaults = {}
    directory = path
    if (path / MODEL_JSON).exists():
        meta = model_info(path)
        if meta["name"] != name:
            raise ValueError(
                f"checkpoint {str(path)!r} holds a {meta['name']!r} model; "
                f"asked to load it as {name!r}"
            )
        defaults = {
            k: tuple(v) if isinstance(v, list) else v for k, v in meta.get("overrides", {}).items()
        }
        if "image_size" in meta and registry.family_of(name) == "resnet":
            defaults.setdefault("image_size", meta["image_size"])
        directory = path / _VARIABLES_DIR
    try:
        with quiet_orbax():
            tree = restore_as_numpy(directory.absolute())
    except Exception as err:  # orbax/tensorstore raise many kinds for broken files
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"checkpoint {str(path)!r} cannot be read ({reason[:300]})") from None
    flat = {k: np.asarray(v) for k, v in paths.flatten(tree).items()}
    return flat, {k: k for k in flat}, [], defaults


# ----------------------------------------------------------------------------- checking


def _architecture_only(overrides: dict) -> dict:
    return {k: v for k, v in overrides.items() if k != "dtype"}


def _check_optional_positive(arg: str, value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{arg} must be a positive int or None; got {value!r}")


def _checkpoint_classes(flat: dict, head: str) -> int | None:
    kernel = flat.get(f"params/{head}/kernel")
    return int(kernel.shape[-1]) if kernel is not None and kernel.ndim == 2 else None


def _checkpoint_image_size(flat: dict, name: str, config: dict) -> int:
    """The ViT input side the checkpoint's position embedding was made for."""
    pos = flat.get(_POS_EMBEDDING)
    patch = registry.create(name, num_classes=1, **_architecture_only(config)).patch_size
    if pos is None or pos.ndim != 3:
        return registry.spec(name).preprocessing.image_size  # reported as missing later
    grid = math.isqrt(pos.shape[1] - 1)
    if grid * grid + 1 != pos.shape[1]:
        raise ValueError(f"position embedding {pos.shape} is not 1 + g² tokens of a square grid")
    return grid * patch


def _fresh_head(model, head: str, seed: int):
    """The head's parameters from the model's own initialiser, without initialising the rest.

    Only the head leaves are returned from the jitted init, so XLA drops all other work.
    """
    fresh = registry.init_variables(model, seed, only=head)
    return jax.tree.map(np.asarray, fresh)
