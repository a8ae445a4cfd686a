"""SSF: Scaling & Shifting your Features, and folding them away for inference.

SSF freezes a pre-trained backbone and learns, after chosen operations, a per-channel affine map
``y = γ ⊙ x + β`` (γ ~ N(1, 0.02), β ~ N(0, 0.02)). Because the map is linear and follows a linear
operation or a normalisation, it can be folded into that operation's weights after training, so the
deployed model is the plain architecture at the plain speed.

Where SSF lives in the parameter tree (what a training mask selects):
  ``create(name, ssf=True)`` adds, next to each wrapped module ``X``, a sibling submodule named
  ``ssf_X`` holding two float32 leaves ``scale`` (γ) and ``shift`` (β), both of shape ``[C]``, where
  C is the number of output channels of ``X`` (for a DenseGeneral with output shape ``[H, Dh]``,
  C = H·Dh in row-major order). Example paths: ``('params', 'layer1_0', 'ssf_bn1', 'scale')``,
  ``('params', 'Transformer', 'encoderblock_0', 'MultiHeadDotProductAttention_1', 'ssf_query',
  'shift')``. No module of the plain models has a name starting with ``ssf_``, so a path is an SSF
  leaf exactly when one of its keys starts with ``ssf_`` (``is_ssf_path``, ``ssf_mask``). With
  ``ssf=False`` none of these exist and the tree is exactly the plain model's.

Folding (``fold``), per wrapped module ``X`` with SSF (γ, β):
  - Dense / DenseGeneral / Conv: ``kernel ← kernel · γ`` broadcast on the output axes (the trailing
    axes of the kernel, shaped like the bias), ``bias ← γ · bias + β``.
  - LayerNorm / BatchNorm: ``scale ← γ · scale``, ``bias ← γ · bias + β``; BatchNorm's running
    statistics in ``batch_stats`` are untouched.

References:
  Lian, Zhou, Feng, Wang. "Scaling & Shifting Your Features: A New Baseline for Efficient Model
  Tuning." NeurIPS 2022. https://arxiv.org/abs/2210.08823
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxmodels.models import paths

SSF_PREFIX = "ssf_"
SSF_INIT_STD = 0.02


class ScaleShift(nn.Module):
    """Per-channel ``x · γ + β`` over the trailing ``feature_ndim`` axes of ``x``.

    Attributes:
      feature_ndim: how many trailing axes of the input form one channel vector of C entries
        (1 for Dense/Conv/norm outputs, 2 for a DenseGeneral with output shape [H, Dh]).
    """

    feature_ndim: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        feature_shape = x.shape[x.ndim - self.feature_ndim :]
        channels = math.prod(feature_shape)
        scale = self.param(
            "scale", lambda k, s: 1.0 + SSF_INIT_STD * jax.random.normal(k, s), (channels,)
        )
        shift = self.param("shift", nn.initializers.normal(SSF_INIT_STD), (channels,))
        # explicit leading ones: no implicit rank promotion
        shape = (1,) * (x.ndim - self.feature_ndim) + tuple(feature_shape)
        scale = jnp.reshape(scale, shape).astype(x.dtype)
        shift = jnp.reshape(shift, shape).astype(x.dtype)
        return x * scale + shift


def maybe_ssf(enabled: bool, target: str, x: jax.Array, feature_ndim: int = 1) -> jax.Array:
    """Applies ``ScaleShift(name='ssf_' + target)`` to ``x`` when ``enabled``; else returns ``x``.

    Must be called inside a ``@nn.compact`` method: the new submodule belongs to the caller and
    sits next to the module named ``target`` whose output ``x`` is.
    """
    if not enabled:
        return x
    return ScaleShift(feature_ndim=feature_ndim, name=SSF_PREFIX + target)(x)


def is_ssf_path(path: Sequence[Any]) -> bool:
    """Whether a parameter path names an SSF leaf.

    Args:
      path: a sequence of keys, either plain strings (``('params', 'ssf_bn1', 'scale')``) or the
        key objects of ``jax.tree_util.tree_flatten_with_path``.

    Returns:
      True exactly when some key starts with ``ssf_``.
    """
    return any(paths.key_name(k).startswith(SSF_PREFIX) for k in path)


def ssf_mask(params: Any) -> Any:
    """A boolean pytree shaped like ``params``: True on SSF leaves, False elsewhere.

    Args:
      params: any pytree of parameters (``variables['params']`` or the whole ``variables``).

    Returns:
      A pytree with the same structure and Python ``bool`` leaves.
    """
    return jax.tree_util.tree_map_with_path(lambda path, _: is_ssf_path(path), params)


def _fold_into(target: Mapping[str, Any], ssf: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Folds one SSF (scale γ, shift β) into the parameters of the module it follows."""
    if set(ssf) != {"scale", "shift"}:
        raise ValueError(
            f"{where}: SSF module must hold exactly 'scale' and 'shift'; got {sorted(ssf)}"
        )
    if "bias" not in target:
        raise ValueError(
            f"{where}: SSF follows a module without a bias; found keys {sorted(target)}"
        )
    bias = target["bias"]
    gamma = jnp.asarray(ssf["scale"], jnp.float32)
    beta = jnp.asarray(ssf["shift"], jnp.float32)
    if gamma.size != math.prod(bias.shape) or beta.size != gamma.size:
        raise ValueError(
            f"{where}: SSF has {gamma.size} scales and {beta.size} shifts but the module's bias "
            f"has shape {tuple(bias.shape)}"
        )
    gamma = jnp.reshape(gamma, bias.shape)
    beta = jnp.reshape(beta, bias.shape)
    folded = dict(target)
    folded["bias"] = (gamma * jnp.asarray(bias, jnp.float32) + beta).astype(bias.dtype)
    if "kernel" in target:  # Dense, DenseGeneral, Conv: output axes are the kernel's trailing ones
        kernel = target["kernel"]
        if tuple(kernel.shape[kernel.ndim - bias.ndim :]) != tuple(bias.shape):
            raise ValueError(
                f"{where}: kernel shape {tuple(kernel.shape)} does not end with the bias shape "
                f"{tuple(bias.shape)}"
            )
        gamma_k = jnp.reshape(gamma, (1,) * (kernel.ndim - gamma.ndim) + gamma.shape)
        folded["kernel"] = (jnp.asarray(kernel, jnp.float32) * gamma_k).astype(kernel.dtype)
    elif "scale" in target:  # LayerNorm, BatchNorm
        scale = target["scale"]
        folded["scale"] = (jnp.asarray(scale, jnp.float32) * gamma).astype(scale.dtype)
    else:
        raise ValueError(
            f"{where}: SSF follows a module with neither 'kernel' nor 'scale'; keys {sorted(target)}"
        )
    return folded


