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
    """−Σ_{i≠j} exp(−D_B): "spherical" as the authors' code computes it (scalar variances, the
    log term once), the others from full covariance matrices and slogdet."""
    reduced = PCA(n_components=pca_dim).fit_transform(f)
    floor = 1e-4 * np.var(f, axis=0, ddof=1).mean()  # the authors' 1e-4, relative to the spread
    classes = np.unique(y)
    means = [reduced[y == c].mean(axis=0) for c in classes]
    variances = [np.maximum(reduced[y == c].var(axis=0), floor) for c in classes]
    total = 0.0
    for i in range(len(classes)):
        for j in range(len(classes)):
            if i == j:
                continue
            diff = means[i] - means[j]
            if gaussian == "spherical":
                s1, s2 = variances[i].mean(), variances[j].mean()
                s = (s1 + s2) / 2
                distance = diff @ diff / (8 * s) + 0.5 * (
                    np.log(s) - 0.5 * np.log(s1) - 0.5 * np.log(s2)
                )
            else:
                v1, v2 = variances[i], variances[j]
                if gaussian == "spherical_exact":
                    v1, v2 = np.full(pca_dim, v1.mean()), np.full(pca_dim, v2.mean())
                s1, s2 = np.diag(v1), np.diag(v2)
                s = (s1 + s2) / 2
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
        ("spherical_exact", "eager_call"),
        ("diagonal", "eager_call"),
    ],
)
def test_matches_numpy_in_float64(gaussian, mode):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 150)
    # Unequal spreads per class and per dimension, so the three Gaussians differ.
    spread = rng.uniform(0.5, 2.0, size=(4, 1)) * rng.uniform(0.5, 2.0, size=(1, 24))
    feats = rng.normal(size=(150, 24)) * spread[labels] + 1.5 * rng.normal(size=(4, 24))[labels]
    with jax.enable_x64(True):
        got = run(mode, scoring.gbc, feats, labels, num_classes=4, pca_dim=8, gaussian=gaussian)
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(float(got), numpy_gbc(feats, labels, 8, gaussian), rtol=1e-9)


def two_class_model(rng, n, k, separation, spreads):
    """Features [2n, k] of two Gaussian classes at distance `separation` with variances `spreads`."""
    labels = np.repeat([0, 1], n)
    noise = rng.normal(size=(2 * n, k))
    center = np.zeros((2, k))
    center[1, 0] = separation
    return center[labels] + noise * np.sqrt(np.asarray(spreads))[labels][:, None], labels


def test_default_follows_the_authors_where_the_exact_spherical_form_ranks_otherwise():
    # Model A: equal class spreads, means 2 apart. Model B: spreads 1 and 4, means 2.45 apart.
    # The authors' distance (log term once) separates A's classes more; the exact spherical
    # Gaussians' (log term k = 8 times) gives B's unequal spreads the larger distance.
    rng = np.random.default_rng(5)
    feats_a, labels = two_class_model(rng, 400, 8, 2.0, [1.0, 1.0])
    feats_b, _ = two_class_model(rng, 400, 8, 2.45, [1.0, 4.0])
    with jax.enable_x64(True):
        scores = {
            (model, gaussian): float(scoring.gbc(f, labels, pca_dim=None, gaussian=gaussian))
            for model, f in (("A", feats_a), ("B", feats_b))
            for gaussian in ("spherical", "spherical_exact")
        }
        for (model, gaussian), value in scores.items():
            f = feats_a if model == "A" else feats_b
            np.testing.assert_allclose(value, numpy_gbc(f, labels, 8, gaussian), rtol=1e-9)
        default_a = float(scoring.gbc(feats_a, labels, pca_dim=None))
        assert default_a == scores["A", "spherical"]
    assert scores["A", "spherical"] > scores["B", "spherical"]
    assert scores["A", "spherical_exact"] < scores["B", "spherical_exact"]


def test_pca_keeps_at_most_the_rank_of_the_data():
    # N = 20 ≤ pca_dim = 64 < D: the centred features have rank 19; components beyond it would be
    # floored noise diluting the spherical variance. The answer equals GBC on the 19 components.
    rng = np.random.default_rng(7)
    labels = np.arange(20) % 3
    feats = rng.normal(size=(20, 100)) + 2 * rng.normal(size=(3, 100))[labels]
    with jax.enable_x64(True):
        want = numpy_gbc(feats, labels, 19, "spherical")
        np.testing.assert_allclose(float(scoring.gbc(feats, labels)), want, rtol=1e-9)
        # Rank-deficient columns (D = 30 of rank 10): only the 10 real components count.
        low_rank = feats[:, :10] @ rng.normal(size=(10, 30))
        want = numpy_gbc(low_rank, labels, 10, "spherical")
        np.testing.assert_allclose(float(scoring.gbc(low_rank, labels)), want, rtol=1e-9)


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


@pytest.mark.parametrize("gaussian", ["spherical", "diagonal"])
def test_variance_floor_is_relative_so_gbc_does_not_depend_on_the_scale(gaussian):
    # Half the dimensions separate the classes by small offsets with almost no spread, so their
    # variances sit on the floor and the floor sets their distances (Δμ² / (8·floor) ≈ 0.5): an
    # absolute floor (the authors' 1e-4) would make GBC depend on the features' magnitude.
    rng = np.random.default_rng(8)
    labels = np.arange(90) % 3
    offsets = 0.01 * rng.normal(size=(3, 4))
    spread = np.concatenate([np.ones(4), np.full(4, 1e-5)])
    feats = rng.normal(size=(90, 8)) * spread + np.concatenate([0 * offsets, offsets], 1)[labels]
    with jax.enable_x64(True):
        want = numpy_gbc(feats, labels, 8, gaussian)
        for scale in (3.7e-9, 1.0, 7.3e11):
            got = float(scoring.gbc(feats * scale, labels, pca_dim=8, gaussian=gaussian))
            np.testing.assert_allclose(got, want, rtol=1e-9, err_msg=f"×{scale:g}")


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
    with pytest.raises(ValueError, match="gaussian must be one of"):
        scoring.gbc(feats, labels, gaussian="full")
    with pytest.raises(ValueError, match="must not be constant"):
        scoring.gbc(np.ones((10, 3)), labels)
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
