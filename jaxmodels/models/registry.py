"""Model names → Flax modules, their preprocessing and their forward cost.

``create(name, num_classes=K)`` builds a Linen module; ``spec(name)`` tells how to prepare its
input and what a forward pass costs. Known names: ``resnet18 resnet34 resnet50 resnet101
resnet152`` (torchvision layout), ``vit_ti16 vit_s16 vit_b16 vit_l16 vit_b32`` (ViT, patch 16 or
32, 224 px), and two tiny test configurations: ``resnet_tiny`` (BasicBlock, one block per stage,
width 8, 32 px) and ``vit_tiny`` (32 px, patch 8, width 32, depth 2, 2 heads, MLP 64).

Every module answers ``model.apply(variables, images, train=False)`` → logits [B, K] and
``model.apply(variables, images, method="features")`` → features [B, D], for NHWC float images
already preprocessed (``jaxmodels.data.preprocess``).

Parameter layouts (what a weight importer maps onto; all leaves float32):
  ResNet (``jaxmodels.models.resnet``) mirrors torchvision's state-dict keys: ``conv1/kernel`` [7,7,3,64],
  ``bn1/{scale,bias}`` + ``batch_stats/bn1/{mean,var}``, ``layer{s}_{b}/conv{i}/kernel`` (HWIO),
  ``layer{s}_{b}/bn{i}``, ``layer{s}_{b}/downsample_conv/kernel``, ``layer{s}_{b}/downsample_bn``
  (only in blocks that change shape), ``fc/{kernel [D, K], bias [K]}``. Torch key ``layer2.0.bn1.
  running_var`` ↔ ``batch_stats/layer2_0/bn1/var``; ``downsample.0``/``.1`` ↔ ``downsample_conv`` /
  ``downsample_bn``; conv OIHW → HWIO, Linear [out, in] → [in, out].
  ViT (``jaxmodels.models.vit``) is the google-research/vision_transformer ``.npz`` layout: ``embedding``
  (Conv [P,P,3,D] + bias), ``cls`` [1,1,D], ``Transformer/posembed_input/pos_embedding`` [1,N,D],
  ``Transformer/encoderblock_{i}/{LayerNorm_0, MultiHeadDotProductAttention_1/{query,key,value,out},
  LayerNorm_2, MlpBlock_3/{Dense_0,Dense_1}}``, ``Transformer/encoder_norm``, ``head``;
  query/key/value kernels [D, H, Dh] with bias [H, Dh], out kernel [H, Dh, D] with bias [D].
  timm ↔ here: ``patch_embed.proj`` ↔ ``embedding``, ``cls_token`` ↔ ``cls``, ``pos_embed`` ↔
  ``pos_embedding``, ``blocks.i.norm1/attn.qkv/attn.proj/norm2/mlp.fc1/mlp.fc2`` ↔
  ``LayerNorm_0/{query,key,value}/out/LayerNorm_2/Dense_0/Dense_1``, ``norm`` ↔ ``encoder_norm``.
  With ``ssf=True``, sibling submodules ``ssf_<module>`` with ``scale``/``shift`` [C] are added
  (``jaxmodels.models.ssf``); with ``ssf=False`` the tree is exactly as above.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn

from jaxmodels.data.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    UNIT_RANGE_MEAN,
    UNIT_RANGE_STD,
    Preprocessing,
)
from jaxmodels.models.resnet import ResNet, resnet_macs
from jaxmodels.models.vit import VisionTransformer, vit_macs

_RESNETS: dict[str, dict[str, Any]] = {
    "resnet18": dict(stage_sizes=(2, 2, 2, 2), block="basic"),
    "resnet34": dict(stage_sizes=(3, 4, 6, 3), block="basic"),
    "resnet50": dict(stage_sizes=(3, 4, 6, 3), block="bottleneck"),
    "resnet101": dict(stage_sizes=(3, 4, 23, 3), block="bottleneck"),
    "resnet152": dict(stage_sizes=(3, 8, 36, 3), block="bottleneck"),
    "resnet_tiny": dict(stage_sizes=(1, 1, 1, 1), block="basic", width=8),
}
_VITS: dict[str, dict[str, Any]] = {
    "vit_ti16": dict(patch_size=16, width=192, depth=12, num_heads=3, mlp_dim=768),
    "vit_s16": dict(patch_size=16, width=384, depth=12, num_heads=6, mlp_dim=1536),
    "vit_b16": dict(patch_size=16, width=768, depth=12, num_heads=12, mlp_dim=3072),
    "vit_l16": dict(patch_size=16, width=1024, depth=24, num_heads=16, mlp_dim=4096),
    "vit_b32": dict(patch_size=32, width=768, depth=12, num_heads=12, mlp_dim=3072),
    "vit_tiny": dict(image_size=32, patch_size=8, width=32, depth=2, num_heads=2, mlp_dim=64),
}
# Input side each name is made for (ResNets are fully convolutional; this is their eval size).
_IMAGE_SIZE = {"resnet_tiny": 32, "vit_tiny": 32}
_DEFAULT_IMAGE_SIZE = 224
MODEL_NAMES: tuple[str, ...] = (*_RESNETS, *_VITS)
# The top-level classifier module of each family (torchvision calls ResNet's ``fc``): the head that
# loading re-initialises, linear probing trains and LEEP/NCE read.
HEAD_NAMES = {"resnet": "fc", "vit": "head"}
FAMILIES = {"resnet": ResNet, "vit": VisionTransformer}

# Fields of each module that create(**overrides) may set (name/parent/ssf/num_classes are apart).
_RESNET_OVERRIDES = ("stage_sizes", "block", "width", "zero_init_last_bn", "image_size", "dtype")
_VIT_OVERRIDES = (
    "image_size",
    "patch_size",
    "width",
    "depth",
    "num_heads",
    "mlp_dim",
    "gelu_approximate",
    "dtype",
)
# Fields that fix the shapes of a model's weights (not its head size, input size or dtype): a
# registered name is the architecture these values give.
ARCHITECTURE_FIELDS = {
    "resnet": ("stage_sizes", "block", "width"),
    "vit": ("patch_size", "width", "depth", "num_heads", "mlp_dim"),
}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What a pipeline needs to know about a model besides its weights.

    Attributes:
      name: the registry name (for a module built with overrides that match no registered name,
        the family followed by ``*``, e.g. ``'resnet*'``).
      family: ``'resnet'`` or ``'vit'``.
      head: the top-level classifier module (``'fc'`` or ``'head'``).
      preprocessing: how to prepare evaluation images (``jaxmodels.data.preprocess``).
      feature_dim: D, the width of ``method="features"``.
      macs_per_image: multiply-accumulates of one forward pass at ``preprocessing.image_size``
        (convolutions, dense layers and attention matmuls; the convention of torchvision's and
        fvcore's "GFLOPS" tables).
      flops_per_image: ``2 · macs_per_image`` (one multiply + one add), the unit of
        ``jax.jit(...).lower(...).compile().cost_analysis()['flops']``.
    """

    name: str
    family: str
    head: str
    preprocessing: Preprocessing
    feature_dim: int
    macs_per_image: int
    flops_per_image: int


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or name not in MODEL_NAMES:
        raise ValueError(f"unknown model name {name!r}; known names: {', '.join(MODEL_NAMES)}")
    return name


