"""Inference as a library: logits and accuracy of a model over a dataset, on all devices.

`predict(model, variables, data)` returns logits [N, K] in input order and `evaluate` accuracy,
loss and count, for any data the data layer reads (a spec string, an `ImageSource`, uint8 arrays)
or for a `Prepared` evaluation set (`jaxmodels.inference.prepared`): decoded and preprocessed once,
then evaluated as often as wanted — a greedy soup scores dozens of candidate weights on one
held-out set, and each candidate costs one forward pass, not a re-decode.

How a pass runs:
  * images reach the device as uint8 [B, S, S, 3] (resized and centre-cropped on the host by
    `jaxmodels.data.preprocess.prepare_for_eval`, the one evaluation preprocessing) and are normalised
    inside the jitted forward (`normalized_forward`), so a model sees the same input on every
    path: ranking, fine-tuning's evaluation, soups and committees;
  * the batch is split over the 'data' axis of a `Mesh` of all devices, variables are replicated,
    the last batch is padded and marked by `valid`, so one shape compiles once;
  * a device-resident `Prepared` set runs on the committees' row engine
    (`jaxmodels.inference.row_batches.map_rows`): one program per pass, each device mapping the
    forward over its rows of every batch, the outputs fetched once (`predict`; `evaluate`
    fetches each row's hit and loss); a streamed set (a source, or a host-resident `Prepared`)
    goes batch by batch with the next batch transferred while the current one computes
    (`run_batches`);
  * multi-host: each process decodes and feeds only its slice of every global batch (the
    contiguous rows [p·B/P, (p+1)·B/P)); outputs are gathered so every process returns all N rows
    in input order (`DeviceRows.fetch`, `prepared.gather_steps`).

Shapes: N examples, T batches, B global batch, L = B / process count, S image side, K classes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from jaxmodels import sharding
from jaxmodels.data import preprocess
from jaxmodels.inference import compute_dtype, image_batches, row_batches
from jaxmodels.inference import prepared as prepared_lib
from jaxmodels.jit_cache import cached

PyTree = Any


class EvalResult(NamedTuple):
    """What `evaluate` returns: mean accuracy and cross-entropy over `count` labelled examples."""

    accuracy: float
    loss: float
    count: int


def predict(
    model,
    variables: PyTree,
    data,
    *,
    preprocessing: preprocess.Preprocessing | None = None,
    batch_size: int | None = None,
    mesh: Mesh | None = None,
    dtype=None,
    progress: bool = True,
) -> np.ndarray:
    """Logits of `model` over `data`, in input order, computed on all devices.

    Args:
      model: a Flax Linen classifier, `model.apply(variables, images, train=False) -> [B, K]`.
      variables: its variables.
      data: a `Prepared` set, a data spec string, an `ImageSource`, or `(images uint8
        [N, H, W, 3], labels [N])`.
      preprocessing: default the model's own (`jaxmodels.spec_of(model)`) or the `Prepared`
        set's; required for modules that are not jaxmodels architectures.
      batch_size: global batch (default 32 per device; a `Prepared` set keeps its own).
      mesh: default all devices (a `Prepared` set keeps its own).
      dtype: compute dtype, e.g. `jnp.bfloat16` (variables and images are cast; logits float32).
      progress: show a progress bar on process 0.

    Returns:
      float32 NumPy logits [N, K], identical on every process.
    """
    prepared, step = _setup(
        model, variables, data, preprocessing, batch_size, mesh, dtype, progress
    )
    variables = sharding.replicate(compute_dtype.cast_floating(variables, dtype), prepared.mesh)
    if not prepared.on_host:
        logits = lambda v, images, labels, valid: (step.forward(v, images),)
        return row_batches.map_rows(logits, (variables,), prepared.rows, ("predict", step))[0]
    outs, _ = run_batches(
        step, variables, prepared.host_batches(), prepared.mesh, progress,
        num_batches=prepared.num_batches,
    )  # fmt: skip
    return prepared_lib.gather_steps(outs[0], prepared.num_examples)


def evaluate(
    model,
    variables: PyTree,
    data,
    *,
    preprocessing: preprocess.Preprocessing | None = None,
    batch_size: int | None = None,
    mesh: Mesh | None = None,
    dtype=None,
    progress: bool = False,
) -> EvalResult:
    """Accuracy, mean cross-entropy and count of `model` on labelled `data`.

    Arguments as `predict`. On a device-resident `Prepared` set this is one program over the
    set that returns each row's hit and loss (summed here, in float64): the cost of one forward
    pass.

    Raises:
      ValueError: the data has no labels, or labels outside [0, K).
    """
    prepared, step = _setup(
        model, variables, data, preprocessing, batch_size, mesh, dtype, progress
    )
    if prepared.num_examples and (prepared.labels < 0).any():
        raise ValueError("evaluate needs labelled data; some examples have no label")
    variables = sharding.replicate(compute_dtype.cast_floating(variables, dtype), prepared.mesh)
    if prepared.on_host:
        logits_NK = predict(model, variables, prepared, dtype=dtype, progress=progress)
        return evaluate_logits(logits_NK, prepared.labels)
    hit_N, loss_N, classes_N = row_batches.map_rows(
        _scored_rows(step), (variables,), prepared.rows, ("evaluate", step)
    )
    _check_labels_within(prepared.labels, int(classes_N[0]))
    return _result(hit_N, loss_N)


def evaluate_logits(logits_NK, labels_N) -> EvalResult:
    """Accuracy, mean cross-entropy and count of logits already computed (e.g. by `predict`).

    What `evaluate` computes from a model's logits, for logits in hand: an ensemble's averaged
    logits, or one model's logits kept for something else too.

    Args:
      logits_NK: float [N, K].
      labels_N: int [N] in [0, K).

    Raises:
      ValueError: shapes that do not match, or labels outside [0, K).
    """
    logits_NK, labels_N = np.asarray(logits_NK), np.asarray(labels_N)
    if logits_NK.ndim != 2 or labels_N.shape != logits_NK.shape[:1]:
        raise ValueError(
            f"need logits [N, K] and labels [N]; got {logits_NK.shape} and {labels_N.shape}"
        )
    if len(labels_N) and labels_N.min() < 0:
        raise ValueError("evaluate needs labelled data; some examples have no label")
    classes = logits_NK.shape[1]
    _check_labels_within(labels_N, classes)
    loss_N = optax.softmax_cross_entropy_with_integer_labels(
        jnp.asarray(logits_NK, jnp.float32), jnp.asarray(labels_N, jnp.int32)
    )
    return _result(np.argmax(logits_NK, 1) == labels_N, np.asarray(loss_N))


def _result(hit_N: np.ndarray, loss_N: np.ndarray) -> EvalResult:
    """Accuracy and mean loss of per-row hits and float32 losses (summed in float64)."""
    count = len(hit_N)
    correct, loss_sum = float(np.sum(hit_N)), float(np.sum(loss_N, dtype=np.float64))
    return EvalResult(correct / max(count, 1), loss_sum / max(count, 1), count)


def _check_labels_within(labels_N: np.ndarray, classes: int) -> None:
    if len(labels_N) and labels_N.max() >= classes:
        raise ValueError(f"labels reach {int(labels_N.max())} but the model has {classes} classes")


# ----------------------------------------------------------------------------- engine


def run_batches(
    step: Callable,
    variables: PyTree,
    batches,
    mesh: Mesh,
    progress: bool,
    desc: str = "predict",
    num_batches: int | None = None,
) -> list[list[np.ndarray]]:
    """Runs a jitted per-batch `step(variables, images) -> tuple of [B, ...]` over host batches.

    The next batch is transferred in a background thread while the current one computes, and each
    step's outputs are copied back one step late (JAX dispatch is asynchronous).

    Args:
      step: jitted, returning a tuple of batch-sharded outputs.
      variables: replicated variables.
      batches: an iterator of `image_batches.HostBatch` of this process's rows.
      mesh: the data mesh.
      progress: show a bar on process 0.
      desc: the bar's label.
      num_batches: the steps of the pass when known (the same on every process): then no
        per-step agreement between processes (`image_batches.prefetch_to_device`).

    Returns:
      `(outputs, counts)`: per output, the list of this process's rows per step ([L, ...] each,
      padding included); and per step, how many of those rows are real.
    """
    pending, collected, counts = [], None, []

    def fetch(done):
        nonlocal collected
        outs, batch = done
        counts.append(batch.count)
        rows = [sharding.local_rows(x, mesh) for x in outs]
        collected = [[] for _ in rows] if collected is None else collected
        for store, x in zip(collected, rows, strict=True):
            store.append(x)

    with prepared_lib.progress_bar(None, progress, desc) as bar:
        pairs = image_batches.prefetch_to_device(batches, mesh, False, num_batches)
        for device_batch, batch in pairs:
            pending.append((step(variables, device_batch["images"]), batch))
            if len(pending) > 1:
                fetch(pending.pop(0))
            bar.update(batch.count * jax.process_count())
        for done in pending:
            fetch(done)
    return collected or [], counts


def forward_fn(model, method: str | None, prep: preprocess.Preprocessing | None, dtype):
    """`f(variables, images [B, S, S, 3]) -> float32 output`: normalises uint8 images on device.

    `method` None gives the logits (`train=False`), else e.g. "features". Float images are taken
    as already normalised. `dtype` casts the images (variables are cast by the caller).
    """
    if method is None:
        apply = lambda variables, images: model.apply(variables, images, train=False)
    else:
        apply = lambda variables, images: model.apply(variables, images, method=method)
    return normalized_forward(apply, prep, dtype)


def normalized_forward(apply_fn, prep: preprocess.Preprocessing | None, dtype=None):
    """`f(variables, images) -> float32 apply_fn(variables, images)`, uint8 images normalised
    with `prep` on the device first (any apply function: `forward_fn`, a committee member)."""

    def forward(variables, images):
        if images.dtype == jnp.uint8:
            if prep is None:
                raise ValueError("uint8 images need the model's preprocessing to be normalised")
            images = preprocess.normalize(images, prep)
        if dtype is not None:
            images = images.astype(dtype)
        return apply_fn(variables, images).astype(jnp.float32)

    return forward


def _scored_rows(step):
    """f(variables, images [B], labels [B], valid [B]) → per row: hit (int32), cross-entropy
    (float32) and K (int32), what `evaluate` sums on the host over the real rows."""

    def scored(v, x_B, y_B, valid_B):
        logits_BK = step.forward(v, x_B)
        classes = logits_BK.shape[1]
        y_B = jnp.clip(y_B, 0, classes - 1)  # padding rows carry label 0 (and are not fetched)
        hit_B = (jnp.argmax(logits_BK, axis=1) == y_B).astype(jnp.int32)
        loss_B = optax.softmax_cross_entropy_with_integer_labels(logits_BK, y_B)
        return hit_B, loss_B, jnp.full_like(y_B, classes, jnp.int32)

    return scored


class _Step:
    """A jitted per-batch step that also exposes its un-jitted forward (for passes on device rows)."""

    def __init__(self, forward, jitted):
        self.forward, self.jitted = forward, jitted

    def __call__(self, variables, images):
        return self.jitted(variables, images)


def _setup(model, variables, data, preprocessing, batch_size, mesh, dtype, progress):
    if not hasattr(model, "apply"):
        raise TypeError(f"model must be a Flax module; got {type(model).__name__}")
    if not isinstance(variables, dict) or "params" not in variables:
        raise TypeError("variables must be a dict with a 'params' collection")
    compute_dtype.check(dtype)
    prepared = prepared_lib.as_dataset(model, data, preprocessing, batch_size, mesh)
    run_model = compute_dtype.apply_to_model(model, dtype)
    prep, mesh = prepared.preprocessing, prepared.mesh

    def build():
        forward = forward_fn(run_model, None, prep, dtype)
        jitted = jax.jit(lambda v, x: (forward(v, x),), out_shardings=sharding.batch_sharding(mesh))
        return _Step(forward, jitted)

    return prepared, cached(("logits", run_model, prep, compute_dtype.key(dtype), mesh), build)
