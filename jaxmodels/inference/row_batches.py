"""Running a jitted step over chosen rows of host arrays, in a few fixed (bucket) batch shapes.

An adaptive cascade sends a different, data-dependent subset of the examples to each stage.
Compiling one step per subset size would recompile all the time; padding every subset to the
full batch would waste the savings. `map_rows` cuts the rows into batches of the largest bucket
and pads only the remainder, to the smallest bucket that holds it, so each step compiles at
most once per bucket, and the waste is below one bucket step (`default_buckets`). Every batch is gathered on the
host, sharded over the 'data' axis of a `Mesh` and dispatched asynchronously; the previous
batch's outputs are fetched while the next one computes.

Shapes: R rows to run, B rows of one device batch (a bucket size).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from jax.sharding import Mesh

from jaxmodels import sharding

DEFAULT_BATCH_SIZE = 256
# Default buckets: multiples of batch/16 (a leftover of many rows wastes at most batch/16 of
# them), and below batch/16 the powers of two (a small leftover at most doubles); every size
# rounded up to the mesh. With batch 256 on one device: 1, 2, 4, 8, 16, 32, ..., 240, 256.
NUM_LINEAR_BUCKETS = 16


def default_buckets(batch_size: int, shards: int) -> set[int]:
    """The default bucket sizes for `batch_size` rows on `shards` devices (see above)."""
    step = batch_size / NUM_LINEAR_BUCKETS
    sizes = {math.ceil(step * i) for i in range(1, NUM_LINEAR_BUCKETS + 1)}
    size = 1
    while size < step:
        sizes.add(size)
        size *= 2
    return {min(batch_size, math.ceil(size / shards) * shards) for size in sizes}


def mesh_and_buckets(mesh, batch_size, buckets) -> tuple[Mesh, tuple[int, ...]]:
    """The mesh and the ascending bucket sizes, the largest being the batch size.

    Args:
      mesh: a `Mesh` with a 'data' axis, or None for all devices.
      batch_size: rows of the largest batch, or None: the largest bucket if buckets are given,
        else `DEFAULT_BATCH_SIZE` rounded up to a multiple of the 'data' size.
      buckets: padded batch sizes, or None for `default_buckets`.

    Returns:
      (mesh, buckets) with every bucket a positive multiple of the 'data' size.

    Raises:
      TypeError / ValueError: a bad mesh, sizes that are not positive multiples of the 'data'
        size (`sharding.check_batch_size`), or buckets above batch_size.
    """
    mesh = sharding.data_mesh() if mesh is None else mesh
    sharding.check_data_mesh(mesh)
    shards = sharding.data_parallel_size(mesh)
    if buckets is not None:
        if isinstance(buckets, str) or not isinstance(buckets, Sequence | set) or not buckets:
            raise TypeError(f"buckets must be a non-empty sequence of ints; got {buckets!r}")
        for size in buckets:
            sharding.check_batch_size(size, mesh)
    if batch_size is None:
        batch_size = max(buckets) if buckets else math.ceil(DEFAULT_BATCH_SIZE / shards) * shards
    sharding.check_batch_size(batch_size, mesh)
    if buckets is None:
        buckets = default_buckets(batch_size, shards)
    elif max(buckets) > batch_size:
        raise ValueError(f"buckets must not exceed batch_size {batch_size}; got {sorted(buckets)}")
    return mesh, tuple(sorted({int(size) for size in buckets} | {int(batch_size)}))


def bucket_chunks(num_rows: int, buckets: tuple[int, ...]):
    """Yields (start, stop, padded size): full largest buckets, then the rest in the smallest
    bucket that holds it."""
    largest = buckets[-1]
    for start in range(0, num_rows, largest):
        stop = min(start + largest, num_rows)
        yield start, stop, next(size for size in buckets if size >= stop - start)


def map_rows(step, consts, row_arrays, rows_R, mesh: Mesh, buckets) -> tuple[np.ndarray, ...]:
    """Runs ``step(*consts, *batch)`` over the rows `rows_R` of host arrays; returns NumPy.

    Args:
      step: a jitted function returning a tuple of arrays whose leading axis is the batch.
      consts: leading arguments passed unchanged (e.g. replicated variables).
      row_arrays: host arrays [N, ...] (images, running sums); each batch takes rows of each.
      rows_R: non-empty int array of the row indices to run, in the order wanted.
      mesh: the data mesh the batches are sharded over.
      buckets: ascending batch sizes (`mesh_and_buckets`).

    Returns:
      The step's outputs for rows `rows_R`, each [R, ...], in the order of `rows_R`. Padding
      rows (copies of a chunk's last row) are dropped.
    """
    if not len(rows_R):
        raise ValueError("rows_R must not be empty")
    in_flight, done = [], []
    for start, stop, size in bucket_chunks(len(rows_R), buckets):
        idx_B = rows_R[start:stop]
        idx_B = np.concatenate([idx_B, np.full(size - len(idx_B), idx_B[-1])])
        batch = sharding.shard_local_batch(tuple(x[idx_B] for x in row_arrays), mesh)
        in_flight.append((step(*consts, *batch), stop - start))
        if len(in_flight) > 1:  # async dispatch: fetch the previous batch while this one runs
            done.append(_fetch(*in_flight.pop(0)))
    done.extend(_fetch(*item) for item in in_flight)
    return tuple(np.concatenate(parts) for parts in zip(*done, strict=True))


def _fetch(outputs, count: int) -> tuple[np.ndarray, ...]:
    return tuple(np.asarray(x)[:count] for x in outputs)
