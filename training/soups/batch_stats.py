"""Recompute BatchNorm statistics for averaged weights (SWA's ``bn_update`` practice).

The running mean and variance of a BatchNorm layer describe the inputs that layer saw under
the weights that were trained; after averaging weights (a soup, SWA) they describe nobody's
inputs. ``recompute_batch_stats`` replaces them with the statistics of the inputs under the new
weights, measured over a dataset in train-mode forward passes.

What the statistics are: for every BatchNorm, the exact mean and (biased) variance, per channel,
of all the inputs it received during the passes — every position of every image, each batch
weighted by its size, as if the whole dataset were one batch. Batches are combined exactly (the
per-batch mean and variance are merged with Chan et al.'s pairwise update in float64), not with
the momentum-0.9 running estimate, which forgets early batches. As in SWA's ``bn_update``, the
passes run in train mode, so a BatchNorm downstream of another sees inputs normalised with each
batch's own statistics. (SWA averages per-batch variances; here the variance is the dataset's,
which also counts the spread between batch means.)

How: ``flax.linen.intercept_methods`` sees the input of every ``nn.BatchNorm`` call inside a
jitted train-mode ``model.apply``; its per-channel moments are computed there in float32 (two
passes: mean, then mean squared deviation) and returned with the batch's element count.

References:
  Izmailov, Podoprikhin, Garipov, Vetrov, Wilson. "Averaging Weights Leads to Wider Optima and
  Better Generalization." UAI 2018 (SWA, ``bn_update``). https://arxiv.org/abs/1803.05407
  Chan, Golub, LeVeque. "Updating formulae and a pairwise algorithm for computing sample
  variances." 1979.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxmodels import jit_cache, sharding

PyTree = Any
_STATS = ("mean", "var")


def _moments(x: jax.Array, axis) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-feature (count, mean, biased variance) of ``x`` in float32, features on ``axis``."""
    x = jnp.asarray(x, jnp.float32)
    features = {a % x.ndim for a in (axis if isinstance(axis, tuple) else (axis,))}
    reduce = tuple(a for a in range(x.ndim) if a not in features)
    mean = jnp.mean(x, axis=reduce, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=reduce)
    count = np.prod([x.shape[a] for a in reduce], dtype=np.int64)
    return jnp.asarray(count, jnp.int32), jnp.squeeze(mean, axis=reduce), var


def _moments_fn(model):
    """A jitted ``(variables, images) -> {bn path: (count, mean, var)}`` for one train pass,
    built once per model (a greedy soup recomputes the statistics of every candidate)."""
    return jit_cache.cached(("batch_moments", model), lambda: _build_moments_fn(model))


def _build_moments_fn(model):
    def batch_moments(variables, images_BHWC):
        seen: dict[str, tuple] = {}

        def capture(next_fun, args, kwargs, context):
            if isinstance(context.module, nn.BatchNorm) and context.method_name == "__call__":
                x = args[0] if args else kwargs["x"]
                name = "/".join(context.module.path)
                calls = sum(1 for key in seen if key.split("#")[0] == name)
                seen[f"{name}#{calls}" if calls else name] = _moments(x, context.module.axis)
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(capture):
            model.apply(variables, images_BHWC, train=True, mutable=["batch_stats"])
        return seen

    return jax.jit(batch_moments)


def _merge(total: tuple | None, count: int, mean: np.ndarray, var: np.ndarray) -> tuple:
    """Chan et al.'s update of (count, mean, sum of squared deviations) with one more part."""
    m2 = var * count
    if total is None:
        return count, mean, m2
    n_a, mean_a, m2_a = total
    n = n_a + count
    delta = mean - mean_a
    return n, mean_a + delta * (count / n), m2_a + m2 + delta * delta * (n_a * count / n)


def _check_images(images: Any, b: int, mesh: Mesh | None):
    if not (hasattr(images, "shape") and hasattr(images, "dtype")):
        raise TypeError(f"batches[{b}] must be an image array [B, H, W, 3]; got {type(images)}")
    if images.ndim != 4 or images.shape[-1] != 3 or images.shape[0] == 0:
        raise ValueError(f"batches[{b}] must be images [B, H, W, 3] with B > 0; got {images.shape}")
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise TypeError(
            f"batches[{b}] must be float images in the model's input form (preprocessed); got "
            f"dtype {images.dtype}"
        )
    if mesh is None:
        return images
    sharding.check_batch_size(int(images.shape[0]) * jax.process_count(), mesh)
    return sharding.shard_local_batch(images, mesh)


