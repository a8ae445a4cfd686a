"""Running jitted steps over rows that are uploaded once and stay on the devices.

Committees run models over every row of a set (an ensemble) or, stage after stage, over the rows
still undecided (a cascade). Both upload the host arrays once (`DeviceRows`): the N rows in
contiguous blocks of n = ⌈N/S⌉, one block per device of the mesh's 'data' axis. Each call is
three steps: a small gather of each device's rows by their local index (`per_device`, inside
`jax.shard_map`), the model step on that batch (`data_parallel`: it depends on the bucket only,
not on N) and a small scatter of its outputs into buffers on the devices, fetched once at the
end (`DeviceRows.fetch`). No row crosses between devices or back to the host on the way.

A step is compiled once per bucket, a padded number of rows per call. Work is cut into calls of
the largest bucket and the rest goes in the smallest bucket that holds it (`bucket_chunks`), so a
subset of any size compiles at most once per bucket and wastes less than one bucket step
(`default_buckets`). Buckets are global row counts, multiples of S; a device runs B/S rows of a
call.

Shapes: N rows, S devices on 'data', n rows per device, B rows of one call (a bucket), b = B/S
of them per device.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Hashable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from jaxmodels import jit_cache, sharding

DEFAULT_BATCH_SIZE = 256
# Default buckets: multiples of batch/16 (a leftover of many rows wastes at most batch/16 of
# them), and below batch/16 the powers of two (a small leftover at most doubles); every size
# rounded up to the mesh. With batch 256 on one device: 1, 2, 4, 8, 16, 32, ..., 240, 256.
# On accelerators the buckets are coarse, powers of two only (1, 2, 4, ..., 256): a compile
# costs seconds there while padded rows cost little, so fewer executables pay.
NUM_LINEAR_BUCKETS = 16


def default_buckets(batch_size: int, shards: int, coarse: bool = False) -> set[int]:
    """The default bucket sizes for `batch_size` rows on `shards` devices (see above)."""
    linear = 1 if coarse else NUM_LINEAR_BUCKETS
    step = batch_size / linear
    sizes = {math.ceil(step * i) for i in range(1, linear + 1)}
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
      buckets: padded batch sizes, or None for `default_buckets` (coarse off the CPU).

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
        buckets = default_buckets(batch_size, shards, coarse=jax.default_backend() != "cpu")
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


class DeviceRows:
    """Host arrays [N, ...] uploaded once, in blocks of n rows, one block per device.

    Each device holds its n rows in a block of C ≥ n rows, the rest zeros. Two layouts:

      * contiguous (the constructor): device s holds rows [s·n, (s+1)·n). C is the largest
        bucket's rows b_max, or b_max times a power of two, so compiled calls depend on C, not
        on N, and sets of many sizes share them: every set of at most one largest batch (a set
        and its quarter, as `jaxmodels.committees.deploy` times them), and larger ones at most
        twice the rows. Committees use it.
      * in batches (`in_batches`): the rows of T global batches of B = S·b rows, device s holding
        its b rows of every batch (rows t·B + s·b + j at t·b + j; C = n = T·b), so the call at
        offset t·b is global batch t. A prepared evaluation set uses it: each pass runs the batches
        a streamed pass would, and multi-host each process uploads the slice of every batch it
        read (`jaxmodels.inference.prepared`).

    Arrays given as one object several times are uploaded once and shared. Multi-host: every
    process uploads the blocks of its own devices; `fetch` returns all rows on every process.

    Args:
      host_arrays: arrays [N, ...] with one N (the same arrays, all N rows, on every process).
      mesh: the data mesh.
      buckets: ascending global bucket sizes (`mesh_and_buckets`).

    Attributes:
      arrays: the device arrays [S·C, ...], sharded over 'data', in the order given.
      num_rows, rows_per_device, capacity: N, n and C.
      counts_S: [S] how many of each device's n rows are real rows.
      local_buckets: the buckets in rows per device (b = B/S).
      batches: None (contiguous), or (T, b) for rows in batches.
    """

    def __init__(self, host_arrays: Sequence[np.ndarray], mesh: Mesh, buckets: tuple[int, ...]):
        shards = sharding.data_parallel_size(mesh)
        n = -(-len(host_arrays[0]) // shards)
        largest = buckets[-1] // shards
        capacity = largest * (1 << max(-(-n // largest) - 1, 0).bit_length())
        self._layout(mesh, buckets, len(host_arrays[0]), n, capacity, batches=None)
        self.arrays = self._upload_all(host_arrays, lambda x, s: x[s * n : (s + 1) * n])

    @classmethod
    def in_batches(
        cls, local_arrays: Sequence[np.ndarray], num_rows: int, mesh: Mesh
    ) -> DeviceRows:
        """Rows held as global batches: this process's slice of each, [T, L, ...] per array.

        Args:
          local_arrays: arrays [T, L, ...]: of every global batch of B = L · process count rows,
            the contiguous slice [p·L, (p+1)·L) of this process p (padding rows included).
          num_rows: N, the real rows (B·(T−1) < N ≤ B·T).
          mesh: the data mesh; B must be a multiple of its 'data' size.

        Returns:
          Rows in the batch layout (class docstring), with one bucket, B.
        """
        steps, local = local_arrays[0].shape[:2]
        batch = local * jax.process_count()
        sharding.check_batch_size(batch, mesh)
        rows = cls.__new__(cls)
        b = batch // sharding.data_parallel_size(mesh)
        rows._layout(mesh, (batch,), num_rows, steps * b, steps * b, batches=(steps, b))
        # this process's slice starts at global column p·L: its first device's first row
        first = jax.process_index() * local

        def block(x_TL, s):  # device s's b columns of every batch, [T·b, ...]
            x_Tb = x_TL[:, s * b - first : (s + 1) * b - first]
            return x_Tb.reshape(steps * b, *x_TL.shape[2:])

        rows.arrays = rows._upload_all(local_arrays, block)
        return rows

    def _layout(self, mesh, buckets, num_rows, rows_per_device, capacity, batches):
        shards = sharding.data_parallel_size(mesh)
        self.mesh, self.shards, self.num_rows = mesh, shards, num_rows
        self.rows_per_device, self.capacity = rows_per_device, capacity
        self.local_buckets = tuple(size // shards for size in buckets)
        self.batches = batches  # None: contiguous; (T, b): in batches
        self._scalars: dict[tuple, jax.Array] = {}
        if batches is None:
            counts = num_rows - rows_per_device * np.arange(shards)
        else:  # device s holds the rows t·B + s·b + j; the last batch is the partial one
            steps, b = batches
            last = num_rows - (steps - 1) * b * shards
            counts = (steps - 1) * b + np.clip(last - b * np.arange(shards), 0, b)
        self.counts_S = np.clip(counts, 0, rows_per_device).astype(np.int32)

    def _upload_all(self, host_arrays, block_of) -> tuple[jax.Array, ...]:
        uploaded: dict[int, jax.Array] = {}
        for x in host_arrays:
            if id(x) not in uploaded:
                uploaded[id(x)] = self._upload(np.asarray(x), block_of)
        return tuple(uploaded[id(x)] for x in host_arrays)

    def _upload(self, x: np.ndarray, block_of) -> jax.Array:
        """One explicit transfer per device of its real rows, ``block_of(x, s)`` for device s
        (no host copy of the whole); the block's padding is made on its device."""
        capacity = self.capacity
        layout = sharding.batch_sharding(self.mesh)
        row_shape = x.shape[2:] if self.batches else x.shape[1:]
        shape = (self.shards * capacity, *row_shape)
        blocks = []
        for device, index in layout.addressable_devices_indices_map(shape).items():
            block = jax.device_put(block_of(x, (index[0].start or 0) // capacity), device)
            blocks.append(_padded(block, capacity) if len(block) < capacity else block)
        return jax.make_array_from_single_device_arrays(shape, layout, blocks)

    def zeros(self, row_shape: tuple[int, ...], dtype, rows_per_device: int | None = None):
        """A device buffer [S·rows_per_device (default C), *row_shape] of zeros, made on the
        devices (nothing uploaded)."""
        shape = (self.shards * (rows_per_device or self.capacity), *row_shape)
        return _on_devices(
            ("zeros", shape, np.dtype(dtype).name), self.mesh, lambda: jnp.zeros(shape, dtype)
        )

    def local_indices(self, rows_per_device: int) -> jax.Array:
        """[S·rows_per_device] int32: 0..rows_per_device−1 on every device, made there."""
        shape = self.shards * rows_per_device
        return _on_devices(
            ("indices", shape, rows_per_device),
            self.mesh,
            lambda: jnp.arange(shape, dtype=jnp.int32) % rows_per_device,
        )

    def scalar(self, value, dtype=np.int32) -> jax.Array:
        """`value` on every device: uploaded once per value (a set's call offsets are the same
        every pass)."""
        key = (value, np.dtype(dtype).name)
        if key not in self._scalars:
            self._scalars[key] = sharding.replicate(np.asarray(value, dtype), self.mesh)
        return self._scalars[key]

    def per_device(self, host_S: np.ndarray) -> jax.Array:
        """[S] host values, one on each device of 'data' (the same array on every process)."""
        return sharding.put(np.asarray(host_S), sharding.batch_sharding(self.mesh))

    def fetch(self, *buffers: jax.Array) -> tuple[np.ndarray, ...]:
        """The real rows of device buffers [S·C, ...] as NumPy [N, ...], in input order, on
        every process (one transfer for all; all-gathered across processes, a collective)."""
        n, out = self.rows_per_device, []
        for x in sharding.host_copy(buffers):
            blocks = np.asarray(x).reshape(self.shards, self.capacity, *x.shape[1:])[:, :n]
            if self.batches is not None:  # [S, T, b] → [T, S, b]: batch t's rows in order
                blocks = blocks.reshape(self.shards, *self.batches, *x.shape[1:]).swapaxes(0, 1)
            out.append(blocks.reshape(self.shards * n, *x.shape[1:])[: self.num_rows])
        return tuple(out)


@functools.partial(jax.jit, static_argnums=1)
def _padded(block_nX: jax.Array, capacity: int) -> jax.Array:
    """`block_nX` followed by zero rows up to `capacity`, on the block's device."""
    pad = [(0, capacity - block_nX.shape[0])] + [(0, 0)] * (block_nX.ndim - 1)
    return jnp.pad(block_nX, pad)


def _on_devices(key: Hashable, mesh: Mesh, make: Callable[[], jax.Array]) -> jax.Array:
    """``make()`` computed on the devices, split over 'data' (compiled once per key)."""
    jitted = jit_cache.cached(
        ("device-rows", key, mesh),
        lambda: jax.jit(make, out_shardings=sharding.batch_sharding(mesh)),
    )
    return jitted()


def per_device(fn: Callable, mesh: Mesh, in_specs, out_specs, donate_argnums=()) -> Callable:
    """jit of `fn` run on each device's own rows (`jax.shard_map`; no collective inside)."""
    mapped = jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    return jax.jit(mapped, donate_argnums=donate_argnums)


def compiled(key: Hashable, build: Callable[[], Callable], *args):
    """The executable of ``build()`` for these arguments' shapes and shardings, compiled ahead of
    the call (`jax.jit(...).lower(*args).compile()`) once per key and shapes."""
    leaves, treedef = jax.tree.flatten(args)
    shapes = tuple((np.shape(x), str(x.dtype), getattr(x, "sharding", None)) for x in leaves)
    return jit_cache.cached(("aot", key, treedef, shapes), lambda: build().lower(*args).compile())


def abstract(out_info) -> tuple[jax.ShapeDtypeStruct, ...]:
    """A compiled call's outputs as shapes, dtypes and shardings (to compile the next ahead)."""
    return tuple(jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding) for x in out_info)


def data_parallel(fn: Callable, mesh: Mesh) -> Callable:
    """jit of a per-row `fn` over batches split on 'data' (variables replicated): XLA runs each
    device's rows where they are, and the compiled program depends on the batch, not the set."""
    return jax.jit(fn, out_shardings=sharding.batch_sharding(mesh))


def device_batches(rows: DeviceRows):
    """Yields ``(offset, size, batch)`` per call over every row of `rows`, in row order.

    `batch` holds each array's `size` rows per device (b = B/S of a bucket B) from the local
    `offset` (one small gather on each device, compiled once per size and layout; rows past a
    block are its last row): what `map_rows` runs its step on, and a fold (`jaxmodels.evaluate`,
    `jaxmodels.stream_reduce`) folds into its carry.
    """
    spec, replicated = PartitionSpec(sharding.DATA_AXIS), PartitionSpec()
    capacity, calls = rows.capacity, {}  # this pass's gathers by size (looked up once each)
    for start, _, size in bucket_chunks(rows.rows_per_device, rows.local_buckets):

        def take(arrays, offset, size=size):
            idx_b = jnp.minimum(offset + jnp.arange(size), capacity - 1)
            return tuple(x[idx_b] for x in arrays)

        offset = rows.scalar(start)
        if size not in calls:
            calls[size] = compiled(
                ("map-rows-take", size, rows.mesh),
                lambda take=take: per_device(take, rows.mesh, (spec, replicated), spec),
                rows.arrays, offset,
            )  # fmt: skip
        yield offset, size, calls[size](rows.arrays, offset)


def map_rows(step: Callable, consts, rows: DeviceRows, key: Hashable) -> tuple[np.ndarray, ...]:
    """Runs ``step(*consts, *batch)`` over every row of `rows`; returns its outputs as NumPy.

    Each call takes b rows of each device's block (`device_batches`: one small gather), runs
    the step on them (`data_parallel`: compiled once per bucket, whatever N) and writes the
    outputs into buffers on the devices (one small scatter); the buffers are fetched once. Rows
    in batches (a prepared set) run as one program instead (`_map_batches`).

    Args:
      step: a per-batch function (not jitted) returning a tuple of arrays [B, ...].
      consts: leading arguments, replicated (e.g. variables).
      rows: the device-resident row arrays, passed to `step` in order.
      key: what `step` is (with its consts' structure), for the compiled-function memo.

    Returns:
      The outputs for all N rows, each [N, ...], in input order.
    """
    if rows.batches is not None:
        return _map_batches(step, consts, rows, key)
    spec, replicated = PartitionSpec(sharding.DATA_AXIS), PartitionSpec()
    capacity = rows.capacity
    outs, calls = None, {}  # calls: this pass's executables by size (looked up once each)
    for offset, size, batch in device_batches(rows):

        def put(buffers, results, offset, size=size):
            idx_b = offset + jnp.arange(size)
            idx_b = jnp.where(idx_b < capacity, idx_b, capacity)  # out of range: dropped
            return tuple(
                o.at[idx_b].set(r, mode="drop") for o, r in zip(buffers, results, strict=True)
            )

        if size not in calls:
            run = compiled(("map-rows", key, rows.mesh), lambda: data_parallel(step, rows.mesh),
                           *consts, *abstract(batch))  # fmt: skip
            if outs is None:  # output buffers shaped like one call's outputs, per row
                outs = tuple(rows.zeros(r.shape[1:], r.dtype) for r in abstract(run.out_info))
            put_call = compiled(
                ("map-rows-put", size, rows.mesh),
                lambda put=put: per_device(put, rows.mesh, (spec, spec, replicated), spec,
                                           donate_argnums=0),
                outs, abstract(run.out_info), offset,
            )  # fmt: skip
            calls[size] = run, put_call
        run, put_call = calls[size]
        outs = put_call(outs, run(*consts, *batch), offset)
    return rows.fetch(*outs)


def _map_batches(step: Callable, consts, rows: DeviceRows, key: Hashable):
    """`map_rows` over rows in batches: one program for the pass, each device mapping the step
    over its T blocks of b rows (`lax.map`), the outputs left in the rows' layout.

    Every call of such a pass is a full bucket at a known offset, so the T calls fold into one
    dispatch (on a CPU, T calls cost a quarter more than one program of T steps); each device
    runs the step on the b rows it would get in call t, so the outputs are those of the calls.
    """
    steps, b = rows.batches
    spec, replicated = PartitionSpec(sharding.DATA_AXIS), PartitionSpec()

    def run(consts, arrays):  # one device: arrays [T·b, ...] → outputs [T·b, ...]
        blocks = tuple(x[: steps * b].reshape(steps, b, *x.shape[1:]) for x in arrays)
        outs = jax.lax.map(lambda batch: step(*consts, *batch), blocks)
        return tuple(o.reshape(steps * b, *o.shape[2:]) for o in outs)

    call = compiled(("map-batches", key, rows.mesh),
                    lambda: per_device(run, rows.mesh, (replicated, spec), spec),
                    consts, rows.arrays)  # fmt: skip
    return rows.fetch(*call(consts, rows.arrays))