def family_of(name: str) -> str:
    """``'resnet'`` or ``'vit'`` for a registered name."""
    return "resnet" if _check_name(name) in _RESNETS else "vit"


def _check_num_classes(num_classes: Any) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int; got {num_classes!r}")
    return num_classes


def _config(name: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """The module fields for ``name`` with ``overrides`` applied and validated."""
    is_resnet = name in _RESNETS
    allowed = _RESNET_OVERRIDES if is_resnet else _VIT_OVERRIDES
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise TypeError(
            f"create({name!r}) got unknown overrides {unknown}; allowed: {', '.join(allowed)}"
        )
    size = _IMAGE_SIZE.get(name, _DEFAULT_IMAGE_SIZE)
    if is_resnet:
        config = {"width": 64, "image_size": size, **_RESNETS[name], **overrides}
        if config["block"] not in ("basic", "bottleneck"):
            raise ValueError(f"block must be 'basic' or 'bottleneck'; got {config['block']!r}")
        sizes = tuple(config["stage_sizes"])
        if not sizes or any(not isinstance(n, int) or n < 1 for n in sizes):
            raise ValueError(f"stage_sizes must be positive ints; got {config['stage_sizes']!r}")
        config["stage_sizes"] = sizes
        _check_positive(config, ("width", "image_size"))
        return config
    config = {"image_size": size, **_VITS[name], **overrides}
    _check_positive(config, ("image_size", "patch_size", "width", "depth", "num_heads", "mlp_dim"))
    if config["image_size"] % config["patch_size"]:
        raise ValueError(
            f"image_size must be a multiple of patch_size; got image_size={config['image_size']}, "
            f"patch_size={config['patch_size']}"
        )
    if config["width"] % config["num_heads"]:
        raise ValueError(
            f"width must be a multiple of num_heads; got width={config['width']}, "
            f"num_heads={config['num_heads']}"
        )
    return config


def _check_positive(config: dict[str, Any], keys: tuple[str, ...]) -> None:
    for key in keys:
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} must be a positive int; got {value!r}")


