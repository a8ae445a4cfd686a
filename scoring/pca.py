"""Principal component projection, the dimension reduction GBC and N-LEEP apply before fitting
Gaussians (Pándy et al., CVPR 2022; Li et al., CVPR 2021, both following scikit-learn's `PCA`).

Dimension names: N samples, D feature dimensions, k kept components.
"""

import jax
import jax.numpy as jnp

from scoring.class_moments import HIGHEST


def principal_axes(feats_ND: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Eigen-decomposition of the feature covariance, largest first.

    Args:
        feats_ND: [N, D] features.

    Returns:
        (variances_D, axes_DD): [D] variance along each principal axis, descending (clipped at 0),
        and [D, D] the axes as columns.
    """
    centered_ND = feats_ND - jnp.mean(feats_ND, axis=0, keepdims=True)
    scatter_DD = jnp.matmul(centered_ND.T, centered_ND, precision=HIGHEST)
    eig_D, vecs_DD = jnp.linalg.eigh(scatter_DD)
    variances_D = jnp.maximum(eig_D[::-1], 0) / (feats_ND.shape[0] - 1)
    return variances_D, vecs_DD[:, ::-1]


def project(feats_ND: jax.Array, axes_Dk: jax.Array) -> jax.Array:
    """[N, k] coordinates of the centred features on the given axes (scikit-learn's transform)."""
    centered_ND = feats_ND - jnp.mean(feats_ND, axis=0, keepdims=True)
    return jnp.matmul(centered_ND, axes_Dk, precision=HIGHEST)


def num_components_for_variance(variances_D, fraction: float) -> int:
    """Smallest k whose leading k components explain strictly more than `fraction` of the total
    variance, scikit-learn's rule for `PCA(n_components=fraction)` (host-side, concrete input)."""
    ratio_D = jnp.cumsum(variances_D) / jnp.sum(variances_D)
    return min(int(jnp.sum(ratio_D <= fraction)) + 1, ratio_D.shape[0])
