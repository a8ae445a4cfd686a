"""N-LEEP: LEEP with a Gaussian mixture on the features in place of the source classifier.

Li, Jia, Zhu, Tian, Han, Wang, Yu & Gong, "Ranking Neural Checkpoints", CVPR 2021.

LEEP needs source-class probabilities θ(x); N-LEEP makes its own from the features alone, so it
applies to any checkpoint (also self-supervised ones without a head): the features are reduced by
PCA to the leading components that explain more than 80% of the variance, a Gaussian mixture with
V = 5·C full-covariance components is fitted to them, and its posteriors π(v | x) play the role of
θ(x) in LEEP: N-LEEP = 1/N Σ_i log Σ_v P̂(y_i | v) π(v | x_i) (with the log, as in the paper and
google-research's implementation; the SFDA authors' re-implementation drops it).

The mixture is fitted by scikit-learn's `GaussianMixture` on the host (k-means initialisation, EM to
tol 1e-3, reg_covar 1e-6 — here on features divided by their mean standard deviation
√(tr cov(f) / D), so that N-LEEP does not depend on the features' scale as an absolute reg_covar
would make it; at most 100 iterations), the estimator the paper and the public
implementations use: EM with k-means restarts is sequential, data-dependent control flow, and its
local optimum depends on the initialisation, so a different (JAX) EM would give a different score
for the same data. The PCA and the LEEP step run in JAX.

Dimension names: N samples, D feature dimensions, C classes, k PCA components, V mixture components.
"""

import jax
import jax.numpy as jnp
import numpy as np

from scoring import inputs, pca
from scoring.leep import _leep
from scoring.spectrum import power_of_two_scale

DEFAULT_VARIANCE_KEPT = 0.8
DEFAULT_COMPONENTS_PER_CLASS = 5


def nleep(
    features,
    labels,
    *,
    num_classes: int | None = None,
    components_per_class: int = DEFAULT_COMPONENTS_PER_CLASS,
    variance_kept: float = DEFAULT_VARIANCE_KEPT,
    seed: int = 0,
) -> jax.Array:
    """N-LEEP score: LEEP of Gaussian-mixture posteriors on PCA-reduced features.

    Not traceable by `jax.jit` (the mixture is fitted on the host).

    Args:
        features: [N, D] real features, finite; N must be ≥ the number of mixture components.
        labels: [N] integer labels; classes are the distinct values present, or 0..num_classes-1.
        num_classes: optional number of classes C.
        components_per_class: V / C (default 5, the paper's).
        variance_kept: PCA keeps the fewest leading components explaining more than this fraction
          of the variance (default 0.8, the paper's).
        seed: random state of the mixture's k-means initialisation.

    Returns:
        [] N-LEEP ≤ 0 in the dtype of `features` (higher means more transferable).

    Raises:
        TypeError, ValueError: bad features or labels (see `scoring.inputs`), bad options, fewer
          samples than mixture components, or a call under `jax.jit`.

    References:
        Li et al., "Ranking Neural Checkpoints", CVPR 2021, Sec. 3.3.
    """
    feats_ND = inputs.check_features(features)
    if inputs.is_traced(feats_ND) or inputs.is_traced(labels):
        raise ValueError("nleep fits its Gaussian mixture on the host; call it outside jax.jit")
    labels = inputs.check_labels(labels, feats_ND.shape[0], num_classes=num_classes)
    if (
        isinstance(components_per_class, bool)
        or not isinstance(components_per_class, int)
        or (components_per_class < 1)
    ):
        raise ValueError(f"components_per_class must be an int ≥ 1; got {components_per_class!r}")
    if not 0 < float(variance_kept) <= 1:
        raise ValueError(f"variance_kept must lie in (0, 1]; got {variance_kept!r}")
    num_components = components_per_class * labels.num_classes
    if feats_ND.shape[0] < num_components:
        raise ValueError(
            f"features need at least {num_components} samples (rows) to fit "
            f"{components_per_class}·C = {num_components} mixture components; got "
            f"N={feats_ND.shape[0]}"
        )
    scaled_ND, _ = power_of_two_scale(feats_ND)  # exact; keeps 1e-15 or 1e20 in range
    variances_D, axes_DD = pca.principal_axes(scaled_ND)
    if not float(variances_D[0]) > 0:
        raise ValueError("features must not be constant: every column has zero variance")
    k = pca.num_components_for_variance(variances_D, float(variance_kept))
    reduced_Nk = np.asarray(pca.project(scaled_ND, axes_DD[:, :k]), np.float64)
    # In units of the features' mean standard deviation: the mixture's reg_covar = 1e-6 is
    # absolute, so it then acts alike at every feature scale.
    reduced_Nk = reduced_Nk / np.sqrt(float(jnp.sum(variances_D)) / feats_ND.shape[1])
    # imported here: scikit-learn takes ~0.75 s to import, which every `import scoring` (each
    # command, each ranking without N-LEEP) would otherwise pay
    from sklearn.mixture import GaussianMixture

    mixture = GaussianMixture(n_components=num_components, random_state=seed).fit(reduced_Nk)
    posteriors_NV = jnp.asarray(mixture.predict_proba(reduced_Nk), feats_ND.dtype)
    return _leep(posteriors_NV, labels.index, labels.num_classes)
