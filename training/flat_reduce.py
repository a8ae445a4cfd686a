"""Gradients of a data-parallel batch, averaged across devices in one flat all-reduce.

Under `jax.jit` over a batch sharded on the 'data' axis, XLA averages the gradients leaf by leaf.
On GPU and TPU that is what we want (NCCL and the TPU interconnect combine and overlap the
all-reduces), but XLA:CPU sends each leaf over gloo on its own, and every device is its own gloo
rank: a small ViT's 72 leaves made a 2-process × 4-device step 18× slower than 1 × 8. Here each
device differentiates its slice of the batch inside `shard_map`, the gradients and the loss are
raveled into one vector (`jax.flatten_util.ravel_pytree`), averaged by one `lax.pmean`, and
unraveled: one collective per step.

The replicated parameters enter `shard_map` as device-invariant values. Differentiating an
invariant input sums its cotangents over the devices already (the transpose of the broadcast),
so the `pmean` below would count them 8 times; marking them varying first
(`jax.lax.pcast(..., to="varying")`) makes each device's gradient its own, as intended.

`flat_reduce_pays` says where to use it: the CPU backend with more than one process.

Shapes: B = global batch, K = classes.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import jax
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh, PartitionSpec

DATA = "data"


def flat_reduce_pays(mesh: Mesh) -> bool:
    """Whether the flat all-reduce beats XLA's own: the CPU backend, more than one process.

    ``HUBTUNE_FLAT_REDUCE=1`` (or ``0``) forces the choice, for benchmarks and tests.
    """
    forced = os.environ.get("HUBTUNE_FLAT_REDUCE")
    if forced in ("0", "1"):
        return forced == "1" and DATA in mesh.axis_names
    return jax.default_backend() == "cpu" and jax.process_count() > 1 and DATA in mesh.axis_names


def value_and_mean_grad(loss_fn: Callable, mesh: Mesh) -> Callable:
    """`jax.value_and_grad(loss_fn, has_aux=True)` over a batch sharded on `mesh`'s 'data' axis,
    with the loss and gradients averaged across devices in one `pmean`.

    Args:
      loss_fn: ``loss_fn(trainable, frozen, batch_stats, images, targets, key) ->
        (loss, (logits, batch_stats))``, the per-batch mean loss; `batch_stats` must come back
        unchanged (BatchNorm updating its statistics needs the global batch, so such steps keep
        XLA's path).
      mesh: the mesh whose 'data' axis shards `images` and `targets` (equal slices per device).

    Returns:
      A function of the same arguments returning ``((loss, (logits_BK, batch_stats)), grads)``:
      the global-batch mean loss, the logits sharded as the batch, and the global mean gradient.
    """
    replicated, sharded = PartitionSpec(), PartitionSpec(DATA)

    def local(trainable, frozen, batch_stats, images, targets, key):
        trainable = jax.lax.pcast(trainable, DATA, to="varying")  # see the module docstring
        (loss, (logits, _)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            trainable, frozen, batch_stats, images, targets, key
        )
        flat, unravel = ravel_pytree((grads, loss))
        grads, loss = unravel(jax.lax.pmean(flat, DATA))
        return loss, logits, grads

    mapped = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(replicated, replicated, replicated, sharded, sharded, replicated),
        out_specs=(replicated, sharded, replicated),
    )

    def value_and_grad(trainable, frozen, batch_stats, images, targets, key):
        loss, logits, grads = mapped(trainable, frozen, batch_stats, images, targets, key)
        return (loss, (logits, batch_stats)), grads

    return value_and_grad
