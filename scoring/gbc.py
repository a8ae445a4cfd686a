"""GBC: the Gaussian Bhattacharyya coefficient, a measure of class overlap in feature space.

Pándy, Agostinelli, Uijlings, Ferrari & Mensink, "Transferability Estimation using Bhattacharyya
Class Separability", CVPR 2022.

The features are reduced by PCA to k = 64 dimensions; each class c is modelled as a Gaussian
N(μ_c, Σ_c) with Σ_c spherical (σ_c² I, σ_c² the mean of the per-dimension variances; the paper's
default) or diagonal. For every ordered pair of classes the Bhattacharyya distance

    D_B(c, c') = ⅛ (μ_c − μ_c')ᵀ Σ⁻¹ (μ_c − μ_c') + ½ log( det Σ / √(det Σ_c · det Σ_c') ),
    Σ = (Σ_c + Σ_c') / 2,

gives the coefficient BC = exp(−D_B), and GBC = −Σ_{c ≠ c'} BC(c, c') ≤ 0: near 0 when the classes
do not overlap. Constants as in the authors' code: variances are the biased (1/n_c) ones, floored at
1e-4; PCA keeps 64 components. For spherical Gaussians the log-determinant term above carries the
factor k (det σ²I = σ^{2k}); the authors' TensorFlow code reduces it over a scalar and so omits k —
this module follows the formula.

Dimension names: N samples, D feature dimensions, C classes, k PCA components.
"""

import functools

import jax
import jax.numpy as jnp

from scoring import inputs, pca
from scoring.class_moments import class_moments

DEFAULT_PCA_DIM = 64
_VARIANCE_FLOOR = 1e-4


def bhattacharyya_distances(means_Ck, variances_Ck) -> jax.Array:
    """[C, C] Bhattacharyya distances between Gaussians with diagonal covariances diag(σ²_c)."""
    avg_CCk = (variances_Ck[:, None, :] + variances_Ck[None, :, :]) / 2
    diff_CCk = means_Ck[:, None, :] - means_Ck[None, :, :]
    mahalanobis_CC = jnp.sum(diff_CCk**2 / avg_CCk, axis=-1) / 8
    log_var_C = jnp.sum(jnp.log(variances_Ck), axis=-1)
    log_det_ratio_CC = (
        jnp.sum(jnp.log(avg_CCk), axis=-1) - (log_var_C[:, None] + log_var_C[None, :]) / 2
    )
    return mahalanobis_CC + log_det_ratio_CC / 2


@functools.partial(jax.jit, static_argnames=("num_classes", "pca_dim", "gaussian"))
def _gbc(feats_ND, labels_N, num_classes, pca_dim, gaussian):
    _, axes_DD = pca.principal_axes(feats_ND)
    reduced_Nk = pca.project(feats_ND, axes_DD[:, :pca_dim])
    counts_C, means_Ck, _ = class_moments(reduced_Nk, labels_N, num_classes)
    second_Ck = jax.ops.segment_sum(reduced_Nk**2, labels_N, num_segments=num_classes)
    variances_Ck = second_Ck / jnp.maximum(counts_C, 1)[:, None] - means_Ck**2
    variances_Ck = jnp.maximum(variances_Ck, _VARIANCE_FLOOR)
    if gaussian == "spherical":
        variances_Ck = jnp.broadcast_to(
            jnp.mean(variances_Ck, axis=1, keepdims=True), variances_Ck.shape
        )
    coeff_CC = jnp.exp(-bhattacharyya_distances(means_Ck, variances_Ck))
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
        labels: [N] integer labels; classes are the distinct values present, or 0..num_classes-1.
        num_classes: optional number of classes C (required inside `jax.jit`).
        pca_dim: PCA components kept, k = min(pca_dim, D) (default 64, the authors'); None keeps
          all D, still rotated onto the principal axes.
        gaussian: "spherical" (default, as in the paper's experiments) or "diagonal".

    Returns:
        [] GBC ≤ 0 (higher, i.e. closer to 0, means more separable classes).

    Raises:
        TypeError, ValueError: bad features or labels (see `scoring.inputs`), bad `pca_dim` or
          `gaussian`.

    References:
        Pándy et al., "Transferability Estimation using Bhattacharyya Class Separability",
        CVPR 2022, Eq. (1)–(3).
    """
    feats_ND = inputs.check_features(features)
    labels = inputs.check_labels(labels, feats_ND.shape[0], num_classes=num_classes)
    if gaussian not in ("spherical", "diagonal"):
        raise ValueError(f"gaussian must be 'spherical' or 'diagonal'; got {gaussian!r}")
    dim = feats_ND.shape[1]
    if pca_dim is None:
        pca_dim = dim
    if isinstance(pca_dim, bool) or not isinstance(pca_dim, int) or pca_dim < 1:
        raise ValueError(f"pca_dim must be a positive int or None; got {pca_dim!r}")
    return _gbc(feats_ND, labels.index, labels.num_classes, min(pca_dim, dim), gaussian)
