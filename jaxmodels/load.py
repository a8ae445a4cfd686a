"""Load pre-trained weights into jaxmodels' architectures, or fail loudly.

`load(name, path)` reads three kinds of checkpoint and returns `(model, variables)`:
  * `.safetensors` — a torchvision/timm ResNet or timm ViT state dict, read with
    `safetensors.numpy` (no torch needed; see `jaxmodels.load_torch` for the layout changes);
  * `.npz` — a google-research/vision_transformer or big_vision ViT (`jaxmodels.load_npz`);
  * a directory — an orbax checkpoint of `{'params': ..., 'batch_stats': ...}`, as written by
    `save` (which adds `model.json` with the name and architecture overrides) or by
    `orbax.checkpoint.StandardCheckpointer().save(path, variables)`.

Only what the architectures express can load: class-token ViTs without a pre-logits layer,
global-average pooling, MAP head, layer scale or register tokens, and torchvision-style
ResNets (v1.5, 1×1 conv shortcuts). Other checkpoints are rejected with their unknown keys.

The architecture comes from `name` and `**overrides` (as in `jaxmodels.create`); the number of
classes and, for a ViT, the image size are read from the checkpoint. Every parameter of the
model must come from the checkpoint and every checkpoint entry must land in the model with the
right shape, otherwise `ValueError` lists the offending keys — nothing is silently left at its
random initialisation. Then, as fine-tuning needs:
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

import flax
import jax
import jax.numpy as jnp
import numpy as np

from jaxmodels import load_npz, load_torch, registry

_MODEL_JSON = "model.json"
_VARIABLES_DIR = "variables"
_FORMAT = "hubtune-variables-v1"
_HEAD = {"resnet": "fc", "vit": "head"}
_POS_EMBEDDING = "params/Transformer/posembed_input/pos_embedding"
_MAX_LISTED = 12


def load(
    name: str,
    path: str | pathlib.Path,
    *,
    num_classes: int | None = None,
    image_size: int | None = None,
    seed: int = 0,
    **overrides: Any,
):
    """Builds `name` and fills it with the weights at `path`.

    Args:
      name: a `jaxmodels.MODEL_NAMES` entry, e.g. 'resnet50' or 'vit_b16'.
      path: a `.safetensors` file (torchvision/timm state dict), a `.npz` file
        (vision_transformer/big_vision ViT) or an orbax checkpoint directory.
      num_classes: K of the returned model; default the checkpoint's. A different K
        re-initialises the head from `seed`; required for a checkpoint without a head
        (e.g. timm `num_classes=0` backbones), whose head is then initialised.
      image_size: ViT input side of the returned model; default the checkpoint's. A different
        size resizes the position embedding. ResNets accept any input size; ignored for them.
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
      ValueError: unknown name or file type; checkpoint keys that are unknown, missing or of the
        wrong shape (all named); bad `num_classes`/`image_size`.
      TypeError: an override the architecture has no field for.
    """
    path = pathlib.Path(path)
    if name not in registry.MODEL_NAMES:
        raise ValueError(f"name must be one of {', '.join(registry.MODEL_NAMES)}; got {name!r}")
    if not path.exists():
        raise FileNotFoundError(f"checkpoint path {str(path)!r} does not exist")
    _check_optional_positive("num_classes", num_classes)
    _check_optional_positive("image_size", image_size)
    family = registry.spec(name, **_architecture_only(overrides)).family

    flat, sources, unknown, defaults = _read(path, name, family, overrides)
    config = {**defaults, **overrides}
    head = _HEAD[family]
    headless = not any(k.startswith(f"params/{head}/") for k in flat)
    if headless and num_classes is None:
        raise ValueError(
            f"checkpoint {str(path)!r} has no classification head "
            f"('{head}'); pass num_classes to initialise one"
        )
    ckpt_classes = None if headless else _checkpoint_classes(flat, family)
    if family == "vit":
        config.setdefault("image_size", _checkpoint_image_size(flat, name, config))
    model = registry.create(name, num_classes=ckpt_classes or num_classes or 1, **config)
    _check_against_model(
        model, flat, sources, unknown, path, head_optional=f"params/{head}/" if headless else None
    )

    variables = _unflatten({k: np.asarray(v, np.float32) for k, v in flat.items()})
    if family == "vit" and image_size is not None and image_size != config["image_size"]:
        config["image_size"] = image_size
        pos = variables["params"]["Transformer"]["posembed_input"]["pos_embedding"]
        grid = image_size // model.patch_size
        variables["params"]["Transformer"]["posembed_input"]["pos_embedding"] = (
            resize_position_embedding(pos, grid)
        )
    classes = ckpt_classes if num_classes is None else num_classes
    model = registry.create(name, num_classes=classes, **config)
    if classes != ckpt_classes:
        variables["params"][head] = _fresh_head(model, head, seed)
    return model, jax.tree.map(jnp.asarray, variables)


def save(path: str | pathlib.Path, name: str, variables, **overrides: Any) -> None:
    """Writes `variables` as an orbax checkpoint that `load(name, path)` reads back.

    Layout: `path/variables/` (orbax `StandardCheckpointer`, the variables pytree) and
    `path/model.json` (`{"format", "name", "overrides"}`), so `load` rebuilds the same
    architecture without being told the overrides again.

    Args:
      path: a directory that does not exist yet.
      name: the `jaxmodels.MODEL_NAMES` entry the variables belong to.
      variables: `{'params': ..., 'batch_stats': ...}` as from `model.init` or `load`.
      **overrides: the architecture overrides the model was created with (JSON values only).

    Raises:
      ValueError: unknown name, `path` exists, or `variables` lacks 'params'.
      TypeError: an override value that JSON cannot store (e.g. a dtype).
    """
    import orbax.checkpoint as ocp

    path = pathlib.Path(path).absolute()
    if name not in registry.MODEL_NAMES:
        raise ValueError(f"name must be one of {', '.join(registry.MODEL_NAMES)}; got {name!r}")
    if path.exists():
        raise ValueError(f"path {str(path)!r} already exists; save writes a new directory")
    if not isinstance(variables, dict) or "params" not in variables:
        raise ValueError("variables must be a dict with a 'params' collection")
    try:
        meta = json.dumps({"format": _FORMAT, "name": name, "overrides": overrides})
    except TypeError as err:
        raise TypeError(f"overrides must be JSON values (ints, bools, lists); {err}") from err
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path / _VARIABLES_DIR, jax.tree.map(np.asarray, variables))
    checkpointer.wait_until_finished()
    (path / _MODEL_JSON).write_text(meta)


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
    import orbax.checkpoint as ocp

    defaults = {}
    directory = path
    if (path / _MODEL_JSON).exists():
        meta = json.loads((path / _MODEL_JSON).read_text())
        if meta.get("name") != name:
            raise ValueError(
                f"checkpoint {str(path)!r} holds a {meta.get('name')!r} model; "
                f"asked to load it as {name!r}"
            )
        defaults = {
            k: tuple(v) if isinstance(v, list) else v for k, v in meta.get("overrides", {}).items()
        }
        directory = path / _VARIABLES_DIR
    tree = ocp.StandardCheckpointer().restore(directory.absolute())
    flat = {
        "/".join(str(getattr(k, "key", k)) for k in keys): np.asarray(v)
        for keys, v in jax.tree_util.tree_flatten_with_path(tree)[0]
    }
    return flat, {k: k for k in flat}, [], defaults


# ----------------------------------------------------------------------------- checking


def _architecture_only(overrides: dict) -> dict:
    return {k: v for k, v in overrides.items() if k != "dtype"}


def _check_optional_positive(arg: str, value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{arg} must be a positive int or None; got {value!r}")


def _checkpoint_classes(flat: dict, family: str) -> int | None:
    kernel = flat.get(f"params/{_HEAD[family]}/kernel")
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


def _check_against_model(model, flat, sources, unknown, path, head_optional=None) -> None:
    """Raises ValueError naming unknown, missing and mis-shaped keys (all of them).

    `head_optional`: a key prefix (the head of a headless checkpoint) not reported as missing.
    """
    size = getattr(model, "image_size", 32)
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))
    expected = {
        "/".join(str(k.key) for k in keys): tuple(v.shape)
        for keys, v in jax.tree_util.tree_flatten_with_path(flax.core.unfreeze(abstract))[0]
    }
    missing = sorted(
        k
        for k in set(expected) - set(flat)
        if head_optional is None or not k.startswith(head_optional)
    )
    unexpected = sorted(
        f"{sources[k]} (→ {k})" if sources[k] != k else k for k in set(flat) - set(expected)
    )
    misshaped = sorted(
        f"{sources[k]}: checkpoint {tuple(flat[k].shape)} → {k} expects {expected[k]}"
        for k in set(flat) & set(expected)
        if tuple(flat[k].shape) != expected[k]
    )
    problems = []
    for title, items in (
        ("unknown keys", sorted(unknown) + unexpected),
        ("missing keys", missing),
        ("mis-shaped keys", misshaped),
    ):
        if items:
            listed = ", ".join(items[:_MAX_LISTED])
            more = f" and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
            problems.append(f"{len(items)} {title}: {listed}{more}")
    if problems:
        raise ValueError(
            f"checkpoint {str(path)!r} does not fit {model.__class__.__name__}"
            f"({_describe(model)}): " + "; ".join(problems)
        )


def _describe(model) -> str:
    fields = (
        "num_classes",
        "stage_sizes",
        "block",
        "width",
        "image_size",
        "patch_size",
        "depth",
        "num_heads",
        "mlp_dim",
    )
    return ", ".join(f"{f}={getattr(model, f)!r}" for f in fields if hasattr(model, f))


def _unflatten(flat: dict) -> dict:
    tree: dict = {}
    for key, value in flat.items():
        *parents, leaf = key.split("/")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def _fresh_head(model, head: str, seed: int):
    """The head's parameters from the model's own initialiser, without initialising the rest.

    Only the head leaves are returned from the jitted init, so XLA drops all other work.
    """
    size = getattr(model, "image_size", 32)

    def init_head(key):
        return model.init(key, jnp.zeros((1, size, size, 3)))["params"][head]

    return jax.tree.map(np.asarray, jax.jit(init_head)(jax.random.key(seed)))
