"""Feature extraction that keeps accelerators busy: sharded, prefetched, never recompiling.

`extract_features` runs a model's `features` method (the penultimate representation that
LogME and its peers score) over many images and returns NumPy arrays; `stream_reduce` folds
the features into a running statistic inside the same jitted step, so that features of huge
datasets never leave the device. Both run on `jaxmodels.inference.evaluate`'s engine (the one `predict`
uses): batches sharded over the 'data' axis of a `Mesh`, variables replicated, the last batch
padded so the step compiles once, the next batch transferred while the current one computes, and,
multi-host, every process feeding its own rows.

Inputs come in two kinds:
  * data the data layer reads — a spec string, an `ImageSource`, `(images uint8 [N, H, W, 3],
    labels [N])`, or a `Prepared`/`Streamed` set: prepared with the model's own evaluation
    preprocessing (`jaxmodels.spec_of(model)`, or `preprocessing=`) exactly as `predict` does;
  * preprocessed float images — an array [N, H, W, C] or an iterable of batches (arrays, dicts
    with 'image'/'label', or (images, labels) tuples), re-cut to `batch_size`.

Shapes: B = global batch size, N = number of images, D = feature width, K = number of classes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from jaxmodels import jit_cache, sharding
from jaxmodels.inference import compute_dtype, image_batches, row_batches
from jaxmodels.inference import evaluate as inference
from jaxmodels.inference import prepared as prepared_lib

PyTree = Any


def extract_features(
    model,
    variables: PyTree,
    images,
    *,
    batch_size: int | None = None,
    mesh: Mesh | None = None,
    dtype=None,
    preprocessing=None,
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
      images: data the data layer reads (a spec string, an `ImageSource`, `(images uint8,
        labels)`, a `Prepared` or `Streamed` set), or preprocessed float images: an array
        [N, H, W, C] or an iterable of batches, each an array [b, H, W, C], a dict with key
        'image' (and optionally 'label' [b]), or a tuple (images [b, H, W, C], labels [b]) — e.g.
        `tfds.as_numpy(ds.batch(256))`; such batches may have any sizes and are re-cut to
        `batch_size`. Multi-host, float input is this process's images.
      batch_size: global number of images per step; a positive multiple of the number of
        devices on the mesh's 'data' axis. Default 32 per device (a `Prepared` set keeps its own).
      mesh: a `Mesh` with a 'data' axis; default: all devices (`sharding.data_mesh()`).
      dtype: compute dtype, e.g. `jnp.bfloat16`; floating variables and the images are cast to
        it, and a model with a `dtype` field is cloned with it (Flax layers with an explicit
        float32 dtype would otherwise compute in float32). Default: float32 images, the model
        and variables as given. Outputs are always float32.
      preprocessing: for data-layer input, overrides the model's own evaluation preprocessing.
      return_logits: also return the logits [N, K].
      return_labels: also return the labels [N] int32 (from the data, or for float batches from
        a dict 'label' or a tuple's second item).
      progress: show a tqdm bar (images/s) on process 0.

    Returns:
      features [N, D] float32 NumPy array; or a tuple `(features, logits)`, `(features,
      labels)` or `(features, logits, labels)` depending on the flags. Data-layer input comes
      back in input order on every process; multi-host float input as all processes' rows,
      concatenated in process order.

    Raises:
      TypeError: `model` has no `features` method, or `images`/`batch_size` has the wrong type.
      ValueError: bad `batch_size`, `dtype`, mesh or image shapes; empty input; labels asked for
        but absent.
    """
    _check_model(model)
    compute_dtype.check(dtype)
    run_model = compute_dtype.apply_to_model(model, dtype)
    variables = compute_dtype.cast_floating(variables, dtype)
    if _is_dataset(images):
        data = prepared_lib.as_dataset(model, images, preprocessing, batch_size, mesh)
        step = _extract_step(run_model, data.preprocessing, dtype, data.mesh, return_logits)
        variables = sharding.replicate(variables, data.mesh)
        if data.on_host:
            outs, _ = inference.run_batches(
                step, variables, data.host_batches(), data.mesh, progress, "features",
                num_batches=data.num_batches,
            )  # fmt: skip
            results = [prepared_lib.gather_steps(o, data.num_examples) for o in outs]
        else:
            outputs = lambda v, images, labels, valid: step.forward(v, images)
            results = list(
                row_batches.map_rows(outputs, (variables,), data.rows, ("extract", step))
            )
        if return_labels:
            results.append(data.labels)
        return results[0] if len(results) == 1 else tuple(results)

    mesh, local_batch, image_dtype = _check_args(batch_size, mesh, dtype)
    batches = image_batches.fixed_batches(images, None, local_batch, image_dtype)
    variables = sharding.replicate(variables, mesh)
    step = _extract_step(run_model, None, dtype, mesh, return_logits)
    labels = []

    def checked(batches):
        for batch in batches:
            if return_labels and not batch.has_labels:
                raise ValueError(
                    "return_labels=True needs labels in the batches (dict 'label' or "
                    "(images, labels) tuples)"
                )
            labels.append(batch.labels[: batch.count])
            yield batch

    # (multi-host: a process that ran out feeds padding steps, which hold no rows)

    outs, counts = inference.run_batches(
        step, variables, checked(batches), mesh, progress, "features"
    )
    results = [
        sharding.gather_rows(np.concatenate([x[:n] for x, n in zip(o, counts, strict=True)]))
        for o in outs
    ]
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
    merge: Callable[[PyTree], PyTree] | None = None,
    batch_size: int | None = None,
    labels=None,
    mesh: Mesh | None = None,
    dtype=None,
    preprocessing=None,
    progress: bool = True,
) -> PyTree:
    """Folds features into a carry on the device, batch by batch, without copying them back.

    Each step computes `feats_BD = model.apply(variables, x, method="features")` (float32) and
    then `carry = update(carry, feats_BD, labels_B, valid_B)` inside the same jitted function;
    the carry is replicated and XLA inserts the cross-device reductions. Padded rows have
    `valid_B == False` and zero images, so `update` must mask them out, e.g.
    `f = jnp.where(valid[:, None], feats, 0); return carry + f.T @ f`.

    With `merge`, every device keeps its own carry instead: `update` sees only that device's
    rows of each batch (inside `jax.shard_map`, so a step gathers nothing and sums nothing across
    devices), and `merge` combines the M carries once at the end (M = the mesh's 'data' size).
    Use it where a replicated carry would need every row on every device, e.g. a running QR
    (`scoring.tsqr`: each device factors its own rows, the M factors are merged once).

    Args:
      model: a Flax Linen module with a `features` method (see `extract_features`).
      variables: the model's variables.
      images: data the data layer reads or float images/batches, as in `extract_features`
        (a `Prepared` set is streamed from the host or sliced from the devices batch by batch).
      init: the initial carry, a pytree of arrays (identical on every process).
      update: `update(carry, feats_BD float32, labels_B int32, valid_B bool) -> carry` with
        the same structure, shapes and dtypes as `init`; traced once, must be jittable. With
        `merge`, B is the rows per device (the global batch / M).
      merge: `merge(carries) -> result` for per-device carries: `carries` is `init`'s pytree
        with a leading axis [M, ...], device m's carry at index m; jitted, called once. Default
        None: one replicated carry.
      batch_size: global number of images per step (multiple of the mesh's 'data' size);
        default 32 per device.
      labels: labels [N] (integers) for a float array `images`; other inputs carry their own.
        Rows without labels get label -1.
      mesh: a `Mesh` with a 'data' axis; default: all devices.
      dtype: compute dtype for the forward pass, e.g. `jnp.bfloat16` (features are float32).
      preprocessing: for data-layer input, overrides the model's own evaluation preprocessing.
      progress: show a tqdm bar on process 0.

    Returns:
      The final carry (or with `merge`, its result) as replicated `jax.Array`s (use
      `sharding.host_copy` to get NumPy).

    Raises:
      TypeError: wrong argument types, or `update` is not callable.
      ValueError: bad shapes or sizes, or `update` changes the carry's structure/shapes/dtypes.
    """
    _check_model(model)
    if not callable(update):
        raise TypeError(f"update must be callable; got {type(update).__name__}")
    if merge is not None and not callable(merge):
        raise TypeError(f"merge must be callable or None; got {type(merge).__name__}")
    if _is_dataset(images):
        if labels is not None:
            raise ValueError("labels come with the data here; pass labels only with float arrays")
        data = prepared_lib.as_dataset(model, images, preprocessing, batch_size, mesh)
        mesh, prep = data.mesh, data.preprocessing
        pairs = (
            image_batches.prefetch_to_device(data.host_batches(), mesh, False, data.num_batches)
            if data.on_host
            else _device_batches(data)
        )
    else:
        if labels is not None and not isinstance(images, np.ndarray | jax.Array):
            raise ValueError(
                "labels may only be given with an array of images; iterables of "
                "batches carry their labels in a dict 'label' or tuple item"
            )
        mesh, local_batch, image_dtype = _check_args(batch_size, mesh, dtype)
        batches = image_batches.fixed_batches(images, labels, local_batch, image_dtype)
        pairs = image_batches.prefetch_to_device(batches, mesh, False)
        prep = None
    variables = sharding.replicate(compute_dtype.cast_floating(variables, dtype), mesh)
    carry = sharding.replicate(init, mesh)
    if merge is not None:
        carry = _per_device(carry, mesh)
    expected = _shapes(carry)
    run_model = compute_dtype.apply_to_model(model, dtype)
    step = _stream_step(run_model, prep, dtype, mesh, update, merge is not None)

    with prepared_lib.progress_bar(None, progress, "features") as bar:
        for device_batch, batch in pairs:
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
            bar.update(batch.count * jax.process_count())
    if merge is None:
        return carry
    return jax.jit(merge, out_shardings=sharding.replicated_sharding(mesh))(carry)


