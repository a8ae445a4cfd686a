"""Weight-space merges: WiSE-FT interpolation, task arithmetic, TIES and DARE."""

import json

import chex
import numpy as np
import pytest

from training import dare, interpolate, sweep_interpolation, task_arithmetic, ties


def _tree(a, b, step=3):
    """Two float leaves (a: 3 entries, b: 2) and an integer counter."""
    return {
        "layer": {"a": np.asarray(a, np.float32), "b": np.asarray(b, np.float32)},
        "step": np.int32(step),
    }


def _random_trees(n, seed=0, shape=(6, 7)):
    rng = np.random.default_rng(seed)
    return [
        {
            "w": (rng.normal(size=shape) * 10.0 ** rng.uniform(-3, 3, shape)).astype(np.float32),
            "v": rng.normal(size=(5,)).astype(np.float32),
            "count": np.int32(2),
        }
        for _ in range(n)
    ]


def _assert_close_in_float32(got, expected, *magnitudes):
    """|got − expected| within 1e-6 of the summed magnitudes that float32 arithmetic rounds."""
    scale = sum(np.abs(np.asarray(m, np.float64)) for m in magnitudes)
    error = np.abs(np.asarray(got, np.float64) - np.asarray(expected, np.float64))
    assert np.all(error <= 1e-6 * scale), (error / scale).max()


def _values(tree):
    return np.concatenate([np.asarray(tree["layer"]["a"]), np.asarray(tree["layer"]["b"])])


# ------------------------------------------------------------------ interpolation


def test_interpolate_is_the_weighted_mean_and_hits_both_ends_exactly():
    a, b = _random_trees(2)
    for alpha in (0.0, 0.3, 1.0, 1.5):
        mixed = interpolate(a, b, alpha)
        for key in ("w", "v"):
            expected = (1 - alpha) * a[key].astype(np.float64) + alpha * b[key].astype(np.float64)
            scale = np.abs(a[key]) + np.abs(b[key])
            assert np.all(np.abs(np.asarray(mixed[key]) - expected) <= 4e-7 * scale)
        assert int(mixed["count"]) == 2
    chex.assert_trees_all_equal(interpolate(a, b, 0.0), a)
    chex.assert_trees_all_equal(interpolate(a, b, 1.0), b)


def test_sweep_interpolation_finds_the_best_alpha():
    a, b = _random_trees(2)
    target = 0.7 * a["v"] + 0.3 * b["v"]  # closest to alpha = 0.3
    score = lambda v: -float(np.sum((np.asarray(v["v"]) - target) ** 2))
    best, sweep = sweep_interpolation(a, b, score)
    assert sweep.alphas == tuple(i / 10 for i in range(11))
    assert sweep.best_alpha == 0.3
    assert sweep.scores[3] == max(sweep.scores)
    chex.assert_trees_all_equal(best, interpolate(a, b, 0.3))
    json.dumps(sweep._asdict())
    with pytest.raises(ValueError, match="alphas must be a non-empty"):
        sweep_interpolation(a, b, score, alphas=[])


@pytest.mark.parametrize("alpha", [float("nan"), float("inf")])
def test_interpolate_refuses_non_finite_alpha(alpha):
    a, b = _random_trees(2)
    with pytest.raises(ValueError, match="alpha must be finite"):
        interpolate(a, b, alpha)


# ------------------------------------------------------------------ task arithmetic


def test_task_arithmetic_adds_the_scaled_sum_of_task_vectors():
    base, *tuned = _random_trees(4)
    merged = task_arithmetic(base, tuned, 0.4)
    for key in ("w", "v"):
        b64 = base[key].astype(np.float64)
        expected = b64 + 0.4 * sum(t[key].astype(np.float64) - b64 for t in tuned)
        scale = np.abs(b64) + sum(np.abs(t[key]) for t in tuned)
        assert np.all(np.abs(np.asarray(merged[key]) - expected) <= 1e-6 * scale)
    # one model (a tree or a loader) is one task vector
    single = task_arithmetic(base, tuned[0], 1.0)
    chex.assert_trees_all_equal(single, task_arithmetic(lambda: base, [lambda: tuned[0]], 1.0))
    for key in ("w", "v"):  # base + (tuned − base) is tuned up to float32 rounding
        _assert_close_in_float32(single[key], tuned[0][key], base[key], tuned[0][key])


# ------------------------------------------------------------------ TIES


