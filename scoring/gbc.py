"""GBC: the Gaussian Bhattacharyya coefficient, a measure of class overlap in feature space.

Pándy, Agostinelli, Uijlings, Ferrari & Mensink, "Transferability Estimation using Bhattacharyya
Class Separability", CVPR 2022.

The features are reduced by PCA to k = 64 dimensions; each class c is modelled as a Gaussian with
mean μ_c and variances σ²_c (per dimension, biased 1/n_c, floored). For every ordered pair of
classes the Bhattacharyya distance D_B(c, c') gives the coefficient BC = exp(−D_B), and
GBC = −Σ_{c ≠ c'} BC(c, c') ≤ 0: near 0 when the classes do not overlap. With s̄ = (s_c + s_c')/2:

* "spherical" (default, the authors' published method and code): s_c = mean_d σ²_{c,d}, and
  D_B = ‖μ_c − μ_c'‖² / (8 s̄) + ½ log(s̄ / √(s_c s_c')), the log term taken once;
* "spherical_exact": the Bhattacharyya distance of the Gaussians N(μ_c, s_c I_k) themselves,
  whose log-determinant term is k times the one above (det(s I_k) = s^k). This is what the
  paper's formula gives for spherical covariances, but it weighs unequal class spreads k times
  more than the authors' code, which can flip rankings against the published numbers (a model
  whose classes differ in spread gains over one whose classes are better separated);
* "diagonal": N(μ_c, diag(σ²_c)), D_B = Σ_d [(Δμ_d)² / (8 s̄_d) + ½ log(s̄_d / √(σ²_{c,d} σ²_{c',d}))].

The authors floor each variance at 1e-4 (for constant features); here the floor is 1e-4 times the
features' mean variance tr cov(f) / D, the same for unit-variance features and, like the
Bhattacharyya distance itself, invariant to the features' scale (an absolute floor makes every
score −C(C − 1) for features of magnitude ≤ 1e-3). PCA keeps at most the data's rank: min(64, D,
N − 1) components, and of those only the ones whose variance exceeds the numerical-rank tolerance
(the authors' scikit-learn PCA refuses more components than min(N, D) and the rest would be
floored noise that dilutes s_c). The features are rescaled by an exact power of two first.

Dimension names: N samples, D feature dimensions, C classes, k PCA components.
"""

import functools

import jax
import jax.numpy as jnp

from scoring import inputs, pca
from scoring.class_moments import class_moments
from scoring.spectrum import power_of_two_scale

DEFAULT_PCA_DIM = 64
GAUSSIANS = ("spherical", "spherical_exact", "diagonal")
_RELATIVE_VARIANCE_FLOOR = 1e-4


def bhattacharyya_distances(means_Ck, variances_Ck, kept_k=None) -> jax.Array:
    """[C, C] Bhattacharyya distances between Gaussians with diagonal covariances diag(σ²_c),
    over the components where `kept_k` [k] is True (all by default)."""
    kept_k = jnp.ones(means_Ck.shape[1], bool) if kept_k is None else kept_k
    avg_CCk = (variances_Ck[:, None, :] + variances_Ck[None, :, :]) / 2
    diff_CCk = means_Ck[:, None, :] - means_Ck[None, :, :]
    mahalanobis_CC = jnp.sum(jnp.where(kept_k, diff_CCk**2 / avg_CCk, 0), axis=-1) / 8
    log_var_Ck = jnp.where(kept_k[None, :], jnp.log(variances_Ck), 0)
    log_var_C = jnp.sum(log_var_Ck, axis=-1)
    log_avg_CC = jnp.sum(jnp.where(kept_k, jnp.log(avg_CCk), 0), axis=-1)
    log_det_ratio_CC = log_avg_CC - (log_var_C[:, None] + log_var_C[None, :]) / 2
    return mahalanobis_CC + log_det_ratio_CC / 2


def spherical_distances(means_Ck, spreads_C, kept_k) -> jax.Array:
    """[C, C] the authors' spherical distance ‖Δμ‖² / (8 s̄) + ½ log(s̄ / √(s_c s_c')) over the
    kept components (the log term once, as in their code)."""
    avg_CC = (spreads_C[:, None] + spreads_C[None, :]) / 2
    diff_CCk = means_Ck[:, None, :] - means_Ck[None, :, :]
    sq_dist_CC = jnp.sum(jnp.where(kept_k, diff_CCk**2, 0), axis=-1)
    log_ratio_CC = jnp.log(avg_CC) - (jnp.log(spreads_C)[:, None] + jnp.log(spreads_C)[None, :]) / 2
    return sq_dist_CC / (8 * avg_CC) + log_ratio_CC / 2