# ----------------------------------------------------------------------------- steps


def _features_and_logits(forward_feats, forward_logits, variables, images_BHWC):
    """Forward pass returning (feats_BD, logits_BK or None).

    The two `apply` calls trace the backbone twice, but on identical inputs inside one jitted
    function, so XLA's common-subexpression elimination runs it once (the tests check the
    compiled FLOPs). This works for any module with `features` and `__call__`.
    """
    feats_BD = forward_feats(variables, images_BHWC)
    if forward_logits is None:
        return (feats_BD,)
    return feats_BD, forward_logits(variables, images_BHWC)


class _ExtractStep:
    """Jitted per-batch extraction, plus its un-jitted form for passes on device rows."""

    def __init__(self, model, prep, dtype, mesh, with_logits):
        feats = inference.forward_fn(model, "features", prep, dtype)
        logits = inference.forward_fn(model, None, prep, dtype) if with_logits else None
        self.forward = lambda v, x: _features_and_logits(feats, logits, v, x)
        self.jitted = jax.jit(self.forward, out_shardings=sharding.batch_sharding(mesh))

    def __call__(self, variables, images):
        return self.jitted(variables, images)


def _extract_step(model, prep, dtype, mesh, with_logits: bool):
    key = ("extract", model, prep, compute_dtype.key(dtype), mesh, with_logits)
    return jit_cache.cached(key, lambda: _ExtractStep(model, prep, dtype, mesh, with_logits))


