"""H-score: how much of the features' variance the class-conditional means explain.

Bao, Li, Huang, Zheng, Li & Zhong, "An Information-Theoretic Approach to Transferability in Task
Transfer Learning", ICIP 2019.

H(f) = tr(cov(f)⁺ cov(E[f | y])): the (pseudo-)inverse feature covariance weighs the covariance of
the features with every sample replaced by its class mean. It is the optimal value of the
maximal-correlation (HGR) objective for a linear head, so a higher score means features that
separate the classes better relative to their spread. Both covariances use the 1/(N−1) divisor as
the reference code does, which cancels in the trace.

Computed without forming a covariance matrix: a Householder QR of [1 | F | onehot(y)] gives the
R factor R_FF of the centred features F̃ (the constant column's reflection removes the mean) and
the coordinates R_FY of the class indicators on the same basis. Then cov(f) ∝ R_FFᵀR_FF,
cov(E[f | y]) ∝ R_FFᵀR_FY diag(1/n_c) R_FYᵀR_FF, and with R_FF = UΣVᵀ

    H = Σ_c Σ_{k kept} (u_kᵀ R_FY[:, c])² / n_c,

each class indicator's squared projection onto the kept principal directions, divided by its
count: a sum of squares, in [0, C − 1]. Every kept direction counts fully, whatever its variance
(the H-score is invariant to invertible linear maps of the features), so what the pseudo-inverse
drops decides the score on (nearly) rank-deficient features: it keeps λ_k > rcond·λ_max for the
eigenvalues λ_k = σ_k² of the covariance. Singular values carry rounding of ~eps·σ_max where
eigenvalues of a covariance matrix carry ~eps·λ_max, so the float32 default keeps directions down
to λ ≈ (max(N, D)·eps)²·λ_max instead of max(N, D)·eps·λ_max; the float64 default stays the
reference-like max(N, D)·eps·λ_max, above the rounding of float32 features cast to float64 (a
"direction" made of that rounding would otherwise count as fully as a real one). The features are
rescaled by an exact power of two first, so their magnitude does not matter.

Dimension names: N samples, D feature dimensions, C classes.
"""

import functools

import jax
import jax.numpy as jnp

from scoring import inputs
from scoring.class_moments import HIGHEST
from scoring.spectrum import power_of_two_scale


def default_rcond(num_samples, dim, dtype):
    """The default relative eigenvalue cutoff: max((max(N, D)·eps)², max(N, D)·eps_float64).

    The first term is the rounding of λ = σ² from singular values (NumPy's `matrix_rank`
    tolerance on σ, squared); the second, which dominates in float64, is the reference-like cutoff
    of an eigendecomposition of the covariance in float64.
    """
    size = jnp.maximum(num_samples, dim)
    return jnp.maximum((size * jnp.finfo(dtype).eps) ** 2, size * float(jnp.finfo(jnp.float64).eps))


def hscore_from_factor(r_ff, r_fy, counts_C, *, rcond=None, num_samples=None) -> jax.Array:
    """H-score from an R factor of the centred features and the class indicators' coordinates.

    Args:
        r_ff: [M, D] R_FF with R_FFᵀR_FF = F̃ᵀF̃ (F̃ the centred features).
        r_fy: [M, C] R_FY = Qᵀ onehot(y) on the same orthonormal basis Q (F̃ = Q R_FF).
        counts_C: [C] class counts n_c (a class with none adds nothing).
        rcond: keep σ_k² > rcond·σ_max²; default `default_rcond` (traced values are fine).
        num_samples: N, for the default rcond (default M).

    Returns:
        [] the H-score.
    """
    dtype = r_ff.dtype
    if rcond is None:
        n = r_ff.shape[0] if num_samples is None else num_samples
        rcond = default_rcond(n, r_ff.shape[1], dtype)
    vecs_MK, sigma_K, _ = jnp.linalg.svd(r_ff, full_matrices=False)
    kept_K = sigma_K**2 > rcond * jnp.max(sigma_K) ** 2
    proj2_KC = jnp.matmul(vecs_MK.T, r_fy, precision=HIGHEST) ** 2
    energy_C = jnp.sum(jnp.where(kept_K[:, None], proj2_KC, 0), axis=0)
    present_C = counts_C > 0
    return jnp.sum(jnp.where(present_C, energy_C / jnp.where(present_C, counts_C, 1), 0))


def centred_factor(feats_ND, labels_N, num_classes):
    """(R_FF [M, D], R_FY [M, C]) from one QR of [1 | F·2^−e | onehot(y)] (M = min(N − 1, D))."""
    num_samples, dim = feats_ND.shape
    scaled_ND, _ = power_of_two_scale(feats_ND)
    onehot_NC = (labels_N[:, None] == jnp.arange(num_classes)[None, :]).astype(feats_ND.dtype)
    ones_N1 = jnp.ones((num_samples, 1), feats_ND.dtype)
    r = jnp.linalg.qr(jnp.concatenate([ones_N1, scaled_ND, onehot_NC], axis=1), mode="r")
    return r[1 : 1 + dim, 1 : 1 + dim], r[1 : 1 + dim, 1 + dim :]


@functools.partial(jax.jit, static_argnames=("num_classes",))
def _hscore(feats_ND, labels_N, num_classes, rcond):
    r_ff, r_fy = centred_factor(feats_ND, labels_N, num_classes)
    counts_C = jnp.zeros(num_classes, feats_ND.dtype).at[labels_N].add(1)
    return hscore_from_factor(r_ff, r_fy, counts_C, rcond=rcond, num_samples=feats_ND.shape[0])


def hscore(features, labels, *, num_classes: int | None = None, rcond: float | None = None):
    """H-score of features for a classification task.

    H = tr(cov(f)⁺ cov(E[f | y])), from one QR and one SVD of a D×D factor (module docstring).

    Args:
        features: [N, D] real features, finite, N ≥ 2; computes in their dtype (float32, or
          float64 with x64 on).
        labels: [N] integer labels, 0..C−1 (see `scoring.inputs.check_labels`), or
          0..num_classes-1.
        num_classes: optional number of classes C (required inside `jax.jit`).
        rcond: relative eigenvalue cutoff of the covariance's pseudo-inverse; default
          `default_rcond`: max(N, D)·eps in float64, (max(N, D)·eps)² in float32. The reference
          passes rcond=1e-15 to `np.linalg.pinv` in float64; the two agree unless cov(f) is
          numerically singular, where the H-score is unstable anyway (see `regularized_hscore`).

    Returns:
        [] the H-score, in [0, C − 1] (higher means more transferable).

    Raises:
        TypeError, ValueError: bad features or labels (see `scoring.inputs`), or rcond < 0.

    References:
        Bao et al., "An Information-Theoretic Approach to Transferability in Task Transfer
        Learning", ICIP 2019, Def. 2.
    """
    feats_ND = inputs.check_features(features)
    labels = inputs.check_labels(labels, feats_ND.shape[0], num_classes=num_classes)
    if rcond is not None and not inputs.is_traced(rcond) and not float(rcond) >= 0:
        raise ValueError(f"rcond must be ≥ 0 or None; got {rcond!r}")
    return _hscore(feats_ND, labels.index, labels.num_classes, rcond)