@functools.partial(jax.jit, static_argnames=("num_classes", "pca_dim", "gaussian"))
def _gbc(feats_ND, labels_N, num_classes, pca_dim, gaussian):
    num_samples, dim = feats_ND.shape
    feats_ND, _ = power_of_two_scale(feats_ND)
    variances_D, axes_DD = pca.principal_axes(feats_ND)
    # Components with variance at rounding level are null-space directions, not data.
    rank_tol = max(num_samples, dim) * jnp.finfo(feats_ND.dtype).eps * variances_D[0]
    kept_k = variances_D[:pca_dim] > rank_tol
    reduced_Nk = pca.project(feats_ND, axes_DD[:, :pca_dim])
    counts_C, means_Ck, _ = class_moments(reduced_Nk, labels_N, num_classes)
    second_Ck = jax.ops.segment_sum(reduced_Nk**2, labels_N, num_segments=num_classes)
    variances_Ck = second_Ck / jnp.maximum(counts_C, 1)[:, None] - means_Ck**2
    floor = _RELATIVE_VARIANCE_FLOOR * jnp.sum(variances_D) / dim
    variances_Ck = jnp.maximum(variances_Ck, floor)
    if gaussian == "spherical":
        num_kept = jnp.maximum(jnp.sum(kept_k), 1)
        spreads_C = jnp.sum(jnp.where(kept_k[None, :], variances_Ck, 0), axis=1) / num_kept
        distances_CC = spherical_distances(means_Ck, spreads_C, kept_k)
    else:
        if gaussian == "spherical_exact":
            num_kept = jnp.maximum(jnp.sum(kept_k), 1)
            spreads_C = jnp.sum(jnp.where(kept_k[None, :], variances_Ck, 0), axis=1) / num_kept
            variances_Ck = jnp.broadcast_to(spreads_C[:, None], variances_Ck.shape)
        distances_CC = bhattacharyya_distances(means_Ck, variances_Ck, kept_k)
    coeff_CC = jnp.exp(-distances_CC)
    # Only pairs of distinct classes that both occur (an empty class is no Gaussian).
    present_C = counts_C > 0
    pair_CC = present_C[:, None] & present_C[None, :] & ~jnp.eye(num_classes, dtype=bool)
    return -jnp.sum(jnp.where(pair_CC, coeff_CC, 0))


def gbc(
    features,
    labels,
    *,
    num_classes: int | None = None,
    pca_dim: int | None = DEFAULT_PCA_DIM,
    gaussian: str = "spherical",
) -> jax.Array:
    """GBC = −Σ_{c ≠ c'} exp(−D_B(c, c')) over pairs of class Gaussians (module docstring).

    Args:
        features: [N, D] real features, finite, N ≥ 2; computes in their dtype.
        labels: [N] integer labels, 0..C−1 (see `scoring.inputs.check_labels`), or
          0..num_classes-1.
        num_classes: optional number of classes C (required inside `jax.jit`).
        pca_dim: PCA components kept, k = min(pca_dim, D, N − 1) (default 64, the authors'),
          of which those with variance at rounding level are left out; None keeps all D (still
          rotated onto the principal axes).
        gaussian: "spherical" (default: the authors' method and code), "spherical_exact" (the
          Bhattacharyya distance of N(μ_c, s_c I_k), log term k times larger) or "diagonal".

    Returns:
        [] GBC ≤ 0 (higher, i.e. closer to 0, means more separable classes).

    Raises:
        TypeError, ValueError: bad features or labels (see `scoring.inputs`), bad `pca_dim` or
          `gaussian`, or constant features.

    References:
        Pándy et al., "Transferability Estimation using Bhattacharyya Class Separability",
        CVPR 2022, Eq. (1)–(3); google-research/stable_transfer/transferability/gbc.py.
    """
    feats_ND = inputs.check_features(features)
    labels = inputs.check_labels(labels, feats_ND.shape[0], num_classes=num_classes)
    if gaussian not in GAUSSIANS:
        raise ValueError(f"gaussian must be one of {GAUSSIANS}; got {gaussian!r}")
    num_samples, dim = feats_ND.shape
    if pca_dim is None:
        pca_dim = dim
    if isinstance(pca_dim, bool) or not isinstance(pca_dim, int) or pca_dim < 1:
        raise ValueError(f"pca_dim must be a positive int or None; got {pca_dim!r}")
    inputs.check_not_constant(feats_ND)
    k = min(pca_dim, dim, num_samples - 1)  # centred data has rank ≤ N − 1
    return _gbc(feats_ND, labels.index, labels.num_classes, k, gaussian)
