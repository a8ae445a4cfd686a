"""Streamed statistics: scores from `ScoreStats` equal the in-memory scores.

Batches are padded to a fixed size (N not divisible by the batch or the 8 fake devices) and
sharded over a 'data' mesh, as `jaxmodels.stream_reduce` does; the end-to-end test runs
`stream_reduce` itself on a tiny Flax model. The features have a decaying spectrum (Gram condition
number ~1e8) and a mean far from 0, which is what float32 sums of FᵀF could not survive.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import jaxmodels
import scoring
from scoring import stats as stats_lib

N, D, C, K, BATCH = 203, 16, 4, 6, 32  # 203 = 6·32 + 11 rows: the last batch is padded


def softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def make_data(seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, C, N)
    scales = np.logspace(0, -4, D)  # feature variances from 1 down to 1e-8
    centers = 2 * rng.normal(size=(C, D))
    feats = (rng.normal(size=(N, D)) + centers[labels]) * scales + 3.0
    probs = softmax(rng.normal(size=(N, K)) + 2 * np.eye(C, K)[labels])
    return feats, labels, probs


def padded_batches(*arrays, batch=BATCH):
    """Yields (arrays..., valid) in fixed-size batches, zero/−1 padded like stream_reduce."""
    n = arrays[0].shape[0]
    for start in range(0, n, batch):
        count = min(batch, n - start)
        out = []
        for a in arrays:
            pad_value = -1 if a.dtype.kind == "i" else 0
            block = np.full((batch, *a.shape[1:]), pad_value, a.dtype)
            block[:count] = a[start : start + count]
            out.append(block)
        yield (*out, np.arange(batch) < count)


def _mesh_and_jitted():
    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    replicated = NamedSharding(mesh, PartitionSpec())
    return (
        NamedSharding(mesh, PartitionSpec("data")),
        jax.jit(stats_lib.update, out_shardings=replicated),
        jax.jit(stats_lib.leep_pass_update, out_shardings=replicated),
    )


SHARD, UPDATE, LEEP_UPDATE = _mesh_and_jitted()  # jitted once, so tests share compilations


def stream(feats, labels, probs, dtype):
    shard, update, leep_update = SHARD, UPDATE, LEEP_UPDATE
    acc = stats_lib.init(D, C, num_source_classes=K, dtype=dtype)
    for f, y, p, valid in padded_batches(feats.astype(np.float32), labels, probs):
        acc = update(acc, *(jax.device_put(a, shard) for a in (f, y, valid, p)))
    # LEEP needs P̂(y|z) first: a second pass over the source probabilities.
    second = stats_lib.leep_pass_init(acc)
    for p, y, valid in padded_batches(probs, labels, batch=48):
        second = leep_update(second, *(jax.device_put(a, shard) for a in (p, y, valid)))
    return acc, second


def assert_logme_equal(got, want, rtol):
    for field in ("score", "evidence", "alpha", "beta"):
        np.testing.assert_allclose(
            np.asarray(getattr(got, field)),
            np.asarray(getattr(want, field)),
            rtol=rtol,
            err_msg=field,
        )
    # Weights: relative to the largest, as small entries carry the rounding of large ones.
    want_weights = np.asarray(want.weights)
    np.testing.assert_allclose(
        np.asarray(got.weights), want_weights, rtol=0, atol=rtol * np.abs(want_weights).max()
    )


def assert_scores_equal(acc, second, feats64, labels, probs, rtol):
    """Every streamed score against the in-memory one on float64 features (LogME by the same
    "factor" method: float64's default "gram" method resolves this data's smallest Gram
    eigenvalue, 1e-10·λ_max, only to ~1e-6 of itself)."""
    in_memory = scoring.logme(feats64, labels, num_classes=C, method="factor")
    assert_logme_equal(scoring.logme_from_stats(acc), in_memory, rtol)
    np.testing.assert_allclose(
        float(scoring.hscore_from_stats(acc)), float(scoring.hscore(feats64, labels)), rtol=rtol
    )
    np.testing.assert_allclose(
        float(scoring.nce_from_stats(acc)), float(scoring.nce(probs.argmax(1), labels)), rtol=rtol
    )
    np.testing.assert_allclose(
        float(scoring.leep_from_stats(acc, second)), float(scoring.leep(probs, labels)), rtol=rtol
    )


def test_streamed_scores_equal_in_memory_scores_in_float64():
    feats, labels, probs = make_data()
    feats32 = feats.astype(np.float32)  # what extraction delivers
    with jax.enable_x64(True):
        acc, second = stream(feats, labels, probs, jnp.float64)
        assert float(acc.num_samples) == N and acc.r_factor.dtype == jnp.float64
        assert_scores_equal(acc, second, feats32.astype(np.float64), labels, probs, 1e-9)


def test_float32_statistics_match_float64_scores():
    # The default accumulators: float32 all the way, on features whose Gram condition number
    # is ~1e8 and whose mean is 3 against spreads down to 1e-4.
    feats, labels, probs = make_data(2)
    feats32 = feats.astype(np.float32)
    acc, second = stream(feats, labels, probs, jnp.float32)
    assert acc.r_factor.dtype == jnp.float32
    with jax.enable_x64(True):
        f64 = feats32.astype(np.float64)
        assert np.linalg.cond(f64 - f64.mean(0)) ** 2 > 1e7
        ref = scoring.logme(f64, labels, num_classes=C)
        np.testing.assert_allclose(float(scoring.logme_from_stats(acc).score), ref.score, rtol=1e-5)
        # Per-class evidences are differences of O(1) terms (one is 0.13 here): float32 rounding
        # of the R factor moves them by ~1e-6 absolute, so compare relative to the largest.
        evidence = np.asarray(scoring.logme_from_stats(acc).evidence)
        np.testing.assert_allclose(
            evidence, ref.evidence, rtol=0, atol=1e-5 * np.abs(ref.evidence).max()
        )
        np.testing.assert_allclose(
            float(scoring.hscore_from_stats(acc)), float(scoring.hscore(f64, labels)), rtol=1e-5
        )
        np.testing.assert_allclose(
            float(scoring.nce_from_stats(acc)), float(scoring.nce(probs.argmax(1), labels)), 1e-6
        )
        np.testing.assert_allclose(
            float(scoring.leep_from_stats(acc, second)), float(scoring.leep(probs, labels)), 1e-6
        )


def test_merge_of_two_shards_equals_stream_of_all():
    feats, labels, probs = make_data(1)
    with jax.enable_x64(True):
        whole, second = stream(feats, labels, probs, jnp.float64)
        first, _ = stream(feats[:100], labels[:100], probs[:100], jnp.float64)
        rest, _ = stream(feats[100:], labels[100:], probs[100:], jnp.float64)
        merged = stats_lib.merge(first, rest)
        # R factors agree up to the signs of their rows; everything else is a sum.
        np.testing.assert_allclose(
            np.abs(np.asarray(merged.r_factor)), np.abs(np.asarray(whole.r_factor)), atol=1e-9
        )
        for got, want in zip(merged[2:], whole[2:], strict=True):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-12)
        assert float(merged.num_samples) == N
        f64 = feats.astype(np.float32).astype(np.float64)
        assert_scores_equal(merged, second, f64, labels, probs, 1e-9)
    with pytest.raises(ValueError, match="cannot merge"):
        stats_lib.merge(first, stats_lib.init(D + 1, C, num_source_classes=K))


def test_hscore_from_stats_drops_the_null_space_of_rank_deficient_features():
    # Rank 5 of 8, mean 100 against unit spread: the centred factor has 3 singular values at
    # rounding level, which the pseudo-inverse must drop (they hold the class indicators' parts
    # outside the features' span). The exact answer is the H-score of the 5 independent columns.
    rng = np.random.default_rng(6)
    labels = rng.integers(0, C, N)
    base = rng.normal(size=(N, 5)) + 1.5 * rng.normal(size=(C, 5))[labels]
    feats = np.concatenate([base, base[:, :2] @ rng.normal(size=(2, 3))], axis=1) + 100.0
    for dtype in (jnp.float32, jnp.float64):
        with jax.enable_x64(dtype == jnp.float64):
            acc = stats_lib.init(8, C, dtype=dtype)
            for f, y, valid in padded_batches(feats.astype(dtype), labels):
                acc = jax.jit(stats_lib.update)(acc, f, y, valid)
            want = float(scoring.hscore(base.astype(np.float64), labels))
            rtol = 1e-4 if dtype == jnp.float32 else 1e-9
            np.testing.assert_allclose(float(scoring.hscore_from_stats(acc)), want, rtol=rtol)


class LinearFeatures(nn.Module):
    """Flattened pixels → Dense(D) features → Dense(K) head: the jaxmodels protocol."""

    @nn.compact
    def features(self, images_BHWC):
        flat = images_BHWC.reshape(images_BHWC.shape[0], -1)
        return nn.Dense(D, name="embed")(flat)

    @nn.compact
    def __call__(self, images_BHWC, train=False):
        return nn.Dense(K, name="head")(self.features(images_BHWC))


def test_stream_reduce_end_to_end_equals_extract_features():
    rng = np.random.default_rng(3)
    num_images = 37  # not a multiple of the batch (16) nor of the 8 devices
    images = rng.normal(size=(num_images, 4, 4, 3)).astype(np.float32) + np.float32(1)
    labels = rng.integers(0, C, num_images)
    model = LinearFeatures()
    variables = model.init(jax.random.key(0), images[:1])
    head = variables["params"]["head"]

    def update(acc, feats_BD, labels_B, valid_B):
        probs_BK = jax.nn.softmax(feats_BD @ head["kernel"] + head["bias"][None, :])
        return stats_lib.update(acc, feats_BD, labels_B, valid_B, probs_BK)

    acc = jaxmodels.stream_reduce(
        model,
        variables,
        images,
        labels=labels,
        init=stats_lib.init(D, C, num_source_classes=K),  # float32, as rank.py streams
        update=update,
        batch_size=16,
        progress=False,
    )
    feats, logits = jaxmodels.extract_features(
        model, variables, images, batch_size=16, return_logits=True, progress=False
    )
    with jax.enable_x64(True):
        f64 = feats.astype(np.float64)
        assert float(acc.num_samples) == num_images
        assert_logme_equal(
            scoring.logme_from_stats(acc), scoring.logme(f64, labels, num_classes=C), 1e-5
        )
        np.testing.assert_allclose(
            float(scoring.hscore_from_stats(acc)), float(scoring.hscore(f64, labels)), rtol=1e-5
        )
        probs = softmax(logits.astype(np.float64))
        np.testing.assert_allclose(
            float(scoring.nce_from_stats(acc)),
            float(scoring.nce(probs.argmax(1), labels)),
            rtol=1e-6,
        )
        second = stats_lib.leep_pass_update(
            stats_lib.leep_pass_init(acc), jnp.asarray(probs), jnp.asarray(labels)
        )
        np.testing.assert_allclose(
            float(scoring.leep_from_stats(acc, second)),
            float(scoring.leep(probs, labels)),
            rtol=1e-5,
        )


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="num_classes must be an int ≥ 2"):
        stats_lib.init(4, 1)
    acc = stats_lib.init(4, 3)
    with pytest.raises(ValueError, match=r"feats_BD must have shape \[B, 4\]"):
        stats_lib.update(acc, jnp.zeros((2, 5)), jnp.zeros(2, int))
    with pytest.raises(ValueError, match="source_probs_BK must be given exactly"):
        stats_lib.update(acc, jnp.zeros((2, 4)), jnp.zeros(2, int), None, jnp.ones((2, 3)) / 3)
    with pytest.raises(ValueError, match="at least 2 samples"):
        scoring.logme_from_stats(acc)
    acc = stats_lib.update(acc, jnp.ones((3, 4)), jnp.arange(3))
    with pytest.raises(ValueError, match="no source predictions"):
        scoring.nce_from_stats(acc)
    with pytest.raises(TypeError, match="must be a ScoreStats"):
        scoring.hscore_from_stats({"gram": 1})


def test_rows_with_out_of_range_labels_are_dropped_from_every_statistic():
    rng = np.random.default_rng(5)
    feats = rng.normal(size=(6, D)).astype(np.float32)
    probs = softmax(rng.normal(size=(6, K)))
    labels = np.array([0, 1, -1, 2, C, 3])  # rows 2 and 4 carry no valid label
    keep = np.array([0, 1, 3, 5])
    acc = stats_lib.update(stats_lib.init(D, C, K), feats, labels, None, probs)
    ref = stats_lib.update(stats_lib.init(D, C, K), feats[keep], labels[keep], None, probs[keep])
    for got, want in zip(acc, ref, strict=True):  # |R|: factors agree up to row signs
        np.testing.assert_allclose(np.abs(got), np.abs(want), rtol=1e-6, atol=1e-6)


def test_buffered_statistics_equal_every_batch_refactored():
    """A buffer of 3 batches (R refactored at the 4th and 7th batch, the rest at the flush) gives
    the scores of one refactor per batch; counts and joints never wait for the buffer."""
    feats, labels, probs = make_data()
    with jax.enable_x64(True):
        acc, second = stream(feats, labels, probs, jnp.float64)
        buf = stats_lib.buffered(stats_lib.init(D, C, num_source_classes=K, dtype=jnp.float64), 96)
        update = jax.jit(stats_lib.buffered_update)
        refactors = []
        for f, y, p, valid in padded_batches(feats.astype(np.float32), labels, probs):
            r_before = np.asarray(buf.stats.r_factor)
            buf = update(buf, f, y, valid, p)
            refactors.append(not np.array_equal(np.asarray(buf.stats.r_factor), r_before))
        assert refactors == [False, False, False, True, False, False, True]  # 7 batches of 32
        assert int(buf.filled) == 32 and float(buf.stats.num_samples) == N
        got = stats_lib.flushed(buf)
        for field in ("num_samples", "class_count_C", "source_argmax_joint_CK"):
            np.testing.assert_array_equal(getattr(got, field), getattr(acc, field), err_msg=field)
        # (the reference summed over 8 devices: another order)
        np.testing.assert_allclose(got.source_joint_CK, acc.source_joint_CK, rtol=1e-14)
        feats64 = feats.astype(np.float32).astype(np.float64)
        assert_scores_equal(got, second, feats64, labels, probs, 1e-9)
    with pytest.raises(ValueError, match="exceeds the buffer's 16"):
        stats_lib.buffered_update(
            stats_lib.buffered(stats_lib.init(D, C), 16), feats[:32], labels[:32]
        )
