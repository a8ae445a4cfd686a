"""H-score: how much of the features' variance the class-conditional means explain.

Bao, Li, Huang, Zheng, Li & Zhong, "An Information-Theoretic Approach to Transferability in Task
Transfer Learning", ICIP 2019.

H(f) = tr(cov(f)⁺ cov(E[f | y])): the (pseudo-)inverse feature covariance weighs the covariance of
the features with every sample replaced by its class mean. It is the optimal value of the
maximal-correlation (HGR) objective for a linear head, so a higher score means features that
separate the classes better relative to their spread. Both covariances use the 1/(N−1) divisor as
the reference code does, which cancels in the trace.

Dimension names: N samples, D feature dimensions, C classes.
"""

import functools

import jax
import jax.numpy as jnp

from scoring import inputs
from scoring.class_moments import (
    HIGHEST,
    between_class_factor,
    centered_gram,
    class_moments,
)


def hscore_from_scatter(scatter_DD, between_CD, num_samples, rcond=None, offset=None) -> jax.Array:
    """tr(S⁺ MᵀM) for the total scatter S = N·cov_biased(f) [D, D] and the between-class factor
    M [C, D] (`class_moments.between_class_factor`); the N−1 divisors of both covariances cancel.

    The pseudo-inverse drops eigenvalues ≤ rcond·(λ_max + offset), rcond defaulting to
    max(N, D)·eps of the dtype (the usual numerical-rank tolerance; the reference's fixed 1e-15 is
    below float32's eps) and offset to 0. A caller whose S carries larger rounding errors than
    eps·λ_max (S = FᵀF − N μμᵀ from streamed sums: offset N‖μ‖²) raises the cutoff to match.
    """
    dim = scatter_DD.shape[0]
    if rcond is None:
        rcond = max(int(num_samples) if not inputs.is_traced(num_samples) else 0, dim) * float(
            jnp.finfo(scatter_DD.dtype).eps
        )
    eig_D, vecs_DD = jnp.linalg.eigh(scatter_DD)
    kept_D = eig_D > rcond * (jnp.max(eig_D) + (0 if offset is None else offset))
    # tr(V Λ⁺ Vᵀ MᵀM) = Σ_i ‖M v_i‖² / λ_i over the kept eigenpairs.
    energy_D = jnp.sum(jnp.matmul(between_CD, vecs_DD, precision=HIGHEST) ** 2, axis=0)
    return jnp.sum(jnp.where(kept_D, energy_D / jnp.where(kept_D, eig_D, 1), 0))


@functools.partial(jax.jit, static_argnames=("num_classes", "rcond"))
def _hscore(feats_ND, labels_N, num_classes, rcond):
    moments = class_moments(feats_ND, labels_N, num_classes)
    scatter_DD = centered_gram(feats_ND, moments.mean_D)
    between_CD = between_class_factor(*moments)
    return hscore_from_scatter(scatter_DD, between_CD, feats_ND.shape[0], rcond)


def hscore(features, labels, *, num_classes: int | None = None, rcond: float | None = None):
    """H-score of features for a classification task.

    H = tr(cov(f)⁺ cov(E[f | y])), computed from one eigendecomposition of the centred Gram matrix.

    Args:
        features: [N, D] real features, finite, N ≥ 2; computes in their dtype (float32, or
          float64 with x64 on).
        labels: [N] integer labels; classes are the distinct values present, or 0..num_classes-1.
        num_classes: optional number of classes C (required inside `jax.jit`).
        rcond: relative eigenvalue cutoff of the pseudo-inverse; default max(N, D)·eps. The
          reference passes 1e-15 to `np.linalg.pinv` in float64; the two agree unless cov(f) is
          numerically singular, where the H-score is unstable anyway (see `regularized_hscore`).

    Returns:
        [] the H-score, in [0, C − 1] (higher means more transferable).

    Raises:
        TypeError, ValueError: bad features or labels (see `scoring.inputs`).

    References:
        Bao et al., "An Information-Theoretic Approach to Transferability in Task Transfer
        Learning", ICIP 2019, Def. 2.
    """
    feats_ND = inputs.check_features(features)
    labels = inputs.check_labels(labels, feats_ND.shape[0], num_classes=num_classes)
    return _hscore(feats_ND, labels.index, labels.num_classes, rcond)
