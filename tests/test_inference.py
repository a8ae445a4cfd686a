"""Tests for jaxmodels.inference.evaluate (predict, evaluate, prepare) on 8 fake devices, and for the one
evaluation preprocessing every path shares.

References are plain `model.apply` calls on one device, one image at a time, over images
preprocessed on the host by `preprocess_for_eval`: no batching, padding or sharding.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_classifier import random_variables

import jaxmodels
from jaxmodels import jit_cache
from jaxmodels.data import pipeline
from jaxmodels.inference import row_batches

N = 37  # divisible neither by the batch (16) nor by the 8 devices
NUM_CLASSES = 3


@pytest.fixture(scope="module")
def task():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (N, 40, 44, 3)).astype(np.uint8)  # resized and cropped
    labels = rng.integers(0, NUM_CLASSES, N)
    model = jaxmodels.create("resnet_tiny", num_classes=NUM_CLASSES)
    variables = random_variables(model, seed=3)
    prep = jaxmodels.spec_of(model).preprocessing
    host = np.stack([jaxmodels.preprocess_for_eval(im, prep) for im in images])
    reference = np.stack(
        [np.asarray(model.apply(variables, jnp.asarray(x[None]), train=False))[0] for x in host]
    )
    return {"images": images, "labels": labels, "model": model, "variables": variables,
            "prep": prep, "reference": reference}  # fmt: skip


@pytest.mark.parametrize("placement", ["device", "host", "streamed"])
def test_predict_equals_a_plain_apply_loop(task, placement, monkeypatch):
    data = (task["images"], task["labels"])
    if placement != "streamed":
        data = jaxmodels.prepare(data, task["prep"], batch_size=16, placement=placement,
                                 progress=False)  # fmt: skip
        assert data.on_host == (placement == "host")

    def per_batch_agreement(flag):
        raise AssertionError("a set of known length needs no per-batch agreement of processes")

    # (with one process it would return at once; what is checked is that it is not asked)
    monkeypatch.setattr(jaxmodels.sharding, "any_process", per_batch_agreement)
    logits = jaxmodels.predict(task["model"], task["variables"], data, batch_size=16,
                               progress=False)  # fmt: skip
    assert logits.shape == (N, NUM_CLASSES) and logits.dtype == np.float32
    np.testing.assert_allclose(logits, task["reference"], rtol=1e-5, atol=1e-5)


def test_prepared_rows_hold_each_devices_rows_of_every_batch(task):
    """Device s holds rows t·B + s·b + j of every batch t at t·b + j (the batch layout the
    engine's calls read), with its real-row count; a pass's calls are the global batches."""
    prep = task["prep"]
    prepared = jaxmodels.prepare((task["images"], task["labels"]), prep, batch_size=16,
                                 progress=False)  # fmt: skip
    rows, expected = (
        prepared.rows,
        np.stack([jaxmodels.prepare_for_eval(im, prep) for im in task["images"]]),
    )
    steps, b = 3, 2  # 37 rows in batches of 16 on 8 devices
    assert (rows.rows_per_device, rows.capacity, prepared.num_batches) == (steps * b,) * 2 + (
        steps,
    )
    index_TSb = np.arange(steps * 16).reshape(steps, 8, b)
    real_TSb = index_TSb < N
    np.testing.assert_array_equal(rows.counts_S, real_TSb.sum((0, 2)))
    images, labels, valid = rows.arrays
    for shard in images.addressable_shards:
        s = shard.index[0].start // rows.capacity
        for t in range(steps):
            for j in range(b):
                row = index_TSb[t, s, j]
                got = np.asarray(shard.data)[t * b + j]
                np.testing.assert_array_equal(got, expected[row] if row < N else 0 * got)
    np.testing.assert_array_equal(prepared.host_images(), expected)
    np.testing.assert_array_equal(rows.fetch(labels)[0], task["labels"])
    np.testing.assert_array_equal(rows.fetch(valid)[0], np.ones(N, bool))
    calls = list(row_batches.device_batches(rows))
    assert len(calls) == steps
    for t, (_, size, (x_B, y_B, ok_B)) in enumerate(calls):
        assert size == b  # rows per device
        np.testing.assert_array_equal(np.asarray(ok_B), index_TSb[t].ravel() < N)
        real = np.asarray(ok_B)
        np.testing.assert_array_equal(np.asarray(x_B)[real], expected[t * 16 : t * 16 + 16])
        np.testing.assert_array_equal(np.asarray(y_B)[real], task["labels"][t * 16 : t * 16 + 16])


def test_evaluate_matches_numpy_on_every_placement(task):
    ref = task["reference"].astype(np.float64)
    log_probs = ref - np.log(np.exp(ref - ref.max(1, keepdims=True)).sum(1, keepdims=True)) - ref.max(1, keepdims=True)  # fmt: skip
    expected_loss = -log_probs[np.arange(N), task["labels"]].mean()
    expected_acc = np.mean(ref.argmax(1) == task["labels"])
    data = (task["images"], task["labels"])
    for placement in ("device", "host"):
        prepared = jaxmodels.prepare(data, task["prep"], batch_size=16, placement=placement,
                                     progress=False)  # fmt: skip
        result = jaxmodels.evaluate(task["model"], task["variables"], prepared)
        assert result.count == N
        assert result.accuracy == pytest.approx(expected_acc, abs=1e-12)
        assert result.loss == pytest.approx(expected_loss, rel=1e-5)
    streamed = jaxmodels.evaluate(task["model"], task["variables"], data, batch_size=16)
    assert streamed.accuracy == pytest.approx(expected_acc, abs=1e-12)


def test_evaluate_logits_matches_numpy_and_checks_its_inputs():
    rng = np.random.default_rng(5)
    # logits over many scales, some rows far from zero (a naive exp would overflow)
    logits = (rng.normal(size=(50, 4)) * 10.0 ** rng.uniform(-3, 2.5, (50, 1))).astype(np.float32)
    labels = rng.integers(0, 4, 50)
    ref = logits.astype(np.float64)
    top = ref.max(1, keepdims=True)
    log_probs = ref - top - np.log(np.exp(ref - top).sum(1, keepdims=True))
    result = jaxmodels.evaluate_logits(logits, labels)
    assert result.count == 50
    assert result.accuracy == np.mean(ref.argmax(1) == labels)
    assert result.loss == pytest.approx(-log_probs[np.arange(50), labels].mean(), rel=1e-5)
    with pytest.raises(ValueError, match="labels reach 4 but the model has 4 classes"):
        jaxmodels.evaluate_logits(logits, np.where(labels == 0, 4, labels))
    with pytest.raises(ValueError, match="labelled data"):
        jaxmodels.evaluate_logits(logits, np.full(50, -1))
    with pytest.raises(ValueError, match=r"logits \[N, K\] and labels \[N\]"):
        jaxmodels.evaluate_logits(logits, labels[:49])


def test_a_prepared_set_evaluates_new_weights_without_recompiling(task):
    prepared = jaxmodels.prepare((task["images"], task["labels"]), task["prep"],
                                 batch_size=16, progress=False)  # fmt: skip
    jaxmodels.evaluate(task["model"], task["variables"], prepared)
    jaxmodels.predict(task["model"], task["variables"], prepared)
    compiled = jit_cache.size()
    results = set()
    for seed in range(4, 8):
        other = random_variables(task["model"], seed=seed)
        results.add(jaxmodels.evaluate(task["model"], other, prepared).loss)
        direct = jaxmodels.predict(task["model"], other, prepared)
        assert np.isfinite(direct).all()
    assert len(results) == 4  # each candidate is really evaluated
    assert jit_cache.size() == compiled  # and nothing new was built


class PixelProbe(nn.Module):
    """Returns its (normalised) input pixels as features and logits: what a model sees."""

    @nn.compact
    def __call__(self, images, train=False):
        self.param("unused", nn.initializers.zeros, (1,))
        return images.reshape(images.shape[0], -1)

    def features(self, images, train=False):
        return self(images)


def test_every_path_feeds_the_same_pixels(task, tmp_path):
    """Ranking (extract_features), predict/evaluate, a prepared set (soups, cascades, fine-tuning
    evaluation) and the host reference see identical arrays for the same image."""
    prep = jaxmodels.Preprocessing(16, 18, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), "bicubic")
    np.savez(tmp_path / "d.npz", images=task["images"], labels=task["labels"])
    spec = str(tmp_path / "d.npz")
    probe = PixelProbe()
    variables = probe.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
    host = np.stack([jaxmodels.preprocess_for_eval(im, prep) for im in task["images"]])
    host = host.reshape(N, -1)
    ranking = jaxmodels.extract_features(probe, variables, spec, preprocessing=prep,
                                         batch_size=16, progress=False)  # fmt: skip
    predicted = jaxmodels.predict(probe, variables, spec, preprocessing=prep, batch_size=16,
                                  progress=False)  # fmt: skip
    prepared = jaxmodels.prepare(spec, prep, batch_size=8, progress=False)
    from_prepared = jaxmodels.predict(probe, variables, prepared)
    # the three device paths agree bit for bit; each is the host pipeline's pixels, normalised
    np.testing.assert_array_equal(predicted, ranking)
    np.testing.assert_array_equal(from_prepared, ranking)
    np.testing.assert_allclose(ranking, host, rtol=0, atol=1e-6)
    mean, std = np.asarray(prep.mean), np.asarray(prep.std)
    pixels = np.rint((ranking.reshape(N, 16, 16, 3) * std + mean) * 255).astype(np.uint8)
    host_pixels = np.stack([jaxmodels.prepare_for_eval(im, prep) for im in task["images"]])
    np.testing.assert_array_equal(pixels, host_pixels)
    # the uint8 pixels on the device are exactly the host pipeline's resize + crop
    one = jaxmodels.prepare_for_eval(task["images"][5], prep)
    np.testing.assert_array_equal(prepared.host_images()[5], one)
    batches = list(pipeline.eval_dataset(jaxmodels.open_source(spec), prep, global_batch=8))
    np.testing.assert_array_equal(batches[0]["image"][5], one)


def test_bad_arguments_are_clear_errors(task, tmp_path):
    prepared = jaxmodels.prepare((task["images"], task["labels"]), task["prep"],
                                 batch_size=16, progress=False)  # fmt: skip
    other = jaxmodels.Preprocessing(32, 40, (0.5,) * 3, (0.5,) * 3, "bicubic")
    with pytest.raises(ValueError, match="data was prepared with"):
        jaxmodels.predict(task["model"], task["variables"], prepared, preprocessing=other)
    with pytest.raises(TypeError, match="not a jaxmodels architecture"):
        jaxmodels.predict(PixelProbe(), {"params": {}}, (task["images"], task["labels"]))
    with pytest.raises(TypeError, match="with their labels"):
        jaxmodels.predict(task["model"], task["variables"], task["images"])
    with pytest.raises(ValueError, match="batch_size must be a positive multiple of the 8"):
        jaxmodels.prepare((task["images"], task["labels"]), task["prep"], batch_size=12)
    with pytest.raises(ValueError, match="placement must be"):
        jaxmodels.prepare((task["images"], task["labels"]), task["prep"], placement="gpu")
    with pytest.raises(ValueError, match="dtype must be a floating"):
        jaxmodels.predict(task["model"], task["variables"], prepared, dtype=jnp.int32)
    four = jaxmodels.create("resnet_tiny", num_classes=2)
    with pytest.raises(ValueError, match="labels reach 2 but the model has 2 classes"):
        jaxmodels.evaluate(four, random_variables(four), prepared)
    with pytest.raises(jaxmodels.DataError, match="not found"):
        jaxmodels.predict(task["model"], task["variables"], str(tmp_path / "missing.npz"))


def test_bfloat16_prediction_is_close_to_float32(task):
    prepared = jaxmodels.prepare((task["images"], task["labels"]), task["prep"],
                                 batch_size=16, progress=False)  # fmt: skip
    low = jaxmodels.predict(task["model"], task["variables"], prepared, dtype=jnp.bfloat16)
    assert low.dtype == np.float32
    np.testing.assert_allclose(low, task["reference"], rtol=0.05, atol=0.05)


def test_progress_bars_wait_before_drawing():
    """Work that ends within the delay draws no bar, so logs never keep a lone "0%" line."""
    import io

    from jaxmodels.inference import prepared

    bar = prepared.progress_bar(100, True, "test")
    bar.fp = io.StringIO()  # where it would draw
    bar.update(1)
    bar.close()
    assert bar.delay >= 1.0 and "0%" not in bar.fp.getvalue()