BASE = _tree([1, 2, 3], [4, 5])
TASKS = [  # task vectors τ_t, written out; the models are base + τ_t
    [3, -1, 0.5, 2, -4],
    [-2, 5, -1, 1, -4.5],
    [1, -6, 2, -3, 0.1],
]


def test_ties_on_a_hand_checked_tree():
    # N = 5 entries, density 0.4 → each task keeps its k = 2 largest magnitudes:
    #   τ̂1 = [3, 0, 0, 0, -4], τ̂2 = [0, 5, 0, 0, -4.5], τ̂3 = [0, -6, 0, -3, 0]
    # mass Σ τ̂ = [3, -1, 0, -3, -8.5] → elected signs [+, -, 0, -, -]
    # disjoint mean over the agreeing entries: [3, -6, 0, -3, (-4 - 4.5) / 2]
    merged_tau = np.asarray([3, -6, 0, -3, -4.25])
    tuned = [_tree(_values(BASE)[:3] + t[:3], _values(BASE)[3:] + t[3:]) for t in TASKS]
    for scale in (1.0, 0.5):
        merged = ties(BASE, tuned, density=0.4, scale=scale)
        np.testing.assert_array_equal(_values(merged), _values(BASE) + scale * merged_tau)
        assert int(merged["step"]) == 3


def _ties_numpy(base, tuned, density):
    """TIES written out over the flat float64 vector of all float leaves."""
    flat = lambda t: np.concatenate([np.asarray(t[k], np.float64).ravel() for k in ("v", "w")])
    b = flat(base)
    taus = np.stack([flat(t) - b for t in tuned])
    k = max(1, round(density * b.size))
    trimmed = np.zeros_like(taus)
    for t, tau in enumerate(taus):
        top = np.argsort(-np.abs(tau), kind="stable")[:k]
        trimmed[t, top] = tau[top]
    sign = np.sign(trimmed.sum(axis=0))
    agree = (np.sign(trimmed) == sign) & (trimmed != 0)
    merged = np.where(agree, trimmed, 0).sum(0) / np.maximum(agree.sum(0), 1)
    out = b + merged
    return {"v": out[:5], "w": out[5:].reshape(6, 7)}


def test_ties_matches_a_numpy_transcription_on_random_trees():
    base, *tuned = _random_trees(4, seed=1)
    merged = ties(base, tuned, density=0.2)
    expected = _ties_numpy(base, tuned, 0.2)
    for key in ("v", "w"):
        _assert_close_in_float32(merged[key], expected[key], base[key], *(t[key] for t in tuned))


def test_ties_with_everything_kept_and_one_model_is_that_model():
    base, tuned = _random_trees(2, seed=2)
    merged = ties(base, [tuned], density=1.0)
    for key in ("w", "v"):
        _assert_close_in_float32(merged[key], tuned[key], base[key], tuned[key])


@pytest.mark.parametrize("density", [0.0, 1.5, float("nan")])
def test_ties_refuses_bad_density(density):
    base, tuned = _random_trees(2)
    with pytest.raises(ValueError, match="density"):
        ties(base, [tuned], density=density)


# ------------------------------------------------------------------ DARE


def test_dare_without_dropping_is_task_arithmetic():
    base, *tuned = _random_trees(3)
    chex.assert_trees_all_close(
        dare(base, tuned, drop=0.0, seed=0, scale=0.7), task_arithmetic(base, tuned, 0.7)
    )


