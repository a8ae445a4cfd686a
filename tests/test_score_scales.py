"""Every feature-based score at feature magnitudes from 1e-15 to 1e20, N > D and N < D, in float32
and float64: a finite value equal to float64's (float32 to 1e-4), never NaN or a silent 0.

The scores that are invariant to multiplying the features by a constant (the H-scores, GBC, N-LEEP,
and SFDA for a fixed shrinkage) are also checked against float64 at unit scale; LogME and TransRate
depend on the scale through constants of their definitions (the reference's eps, the distortion ε),
so for them float64 at each scale is the answer.
"""

import warnings

import jax
import numpy as np
import pytest

import scoring

SCALES = [1e-15, 1e-5, 1.0, 1e2, 1e4, 1e10, 1e20]
SHAPES = {"n_gt_d": (30, 8), "n_lt_d": (12, 20)}
C = 3

SCORES = {
    "logme": (lambda f, y: scoring.logme(f, y).score, False),
    "hscore": (scoring.hscore, True),
    "regularized_hscore": (scoring.regularized_hscore, True),
    "transrate": (scoring.transrate, False),
    "gbc": (lambda f, y: scoring.gbc(f, y, pca_dim=6), True),
    "sfda": (scoring.sfda, False),
    "nleep": (lambda f, y: scoring.nleep(f, y, components_per_class=2), True),
}


def features(n, d, seed=0):
    """Overlapping classes with a mean offset and per-dimension spreads over 1.5 decades."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % C
    spreads = np.logspace(0, -1.5, d)
    feats = rng.normal(size=(n, d)) * spreads + 0.4 * rng.normal(size=(C, d))[labels] + 0.5
    return feats, labels


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", SCORES)
def test_score_is_finite_and_agrees_with_float64_at_every_scale(name, shape):
    fn, scale_invariant = SCORES[name]
    feats, labels = features(*SHAPES[shape])
    with jax.enable_x64(True), warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow or invalid-value warnings either
        unit = float(fn(feats, labels))
        for scale in SCALES:
            scaled = feats * scale
            want = float(fn(scaled, labels))
            got = float(fn(scaled.astype(np.float32), labels))
            assert np.isfinite(want) and np.isfinite(got), (scale, want, got)
            # TransRate at 1e-15 is ~1e-53, below float32's range: there float32 gives 0.
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-30, err_msg=f"×{scale:g}")
            if scale_invariant:
                np.testing.assert_allclose(want, unit, rtol=1e-8, err_msg=f"×{scale:g}")
