"""SFDA: self-challenging Fisher discriminant analysis.

Shao, Zhao, Zhang, Wu, Shan, Fu & Hu, "Not All Models Are Equal: Predicting Model Transferability
in a Self-challenging Fisher Space", ECCV 2022.

1. Regularised Fisher discriminant analysis (FDA) on the features: within-class covariance
   S_w = Σ_c π_c Σ_c (priors π_c = n_c / N, biased per-class covariances), shrunk towards the scaled
   identity, S̃_w = (1 − λ) S_w + λ (tr S_w / D) I, with the adaptive strength
   λ = max(exp(−a · σ_max(S_w)), 1e-10), a = 5, σ_max estimated as in the authors' code by
   3 rounds of a two-step power iteration started from S_w·1. The FDA posterior is the linear
   discriminant softmax_c(xᵀ S̃_w⁻¹ μ_c − ½ μ_cᵀ S̃_w⁻¹ μ_c + log π_c).
   (The authors project onto all D generalised eigenvectors V of (S_b, S̃_w), with VᵀS̃_wV = I,
   and form μ_c V Vᵀ; since V Vᵀ = S̃_w⁻¹, a Cholesky solve gives the same discriminant.)
2. Self-challenge (ConfMix): each x_i is mixed towards the mean of the other classes' means,
   x̃_i = p_i x_i + (1 − p_i) μ̄_{−y_i}, with p_i the FDA posterior of its true class after a second
   softmax ("soften", as in the authors' code) and μ̄_{−c} the unweighted mean of the other
   class means.
3. FDA again on the mixed features with the same λ; SFDA = 1/N Σ_i p̃(y_i | x̃_i) ∈ (0, 1]
   (the mean posterior of the true class, without log as in the authors' code).

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
    shrink_to_scaled_identity,
)

_SHRINKAGE_RATE = 5.0  # a in λ = exp(−a σ_max(S_w))
_MIN_SHRINKAGE = 1e-10
_POWER_ROUNDS = 3


def _within_class_cov(feats_ND, moments):
    """S_w = Σ_c (n_c / N) cov_c = (total scatter − between scatter) / N, cov_c biased."""
    between_CD = between_class_factor(*moments)
    scatter_DD = centered_gram(feats_ND, moments.mean_D)
    within_DD = scatter_DD - jnp.matmul(between_CD.T, between_CD, precision=HIGHEST)
    return within_DD / feats_ND.shape[0]


def _largest_eigenvalue_estimate(a_DD):
    """The authors' power-iteration estimate of σ_max: x ← A·1, then 3 × (y = Ax/‖Ax‖,
    x = Ay/‖Ay‖), returning xᵀAy."""
    x_D = jnp.sum(a_DD, axis=1)
    y_D = x_D
    for _ in range(_POWER_ROUNDS):
        y_D = a_DD @ x_D
        y_D = y_D / jnp.linalg.norm(y_D)
        x_D = a_DD @ y_D
        x_D = x_D / jnp.linalg.norm(x_D)
    return x_D @ a_DD @ y_D


def _fda_posteriors(feats_ND, labels_N, num_classes, shrinkage):
    """[N, C] regularised-FDA class posteriors; also returns the moments used."""
    moments = class_moments(feats_ND, labels_N, num_classes)
    within_DD = _within_class_cov(feats_ND, moments)
    shrunk_DD = shrink_to_scaled_identity(within_DD, shrinkage)
    coef_DC = jax.scipy.linalg.cho_solve((jnp.linalg.cholesky(shrunk_DD), True), moments.means_CD.T)
    log_prior_C = jnp.log(moments.counts_C / feats_ND.shape[0])  # −inf for an empty class
    intercept_C = -0.5 * jnp.sum(moments.means_CD * coef_DC.T, axis=1) + log_prior_C
    logits_NC = jnp.matmul(feats_ND, coef_DC, precision=HIGHEST) + intercept_C
    return jax.nn.softmax(logits_NC, axis=1), moments


def _shrinkage(feats_ND, labels_N, num_classes):
    moments = class_moments(feats_ND, labels_N, num_classes)
    sigma = _largest_eigenvalue_estimate(_within_class_cov(feats_ND, moments))
    return jnp.maximum(jnp.exp(-_SHRINKAGE_RATE * sigma), _MIN_SHRINKAGE)


@functools.partial(jax.jit, static_argnames=("num_classes",))
def _sfda(feats_ND, labels_N, num_classes):
    rows = jnp.arange(feats_ND.shape[0])
    shrinkage = _shrinkage(feats_ND, labels_N, num_classes)
    probs_NC, moments = _fda_posteriors(feats_ND, labels_N, num_classes, shrinkage)
    present_C = moments.counts_C > 0
    # The soften step is a softmax over the classes that occur (as the reference, which only knows
    # the labels present): an empty class would otherwise take e⁰ of the mass.
    softened_NC = jax.nn.softmax(jnp.where(present_C, probs_NC, -jnp.inf), axis=1)
    num_present = jnp.sum(present_C)
    # Unweighted mean of the other (present) classes' means.
    total_D = jnp.sum(jnp.where(present_C[:, None], moments.means_CD, 0), axis=0)
    others_CD = (total_D - moments.means_CD) / jnp.maximum(num_present - 1, 1)
    own_N1 = softened_NC[rows, labels_N][:, None]
    mixed_ND = own_N1 * feats_ND + (1 - own_N1) * others_CD[labels_N]
    mixed_probs_NC, _ = _fda_posteriors(mixed_ND, labels_N, num_classes, shrinkage)
    return jnp.mean(mixed_probs_NC[rows, labels_N])


def sfda(features, labels, *, num_classes: int | None = None) -> jax.Array:
    """SFDA score: the mean true-class posterior of regularised FDA after self-challenging mixup.

    Args:
        features: [N, D] real features, finite, N ≥ 2; computes in their dtype.
        labels: [N] integer labels; classes are the distinct values present, or 0..num_classes-1
          (a class without samples gets prior 0 and never wins).
        num_classes: optional number of classes C (required inside `jax.jit`).

    Returns:
        [] SFDA score in (0, 1] (higher means more transferable).

    Raises:
        TypeError, ValueError: bad features or labels (see `scoring.inputs`), constant features, or
          zero within-class covariance.

    References:
        Shao et al., "Not All Models Are Equal: Predicting Model Transferability in a
        Self-challenging Fisher Space", ECCV 2022, Eq. (3)–(8).
    """
    feats_ND = inputs.check_features(features)
    labels = inputs.check_labels(labels, feats_ND.shape[0], num_classes=num_classes)
    if not inputs.is_traced(feats_ND) and not bool(jnp.any(jnp.ptp(feats_ND, axis=0) > 0)):
        raise ValueError("features must not be constant: every column has zero variance")
    score = _sfda(feats_ND, labels.index, labels.num_classes)
    if not inputs.is_traced(score) and not bool(jnp.isfinite(score)):
        raise ValueError(
            "SFDA is undefined for these features: the within-class covariance is zero (every "
            "class collapses to a single point), so the regularised FDA has no scale"
        )
    return score