def _stream_step(model, prep, dtype, mesh: Mesh, update, per_device: bool):
    """The jitted step `(carry, variables, images, labels, valid) -> carry`: a replicated carry,
    or with `per_device` a carry [M, ...] sharded over 'data' that `update` folds each device's
    own rows into (`shard_map`: the features stay where the forward pass made them)."""

    def build():
        forward = inference.forward_fn(model, "features", prep, dtype)
        fold = _per_device_update(update, mesh) if per_device else update

        def step(carry, variables, images_BHWC, labels_B, valid_B):
            return fold(carry, forward(variables, images_BHWC), labels_B, valid_B)

        # Donating the carry lets XLA update it in place; CPU does not support donation.
        donate = () if mesh.devices.flat[0].platform == "cpu" else (0,)
        out = sharding.batch_sharding(mesh) if per_device else sharding.replicated_sharding(mesh)
        return jax.jit(step, out_shardings=out, donate_argnums=donate)

    key = ("stream", model, prep, compute_dtype.key(dtype), mesh, update, per_device)
    return jit_cache.cached(key, build)


def _per_device_update(update, mesh: Mesh):
    """`update` over a carry [M, ...] and a batch, both sharded over 'data': device m folds its
    rows into carry m, with no communication."""
    spec = PartitionSpec(sharding.DATA_AXIS)

    def local(carry_1, feats_bD, labels_b, valid_b):
        carry = jax.tree.map(lambda x: x[0], carry_1)
        return jax.tree.map(lambda x: x[None], update(carry, feats_bD, labels_b, valid_b))

    return jax.shard_map(local, mesh=mesh, in_specs=spec, out_specs=spec)