def test_dare_keeps_each_entry_rescaled_or_drops_it():
    rng = np.random.default_rng(0)
    base = {"w": rng.normal(size=(100, 100)).astype(np.float32)}
    tau = rng.normal(size=(100, 100)).astype(np.float32)
    tuned = {"w": base["w"] + tau}
    tau = tuned["w"].astype(np.float64) - base["w"]  # the task vector as float32 holds it
    for drop in (0.5, 0.9):
        delta = np.asarray(dare(base, [tuned], drop=drop, seed=1)["w"], np.float64) - base["w"]
        kept = np.abs(delta) > 1e-4 * np.abs(tau)
        np.testing.assert_allclose(delta[kept], tau[kept] / (1 - drop), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(delta[~kept], 0.0, atol=1e-6)
        sigma = np.sqrt(drop * (1 - drop) / tau.size)
        assert abs(kept.mean() - (1 - drop)) < 5 * sigma


def test_dare_is_unbiased_and_reproducible():
    base, tuned = _random_trees(2, seed=4)
    tau = tuned["w"].astype(np.float64) - base["w"]
    merges = [np.asarray(dare(base, tuned, drop=0.5, seed=s)["w"]) - base["w"] for s in range(200)]
    # mean of 200 masks: each entry kept ~Binomial(200, 0.5)/100 times τ → within 5σ of τ
    np.testing.assert_allclose(
        np.mean(merges, axis=0), tau, atol=5 * 0.5 / np.sqrt(200) * 2 * np.abs(tau).max()
    )
    chex.assert_trees_all_equal(dare(base, tuned, seed=7), dare(base, tuned, seed=7))
    assert not np.array_equal(merges[0], merges[1])
    # the models' masks are independent: twice the same model at drop 0.5 gives 0, 2τ or 4τ
    # (kept by none, one or both) with probabilities 1/4, 1/2, 1/4
    twice = np.asarray(dare(base, [tuned, tuned], drop=0.5, seed=5)["w"], np.float64) - base["w"]
    ratio = np.round(twice / tau)
    assert set(np.unique(ratio)) <= {0.0, 2.0, 4.0}
    assert abs(np.mean(ratio == 2.0) - 0.5) < 5 * np.sqrt(0.25 / ratio.size)
    # each model's mask depends on its position only: an unchanged second model adds nothing
    chex.assert_trees_all_equal(dare(base, [tuned, base], seed=3), dare(base, [tuned], seed=3))


def test_dare_masks_are_the_documented_draws():
    """Model t's mask of leaf j is ``bernoulli(fold_in(fold_in(key(seed), t), j), 1 − p, shape)``:
    the merge a seed gives is fixed by JAX's public PRNG, whatever program draws it."""
    import jax

    base, *tuned = _random_trees(3, seed=2)
    merged = dare(base, tuned, drop=0.6, seed=11, scale=1.0)
    key = jax.random.key(11)
    expected = {}
    for j, name in enumerate(("v", "w")):  # the leaves in tree order
        tau = sum(
            np.asarray(
                jax.random.bernoulli(
                    jax.random.fold_in(jax.random.fold_in(key, t), j), 0.4, base[name].shape
                ),
                np.float32,
            )
            / np.float32(0.4)
            * (m[name] - base[name])
            for t, m in enumerate(tuned)
        )
        expected[name] = base[name] + tau
    chex.assert_trees_all_close({k: merged[k] for k in ("v", "w")}, expected, rtol=1e-6, atol=1e-6)
    assert merged["count"] == base["count"]


def test_dare_refuses_bad_drop_and_seed():
    base, tuned = _random_trees(2)
    with pytest.raises(ValueError, match=r"drop must be in \[0, 1\)"):
        dare(base, tuned, drop=1.0, seed=0)
    with pytest.raises(TypeError, match="seed must be an int"):
        dare(base, tuned, seed=0.5)


# ------------------------------------------------------------------ running statistics


def _bn_variables(var, w):
    return {
        "params": {"dense": {"kernel": np.asarray(w, np.float32)}},
        "batch_stats": {
            "bn": {"mean": np.zeros(3, np.float32), "var": np.full(3, var, np.float32)}
        },
    }


@pytest.mark.parametrize(
    "merge",
    [
        lambda base, tuned: task_arithmetic(base, tuned, 1.0),
        lambda base, tuned: ties(base, tuned, density=1.0),
        lambda base, tuned: dare(base, tuned, drop=0.9, seed=0),
    ],
    ids=["task_arithmetic", "ties", "dare"],
)
def test_merges_add_to_weights_and_keep_the_base_running_statistics(merge):
    """Six runs whose running variances fell from 1.0 to 0.8: adding their differences would
    give 1 − 6·0.2 < 0; the merge keeps the base's statistics and merges only ``params``."""
    base = _bn_variables(1.0, [1.0, 2.0, 3.0])
    tuned = [_bn_variables(0.8, [1.0 + 0.1 * (t + 1), 2.0, 3.0]) for t in range(6)]
    merged = merge(base, tuned)
    chex.assert_trees_all_equal(merged["batch_stats"], base["batch_stats"])
    assert merged["params"]["dense"]["kernel"].dtype == np.float32
    assert not np.allclose(merged["params"]["dense"]["kernel"], base["params"]["dense"]["kernel"])
    # a tree without a params collection is all weights, as before
    bare = task_arithmetic(base["params"], [t["params"] for t in tuned], 1.0)
    chex.assert_trees_all_close(bare, task_arithmetic(base, tuned, 1.0)["params"])
