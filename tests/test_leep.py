"""LEEP and NCE against the reference fixtures, an independent NumPy recomputation, and known answers."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jit_modes import MODES, run

import scoring

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "logme_reference.npz"


def numpy_leep(probs, labels):
    """LEEP written out with loops over classes (Nguyen et al. 2020, Eq. 2–3)."""
    n = probs.shape[0]
    classes = np.unique(labels)
    joint = np.stack([probs[labels == c].sum(axis=0) for c in classes]) / n  # [C, K]
    cond = joint / joint.sum(axis=0, keepdims=True)  # P(y | z)
    index = np.searchsorted(classes, labels)
    return np.mean(np.log(np.einsum("nk,nk->n", probs, cond[index])))


def numpy_nce(source, labels):
    pairs, counts = np.unique(np.stack([labels, source]), axis=1, return_counts=True)
    joint = counts / counts.sum()
    p_z = {z: joint[pairs[1] == z].sum() for z in np.unique(source)}
    return float(sum(p * np.log(p / p_z[z]) for (_, z), p in zip(pairs.T, joint, strict=True)))


def softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.mark.parametrize(
    ("case", "mode"), [*[("src_a", m) for m in MODES], ("src_b", "eager_call")]
)
def test_leep_and_nce_match_reference_fixture_in_float64(case, mode):
    ref = np.load(FIXTURES)
    probs, labels = ref[f"{case}/source_probs"], ref[f"{case}/labels"]
    num_classes = int(labels.max()) + 1
    with jax.enable_x64(True):
        leep = run(mode, scoring.leep, probs, labels, num_classes=num_classes)
        nce = run(
            mode,
            scoring.nce,
            probs.argmax(axis=1),
            labels,
            num_classes=num_classes,
            num_source_classes=probs.shape[1],
        )
        assert leep.dtype == jnp.float64
        np.testing.assert_allclose(float(leep), ref[f"{case}/leep"], rtol=0, atol=1e-8)
        np.testing.assert_allclose(float(nce), ref[f"{case}/nce"], rtol=0, atol=1e-8)
        # Without num_classes (eager only): the classes are the values present.
        if mode == "eager_call":
            np.testing.assert_allclose(
                float(scoring.leep(probs, labels)), ref[f"{case}/leep"], atol=1e-8
            )
            np.testing.assert_allclose(
                float(scoring.nce(probs.argmax(1), labels)), ref[f"{case}/nce"], atol=1e-8
            )


@pytest.mark.filterwarnings("ignore::scoring.inputs.LabelWarning")  # labels not 0..C−1 on purpose
def test_leep_and_nce_match_numpy_on_noncontiguous_labels_and_float32():
    rng = np.random.default_rng(0)
    probs = softmax(rng.normal(size=(150, 7)) * 2)
    labels = rng.choice([2, 5, 11], size=150)
    with jax.enable_x64(True):
        np.testing.assert_allclose(
            float(scoring.leep(probs, labels)), numpy_leep(probs, labels), rtol=1e-12
        )
        source = probs.argmax(1)
        np.testing.assert_allclose(
            float(scoring.nce(source, labels)), numpy_nce(source, labels), rtol=1e-12
        )
    leep32 = scoring.leep(probs.astype(np.float32), labels)
    assert leep32.dtype == jnp.float32
    np.testing.assert_allclose(float(leep32), numpy_leep(probs, labels), rtol=1e-5)


def test_leep_ranks_informative_head_above_uninformative():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, 400)
    informative = softmax(5 * np.eye(4)[labels] + rng.normal(size=(400, 4)))
    noise = softmax(rng.normal(size=(400, 4)))
    assert float(scoring.leep(informative, labels)) > float(scoring.leep(noise, labels))
    # Perfect source predictions: P(y|z) is the identity and LEEP = mean log θ(x)_{y}.
    perfect = np.eye(4)[labels]
    np.testing.assert_allclose(float(scoring.leep(perfect, labels)), 0.0, atol=1e-6)


def test_nce_known_answers():
    labels = np.array([0, 0, 1, 1, 2, 2])
    # Source label determines the target label: H(Y|Z) = 0.
    np.testing.assert_allclose(float(scoring.nce(labels + 10, labels)), 0.0, atol=1e-7)
    # One source class: NCE = −H(Y) = −log 3 for uniform Y.
    np.testing.assert_allclose(float(scoring.nce(np.zeros(6, int), labels)), -np.log(3), rtol=1e-6)


def test_leep_rejects_bad_inputs():
    probs = softmax(np.random.default_rng(0).normal(size=(10, 3)))
    labels = np.arange(10) % 2
    with pytest.raises(ValueError, match="source_probs rows must sum to 1"):
        scoring.leep(probs * 2, labels)
    with pytest.raises(ValueError, match="probabilities ≥ 0"):
        scoring.leep(np.log(probs), labels)
    with pytest.raises(ValueError, match="labels has 9 entries"):
        scoring.leep(probs, labels[:9])
    with pytest.raises(TypeError, match="integer class labels"):
        scoring.leep(probs, labels.astype(float))
    with pytest.raises(ValueError, match="finite"):
        scoring.leep(np.where(probs > 0.5, np.nan, probs), labels)
    with pytest.raises(ValueError, match="source_labels must have shape"):
        scoring.nce(np.zeros((10, 2), int), labels)
    with pytest.raises(ValueError, match="source_labels must lie in"):
        scoring.nce(np.arange(10), labels, num_source_classes=3)
