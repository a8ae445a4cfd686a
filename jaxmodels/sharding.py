"""Sharding helpers: a 'data' mesh, replicated or fully sharded parameters, per-process batches.

Every caller that runs a model over many images (feature extraction, streaming scores,
fine-tuning) shards the batch over a one-axis `Mesh` named 'data'. Parameters are replicated, or,
for fine-tuning with ``shard_params``, fully sharded over the same axis (`param_shardings`: each
large tensor split along its largest dimension divisible by the device count, as ZeRO-3 / FSDP
do; XLA gathers them for the forward pass and reduce-scatters their gradients). The helpers are
written for multi-host JAX: the mesh spans all global devices (process 0's first), each process
supplies only its own rows, and `jax.make_array_from_process_local_data` assembles the global
batch; `host_copy` reads any global array back on every process.

References:
    Rajbhandari et al. "ZeRO: Memory Optimizations Toward Training Trillion Parameter Models",
    SC 2020 (stage 3: parameters, gradients and optimizer state partitioned over data parallel
    workers).
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"
# Tensors smaller than this stay replicated under `param_shardings`: their bytes are negligible
# and gathering them would cost one collective each (biases, norm scales, small heads).
MIN_SHARDED_SIZE = 1024


def data_mesh(devices: list[jax.Device] | None = None) -> Mesh:
    """A one-axis mesh named 'data' over `devices` (default: all global devices).

    Args:
      devices: devices to span, in order; defaults to `jax.devices()` (every process's).

    Returns:
      A `Mesh` with the single axis 'data'.
    """
    devices = jax.devices() if devices is None else list(devices)
    if not devices:
        raise ValueError("devices must be a non-empty list of jax devices; got an empty list")
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def check_data_mesh(mesh: Mesh) -> None:
    """Raises `TypeError`/`ValueError` unless `mesh` is a `Mesh` with a 'data' axis."""
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh; got {type(mesh).__name__}")
    if DATA_AXIS not in mesh.axis_names:
        raise ValueError(f"mesh must have an axis named {DATA_AXIS!r}; got axes {mesh.axis_names}")


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding that splits the leading (batch) dimension over the mesh's 'data' axis."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding that keeps a full copy on every device of the mesh."""
    return NamedSharding(mesh, PartitionSpec())


def replicate(tree, mesh: Mesh):
    """Places every leaf of `tree` on all devices of `mesh` (fully replicated).

    Args:
      tree: a pytree of host (NumPy) or device arrays, identical on every process.
      mesh: the mesh to replicate over.

    Returns:
      The same pytree of `jax.Array`s, replicated over `mesh`.
    """
    return jax.device_put(_via_host_if_local(tree), replicated_sharding(mesh))


def put(tree, shardings):
    """`jax.device_put(tree, shardings)` that also works multi-host for arrays on local devices.

    Multi-host, an array on this process's devices alone (what `jaxmodels.load` returns) cannot
    be put on a mesh spanning other hosts' devices; it goes through host memory instead (every
    process holds the same value). Global arrays are resharded in place.
    """
    return jax.device_put(_via_host_if_local(tree), shardings)


def _via_host_if_local(tree):
    if jax.process_count() == 1:
        return tree
    local = lambda x: isinstance(x, jax.Array) and x.is_fully_addressable
    return jax.tree.map(lambda x: np.asarray(x) if local(x) else x, tree)


def fsdp_spec(shape: tuple[int, ...], shards: int, min_size: int = MIN_SHARDED_SIZE):
    """Where a tensor of `shape` is split over `shards` devices under fully sharded training.

    Args:
      shape: the tensor's shape.
      shards: the size of the mesh's 'data' axis.
      min_size: tensors with fewer elements stay replicated.

    Returns:
      A `PartitionSpec` naming 'data' on the largest dimension divisible by `shards` (the first
      of equal ones), or the replicated `PartitionSpec()` for small or indivisible tensors.
    """
    if shards == 1 or math.prod(shape) < min_size:
        return PartitionSpec()
    for dim in sorted(range(len(shape)), key=lambda d: (-shape[d], d)):
        if shape[dim] % shards == 0:
            return PartitionSpec(*(DATA_AXIS if d == dim else None for d in range(len(shape))))
    return PartitionSpec()


def param_shardings(tree, mesh: Mesh, *, shard: bool = True, min_size: int = MIN_SHARDED_SIZE):
    """A `NamedSharding` per leaf: fully sharded (`fsdp_spec`) when `shard`, else replicated.

    The rule depends on a leaf's shape alone, so gradients and optimizer moments, which share
    their parameter's shape, get their parameter's sharding, and a train state restored from a
    checkpoint lands where a fresh one would.

    Args:
      tree: a pytree of arrays or `jax.ShapeDtypeStruct`s (e.g. from `jax.eval_shape`).
      mesh: the data mesh.
      shard: False gives every leaf the replicated sharding.
      min_size: see `fsdp_spec`.

    Returns:
      The pytree of `NamedSharding`s, for `jax.jit(..., out_shardings=...)` or `put`.
    """
    check_data_mesh(mesh)
    shards = data_parallel_size(mesh) if shard else 1
    return jax.tree.map(
        lambda x: NamedSharding(mesh, fsdp_spec(tuple(x.shape), shards, min_size)), tree
    )


def bytes_per_device(tree) -> int:
    """Bytes one device holds of a pytree of sharded arrays (or sharded `ShapeDtypeStruct`s).

    Each leaf counts its shard's shape under its own sharding (the largest device's share; even
    shardings give every device the same), so a replicated leaf counts whole.
    """
    total = 0
    for x in jax.tree.leaves(tree):
        where = getattr(x, "sharding", None)
        shape = where.shard_shape(tuple(x.shape)) if where is not None else tuple(x.shape)
        total += math.prod(shape) * np.dtype(x.dtype).itemsize
    return total


def host_copy(tree):
    """NumPy copy of a pytree of global arrays, identical on every process.

    In one process the leaves are fetched together (`jax.device_get`: one batched transfer).
    Multi-host, a replicated array's local replica is the whole value; a sharded one is read
    whole when this process holds it all, else all-gathered from the processes (then every
    process must call this: it is a collective). Non-array leaves are passed through
    `np.asarray`.
    """
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, jax.device_get(tree))

    def one(x):
        if not isinstance(x, jax.Array):
            return np.asarray(x)
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        if x.is_fully_addressable:
            return np.asarray(x)
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(one, tree)


