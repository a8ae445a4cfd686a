"""H-score and regularised H-score against NumPy/scikit-learn recomputations and known answers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from class_blobs import separated_and_overlapping
from jit_modes import MODES, run
from sklearn.covariance import LedoitWolf

import scoring


def blobs(rng, n, d, c, separation):
    labels = rng.integers(0, c, n)
    centers = rng.normal(size=(c, d)) * separation
    return rng.normal(size=(n, d)) + centers[labels], labels


def numpy_class_mean_cov(f, y):
    """cov(E[f | y]): every row replaced by its class mean, np.cov (1/(N−1))."""
    g = np.zeros_like(f)
    for c in np.unique(y):
        g[y == c] = f[y == c].mean(axis=0)
    return np.cov(g, rowvar=False)


def numpy_hscore(f, y):
    return np.trace(
        np.linalg.pinv(np.cov(f, rowvar=False), rcond=1e-15) @ numpy_class_mean_cov(f, y)
    )


def numpy_regularized_hscore(f, y):
    f = f - f.mean(axis=0)
    lw = LedoitWolf(assume_centered=False).fit(f)
    alpha = lw.shrinkage_
    return np.trace(np.linalg.inv(lw.covariance_) @ ((1 - alpha) * numpy_class_mean_cov(f, y)))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("fn", "reference"),
    [(scoring.hscore, numpy_hscore), (scoring.regularized_hscore, numpy_regularized_hscore)],
)
def test_matches_numpy_in_float64(mode, fn, reference):
    rng = np.random.default_rng(0)
    feats, labels = blobs(rng, 120, 16, 4, 1.0)
    feats = feats * rng.uniform(0.1, 10, size=16) + 5  # unequal scales and an offset
    with jax.enable_x64(True):
        got = run(mode, fn, feats, labels, num_classes=4)
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(float(got), reference(feats, labels), rtol=1e-10)


@pytest.mark.parametrize("fn", [scoring.hscore, scoring.regularized_hscore])
def test_float32_close_to_float64_and_wide_features(fn):
    rng = np.random.default_rng(1)
    feats, labels = blobs(rng, 40, 60, 3, 1.0)  # N < D: singular sample covariance
    ref = (numpy_hscore if fn is scoring.hscore else numpy_regularized_hscore)(feats, labels)
    if fn is scoring.regularized_hscore:  # well defined for N < D thanks to the shrinkage
        with jax.enable_x64(True):
            np.testing.assert_allclose(float(fn(feats, labels)), ref, rtol=1e-9)
    feats2, labels2 = blobs(rng, 200, 10, 3, 1.0)
    with jax.enable_x64(True):
        ref64 = float(fn(feats2, labels2))
    got32 = fn(feats2.astype(np.float32), labels2)
    assert got32.dtype == jnp.float32
    np.testing.assert_allclose(float(got32), ref64, rtol=1e-4)


def test_hscore_pseudo_inverse_on_rank_deficient_features():
    rng = np.random.default_rng(2)
    base, labels = blobs(rng, 100, 5, 3, 2.0)
    feats = np.concatenate([base, base[:, :2] @ rng.normal(size=(2, 3))], axis=1)  # rank 5 of 8
    with jax.enable_x64(True):
        # The exact answer is the H-score on the 5 independent columns (same span).
        np.testing.assert_allclose(
            float(scoring.hscore(feats, labels)), numpy_hscore(base, labels), rtol=1e-8
        )


@pytest.mark.parametrize("fn", [scoring.hscore, scoring.regularized_hscore])
def test_separated_classes_score_higher_than_overlapping(fn):
    separated, overlapping, labels = separated_and_overlapping(3, 300, 12, 5, far=4, near=0.2)
    assert float(fn(separated, labels)) > float(fn(overlapping, labels))
    # H-score lies in [0, C − 1]; near C − 1 = 4 when classes barely overlap.
    assert 3.5 < float(scoring.hscore(separated, labels)) <= 4 + 1e-5


@pytest.mark.parametrize("fn", [scoring.hscore, scoring.regularized_hscore])
def test_rejects_bad_inputs(fn):
    feats = np.random.default_rng(0).normal(size=(10, 3))
    labels = np.arange(10) % 2
    with pytest.raises(ValueError, match=r"features must have shape \[N, D\]"):
        fn(feats[0], labels)
    with pytest.raises(ValueError, match="labels has 9 entries"):
        fn(feats, labels[:9])
    with pytest.raises(ValueError, match="at least 2 classes"):
        fn(feats, np.zeros(10, int))
    with pytest.raises(ValueError, match="finite"):
        fn(np.where(feats > 1, np.inf, feats), labels)
    with pytest.raises(TypeError, match="features must be a real-valued array"):
        fn("features", labels)
    with pytest.raises(ValueError, match=r"must lie in \[0, num_classes=2\)"):
        fn(feats, labels + 1, num_classes=2)


@pytest.mark.parametrize("fn", [scoring.hscore, scoring.regularized_hscore])
def test_empty_class_changes_nothing(fn):
    rng = np.random.default_rng(4)
    feats, labels = blobs(rng, 90, 6, 3, 1.0)
    np.testing.assert_allclose(
        float(fn(feats, labels, num_classes=5)), float(fn(feats, labels)), rtol=1e-5
    )


def test_regularized_hscore_rejects_constant_features_and_two_samples():
    with pytest.raises(ValueError, match="must not be constant"):
        scoring.regularized_hscore(np.ones((10, 3)), np.arange(10) % 2)
    # With N = 2 the Ledoit–Wolf shrinkage is always 0 and the covariance has rank 1.
    with pytest.raises(ValueError, match="features needs at least 3 samples"):
        scoring.regularized_hscore(np.array([[0.0, 1.0], [2.0, 5.0]]), np.array([0, 1]))
