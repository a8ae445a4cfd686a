"""TransRate against a NumPy recomputation (slogdet on the D side) and known answers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from class_blobs import separated_and_overlapping

import scoring


def numpy_coding_rate(z, eps):
    n, d = z.shape
    return 0.5 * np.linalg.slogdet(np.eye(d) + z.T @ z / (n * eps))[1]


def numpy_transrate(f, y, eps=1e-4):
    z = f - f.mean(axis=0)
    return numpy_coding_rate(z, eps) - np.mean(
        [numpy_coding_rate(z[y == c], eps) for c in np.unique(y)]
    )


@pytest.mark.filterwarnings("ignore::scoring.inputs.LabelWarning")  # labels not 0..C−1 on purpose
@pytest.mark.parametrize(
    ("n", "d", "classes"),
    [(200, 12, [0, 1, 2]), (30, 50, [1, 4, 9]), (90, 20, [0, 1, 2, 3, 4])],
    ids=["n_gt_d", "n_lt_d", "classes_larger_than_d"],
)
def test_matches_numpy_in_float64(n, d, classes):
    rng = np.random.default_rng(0)
    labels = rng.choice(classes, size=n)
    if n == 90:  # one class of 40 rows > D = 20: that class's log det runs on the D side
        labels[:40] = 0
    feats = rng.normal(size=(n, d)) + rng.normal(size=(max(classes) + 1, d))[labels]
    with jax.enable_x64(True):
        got = scoring.transrate(feats, labels)
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(float(got), numpy_transrate(feats, labels), rtol=1e-10)
        got_eps = scoring.transrate(feats, labels, eps=0.1)
        np.testing.assert_allclose(float(got_eps), numpy_transrate(feats, labels, 0.1), rtol=1e-10)
    got32 = scoring.transrate(feats.astype(np.float32), labels)
    assert got32.dtype == jnp.float32
    np.testing.assert_allclose(float(got32), numpy_transrate(feats, labels), rtol=1e-4)


def test_separated_classes_score_higher_than_overlapping():
    far, near, labels = separated_and_overlapping(1, 200, 8, 4, far=5, near=0.1)
    separated = scoring.transrate(far, labels)
    overlapping = scoring.transrate(near, labels)
    assert float(separated) > float(overlapping)


def test_rejects_bad_inputs():
    feats = np.random.default_rng(0).normal(size=(10, 3))
    labels = np.arange(10) % 2
    with pytest.raises(ValueError, match="eps must be > 0"):
        scoring.transrate(feats, labels, eps=0)
    with pytest.raises(ValueError, match="labels has 11 entries"):
        scoring.transrate(feats, np.arange(11) % 2)
    with pytest.raises(ValueError, match=r"outside jax\.jit"):
        jax.jit(scoring.transrate)(feats, labels)