def data_parallel_size(mesh: Mesh) -> int:
    """Number of batch shards: the size of the mesh's 'data' axis."""
    return int(mesh.shape[DATA_AXIS])


def check_batch_size(batch_size: int, mesh: Mesh) -> int:
    """Validates a global batch size against the mesh and returns the per-process batch size.

    The global batch must split evenly over the 'data' axis (so every device gets the same
    number of rows) and over the processes (each process feeds `batch_size // process_count`).

    Args:
      batch_size: global number of rows per step.
      mesh: the data mesh.

    Returns:
      The number of rows this process supplies per step.

    Raises:
      TypeError: `batch_size` is not an int.
      ValueError: `batch_size` is not positive or not a multiple of the 'data' axis size.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer):
        raise TypeError(f"batch_size must be an int; got {type(batch_size).__name__}")
    shards = data_parallel_size(mesh)
    if batch_size <= 0 or batch_size % shards:
        lower = max(shards, batch_size // shards * shards)
        raise ValueError(
            f"batch_size must be a positive multiple of the {shards} devices on the mesh's "
            f"'data' axis; got {batch_size} (try {lower} or {lower + shards})"
        )
    return int(batch_size) // jax.process_count()


def shard_local_batch(local_batch, mesh: Mesh):
    """Assembles a global batch-sharded array from this process's rows.

    Args:
      local_batch: a pytree of host arrays whose leading dimension is this process's rows.
      mesh: the data mesh.

    Returns:
      The pytree of global `jax.Array`s, sharded along the leading dimension over 'data'.
    """
    sharding = batch_sharding(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch
    )


def local_rows(global_array: jax.Array, mesh: Mesh) -> np.ndarray:
    """The rows of a batch-sharded global array that this process supplied, as NumPy."""
    if jax.process_count() == 1:
        return np.asarray(global_array)
    local = multihost_utils.global_array_to_host_local_array(
        global_array, mesh, PartitionSpec(DATA_AXIS)
    )
    return np.asarray(local)


def any_process(flag: bool) -> bool:
    """True when `flag` is true on at least one process (a collective in multi-host runs).

    Processes that must take the same branch (a cache hit, an existing folder, a checkpoint
    that failed to read) decide with it, so none waits in a collective the others skipped.
    """
    if jax.process_count() == 1:
        return bool(flag)
    return bool(np.any(multihost_utils.process_allgather(np.asarray([flag], dtype=np.bool_))))


def gather_rows(local_NX: np.ndarray) -> np.ndarray:
    """Concatenates each process's rows in process order (no-op with one process).

    Processes may hold different numbers of rows; they are padded to the largest count for the
    collective and trimmed afterwards.

    Args:
      local_NX: this process's rows, [N_local, ...].

    Returns:
      All processes' rows, [sum of N_local, ...], identical on every process.
    """
    if jax.process_count() == 1:
        return local_NX
    counts = multihost_utils.process_allgather(np.asarray([local_NX.shape[0]], dtype=np.int64))
    counts = np.asarray(counts).reshape(-1)
    padded = np.zeros((int(counts.max()), *local_NX.shape[1:]), local_NX.dtype)
    padded[: local_NX.shape[0]] = local_NX
    stacked = np.asarray(multihost_utils.process_allgather(padded))  # [P, max_N, ...]
    return np.concatenate([stacked[p, :n] for p, n in enumerate(counts)], axis=0)