def _per_device(carry, mesh: Mesh):
    """The replicated `carry` copied per device: a leading axis [M, ...] sharded over 'data'
    (made on the devices, so multi-host every process fills its own devices' copies)."""

    def build():
        shards = sharding.data_parallel_size(mesh)
        tile = lambda tree: jax.tree.map(lambda x: jnp.broadcast_to(x, (shards, *x.shape)), tree)
        return jax.jit(tile, out_shardings=sharding.batch_sharding(mesh))

    return jit_cache.cached(("per-device carry", mesh), build)(carry)


# ----------------------------------------------------------------------------- input


def _is_dataset(images) -> bool:
    """Data the data layer reads (as opposed to preprocessed float images or batches)."""
    from jaxmodels.data import sources as data_lib

    return isinstance(
        images, str | prepared_lib.Prepared | prepared_lib.Streamed | data_lib.ImageSource
    ) or (isinstance(images, tuple) and len(images) == 2 and _is_uint8_array(images[0]))


def _is_uint8_array(x) -> bool:
    return isinstance(x, np.ndarray | jax.Array) and x.dtype == np.uint8 and x.ndim == 4


def _device_batches(data: prepared_lib.Prepared):
    """Batch t of a device-resident set, as (device arrays, host batch) pairs (the host batch
    carries this process's count of real rows, for the progress bar)."""
    local = data.batch_size // jax.process_count()
    _, valid_TL = prepared_lib.local_layout(data.labels, data.num_batches, local)
    batches = row_batches.device_batches(data.rows)
    for (_, _, (images, labels, valid)), valid_L in zip(batches, valid_TL, strict=True):
        host = image_batches.HostBatch(None, None, valid_L, int(valid_L.sum()), True)
        yield {"images": images, "labels": labels, "valid": valid}, host


def _check_model(model) -> None:
    if not callable(getattr(model, "features", None)) or not hasattr(model, "apply"):
        raise TypeError(
            f"model must be a Flax module with a `features` method; got {type(model).__name__}"
        )


def _check_args(batch_size, mesh, dtype):
    """Validates the common arguments; returns (mesh, per-process batch, image dtype)."""
    mesh, batch_size = prepared_lib.mesh_and_batch(mesh, batch_size)
    local_batch = batch_size // jax.process_count()
    compute_dtype.check(dtype)
    return mesh, local_batch, np.dtype(np.float32 if dtype is None else dtype)


def _shapes(tree):
    return jax.tree.structure(tree), [(x.shape, x.dtype) for x in jax.tree.leaves(tree)]