def create(name: str, *, num_classes: int, ssf: bool = False, **overrides: Any) -> nn.Module:
    """Builds the Flax module registered as ``name``.

    Args:
      name: one of ``MODEL_NAMES``.
      num_classes: K, the size of the classification head.
      ssf: insert SSF scale/shift after the reference sites (``jaxmodels.models.ssf``).
      **overrides: module fields to change, e.g. ``image_size=384`` (a ViT's position embedding is
        sized for it; a ResNet records it as its evaluation size), ``gelu_approximate=True`` for
        big_vision checkpoints, ``dtype=jnp.bfloat16`` for bfloat16 compute,
        ``zero_init_last_bn=True`` for a ResNet.

    Returns:
      An unbound ``flax.linen.Module``; ``model.init(rng, images)`` makes its variables.

    Raises:
      ValueError: unknown name, num_classes not a positive int, or an inconsistent override.
      TypeError: an override that the family has no field for.
    """
    _check_name(name)
    _check_num_classes(num_classes)
    if not isinstance(ssf, bool):
        raise TypeError(f"ssf must be a bool; got {type(ssf).__name__}")
    config = _config(name, overrides)
    return FAMILIES[family_of(name)](num_classes=num_classes, ssf=ssf, **config)


def _spec(name: str, family: str, config: dict[str, Any], num_classes: int) -> ModelSpec:
    size = config["image_size"]
    if family == "resnet":
        prep = Preprocessing.from_crop_pct(size, 0.875, IMAGENET_MEAN, IMAGENET_STD, "bilinear")
        expansion = 1 if config["block"] == "basic" else 4
        feature_dim = config["width"] * 8 * expansion
        macs = resnet_macs(
            stage_sizes=config["stage_sizes"],
            block=config["block"],
            width=config["width"],
            num_classes=num_classes,
            image_size=size,
        )
    else:
        prep = Preprocessing.from_crop_pct(size, 0.9, UNIT_RANGE_MEAN, UNIT_RANGE_STD, "bicubic")
        feature_dim = config["width"]
        macs = vit_macs(num_classes=num_classes, **config)
    return ModelSpec(name, family, HEAD_NAMES[family], prep, feature_dim, macs, 2 * macs)


def spec(
    name: str, *, num_classes: int = 1000, image_size: int | None = None, **overrides
) -> ModelSpec:
    """Preprocessing, head, feature width and forward cost of ``name``.

    Args:
      name: one of ``MODEL_NAMES``.
      num_classes: K, counted in the head's cost (default ImageNet's 1000).
      image_size: input side; default the name's own (224, or 32 for the tiny ones). This is the
        ``image_size`` override of ``create``.
      **overrides: the same architecture overrides as ``create``.

    Returns:
      A ``ModelSpec``. ResNets use torchvision's eval transform (resize S/0.875 bilinear, centre
      crop S, ImageNet mean/std); ViTs use timm's augreg / big_vision one (resize
      floor(S/0.9) bicubic, centre crop S, scale to [−1, 1]).
    """
    _check_name(name)
    _check_num_classes(num_classes)
    if image_size is not None:
        overrides = {**overrides, "image_size": image_size}
    return _spec(name, family_of(name), _config(name, overrides), num_classes)


