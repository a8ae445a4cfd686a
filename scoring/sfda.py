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
   and form μ_c V Vᵀ; since V Vᵀ = S̃_w⁻¹, solving with S̃_w gives the same discriminant.)
2. Self-challenge (ConfMix): each x_i is mixed towards the mean of the other classes' means,
   x̃_i = p_i x_i + (1 − p_i) μ̄_{−y_i}, with p_i the FDA posterior of its true class after a second
   softmax ("soften", as in the authors' code) and μ̄_{−c} the unweighted mean of the other
   class means.
3. FDA again on the mixed features with the same λ; SFDA = 1/N Σ_i p̃(y_i | x̃_i) ∈ (0, 1]
   (the mean posterior of the true class, without log as in the authors' code).

S̃_w is inverted in the eigenbasis of S_w, taken from the singular values of the rows minus their
class means rather than from S_w itself: with λ = 1e-10 and N < D (S_w singular), S̃_w's small
eigenvalues are ~1e-10·tr S_w / D, below float32's rounding of a formed S_w (eps·λ_max), where a
Cholesky factorisation fails; singular values resolve them. Given λ, SFDA does not depend on the
features' scale, so they are rescaled by an exact power of two first (σ_max(S_w) alone is taken
in their own units).

Dimension names: N samples, D feature dimensions, C classes, K = min(N, D).
"""

import functools

import jax
import jax.numpy as jnp

from scoring import inputs
from scoring.class_moments import HIGHEST, class_moments
from scoring.spectrum import power_of_two_scale, right_singular_pairs

_SHRINKAGE_RATE = 5.0  # a in λ = exp(−a σ_max(S_w))
_MIN_SHRINKAGE = 1e-10
_POWER_ROUNDS = 3


def _within_class_eigenpairs(feats_ND, labels_N, moments):
    """(λ_K, V_DK): eigenpairs of S_w = Σ_c (n_c / N) cov_c = XᵀX / N, X the rows minus their
    class means, from the singular values of X (so λ is resolved to eps·σ_max·σ, not eps·λ_max)."""
    within_ND = feats_ND - moments.means_CD[labels_N]
    sigma_K, vecs_DK = right_singular_pairs(within_ND)
    return sigma_K**2 / feats_ND.shape[0], vecs_DK


def _apply_within(eig_K, vecs_DK, x_D):
    """S_w x = V diag(λ) Vᵀ x."""
    return jnp.matmul(
        vecs_DK, eig_K * jnp.matmul(vecs_DK.T, x_D, precision=HIGHEST), precision=HIGHEST
    )


def _largest_eigenvalue_estimate(eig_K, vecs_DK):
    """The authors' power-iteration estimate of σ_max(S_w): x ← S_w·1, then 3 × (y = S_w x/‖S_w x‖,
    x = S_w y/‖S_w y‖), returning xᵀ S_w y."""
    x_D = _apply_within(eig_K, vecs_DK, jnp.ones(vecs_DK.shape[0], eig_K.dtype))
    y_D = x_D
    for _ in range(_POWER_ROUNDS):
        y_D = _apply_within(eig_K, vecs_DK, x_D)
        y_D = y_D / jnp.linalg.norm(y_D)
        x_D = _apply_within(eig_K, vecs_DK, y_D)
        x_D = x_D / jnp.linalg.norm(x_D)
    return x_D @ _apply_within(eig_K, vecs_DK, y_D)


def _solve_shrunk(eig_K, vecs_DK, shrinkage, b_DC):
    """S̃_w⁻¹ b for S̃_w = (1 − s) S_w + s μ I, μ = tr S_w / D, in S_w's eigenbasis: the eigenvalues
    are (1 − s) λ_k + s μ on V and s μ on its orthogonal complement (present when N < D)."""
    dim, num_vecs = vecs_DK.shape
    mu = jnp.sum(eig_K) / dim
    proj_KC = jnp.matmul(vecs_DK.T, b_DC, precision=HIGHEST)
    shrunk_K = (1 - shrinkage) * eig_K + shrinkage * mu
    solved_DC = jnp.matmul(vecs_DK, proj_KC / shrunk_K[:, None], precision=HIGHEST)
    if num_vecs < dim:
        outside_DC = b_DC - jnp.matmul(vecs_DK, proj_KC, precision=HIGHEST)
        solved_DC = solved_DC + outside_DC / (shrinkage * mu)
    return solved_DC


def _fda_posteriors(feats_ND, labels_N, num_classes, shrinkage):
    """[N, C] regularised-FDA class posteriors; also returns the moments used."""
    moments = class_moments(feats_ND, labels_N, num_classes)
    eig_K, vecs_DK = _within_class_eigenpairs(feats_ND, labels_N, moments)
    coef_DC = _solve_shrunk(eig_K, vecs_DK, shrinkage, moments.means_CD.T)
    log_prior_C = jnp.log(moments.counts_C / feats_ND.shape[0])  # −inf for an empty class
    intercept_C = -0.5 * jnp.sum(moments.means_CD * coef_DC.T, axis=1) + log_prior_C
    logits_NC = jnp.matmul(feats_ND, coef_DC, precision=HIGHEST) + intercept_C[None, :]
    return jax.nn.softmax(logits_NC, axis=1), moments


def _shrinkage(feats_ND, labels_N, num_classes, scale_exp):
    """λ = max(exp(−a σ̂), 1e-10) with σ̂ in the features' own units (σ̂ of the rescaled features
    times 2^(2e)): the one quantity of SFDA that depends on the features' scale. Also returns
    tr S_w (rescaled), which is 0 exactly when every class collapses to a point."""
    moments = class_moments(feats_ND, labels_N, num_classes)
    eig_K, vecs_DK = _within_class_eigenpairs(feats_ND, labels_N, moments)
    sigma = jnp.ldexp(_largest_eigenvalue_estimate(eig_K, vecs_DK), 2 * scale_exp)
    return jnp.maximum(jnp.exp(-_SHRINKAGE_RATE * sigma), _MIN_SHRINKAGE), jnp.sum(eig_K)


@functools.partial(jax.jit, static_argnames=("num_classes",))
def _sfda(feats_ND, labels_N, num_classes):
    """(SFDA, λ, tr S_w of the rescaled features)."""
    rows = jnp.arange(feats_ND.shape[0])
    # Given λ, SFDA is invariant to the features' scale: rescale exactly by a power of two.
    feats_ND, scale_exp = power_of_two_scale(feats_ND)
    shrinkage, within_trace = _shrinkage(feats_ND, labels_N, num_classes, scale_exp)
    probs_NC, moments = _fda_posteriors(feats_ND, labels_N, num_classes, shrinkage)
    present_C = moments.counts_C > 0
    # The soften step is a softmax over the classes that occur (as the reference, which only knows
    # the labels present): an empty class would otherwise take e⁰ of the mass.
    softened_NC = jax.nn.softmax(jnp.where(present_C[None, :], probs_NC, -jnp.inf), axis=1)
    num_present = jnp.sum(present_C)
    # Unweighted mean of the other (present) classes' means.
    total_D = jnp.sum(jnp.where(present_C[:, None], moments.means_CD, 0), axis=0)
    others_CD = (total_D[None, :] - moments.means_CD) / jnp.maximum(num_present - 1, 1)
    own_N1 = softened_NC[rows, labels_N][:, None]
    mixed_ND = own_N1 * feats_ND + (1 - own_N1) * others_CD[labels_N]
    mixed_probs_NC, _ = _fda_posteriors(mixed_ND, labels_N, num_classes, shrinkage)
    return jnp.mean(mixed_probs_NC[rows, labels_N]), shrinkage, within_trace


def sfda(features, labels, *, num_classes: int | None = None) -> jax.Array:
    """SFDA score: the mean true-class posterior of regularised FDA after self-challenging mixup.

    Args:
        features: [N, D] real features, finite, N ≥ 2; computes in their dtype.
        labels: [N] integer labels, 0..C−1 (see `scoring.inputs.check_labels`), or
          0..num_classes-1 (a class without samples gets prior 0 and never wins).
        num_classes: optional number of classes C (required inside `jax.jit`).

    Returns:
        [] SFDA score in (0, 1] (higher means more transferable).

    Raises:
        TypeError, ValueError: bad features or labels (see `scoring.inputs`), constant features,
          or (eager calls) zero within-class covariance, or a non-finite result.

    References:
        Shao et al., "Not All Models Are Equal: Predicting Model Transferability in a
        Self-challenging Fisher Space", ECCV 2022, Eq. (3)–(8).
    """
    feats_ND = inputs.check_features(features)
    labels = inputs.check_labels(labels, feats_ND.shape[0], num_classes=num_classes)
    inputs.check_not_constant(feats_ND)
    score, shrinkage, within_trace = _sfda(feats_ND, labels.index, labels.num_classes)
    if inputs.is_traced(score):
        return score
    if not float(within_trace) > 0:
        raise ValueError(
            "SFDA is undefined for these features: the within-class covariance is zero (every "
            "class collapses to a single point), so the regularised FDA has no scale"
        )
    if not bool(jnp.isfinite(score)):
        raise ValueError(
            f"SFDA came out non-finite in {feats_ND.dtype} (shrinkage λ={float(shrinkage):.3g}, "
            f"N={feats_ND.shape[0]}, D={feats_ND.shape[1]}); try float64 features"
        )
    return score
