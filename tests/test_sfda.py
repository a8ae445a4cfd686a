"""SFDA against a NumPy/SciPy recomputation of the authors' algorithm (generalised eigenproblem)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from class_blobs import separated_and_overlapping
from jit_modes import run

import scoring


def softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def numpy_fda_posteriors(x, y, shrinkage=None):
    """Regularised FDA as the authors describe it: S_b = S_t − S_w, scipy.linalg.eigh(S_b, S_w)."""
    d = x.shape[1]
    classes = np.unique(y)
    priors = np.array([np.mean(y == c) for c in classes])
    means = np.stack([x[y == c].mean(axis=0) for c in classes])
    within = sum(p * np.cov(x[y == c].T, bias=True) for p, c in zip(priors, classes, strict=True))
    if shrinkage is None:  # 3 rounds of the authors' two-step power iteration
        v = within.sum(axis=1)
        for _ in range(3):
            u = within @ v
            u /= np.linalg.norm(u)
            v = within @ u
            v /= np.linalg.norm(v)
        shrinkage = max(np.exp(-5 * (v @ within @ u)), 1e-10)

    def shrink(s):
        return (1 - shrinkage) * s + shrinkage * np.trace(s) / d * np.eye(d)

    shrunk_within = shrink(within)
    between = shrink(np.cov(x.T, bias=True)) - shrunk_within
    evals, evecs = scipy.linalg.eigh(between, shrunk_within)
    evecs = evecs[:, np.argsort(evals)[::-1]]
    coef = means @ evecs @ evecs.T
    intercept = -0.5 * np.diag(means @ coef.T) + np.log(priors)
    return softmax(x @ coef.T + intercept), shrinkage, means


def numpy_sfda(x, y):
    classes, index = np.unique(y, return_inverse=True)
    probs, shrinkage, means = numpy_fda_posteriors(x, index)
    probs = softmax(probs)
    others = np.stack([(means.sum(0) - means[c]) / (len(classes) - 1) for c in range(len(classes))])
    own = probs[np.arange(len(x)), index][:, None]
    mixed = own * x + (1 - own) * others[index]
    mixed_probs, _, _ = numpy_fda_posteriors(mixed, index, shrinkage)
    return mixed_probs[np.arange(len(x)), index].mean()


@pytest.mark.parametrize(
    ("mode", "separation"),
    [("eager_call", 0.05), ("under_jit", 0.05), ("disable_jit", 0.05), ("eager_call", 2.0)],
)
def test_matches_scipy_in_float64(mode, separation):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 160)
    feats = rng.normal(size=(160, 12)) + separation * rng.normal(size=(4, 12))[labels]
    with jax.enable_x64(True):
        got = run(mode, scoring.sfda, feats, labels, num_classes=4)
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(float(got), numpy_sfda(feats, labels), rtol=1e-9)


@pytest.mark.filterwarnings("ignore::scoring.inputs.LabelWarning")  # labels not 0..C−1 on purpose
def test_small_variance_features_use_real_shrinkage_and_float32_close():
    # Small within-class spread makes σ_max small, so λ = exp(−5σ) is far from its 1e-10 floor.
    rng = np.random.default_rng(1)
    labels = rng.choice([3, 8, 9], size=120)
    feats = 0.1 * rng.normal(size=(120, 30)) + 0.2 * rng.normal(size=(10, 30))[labels]
    with jax.enable_x64(True):
        ref = numpy_sfda(feats, labels)
        np.testing.assert_allclose(float(scoring.sfda(feats, labels)), ref, rtol=1e-9)
    got32 = scoring.sfda(feats.astype(np.float32), labels)
    assert got32.dtype == jnp.float32
    np.testing.assert_allclose(float(got32), ref, rtol=1e-4)


def test_separated_classes_score_higher_than_overlapping():
    far, near, labels = separated_and_overlapping(2, 200, 10, 4, far=4, near=0.1)
    separated = float(scoring.sfda(far, labels))
    overlapping = float(scoring.sfda(near, labels))
    assert 0 < overlapping < separated <= 1


@pytest.mark.parametrize(("scale", "separation"), [(1.0, 0.3), (0.05, 0.1)])
def test_float32_with_fewer_samples_than_dimensions(scale, separation):
    # N < D: S_w is singular. At unit scale λ = 1e-10 (σ_max is large), so S̃_w's small
    # eigenvalues (~1e-10) lie below float32's rounding of a formed S_w, where a Cholesky
    # factorisation failed; the eigenbasis from singular values resolves them. At scale 0.05
    # the shrinkage is real (λ ≈ 0.9) and the classes overlap (SFDA ≈ 0.9, not saturated), so
    # the part of the class means outside span(S_w), divided by λ·tr S_w / D, counts.
    rng = np.random.default_rng(5)
    labels = np.arange(40) % 4
    feats = scale * (rng.normal(size=(40, 100)) + separation * rng.normal(size=(4, 100))[labels])
    with jax.enable_x64(True):
        ref = numpy_sfda(feats, labels)
        np.testing.assert_allclose(float(scoring.sfda(feats, labels)), ref, rtol=1e-9)
    np.testing.assert_allclose(
        float(scoring.sfda(feats.astype(np.float32), labels)), ref, rtol=1e-5
    )


def test_collapsed_classes_are_the_zero_covariance_error():
    labels = np.arange(12) % 3
    centers = np.random.default_rng(0).normal(size=(3, 5))
    with pytest.raises(ValueError, match="within-class covariance is zero"):
        scoring.sfda(centers[labels], labels)


def test_rejects_constant_features_and_bad_labels():
    with pytest.raises(ValueError, match="must not be constant"):
        scoring.sfda(np.ones((10, 3)), np.arange(10) % 2)
    with pytest.raises(ValueError, match="at least 2 classes"):
        scoring.sfda(np.random.default_rng(0).normal(size=(10, 3)), np.zeros(10, int))


def test_empty_class_changes_nothing():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 3, 90)
    feats = rng.normal(size=(90, 6)) + rng.normal(size=(3, 6))[labels]
    # num_classes=5 adds two classes without samples: prior 0, never predicted.
    np.testing.assert_allclose(
        float(scoring.sfda(feats, labels, num_classes=5)),
        float(scoring.sfda(feats, labels)),
        rtol=1e-5,
    )
