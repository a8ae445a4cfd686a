"""Streamed statistics across devices: one R factor per device, merged once (TSQR).

`scoring.stats` keeps one running R factor of the rows [1 | f | onehot(y)]. Kept replicated under
a mesh, every batch's rows travel to every device and every device runs the same QR. A
tall-skinny QR (Demmel, Grigori, Hoemmen & Langou, SIAM J. Sci. Comput. 2012) splits that work:
device m factors only its own rows into its own R_m, and since R_mᵀR_m sums to the Gram matrix of
all rows, the R factor of the stacked [R_0; …; R_{M−1}] [M·P, P] is an R factor of all of them.
The counts and joints are plain sums over devices.

* `merge_stacked`, `merge_buffered`: the merge, from statistics stacked along a leading device
  axis [M, ...]: `jaxmodels.stream_reduce(..., update=stats.buffered_update, merge=...)` folds
  each device's rows of each batch into its own `stats.Buffered` (no collective per batch) and
  merges once at the end;
* `from_sharded_rows`: the same for features already in memory, a `jax.Array` [N, D] sharded by
  rows over the mesh: each device factors its rows (`jax.shard_map`), the M factors are merged
  once; no device ever holds all N rows.

Import it as `from scoring import tsqr` (it needs `jaxmodels.sharding`, which `import scoring`
alone does not load).

Dimension names: M devices on the mesh's 'data' axis, N samples, D feature dimensions, C target
classes, L buffered rows, P = 1 + D + C.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxmodels import sharding
from scoring import stats as stats_lib
from scoring.stats import Buffered, ScoreStats


def _summed(stats_M: ScoreStats, r_factor) -> ScoreStats:
    """Counts and joints summed over the device axis, with the merged `r_factor`."""
    return jax.tree.map(lambda x: jnp.sum(x, axis=0), stats_M)._replace(r_factor=r_factor)


def _r_factor(blocks_MXP):
    """[P, P] R factor of the M blocks of rows stacked, [M·X, P]."""
    return jnp.linalg.qr(blocks_MXP.reshape(-1, blocks_MXP.shape[-1]), mode="r")


def merge_stacked(stats_M: ScoreStats) -> ScoreStats:
    """Statistics of the union of M disjoint row sets, from their statistics stacked [M, ...].

    One QR of the M stacked factors [M·P, P] (jittable; under `jit` with `stats_M` sharded over
    devices, the one collective is the gather of the M factors).

    Raises:
        ValueError: `stats_M` has no leading device axis.
    """
    r_MPP = stats_M.r_factor
    if r_MPP.ndim != 3:
        raise ValueError(f"stats_M.r_factor must have shape [M, P, P]; got {tuple(r_MPP.shape)}")
    return _summed(stats_M, _r_factor(r_MPP))


def merge_buffered(bufs_M: Buffered) -> ScoreStats:
    """`merge_stacked` of M row buffers [M, ...], each flushed first (`stats.flushed`).

    The M flushes are one batched QR of [M, P + L, P]: under `jit` with `bufs_M` sharded over
    the devices, XLA splits it by its batch axis, so each device flushes its own buffer and only
    the M factors [M, P, P] move for the merge (not the M·L buffered rows).

    Raises:
        ValueError: `bufs_M` has no leading device axis.
    """
    r_MPP, rows_MLP = bufs_M.stats.r_factor, bufs_M.rows_LP
    if r_MPP.ndim != 3:
        raise ValueError(f"bufs_M must have a leading device axis; got R {tuple(r_MPP.shape)}")
    flushed_MPP = jnp.linalg.qr(jnp.concatenate([r_MPP, rows_MLP], axis=1), mode="r")
    return _summed(bufs_M.stats, _r_factor(flushed_MPP))


def from_sharded_rows(
    feats_ND, labels_N, num_classes: int, *, valid_N=None, mesh: Mesh | None = None, dtype=None
) -> ScoreStats:
    """`ScoreStats` of rows spread over the devices: each device factors its own, merged once.

    Equals `stats.update(stats.init(D, C, dtype=dtype), feats_ND, labels_N, valid_N)` (R up to
    row signs), without gathering the rows on one device.

    Args:
        feats_ND: [N, D] features: a `jax.Array` sharded by rows over `mesh`'s 'data' axis (N a
          multiple of M; pad with `valid_N`), or a NumPy array, padded and sharded here.
        labels_N: [N] integer labels in [0, C), placed like `feats_ND`.
        num_classes: C.
        valid_N: [N] bool, False for padding rows; default all True.
        mesh: a mesh with a 'data' axis; default: all devices (`jaxmodels.sharding.data_mesh`).
        dtype: accumulator dtype, as for `stats.init` (default float32).

    Returns:
        `ScoreStats`, replicated over `mesh`.

    Raises:
        ValueError: mismatched shapes, or a `jax.Array` whose rows do not split over the mesh.
    """
    mesh = sharding.data_mesh() if mesh is None else mesh
    sharding.check_data_mesh(mesh)
    shards = sharding.data_parallel_size(mesh)
    num_rows = feats_ND.shape[0]
    valid_N = np.ones(num_rows, bool) if valid_N is None else valid_N
    if labels_N.shape != (num_rows,) or valid_N.shape != (num_rows,):
        raise ValueError(
            f"labels_N and valid_N must have shape [{num_rows}]; got "
            f"{tuple(labels_N.shape)} and {tuple(valid_N.shape)}"
        )
    arrays = (feats_ND, labels_N, valid_N)
    if not isinstance(feats_ND, jax.Array):  # host rows: padded to M equal shares
        pad = -num_rows % shards
        arrays = tuple(np.concatenate([a, np.zeros((pad, *a.shape[1:]), a.dtype)]) for a in arrays)
    elif num_rows % shards:
        raise ValueError(
            f"a sharded feats_ND needs rows in a multiple of the {shards} devices; got {num_rows} "
            "(pad it and mark the padding in valid_N)"
        )
    # (explicit uploads: arrays already sharded by rows stay where they are)
    arrays = jax.device_put(arrays, sharding.batch_sharding(mesh))
    # checks the sizes and dtype, making nothing (no upload)
    jax.eval_shape(lambda: stats_lib.init(feats_ND.shape[1], num_classes, dtype=dtype))
    return _factor_rows(*arrays, num_classes=num_classes, mesh=mesh, dtype=dtype)


@functools.partial(jax.jit, static_argnames=("num_classes", "mesh", "dtype"))
def _factor_rows(feats_ND, labels_N, valid_N, *, num_classes, mesh, dtype):
    rows = PartitionSpec(sharding.DATA_AXIS)

    def local(feats_nD, labels_n, valid_n):
        init = stats_lib.init(feats_nD.shape[1], num_classes, dtype=dtype)
        stats = stats_lib.update(init, feats_nD, labels_n, valid_n)
        return jax.tree.map(lambda x: x[None], stats)

    stats_M = jax.shard_map(
        local, mesh=mesh, in_specs=rows, out_specs=rows
    )(feats_ND, labels_N, valid_N)  # fmt: skip
    merged = merge_stacked(stats_M)
    return jax.lax.with_sharding_constraint(merged, NamedSharding(mesh, PartitionSpec()))