def recompute_batch_stats(
    model: nn.Module,
    variables: Mapping[str, Any],
    batches: Iterable,
    *,
    mesh: Mesh | None = None,
) -> dict[str, Any]:
    """Variables whose BatchNorm statistics are those of ``batches`` under these weights.

    Args:
      model: a Flax Linen module whose ``apply(variables, images, train=True,
        mutable=['batch_stats'])`` runs its ``nn.BatchNorm`` layers on batch statistics (the
        jaxmodels ResNets; ``tests/tiny_classifier.TinyClassifier(batch_norm=True)``).
      variables: ``{'params': ..., 'batch_stats': ..., ...}``, e.g. a soup.
      batches: an iterable of float image arrays [B, H, W, 3] already in the model's input form
        (preprocessed); batch sizes may differ (each is one compilation). With ``mesh``, this
        process's rows of each global batch.
      mesh: optional data ``Mesh``: each batch is split over its 'data' axis (the global batch
        size must be a multiple of it) and the statistics are global. Default: one device.

    Returns:
      A new dict with the entries of ``variables``; only ``batch_stats`` differs: every
      BatchNorm's ``mean`` and ``var`` are the per-channel mean and biased variance of all its
      inputs over all batches (float32 moments per batch, merged in float64), in the dtypes of
      the old statistics. The other leaves are the caller's arrays, untouched.

    Raises:
      TypeError: ``variables`` is not a mapping with 'params' and 'batch_stats', or a batch is
        not a float array.
      ValueError: a batch of the wrong shape, no batches, or a ``batch_stats`` entry that no
        BatchNorm call filled (or a BatchNorm without one).
    """
    if not isinstance(variables, Mapping) or not all(
        isinstance(variables.get(c), Mapping) for c in ("params", "batch_stats")
    ):
        raise TypeError(
            "variables must be a mapping with 'params' and 'batch_stats' (a model with "
            f"BatchNorm); got {type(variables).__name__}"
            + (f" with keys {sorted(variables)}" if isinstance(variables, Mapping) else "")
        )
    if mesh is not None:
        sharding.check_data_mesh(mesh)
        placed = sharding.replicate(variables, mesh)
    else:
        placed = variables
    batch_moments = _moments_fn(model)
    totals: dict[str, tuple] = {}
    for b, images in enumerate(batches):
        images = _check_images(images, b, mesh)
        for key, (count, mean, var) in batch_moments(placed, images).items():
            name = key.split("#")[0]
            mean64, var64 = np.asarray(mean, np.float64), np.asarray(var, np.float64)
            totals[name] = _merge(totals.get(name), int(count), mean64, var64)
    if not totals:
        raise ValueError("batches yielded no batch; pass at least one [B, H, W, 3] image array")

    flat = jax.tree_util.tree_flatten_with_path(variables["batch_stats"])[0]
    stats_by_module: dict[str, dict[str, Any]] = {}
    for path, leaf in flat:
        keys = [str(getattr(k, "key", k)) for k in path]
        stats_by_module.setdefault("/".join(keys[:-1]), {})[keys[-1]] = leaf
    for name, stats in stats_by_module.items():
        if name not in totals or set(stats) != set(_STATS):
            raise ValueError(
                f"batch_stats/{name} (keys {sorted(stats)}) was not filled by a BatchNorm call "
                "in the train-mode pass; expected every entry to be a BatchNorm's mean and var"
            )
    unknown = sorted(set(totals) - set(stats_by_module))
    if unknown:
        raise ValueError(f"BatchNorm layers {unknown} have no entry in variables['batch_stats']")

    new_stats: dict[str, Any] = {}
    for name, (count, mean, m2) in totals.items():
        node = new_stats
        for key in name.split("/"):
            node = node.setdefault(key, {})
        old = stats_by_module[name]
        node["mean"] = jnp.asarray(mean, old["mean"].dtype)
        node["var"] = jnp.asarray(m2 / count, old["var"].dtype)
    return {**variables, "batch_stats": new_stats}
