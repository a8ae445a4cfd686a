"""Regularised H-score: the H-score with a Ledoit–Wolf shrinkage estimate of the feature covariance.

Ibrahim, Ponomareva & Mazumder, "Newer is not always better: Rethinking transferability metrics,
their peculiarities, stability and performance", ECML-PKDD 2022 (arXiv:2110.06893).

The plain H-score inverts the sample covariance, which is ill-conditioned when D is large relative
to N and makes the score unstable. Here cov(f) is replaced by the Ledoit–Wolf estimate
cov_α = (1 − α)·S + α·(tr S / D)·I (S the biased sample covariance, α the Ledoit–Wolf optimal
shrinkage, as in scikit-learn's `LedoitWolf`), and the between-class covariance is shrunk alike:

    H_α = tr(cov_α⁻¹ · (1 − α) · cov(E[f | y])),

with cov(E[f | y]) using the 1/(N − 1) divisor (`np.cov`), as in the authors' formula and code.
Since cov_α is positive definite for α > 0, one Cholesky factorisation replaces the
eigendecomposition of the H-score (the source of its speed advantage over LogME).

Dimension names: N samples, D feature dimensions, C classes.
"""

import functools

import jax
import jax.numpy as jnp

from scoring import inputs
from scoring.class_moments import (
    HIGHEST,
    between_class_factor,
    class_moments,
    shrink_to_scaled_identity,
)
from scoring.spectrum import power_of_two_scale


def ledoit_wolf_shrinkage(centered_ND: jax.Array, cov_DD: jax.Array) -> jax.Array:
    """The Ledoit–Wolf shrinkage α ∈ [0, 1] of already centred features.

    α = min(b², d²) / d² with d² = ‖S − μI‖²_F / D and b² = (Σ_k ‖x_k‖⁴ / N − ‖S‖²_F) / (D·N),
    S = XᵀX / N, μ = tr S / D (Ledoit & Wolf, J. Multivariate Anal. 2004, Lemma 3.2–3.4;
    scikit-learn's `ledoit_wolf_shrinkage` normalisation).

    Args:
        centered_ND: [N, D] features with zero column means.
        cov_DD: [D, D] their biased covariance XᵀX / N.

    Returns:
        [] the shrinkage α.
    """
    num_samples, dim = centered_ND.shape
    mu = jnp.trace(cov_DD) / dim
    cov_sq = jnp.sum(cov_DD**2)
    # ‖S − μI‖²_F = ‖S‖²_F − 2μ tr S + D μ²
    delta = (cov_sq - 2 * mu * jnp.trace(cov_DD) + dim * mu**2) / dim
    fourth = jnp.sum(jnp.sum(centered_ND**2, axis=1) ** 2) / num_samples
    beta = jnp.minimum((fourth - cov_sq) / (dim * num_samples), delta)
    return jnp.where(delta > 0, beta / jnp.where(delta > 0, delta, 1), 0.0)


@functools.partial(jax.jit, static_argnames=("num_classes",))
def _regularized_hscore(feats_ND, labels_N, num_classes):
    """(H_α, α). H_α and α are invariant to the features' scale: an exact power-of-two rescaling
    first keeps the fourth moments of features of 1e-15 or 1e20 inside the dtype's range."""
    num_samples = feats_ND.shape[0]
    feats_ND, _ = power_of_two_scale(feats_ND)
    moments = class_moments(feats_ND, labels_N, num_classes)
    centered_ND = feats_ND - moments.mean_D[None, :]
    cov_DD = jnp.matmul(centered_ND.T, centered_ND, precision=HIGHEST) / num_samples
    alpha = ledoit_wolf_shrinkage(centered_ND, cov_DD)
    shrunk_DD = shrink_to_scaled_identity(cov_DD, alpha)
    between_CD = between_class_factor(*moments)  # MᵀM / (N − 1) = cov(E[f | y])
    # tr(A⁻¹ MᵀM) = ‖L⁻¹ Mᵀ‖²_F for A = L Lᵀ.
    chol_DD = jnp.linalg.cholesky(shrunk_DD)
    whitened_DC = jax.scipy.linalg.solve_triangular(chol_DD, between_CD.T, lower=True)
    return (1 - alpha) * jnp.sum(whitened_DC**2) / (num_samples - 1), alpha


def regularized_hscore(features, labels, *, num_classes: int | None = None) -> jax.Array:
    """Regularised H-score H_α = tr(cov_α(f)⁻¹ (1 − α) cov(E[f | y])) (module docstring).

    Args:
        features: [N, D] real features, finite, N ≥ 3, not all equal; computes in their dtype.
        labels: [N] integer labels; classes are the distinct values present, or 0..num_classes-1.
        num_classes: optional number of classes C (required inside `jax.jit`).

    Returns:
        [] the regularised H-score (higher means more transferable).

    Raises:
        TypeError, ValueError: bad features or labels (see `scoring.inputs`), N < 3 (with two
          samples the Ledoit–Wolf shrinkage is always 0 and the covariance has rank 1), constant
          features (zero covariance: no shrinkage target), or (eager calls) a shrunk covariance
          that is still singular in the compute dtype.

    References:
        Ibrahim et al., "Newer is not always better: Rethinking transferability metrics, their
        peculiarities, stability and performance", ECML-PKDD 2022, Eq. (5)–(6);
        Ledoit & Wolf, "A well-conditioned estimator for large-dimensional covariance matrices",
        J. Multivariate Analysis 2004.
    """
    # N = 2: the two centred rows are ±x, so Σ‖x_k‖⁴/N = ‖S‖²_F and the shrinkage is 0.
    feats_ND = inputs.check_features(features, min_samples=3)
    labels = inputs.check_labels(labels, feats_ND.shape[0], num_classes=num_classes)
    inputs.check_not_constant(feats_ND)
    score, alpha = _regularized_hscore(feats_ND, labels.index, labels.num_classes)
    if not inputs.is_traced(score) and not bool(jnp.isfinite(score)):
        raise ValueError(
            f"the shrunk covariance is singular in {feats_ND.dtype}: the Ledoit–Wolf shrinkage is "
            f"α={float(alpha):.3g} and the sample covariance of N={feats_ND.shape[0]} rows has "
            f"rank < D={feats_ND.shape[1]}, so (1 − α)·S + α·(tr S / D)·I has eigenvalues below "
            "the dtype's resolution; use float64 features or more samples"
        )
    return score
