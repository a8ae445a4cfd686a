"""GBC against a NumPy recomputation (scikit-learn PCA, full-matrix Bhattacharyya distance)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from class_blobs import separated_and_overlapping
from jit_modes import run
from sklearn.decomposition import PCA

import scoring


def numpy_gbc(f, y, pca_dim, gaussian):
    """−Σ_{i≠j} exp(−D_B) with D_B from full covariance matrices and slogdet."""
    reduced = PCA(n_components=pca_dim).fit_transform(f)
    classes = np.unique(y)
    means = [reduced[y == c].mean(axis=0) for c in classes]
    variances = [np.maximum(reduced[y == c].var(axis=0), 1e-4) for c in classes]
    if gaussian == "spherical":
        variances = [np.full(pca_dim, v.mean()) for v in variances]
    total = 0.0
    for i in range(len(classes)):
        for j in range(len(classes)):
            if i == j:
                continue
            s1, s2 = np.diag(variances[i]), np.diag(variances[j])
            s = (s1 + s2) / 2
            diff = means[i] - means[j]
            distance = diff @ np.linalg.solve(s, diff) / 8 + 0.5 * (
                np.linalg.slogdet(s)[1]
                - 0.5 * np.linalg.slogdet(s1)[1]
                - 0.5 * np.linalg.slogdet(s2)[1]
            )
            total += np.exp(-distance)
    return -total


@pytest.mark.parametrize(
    ("gaussian", "mode"),
    [
        ("spherical", "eager_call"),
        ("spherical", "under_jit"),
        ("spherical", "disable_jit"),
        ("diagonal", "eager_call"),
    ],
)
def test_matches_numpy_in_float64(gaussian, mode):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 150)
    feats = rng.normal(size=(150, 24)) + 1.5 * rng.normal(size=(4, 24))[labels]
    with jax.enable_x64(True):
        got = run(mode, scoring.gbc, feats, labels, num_classes=4, pca_dim=8, gaussian=gaussian)
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(float(got), numpy_gbc(feats, labels, 8, gaussian), rtol=1e-9)


def test_default_pca_dim_is_64_and_float32_close():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 200)
    feats = rng.normal(size=(200, 80)) + rng.normal(size=(3, 80))[labels]
    with jax.enable_x64(True):
        ref = numpy_gbc(feats, labels, 64, "spherical")
        np.testing.assert_allclose(float(scoring.gbc(feats, labels)), ref, rtol=1e-9)
    got32 = scoring.gbc(feats.astype(np.float32), labels)
    assert got32.dtype == jnp.float32
    np.testing.assert_allclose(float(got32), ref, rtol=1e-3)


def test_separated_classes_score_higher_than_overlapping():
    far, near, labels = separated_and_overlapping(2, 200, 10, 4, far=6, near=0.1)
    separated = float(scoring.gbc(far, labels))
    overlapping = float(scoring.gbc(near, labels))
    assert overlapping < separated <= 0
    assert separated > -0.01  # barely any overlap left: every coefficient near 0
    assert overlapping < -0.9 * 4 * 3  # near-identical Gaussians: every coefficient near 1


def test_rejects_bad_options():
    feats = np.random.default_rng(0).normal(size=(10, 3))
    labels = np.arange(10) % 2
    with pytest.raises(ValueError, match="gaussian must be"):
        scoring.gbc(feats, labels, gaussian="full")
    with pytest.raises(ValueError, match="pca_dim must be"):
        scoring.gbc(feats, labels, pca_dim=0)
    with pytest.raises(ValueError, match="at least 2 classes"):
        scoring.gbc(feats, np.ones(10, int))


def test_empty_class_changes_nothing():
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 3, 90)
    feats = rng.normal(size=(90, 6)) + rng.normal(size=(3, 6))[labels]
    np.testing.assert_allclose(
        float(scoring.gbc(feats, labels, num_classes=5)),
        float(scoring.gbc(feats, labels)),
        rtol=1e-5,
    )
