"""Feature extraction that keeps accelerators busy: sharded, prefetched, never recompiling.

`extract_features` runs a model's `features` method (the penultimate representation that
LogME and its peers score) over many images and returns NumPy arrays; `stream_reduce` folds
the features into a running statistic inside the same jitted step, so that features of huge
datasets never leave the device.

How a run is organised:
  * one jitted step per (model, mesh, batch shape); every batch has exactly `batch_size` rows
    because the short last batch is padded (and the padding dropped from the results), so the
    step compiles once;
  * the batch is split over the 'data' axis of a `Mesh` (all devices by default) and the
    variables are replicated;
  * a background thread slices, pads, casts and transfers the next batches while the device
    computes the current one (JAX dispatch is asynchronous), so transfer overlaps compute;
  * multi-host: every process feeds its own images; results are gathered in process order.

Shapes: B = global batch size, B_local = B / process count, N = number of images,
D = feature width, K = number of classes, H, W, C = image height, width, channels.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from jaxmodels import image_batches, sharding

PyTree = Any


def extract_features(
    model,
    variables: PyTree,
    images,
    *,
    batch_size: int,
    mesh: Mesh | None = None,
    dtype=None,
    return_logits: bool = False,
    return_labels: bool = False,
    progress: bool = True,
):
    """Runs `model`'s `features` method over all images; returns NumPy features.

    Args:
      model: a Flax Linen module with a `features` method, `model.apply(variables, x,
        method="features") -> [B, D]`, and, for logits, `model.apply(variables, x,
        train=False) -> [B, K]`. Logits come from the same forward pass when `__call__`
        computes them from the same backbone (XLA merges the two traced passes).
      variables: the model's variables, e.g. `{'params': ..., 'batch_stats': ...}`.
      images: either an array [N, H, W, C] of preprocessed images, or an iterable of batches,
        each an array [b, H, W, C], a dict with key 'image' (and optionally 'label' [b]), or a
        tuple (images [b, H, W, C], labels [b]) — e.g. `tfds.as_numpy(ds.batch(256))`. Batches
        may have any sizes; they are re-cut to `batch_size`. Multi-host: this process's images.
      batch_size: global number of images per step; a positive multiple of the number of
        devices on the mesh's 'data' axis.
      mesh: a `Mesh` with a 'data' axis; default: all devices (`sharding.data_mesh()`).
      dtype: compute dtype, e.g. `jnp.bfloat16`; floating variables and the images are cast to
        it, and a model with a `dtype` field is cloned with it (Flax layers with an explicit
        float32 dtype would otherwise compute in float32). Default: float32 images, the model
        and variables as given. Outputs are always float32.
      return_logits: also return the logits [N, K].
      return_labels: also return the labels [N] int32 taken from the batches (dict 'label' or
        tuple second item); useful with shuffled or streamed datasets.
      progress: show a tqdm bar (images/s) on process 0.

    Returns:
      features [N, D] float32 NumPy array; or a tuple `(features, logits)`, `(features,
      labels)` or `(features, logits, labels)` depending on the flags. Multi-host: all
      processes' rows, concatenated in process order, on every process.

    Raises:
      TypeError: `model` has no `features` method, or `images`/`batch_size` has the wrong type.
      ValueError: bad `batch_size`, `dtype`, mesh or image shapes; empty input; labels asked for
        but absent.
    """
    mesh, local_batch, compute_dtype = _check_args(model, batch_size, mesh, dtype)
    batches = image_batches.fixed_batches(images, None, local_batch, compute_dtype)
    variables = sharding.replicate(_cast_floating(variables, dtype), mesh)
    step = _extract_step(_with_compute_dtype(model, dtype), mesh, return_logits)

    outputs = []  # per step: (device outputs, HostBatch), fetched one step late
    feats, logits, labels = [], [], []

    def fetch(done):
        out, batch = done
        feats.append(sharding.local_rows(out[0], mesh)[: batch.count])
        if return_logits:
            logits.append(sharding.local_rows(out[1], mesh)[: batch.count])
        labels.append(batch.labels[: batch.count])

    with _progress_bar(images, progress) as bar:
        for device_batch, batch in image_batches.prefetch_to_device(batches, mesh, return_labels):
            # Async dispatch: this step runs while the previous step's outputs are copied back.
            outputs.append((step(variables, device_batch["images"]), batch))
            if len(outputs) > 1:
                fetch(outputs.pop(0))
                bar.update(_num_images(feats[-1]))
        for done in outputs:
            fetch(done)
            bar.update(_num_images(feats[-1]))

    results = [sharding.gather_rows(np.concatenate(feats))]
    if return_logits:
        results.append(sharding.gather_rows(np.concatenate(logits)))
    if return_labels:
        results.append(sharding.gather_rows(np.concatenate(labels)))
    return results[0] if len(results) == 1 else tuple(results)


def stream_reduce(
    model,
    variables: PyTree,
    images,
    *,
    init: PyTree,
    update: Callable[[PyTree, jax.Array, jax.Array, jax.Array], PyTree],
    batch_size: int,
    labels=None,
    mesh: Mesh | None = None,
    dtype=None,
    progress: bool = True,
) -> PyTree:
    """Folds features into a carry on the device, batch by batch, without copying them back.

    Each step computes `feats_BD = model.apply(variables, x, method="features")` (float32) and
    then `carry = update(carry, feats_BD, labels_B, valid_B)` inside the same jitted function;
    the carry is replicated and XLA inserts the cross-device reductions. Padded rows have
    `valid_B == False` and zero images, so `update` must mask them out, e.g.
    `f = jnp.where(valid[:, None], feats, 0); return carry + f.T @ f`.

    Args:
      model: a Flax Linen module with a `features` method (see `extract_features`).
      variables: the model's variables.
      images: an array [N, H, W, C] or an iterable of batches, as in `extract_features`.
      init: the initial carry, a pytree of arrays (identical on every process).
      update: `update(carry, feats_BD float32, labels_B int32, valid_B bool) -> carry` with
        the same structure, shapes and dtypes as `init`; traced once, must be jittable.
      batch_size: global number of images per step (multiple of the mesh's 'data' size).
      labels: labels [N] (integers) for an array `images`; for iterables they come from the
        batches. Rows without labels get label -1.
      mesh: a `Mesh` with a 'data' axis; default: all devices.
      dtype: compute dtype for the forward pass, e.g. `jnp.bfloat16` (features are float32).
      progress: show a tqdm bar on process 0.

    Returns:
      The final carry as replicated `jax.Array`s (use `np.asarray` to get NumPy).

    Raises:
      TypeError: wrong argument types, or `update` is not callable.
      ValueError: bad shapes or sizes, or `update` changes the carry's structure/shapes/dtypes.
    """
    mesh, local_batch, compute_dtype = _check_args(model, batch_size, mesh, dtype)
    if not callable(update):
        raise TypeError(f"update must be callable; got {type(update).__name__}")
    if labels is not None and not isinstance(images, np.ndarray | jax.Array):
        raise ValueError(
            "labels may only be given with an array of images; iterables of "
            "batches carry their labels in a dict 'label' or tuple item"
        )
    batches = image_batches.fixed_batches(images, labels, local_batch, compute_dtype)
    variables = sharding.replicate(_cast_floating(variables, dtype), mesh)
    carry = sharding.replicate(init, mesh)
    expected = _shapes(carry)
    step = _stream_step(_with_compute_dtype(model, dtype), mesh, update)

    with _progress_bar(images, progress) as bar:
        for device_batch, batch in image_batches.prefetch_to_device(batches, mesh, False):
            args = (device_batch["images"], device_batch["labels"], device_batch["valid"])
            if expected is not None:  # checked by tracing only, before anything compiles
                returned = _shapes(jax.eval_shape(step, carry, variables, *args))
                if returned != expected:
                    raise ValueError(
                        "update must return a carry with the structure, shapes and dtypes of "
                        f"init; init has {expected}, update returned {returned}"
                    )
                expected = None
            carry = step(carry, variables, *args)
            bar.update(batch.count)
    return carry


# ----------------------------------------------------------------------------- steps


def _features_and_logits(model, variables, images_BHWC, with_logits: bool):
    """Forward pass returning (feats_BD, logits_BK or None).

    The two `apply` calls trace the backbone twice, but on identical inputs inside one jitted
    function, so XLA's common-subexpression elimination runs it once (the tests check the
    compiled FLOPs). This works for any module with `features` and `__call__`.
    """
    feats_BD = model.apply(variables, images_BHWC, method="features")
    if not with_logits:
        return feats_BD, None
    return feats_BD, model.apply(variables, images_BHWC, train=False)


_STEP_CACHE: dict = {}


def _cached(key, build):
    """Memoises jitted steps so repeated calls with the same model never re-trace."""
    try:
        hash(key)
    except TypeError:  # a module with unhashable fields: no cache, still correct
        return build()
    if key not in _STEP_CACHE:
        _STEP_CACHE[key] = build()
    return _STEP_CACHE[key]


def _extract_step(model, mesh: Mesh, with_logits: bool):
    def build():
        def step(variables, images_BHWC):
            feats, logits = _features_and_logits(model, variables, images_BHWC, with_logits)
            outs = (feats.astype(jnp.float32),)
            if with_logits:
                outs += (logits.astype(jnp.float32),)
            return outs

        return jax.jit(step, out_shardings=sharding.batch_sharding(mesh))

    return _cached(("extract", model, mesh, with_logits), build)


def _stream_step(model, mesh: Mesh, update):
    def build():
        def step(carry, variables, images_BHWC, labels_B, valid_B):
            feats_BD = model.apply(variables, images_BHWC, method="features")
            return update(carry, feats_BD.astype(jnp.float32), labels_B, valid_B)

        # Donating the carry lets XLA update it in place; CPU does not support donation.
        donate = () if mesh.devices.flat[0].platform == "cpu" else (0,)
        return jax.jit(
            step, out_shardings=sharding.replicated_sharding(mesh), donate_argnums=donate
        )

    return _cached(("stream", model, mesh, update), build)


# ----------------------------------------------------------------------------- input


def _check_args(model, batch_size, mesh, dtype):
    """Validates the common arguments; returns (mesh, per-process batch, image dtype)."""
    if not callable(getattr(model, "features", None)) or not hasattr(model, "apply"):
        raise TypeError(
            f"model must be a Flax module with a `features` method; got {type(model).__name__}"
        )
    mesh = sharding.data_mesh() if mesh is None else mesh
    sharding.check_data_mesh(mesh)
    local_batch = sharding.check_batch_size(batch_size, mesh)
    if dtype is None:
        return mesh, local_batch, np.dtype(np.float32)
    try:
        compute_dtype = np.dtype(dtype)
    except TypeError as err:
        raise ValueError(
            f"dtype must be a floating dtype such as jnp.bfloat16; got {dtype!r}"
        ) from err
    if not jnp.issubdtype(compute_dtype, jnp.floating):
        raise ValueError(f"dtype must be a floating dtype such as jnp.bfloat16; got {dtype!r}")
    return mesh, local_batch, compute_dtype


def _with_compute_dtype(model, dtype):
    """The model computing in `dtype`: cloned when it has a `dtype` field, else unchanged."""
    if dtype is None or not hasattr(model, "dtype") or not hasattr(model, "clone"):
        return model
    return model.clone(dtype=dtype)


def _cast_floating(tree: PyTree, dtype) -> PyTree:
    """Casts floating leaves to `dtype` (integer leaves, e.g. step counters, are kept)."""
    if dtype is None:
        return tree

    def cast(x):
        return x.astype(dtype) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x

    return jax.tree.map(cast, tree)


def _shapes(tree):
    return jax.tree.structure(tree), [(x.shape, x.dtype) for x in jax.tree.leaves(tree)]


def _num_images(feats_ND: np.ndarray) -> int:
    return int(feats_ND.shape[0])


def _progress_bar(images, enabled: bool):
    total = len(images) if isinstance(images, np.ndarray | jax.Array) else None
    return tqdm(
        total=total,
        unit="img",
        unit_scale=True,
        desc="features",
        disable=not enabled or jax.process_index() != 0,
        smoothing=0.1,
        mininterval=1.0,
    )
