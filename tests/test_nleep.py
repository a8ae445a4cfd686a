"""N-LEEP against a NumPy/scikit-learn recomputation (PCA(0.8) + GaussianMixture + LEEP)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from class_blobs import separated_and_overlapping
from sklearn.decomposition import PCA
from sklearn.mixture import GaussianMixture

import scoring


def numpy_nleep(f, y, seed=0):
    # In units of the features' mean standard deviation, as scoring.nleep fits its mixture.
    reduced = PCA(n_components=0.8).fit_transform(f) / np.sqrt(np.var(f, axis=0, ddof=1).mean())
    classes, index = np.unique(y, return_inverse=True)
    mixture = GaussianMixture(n_components=5 * len(classes), random_state=seed).fit(reduced)
    post = mixture.predict_proba(reduced)
    joint = np.stack([post[index == c].sum(axis=0) for c in range(len(classes))])
    cond = joint / joint.sum(axis=0, keepdims=True)
    return np.mean(np.log(np.einsum("nv,nv->n", post, cond[index])))


@pytest.mark.filterwarnings("ignore::scoring.inputs.LabelWarning")  # labels not 0..C−1 on purpose
def test_matches_sklearn_pipeline_in_float64():
    rng = np.random.default_rng(0)
    labels = rng.choice([1, 4, 6], size=150)
    feats = (
        rng.normal(size=(150, 10)) * np.linspace(3, 0.3, 10) + 3 * rng.normal(size=(7, 10))[labels]
    )
    with jax.enable_x64(True):
        got = scoring.nleep(feats, labels)
        assert got.dtype == jnp.float64
        # PCA axes may differ in sign from scikit-learn's; the mixture fit is invariant to that,
        # up to rounding in EM.
        np.testing.assert_allclose(float(got), numpy_nleep(feats, labels), rtol=1e-6)
    assert scoring.nleep(feats.astype(np.float32), labels).dtype == jnp.float32


def test_separated_classes_score_higher_than_overlapping():
    far, near, labels = separated_and_overlapping(1, 150, 6, 3, far=6, near=0.05)
    separated = float(scoring.nleep(far, labels))
    overlapping = float(scoring.nleep(near, labels))
    assert overlapping < separated <= 0
    assert separated > -0.05  # the mixture components are pure: P(y|v) ≈ 1
    np.testing.assert_allclose(overlapping, -np.log(3), atol=0.15)  # near chance


def test_rejects_bad_options():
    feats = np.random.default_rng(0).normal(size=(12, 3))
    labels = np.arange(12) % 3
    with pytest.raises(ValueError, match="at least 15 samples"):
        scoring.nleep(feats, labels)
    with pytest.raises(ValueError, match="variance_kept"):
        scoring.nleep(feats, labels, components_per_class=1, variance_kept=1.5)
    with pytest.raises(ValueError, match="components_per_class"):
        scoring.nleep(feats, labels, components_per_class=0)
    with pytest.raises(ValueError, match=r"outside jax\.jit"):
        jax.jit(scoring.nleep)(feats, labels)
