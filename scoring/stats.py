"""Transferability scores from streamed statistics: rank on data of any size.

The scores below need only O(D² + C·D + C·K) numbers accumulated batch by batch inside the jitted
feature-extraction step (`jaxmodels.stream_reduce`); the features [N, D] never leave the device:

* LogME and the H-score: the R factor of a QR factorisation of the augmented rows
  [1 | f_i | onehot(y_i)] [P = 1 + D + C], kept up to date by re-factoring the previous R stacked
  on the next batch (a running, or "tall-skinny", QR: Demmel, Grigori, Hoemmen & Langou,
  "Communication-optimal parallel and sequential QR and LU factorizations", SIAM J. Sci.
  Comput. 2012). RᵀR is the Gram matrix of the rows, but R holds it at the square root of its
  condition number: float32 keeps LogME within 1e-5 of float64 on Gram condition numbers up
  to 1e8, where summing FᵀF in float32 loses the small eigenvalues entirely (see
  `scoring.spectrum`). Its blocks give what the scores need without cancellation: R[1:1+D,
  1:1+D] is the R factor of the centred features (the constant column's reflection removes the
  mean), R[1:1+D, 1+D:] the centred class indicators' coordinates, and R[:, 1:] a square root
  of the Gram matrix of [F | Y] for LogME, which has no intercept. R is additive across row
  sets (`merge`: the R factor of [R_a; R_b]), so under a mesh each device keeps its own R of its
  own rows and the devices' factors are merged once (`scoring.tsqr`), instead of every device
  gathering every batch for one replicated R;
* NCE: the joint counts of (target class, argmax source class);
* LEEP: the soft joint Σ_i θ(x_i) per target class gives P̂(y | z) — but LEEP's
  Σ_i log Σ_z P̂(y_i | z) θ(x_i)_z depends on P̂(y | z) inside a log, so it is no function of sums
  taken before P̂(y | z) is known: it needs a second pass over the source probabilities
  (`leep_pass_init`, `leep_pass_update`, `leep_from_stats`).

`init`, `update` and `merge` are pure functions over the `ScoreStats` pytree. Padded rows
(`valid_B == False`) are ignored; labels of valid rows must lie in [0, C) (rows with labels outside
are dropped, as values cannot be checked inside `jit`). float32 accumulators are the default and
the fast path on accelerators; float64 (x64 on) is an option where the backend has it. Each
update costs one QR of a [P + B, P] matrix, ~2(P + B)P² flops against 2BD² for summing FᵀF.

Dimension names: N samples, B batch rows, D feature dimensions, C target classes, K source classes,
P = 1 + D + C.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from scoring import inputs
from scoring.class_moments import HIGHEST
from scoring.evidence import LogMEResult
from scoring.hscore import hscore_from_factor
from scoring.leep import conditional_from_joint
from scoring.logme import logme_from_factor
from scoring.nce import nce_from_joint


class ScoreStats(NamedTuple):
    """Statistics of (features, labels[, source probabilities]) over the samples seen.

    Attributes:
        num_samples: [] N, the number of valid rows seen.
        r_factor: [P, P] upper-triangular R with RᵀR = AᵀA for the rows A = [1 | F | onehot(y)]
          seen so far (P = 1 + D + C).
        class_count_C: [C] n_c.
        source_joint_CK: [C, K] Σ_{i: y_i = c} θ(x_i) (LEEP's joint × N); K = 0 without a source.
        source_argmax_joint_CK: [C, K] #{i: y_i = c, argmax θ(x_i) = z} (NCE's joint × N).
    """

    num_samples: jax.Array
    r_factor: jax.Array
    class_count_C: jax.Array
    source_joint_CK: jax.Array
    source_argmax_joint_CK: jax.Array


def _dims(stats: ScoreStats) -> tuple[int, int]:
    """(D, C) of the statistics."""
    num_classes = stats.class_count_C.shape[0]
    return stats.r_factor.shape[0] - 1 - num_classes, num_classes


def init(dim: int, num_classes: int, num_source_classes: int | None = None, dtype=None):
    """Zero statistics.

    Args:
        dim: D, the feature width.
        num_classes: C ≥ 2, the number of target classes.
        num_source_classes: K, the source head's classes, to also accumulate LEEP/NCE joints.
        dtype: accumulator dtype (default float32; float64 needs x64 on).

    Returns:
        A zero `ScoreStats`.

    Raises:
        ValueError: non-positive sizes, fewer than 2 classes, or a non-float dtype.
    """
    for name, value, low in (("dim", dim, 1), ("num_classes", num_classes, 2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int ≥ {low}; got {value!r}")
    k = 0 if num_source_classes is None else num_source_classes
    if num_source_classes is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise ValueError(f"num_source_classes must be an int ≥ 1 or None; got {k!r}")
    dtype = jnp.dtype(jnp.float32 if dtype is None else dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"dtype must be a float dtype; got {dtype}")
    if dtype == jnp.float64 and not jax.config.jax_enable_x64:
        raise ValueError("dtype float64 needs x64 enabled (jax.enable_x64(True))")
    zeros = lambda *shape: jnp.zeros(shape, dtype)
    size = 1 + dim + num_classes
    return ScoreStats(
        zeros(),
        zeros(size, size),
        zeros(num_classes),
        zeros(num_classes, k),
        zeros(num_classes, k),
    )


def _refactor(r_factor, rows):
    """The R factor of [R; rows]: a QR of the stacked matrix, keeping the first P rows."""
    return jnp.linalg.qr(jnp.concatenate([r_factor, rows], axis=0), mode="r")


def update(stats: ScoreStats, feats_BD, labels_B, valid_B=None, source_probs_BK=None):
    """Adds a batch. Pure and jittable; inside `jaxmodels.stream_reduce` the batch is sharded over
    devices and XLA gathers it for the (replicated) QR and inserts the cross-device sums, unless
    each device keeps its own statistics (`stream_reduce(merge=...)`, `scoring.tsqr`).

    Each call refactors [R; batch], a QR of P + B rows for B new ones: for streams of small
    batches and wide features (P = 869, B = 32) prefer `buffered_update`.

    Args:
        stats: the statistics so far.
        feats_BD: [B, D] features (any float dtype; cast to the accumulator dtype).
        labels_B: [B] integer target labels in [0, C).
        valid_B: [B] bool, False for padding rows; default all True.
        source_probs_BK: [B, K] source-class probabilities, when `stats` was made with
          `num_source_classes=K`.

    Returns:
        The updated `ScoreStats`.

    Raises:
        ValueError: shapes that do not match `stats`, or source probabilities missing/unexpected.
    """
    stats, rows_BP = _absorb(stats, feats_BD, labels_B, valid_B, source_probs_BK)
    return stats._replace(r_factor=_refactor(stats.r_factor, rows_BP))


def _absorb(stats: ScoreStats, feats_BD, labels_B, valid_B, source_probs_BK):
    """`update` but for R: (stats with the batch's counts and joints, the rows [B, P] for R)."""
    dtype = stats.r_factor.dtype
    dim, num_classes = _dims(stats)
    k = stats.source_joint_CK.shape[1]
    if feats_BD.ndim != 2 or feats_BD.shape[1] != dim:
        raise ValueError(f"feats_BD must have shape [B, {dim}]; got {tuple(feats_BD.shape)}")
    batch = feats_BD.shape[0]
    if labels_B.shape != (batch,):
        raise ValueError(f"labels_B must have shape [{batch}]; got {tuple(labels_B.shape)}")
    valid_B = jnp.ones(batch, bool) if valid_B is None else valid_B
    if valid_B.shape != (batch,):
        raise ValueError(f"valid_B must have shape [{batch}]; got {tuple(valid_B.shape)}")
    if (source_probs_BK is None) != (k == 0):
        raise ValueError(
            "source_probs_BK must be given exactly when init had num_source_classes; "
            f"stats track K={k} source classes, source_probs_BK is "
            f"{'missing' if source_probs_BK is None else 'given'}"
        )
    # One-hot of valid rows with in-range labels: padding and stray labels add nothing (a scatter
    # with label −1 would wrap around to the last class).
    onehot_BC = (labels_B[:, None] == jnp.arange(num_classes)[None, :]) & valid_B[:, None]
    # A row counts only with a label in range, in every statistic alike; dropped rows are zero
    # rows, which leave R unchanged.
    valid_B = jnp.any(onehot_BC, axis=1)
    onehot_BC = onehot_BC.astype(dtype)
    feats_BD = jnp.where(valid_B[:, None], feats_BD.astype(dtype), 0)
    rows_BP = jnp.concatenate([valid_B[:, None].astype(dtype), feats_BD, onehot_BC], axis=1)
    source_joint, argmax_joint = stats.source_joint_CK, stats.source_argmax_joint_CK
    if k:
        if source_probs_BK.shape != (batch, k):
            raise ValueError(
                f"source_probs_BK must have shape [{batch}, {k}]; got {tuple(source_probs_BK.shape)}"
            )
        # Mask padded rows before the product: 0 · NaN (a model's output on padding) is NaN.
        probs_BK = jnp.where(valid_B[:, None], source_probs_BK.astype(dtype), 0)
        source_joint = source_joint + jnp.matmul(onehot_BC.T, probs_BK, precision=HIGHEST)
        argmax_BK = jax.nn.one_hot(jnp.argmax(probs_BK, axis=1), k, dtype=dtype)
        argmax_joint = argmax_joint + jnp.matmul(onehot_BC.T, argmax_BK, precision=HIGHEST)
    absorbed = ScoreStats(
        stats.num_samples + jnp.sum(onehot_BC),
        stats.r_factor,
        stats.class_count_C + jnp.sum(onehot_BC, axis=0),
        source_joint,
        argmax_joint,
    )
    return absorbed, rows_BP


class Buffered(NamedTuple):
    """`ScoreStats` whose R factor absorbs rows a buffer at a time.

    Attributes:
        stats: the statistics; counts and joints include every row, R the flushed ones.
        rows_LP: [L, P] rows [1 | F | onehot(y)] waiting for R (zero rows past `filled`).
        filled: [] int32, rows written into `rows_LP`.
    """

    stats: ScoreStats
    rows_LP: jax.Array
    filled: jax.Array


def buffered(stats: ScoreStats, capacity: int) -> Buffered:
    """An empty row buffer of `capacity` rows around `stats`.

    A QR of [R; L rows] costs about (P + L)·P² per refactor, so per row about (P + L)·P²/L:
    with L ≥ P rows buffered that is at most 2·P² a row, against (P + B)·P²/B when every batch
    of B rows refactors (14× more at P = 869, B = 32).

    Args:
        stats: the statistics to add to.
        capacity: L, rows buffered per refactor: at least the batch size; P or more pays.
    """
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
        raise ValueError(f"capacity must be an int ≥ 1; got {capacity!r}")
    size = stats.r_factor.shape[0]
    rows_LP = jnp.zeros((capacity, size), stats.r_factor.dtype)
    return Buffered(stats, rows_LP, jnp.zeros((), jnp.int32))


def buffered_update(buf: Buffered, feats_BD, labels_B, valid_B=None, source_probs_BK=None):
    """`update` into a `Buffered`: the batch's rows join the buffer, and R is refactored only
    when the buffer cannot take them (pure and jittable; `lax.cond` runs one branch).

    Raises:
        ValueError: as `update`, or a batch larger than the buffer.
    """
    stats, rows_BP = _absorb(buf.stats, feats_BD, labels_B, valid_B, source_probs_BK)
    batch, capacity = rows_BP.shape[0], buf.rows_LP.shape[0]
    if batch > capacity:
        raise ValueError(f"a batch of {batch} rows exceeds the buffer's {capacity}")

    def flush(r_factor, rows_LP, filled):
        # zeros_like, not zeros(): inside `shard_map` the zeros must vary by device as `filled`
        # does (`scoring.tsqr` keeps a buffer per device)
        return _refactor(r_factor, rows_LP), jnp.zeros_like(rows_LP), jnp.zeros_like(filled)

    r_factor, rows_LP, filled = jax.lax.cond(
        buf.filled + batch > capacity,
        flush,
        lambda r_factor, rows_LP, filled: (r_factor, rows_LP, filled),
        stats.r_factor,
        buf.rows_LP,
        buf.filled,
    )
    rows_LP = jax.lax.dynamic_update_slice(rows_LP, rows_BP, (filled, jnp.int32(0)))
    return Buffered(stats._replace(r_factor=r_factor), rows_LP, filled + batch)


def flushed(buf: Buffered) -> ScoreStats:
    """The statistics with every buffered row in R (zero rows leave R unchanged)."""
    return buf.stats._replace(r_factor=_refactor(buf.stats.r_factor, buf.rows_LP))


def merge(a: ScoreStats, b: ScoreStats) -> ScoreStats:
    """Statistics of the union of two disjoint sets of samples (e.g. two hosts' shards).

    Raises:
        ValueError: statistics of different shapes or dtypes.
    """
    shapes = [(x.shape, x.dtype) for x in a], [(x.shape, x.dtype) for x in b]
    if shapes[0] != shapes[1]:
        raise ValueError(f"cannot merge statistics of different shapes/dtypes: {shapes}")
    summed = jax.tree.map(jnp.add, a, b)
    return summed._replace(r_factor=_refactor(a.r_factor, b.r_factor))


def _check_stats(stats, name="stats"):
    if not isinstance(stats, ScoreStats):
        raise TypeError(
            f"{name} must be a ScoreStats (from scoring.stats.init); got {type(stats).__name__}"
        )
    if not inputs.is_traced(stats.num_samples) and not float(stats.num_samples) >= 2:
        raise ValueError(f"{name} must hold at least 2 samples; got N={float(stats.num_samples):g}")


def logme_from_stats(stats: ScoreStats, **solver_args) -> LogMEResult:
    """LogME from the statistics; equals `scoring.logme(features, labels, num_classes=C)`.

    Computed by `scoring.logme_from_factor` from R[:, 1:], a square root of the Gram matrix of
    [F | onehot(y)], with the "factor" method's accuracy in either dtype.

    Args:
        stats: accumulated `ScoreStats`.
        **solver_args: eps, tol, max_iter, as for `scoring.logme`.

    Returns:
        `LogMEResult`.
    """
    _check_stats(stats)
    dim, _ = _dims(stats)
    return logme_from_factor(stats.r_factor[:, 1:], dim, stats.num_samples, **solver_args)


def hscore_from_stats(stats: ScoreStats, *, rcond: float | None = None) -> jax.Array:
    """H-score from the statistics; equals `scoring.hscore(features, labels, num_classes=C)`.

    R[1:1+D, 1:1+D] is an R factor of the centred features and R[1:1+D, 1+D:] holds the centred
    class indicators' coordinates on them (`scoring.hscore.hscore_from_factor`), so no scatter
    matrix FᵀF − Nμμᵀ is formed and no digits are lost to the mean.

    Args:
        stats: accumulated `ScoreStats`.
        rcond: relative singular-value cutoff, as for `scoring.hscore`.

    Returns:
        [] the H-score.
    """
    _check_stats(stats)
    dim, _ = _dims(stats)
    r = stats.r_factor
    return hscore_from_factor(
        r[1 : 1 + dim, 1 : 1 + dim],
        r[1 : 1 + dim, 1 + dim :],
        stats.class_count_C,
        rcond=rcond,
        num_samples=stats.num_samples,
    )


def nce_from_stats(stats: ScoreStats) -> jax.Array:
    """NCE from the argmax joint counts; equals `scoring.nce(argmax(source_probs), labels)`."""
    _check_stats(stats)
    if stats.source_argmax_joint_CK.shape[1] == 0:
        raise ValueError("stats hold no source predictions: init with num_source_classes=K")
    return nce_from_joint(stats.source_argmax_joint_CK)


class LeepPass(NamedTuple):
    """LEEP's second pass.

    Attributes:
        cond_KC: [K, C] P̂(y | z) from the first pass's joint.
        log_likelihood: [] Σ_i log Σ_z P̂(y_i | z) θ(x_i)_z over the rows seen so far.
        num_samples: [] rows seen in this pass.
    """

    cond_KC: jax.Array
    log_likelihood: jax.Array
    num_samples: jax.Array


def leep_pass_init(stats: ScoreStats) -> LeepPass:
    """Starts LEEP's second pass from the first pass's statistics."""
    _check_stats(stats)
    if stats.source_joint_CK.shape[1] == 0:
        raise ValueError("stats hold no source predictions: init with num_source_classes=K")
    zero = jnp.zeros((), stats.r_factor.dtype)
    return LeepPass(conditional_from_joint(stats.source_joint_CK), zero, zero)


def leep_pass_update(lp: LeepPass, source_probs_BK, labels_B, valid_B=None) -> LeepPass:
    """Adds a batch of the same rows, in any order, to LEEP's second pass (pure, jittable)."""
    dtype = lp.cond_KC.dtype
    valid_B = jnp.ones(labels_B.shape, bool) if valid_B is None else valid_B
    num_classes = lp.cond_KC.shape[1]
    valid_B = valid_B & (labels_B >= 0) & (labels_B < num_classes)
    safe_B = jnp.where(valid_B, labels_B, 0)
    likelihood_B = jnp.sum(source_probs_BK.astype(dtype) * lp.cond_KC.T[safe_B], axis=1)
    log_b = jnp.where(valid_B, jnp.log(jnp.where(valid_B, likelihood_B, 1)), 0)
    return LeepPass(
        lp.cond_KC, lp.log_likelihood + jnp.sum(log_b), lp.num_samples + jnp.sum(valid_B)
    )


def leep_from_stats(stats: ScoreStats, second_pass: LeepPass) -> jax.Array:
    """LEEP from both passes; equals `scoring.leep(source_probs, labels, num_classes=C)`.

    Raises:
        ValueError: the second pass saw a different number of rows than the first.
    """
    _check_stats(stats)
    if not inputs.is_traced(second_pass.num_samples) and float(second_pass.num_samples) != float(
        stats.num_samples
    ):
        raise ValueError(
            f"LEEP's second pass saw {float(second_pass.num_samples):g} rows but the first saw "
            f"{float(stats.num_samples):g}; both passes must cover the same data"
        )
    return second_pass.log_likelihood / second_pass.num_samples
