"""Data-parallel sharding helpers: a 'data' mesh, replicated params, per-process batch shards.

Every caller that runs a model over many images (feature extraction, streaming scores,
fine-tuning) shards the batch over a one-axis `Mesh` named 'data' and replicates the
parameters. The helpers here are written for multi-host JAX: the mesh spans all global
devices, each process supplies only its own rows, and `jax.make_array_from_process_local_data`
assembles the global batch.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


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
    return jax.device_put(tree, replicated_sharding(mesh))


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
    """True when `flag` is true on at least one process (a collective in multi-host runs)."""
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