def spec_of(model: nn.Module) -> ModelSpec:
    """The `ModelSpec` of a module built by `create` or `jaxmodels.load`, read off its fields.

    Args:
      model: a ``ResNet`` or ``VisionTransformer`` module.

    Returns:
      Its spec at its own ``image_size`` and ``num_classes``; ``name`` is the registered name whose
      architecture it has, else the family followed by ``*``.

    Raises:
      TypeError: ``model`` is not one of jaxmodels' architectures (pass the preprocessing
        explicitly to the function that asked).
    """
    family = next((f for f, cls in FAMILIES.items() if isinstance(model, cls)), None)
    if family is None:
        raise TypeError(
            f"{type(model).__name__} is not a jaxmodels architecture (ResNet, VisionTransformer); "
            "its preprocessing and cost are unknown"
        )
    allowed = _RESNET_OVERRIDES if family == "resnet" else _VIT_OVERRIDES
    config = {f: getattr(model, f) for f in allowed if f != "dtype"}
    if family == "resnet":
        config["stage_sizes"] = tuple(config["stage_sizes"])
    fields = ARCHITECTURE_FIELDS[family]
    names = [n for n in MODEL_NAMES if family_of(n) == family]
    match = [n for n in names if all(_config(n, {})[f] == config[f] for f in fields)]
    name = match[0] if match else f"{family}*"
    return _spec(name, family, config, model.num_classes)


def overrides_of(name: str, model: nn.Module) -> dict[str, Any]:
    """The `create` overrides that rebuild `model` as `name` (fields that differ from the name's).

    `jaxmodels.save` records them, so a model loaded from a big_vision checkpoint (tanh GELU) or
    at another image size comes back as it was. The dtype is not recorded (a runtime choice).
    """
    family = family_of(name)
    if not isinstance(model, FAMILIES[family]):
        raise TypeError(f"model is a {type(model).__name__}, not a {family} like {name!r}")
    allowed = _RESNET_OVERRIDES if family == "resnet" else _VIT_OVERRIDES
    defaults = {f.name: f.default for f in dataclasses.fields(FAMILIES[family])}
    base = {**defaults, **_config(name, {})}
    out = {}
    for field in allowed:
        if field == "dtype":
            continue
        value = getattr(model, field)
        value = tuple(value) if isinstance(value, list | tuple) else value
        if value != base[field]:
            out[field] = list(value) if isinstance(value, tuple) else value
    return out


# Initialisation runs once per model, on tiny inputs: compiled without XLA's backend
# optimisations it costs a fraction of the compile time (resnet_tiny's init: 6.7 s → 1.6 s on a
# 2-core CPU). The random bits are the same; the float transforms of a few leaves differ in the
# last bit from a default-optimised `jax.jit(model.init)` (resnet_tiny: 12 of 62 leaves, at most
# 1.4e-7 relative), so use this function, not your own jit of `init`, to reproduce a model.
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def init_variables(model: nn.Module, seed: int, *, only: str | None = None) -> Any:
    """``model.init`` on a [1, S, S, 3] input at the model's image size, compiled once, cheaply.

    Args:
      model: a module with an ``image_size`` field (every jaxmodels architecture).
      seed: the PRNG seed.
      only: the name of one top-level parameter module to return (e.g. the head); XLA then
        drops the rest of the work.

    Returns:
      The variables (or ``variables['params'][only]``) as ``jax.Array``s.
    """
    import jax
    import jax.numpy as jnp

    from jaxmodels.jit_cache import cached

    def build():
        size = model.image_size
        images = jnp.zeros((1, size, size, 3), jnp.float32)

        def init(key):
            variables = model.init(key, images)
            return variables if only is None else variables["params"][only]

        key = jax.random.key(0)
        return jax.jit(init).lower(key).compile(compiler_options=_FAST_COMPILE)

    return cached(("init", model, only), build)(jax.random.key(seed))