def _fold_tree(tree: Mapping[str, Any], where: str) -> tuple[dict[str, Any], int]:
    """Folds every ``ssf_X`` in ``tree`` (recursively) into its sibling ``X``; counts the folds."""
    out: dict[str, Any] = {}
    count = 0
    for key, value in tree.items():
        if key.startswith(SSF_PREFIX):
            continue
        if isinstance(value, Mapping):
            out[key], sub = _fold_tree(value, f"{where}/{key}")
            count += sub
        else:
            out[key] = value
    for key, value in tree.items():
        if not key.startswith(SSF_PREFIX):
            continue
        target = key[len(SSF_PREFIX) :]
        if target not in out or not isinstance(out[target], Mapping):
            raise ValueError(f"{where}/{key}: no sibling module named {target!r} to fold into")
        out[target] = _fold_into(out[target], value, f"{where}/{key}")
        count += 1
    return out, count


def fold(variables: Mapping[str, Any]) -> dict[str, Any]:
    """Folds all SSF scale/shift pairs into the weights they follow.

    Args:
      variables: variables of ``create(name, ssf=True)``: a mapping with a ``'params'`` tree and
        optionally other collections (``'batch_stats'``), which are passed through unchanged.

    Returns:
      Variables for ``create(name, ssf=False)`` with the same dtypes as the input (the arithmetic
      runs in float32, then casts back).

    Raises:
      TypeError: ``variables`` is not a mapping with a ``'params'`` mapping.
      ValueError: the tree holds no SSF parameters, or an SSF module has no foldable sibling.
    """
    if not isinstance(variables, Mapping) or not isinstance(variables.get("params"), Mapping):
        raise TypeError(
            "variables must be a mapping with a 'params' mapping (as from model.init); "
            f"got {type(variables).__name__}"
            + (f" with keys {sorted(variables)}" if isinstance(variables, Mapping) else "")
        )
    params, count = _fold_tree(variables["params"], "params")
    if count == 0:
        raise ValueError(
            "variables hold no SSF parameters (no module named 'ssf_*'); fold expects the "
            "variables of create(name, ssf=True)"
        )
    folded = dict(variables)
    folded["params"] = params
    return folded


def with_fresh_ssf(abstract: Mapping[str, Any], loaded: Mapping[str, Any], seed: int) -> dict:
    """Variables of an SSF model: every leaf from ``loaded``, SSF leaves drawn fresh from ``seed``.

    Fine-tuning with SSF starts from pre-trained weights that have no SSF parameters; this adds
    them with the initialisation of `ScaleShift` (γ ~ N(1, σ²), β ~ N(0, σ²), σ = 0.02). Each SSF
    leaf's noise comes from ``fold_in(key(seed), i)`` over the sorted SSF paths, so runs that share
    ``seed`` start from identical SSF parameters whatever else they vary.

    Args:
      abstract: the SSF model's variables or their shapes (``jax.eval_shape(model.init, ...)``).
      loaded: the same variables without SSF leaves (e.g. from ``jaxmodels.load``).
      seed: the initialisation seed.

    Returns:
      A nested dict of ``jax.Array``s with the structure of ``abstract``.

    Raises:
      ValueError: ``loaded`` lacks a non-SSF leaf of ``abstract``, has one it lacks, or a leaf of
        another shape.
    """
    wanted = paths.flatten(abstract)
    given = paths.flatten(loaded)
    unknown = sorted(set(given) - set(wanted))
    missing = sorted(p for p in set(wanted) - set(given) if not is_ssf_path(p.split(paths.SEP)))
    if unknown or missing:
        raise ValueError(
            f"weights do not fit the model: leaves they lack {missing[:5]}, leaves the model "
            f"lacks {unknown[:5]}"
        )
    key = jax.random.key(seed)
    ssf_paths = sorted(p for p in wanted if p not in given)
    flat = {}
    for path, spec in wanted.items():
        if path in given:
            if tuple(given[path].shape) != tuple(spec.shape):
                raise ValueError(
                    f"leaf {path} has shape {tuple(given[path].shape)}; the model wants "
                    f"{tuple(spec.shape)}"
                )
            flat[path] = jnp.asarray(given[path], spec.dtype)
            continue
        noise = SSF_INIT_STD * jax.random.normal(
            jax.random.fold_in(key, ssf_paths.index(path)), spec.shape, spec.dtype
        )
        flat[path] = 1.0 + noise if path.endswith("/scale") else noise
    return paths.unflatten(flat)
