"""Per-class first and second moments of features: the statistics that the covariance-based
transferability scores (H-score, regularised H-score, GBC, SFDA) are built from.

Dimension names: N samples, D feature dimensions, C classes.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

# Full float32/float64 matmul precision: TPU bfloat16 passes and GPU TF32 would blur small
# eigenvalues of the covariances these scores invert.
HIGHEST = jax.lax.Precision.HIGHEST


class ClassMoments(NamedTuple):
    """Class counts and feature means.

    Attributes:
        counts_C: [C] number of samples of each class (0 for a class with none).
        means_CD: [C, D] mean feature of each class (0 for an empty class).
        mean_D: [D] mean feature over all N samples.
    """

    counts_C: jax.Array
    means_CD: jax.Array
    mean_D: jax.Array


def class_moments(feats_ND: jax.Array, labels_N: jax.Array, num_classes: int) -> ClassMoments:
    """Counts and means per class of [N, D] features with [N] labels in [0, num_classes)."""
    counts_C = jnp.zeros(num_classes, feats_ND.dtype).at[labels_N].add(1)
    sums_CD = jax.ops.segment_sum(feats_ND, labels_N, num_segments=num_classes)
    means_CD = sums_CD / jnp.maximum(counts_C, 1)[:, None]
    return ClassMoments(counts_C, means_CD, jnp.mean(feats_ND, axis=0))


def between_class_factor(counts_C: jax.Array, means_CD: jax.Array, mean_D: jax.Array) -> jax.Array:
    """[C, D] rows √n_c (μ_c − μ): its Gram matrix MᵀM = Σ_c n_c (μ_c − μ)(μ_c − μ)ᵀ is the
    between-class scatter, i.e. N·cov(E[f | y]) with every sample replaced by its class mean."""
    return jnp.sqrt(counts_C)[:, None] * (means_CD - mean_D[None, :])


def centered_gram(feats_ND: jax.Array, mean_D: jax.Array) -> jax.Array:
    """[D, D] (F − 1μᵀ)ᵀ(F − 1μᵀ), the total scatter: N times the biased covariance."""
    centered_ND = feats_ND - mean_D[None, :]
    return jnp.matmul(centered_ND.T, centered_ND, precision=HIGHEST)


def shrink_to_scaled_identity(cov_DD: jax.Array, shrinkage) -> jax.Array:
    """(1 − s)·Σ + s·(tr Σ / D)·I: shrinkage towards the identity scaled to Σ's mean variance."""
    dim = cov_DD.shape[0]
    mu = jnp.trace(cov_DD) / dim
    return (1 - shrinkage) * cov_DD + shrinkage * mu * jnp.eye(dim, dtype=cov_DD.dtype)
