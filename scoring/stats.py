"""Transferability scores from streamed statistics: rank on data of any size.

For N ≫ D the scores need only sums over samples, which can be accumulated batch by batch inside the
jitted feature-extraction step (`jaxmodels.stream_reduce`), summed across devices and hosts, while
the features [N, D] never leave the device; memory is O(D² + C·D + C·K) instead of O(N·D):

* LogME: FᵀF [D, D], FᵀY [D, C] (per-class feature sums), ‖y_c‖² (class counts) and N
  (`scoring.logme_from_gram`);
* H-score: the feature sum and FᵀF give the covariance, the per-class sums the class means;
* NCE: the joint counts of (target class, argmax source class);
* LEEP: the soft joint Σ_i θ(x_i) per target class gives P̂(y | z) — but LEEP's
  Σ_i log Σ_z P̂(y_i | z) θ(x_i)_z depends on P̂(y | z) inside a log, so it is no function of sums
  taken before P̂(y | z) is known: it needs a second pass over the source probabilities
  (`leep_pass_init`, `leep_pass_update`, `leep_from_stats`).

`init`, `update` and `merge` are pure functions over the `ScoreStats` pytree. Padded rows
(`valid_B == False`) are ignored; labels of valid rows must lie in [0, C) (rows with labels outside
are dropped, as values cannot be checked inside `jit`). Accumulate in float64 (x64 on) when the
results must match in-memory scores closely: FᵀF − N μμᵀ loses about log10(‖μ‖² / var) digits.

Dimension names: N samples, B batch rows, D feature dimensions, C target classes, K source classes.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from scoring import inputs
from scoring.class_moments import HIGHEST
from scoring.hscore import hscore_from_scatter
from scoring.leep import conditional_from_joint
from scoring.logme import LogMEResult, logme_from_gram
from scoring.nce import nce_from_joint


class ScoreStats(NamedTuple):
    """Sufficient statistics of (features, labels[, source probabilities]) summed over samples.

    Attributes:
        num_samples: [] N, the number of valid rows seen.
        feat_sum_D: [D] Σ f_i.
        gram_DD: [D, D] FᵀF = Σ f_i f_iᵀ.
        class_sum_CD: [C, D] Σ_{i: y_i = c} f_i (so FᵀY = class_sum_CDᵀ for one-hot Y).
        class_count_C: [C] n_c (also ‖y_c‖² for one-hot Y).
        source_joint_CK: [C, K] Σ_{i: y_i = c} θ(x_i) (LEEP's joint × N); K = 0 without a source.
        source_argmax_joint_CK: [C, K] #{i: y_i = c, argmax θ(x_i) = z} (NCE's joint × N).
    """

    num_samples: jax.Array
    feat_sum_D: jax.Array
    gram_DD: jax.Array
    class_sum_CD: jax.Array
    class_count_C: jax.Array
    source_joint_CK: jax.Array
    source_argmax_joint_CK: jax.Array


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
    return ScoreStats(
        zeros(),
        zeros(dim),
        zeros(dim, dim),
        zeros(num_classes, dim),
        zeros(num_classes),
        zeros(num_classes, k),
        zeros(num_classes, k),
    )


def update(stats: ScoreStats, feats_BD, labels_B, valid_B=None, source_probs_BK=None):
    """Adds a batch. Pure and jittable; inside `jaxmodels.stream_reduce` the batch is sharded over
    devices and XLA inserts the cross-device sums.

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
    dtype = stats.gram_DD.dtype
    num_classes, dim = stats.class_sum_CD.shape
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
    onehot_BC = (labels_B[:, None] == jnp.arange(num_classes)) & valid_B[:, None]
    # A row counts only with a label in range, in every statistic alike.
    valid_B = jnp.any(onehot_BC, axis=1)
    onehot_BC = onehot_BC.astype(dtype)
    feats_BD = jnp.where(valid_B[:, None], feats_BD.astype(dtype), 0)
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
    return ScoreStats(
        stats.num_samples + jnp.sum(onehot_BC),
        stats.feat_sum_D + jnp.sum(feats_BD, axis=0),
        stats.gram_DD + jnp.matmul(feats_BD.T, feats_BD, precision=HIGHEST),
        stats.class_sum_CD + jnp.matmul(onehot_BC.T, feats_BD, precision=HIGHEST),
        stats.class_count_C + jnp.sum(onehot_BC, axis=0),
        source_joint,
        argmax_joint,
    )


def merge(a: ScoreStats, b: ScoreStats) -> ScoreStats:
    """Statistics of the union of two disjoint sets of samples (e.g. two hosts' shards)."""
    return jax.tree.map(jnp.add, a, b)


def _check_stats(stats, name="stats"):
    if not isinstance(stats, ScoreStats):
        raise TypeError(
            f"{name} must be a ScoreStats (from scoring.stats.init); got {type(stats).__name__}"
        )
    if not inputs.is_traced(stats.num_samples) and not float(stats.num_samples) >= 2:
        raise ValueError(f"{name} must hold at least 2 samples; got N={float(stats.num_samples):g}")


def logme_from_stats(stats: ScoreStats, **solver_args) -> LogMEResult:
    """LogME from the statistics; equals `scoring.logme(features, labels, num_classes=C)`.

    Args:
        stats: accumulated `ScoreStats` (N ≥ D for the best rounding, see `logme_from_gram`).
        **solver_args: eps, tol, max_iter, as for `scoring.logme`.

    Returns:
        `LogMEResult`.
    """
    _check_stats(stats)
    return logme_from_gram(
        stats.gram_DD, stats.class_sum_CD.T, stats.class_count_C, stats.num_samples, **solver_args
    )


@jax.jit
def _hscore_inputs(stats):
    n = stats.num_samples
    mean_D = stats.feat_sum_D / n
    scatter_DD = stats.gram_DD - n * jnp.outer(mean_D, mean_D)
    counts_C = stats.class_count_C
    means_CD = stats.class_sum_CD / jnp.maximum(counts_C, 1)[:, None]
    # FᵀF − N μμᵀ is rounded at the scale of FᵀF, up to λ_max(S) + N‖μ‖², not of S alone.
    offset = n * jnp.sum(mean_D**2)
    return scatter_DD, jnp.sqrt(counts_C)[:, None] * (means_CD - mean_D), offset


def hscore_from_stats(stats: ScoreStats, *, rcond: float | None = None) -> jax.Array:
    """H-score from the statistics; equals `scoring.hscore(features, labels, num_classes=C)` for
    features of full numerical rank.

    The total scatter is S = FᵀF − N μμᵀ and the between-class factor √n_c (μ_c − μ). Forming S
    from sums loses the digits N‖μ‖² shares with FᵀF, so the pseudo-inverse cutoff is taken
    relative to λ_max(S) + N‖μ‖² rather than λ_max(S): directions with less variance than that
    rounding are dropped instead of amplified. Use float64 accumulators for large N or features
    whose mean is large against their spread.
    """
    _check_stats(stats)
    scatter_DD, between_CD, offset = _hscore_inputs(stats)
    return hscore_from_scatter(scatter_DD, between_CD, int(stats.num_samples), rcond, offset)


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
    zero = jnp.zeros((), stats.gram_DD.dtype)
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
