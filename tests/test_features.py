"""Tests for jaxmodels.inference.features: sharded, padded, prefetched extraction on 8 fake CPU devices.

The reference is a plain loop of `model.apply` on one device, one image at a time, so batching,
padding, sharding, prefetch and re-cutting of batches are all checked against code that has
none of them.
"""

import itertools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmodels
from jaxmodels import sharding
from jaxmodels.inference import compute_dtype
from jaxmodels.inference import features as features_lib

NUM_CLASSES = 3


class TinyNet(nn.Module):
    """A conv + BatchNorm + Dense net with the `features`/`__call__` protocol of jaxmodels."""

    num_classes: int = NUM_CLASSES

    def setup(self):
        self.conv = nn.Conv(6, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        self.norm = nn.BatchNorm(use_running_average=True)
        self.head = nn.Dense(self.num_classes)

    def features(self, images_BHWC):
        x = nn.relu(self.norm(self.conv(images_BHWC)))
        return x.mean(axis=(1, 2))

    def __call__(self, images_BHWC, train=False):
        return self.head(self.features(images_BHWC))


class TinyNetWithDtype(TinyNet):
    """TinyNet whose layers take an explicit computation dtype, like jaxmodels' models."""

    dtype: Any = jnp.float32

    def setup(self):
        pad = ((1, 1), (1, 1))
        self.conv = nn.Conv(6, (3, 3), strides=(2, 2), padding=pad, dtype=self.dtype)
        self.norm = nn.BatchNorm(use_running_average=True, dtype=self.dtype)
        self.head = nn.Dense(self.num_classes, dtype=self.dtype)


def _init(model, seed=0):
    x = jnp.zeros((1, 8, 8, 3))
    variables = model.init(jax.random.key(seed), x)
    # Non-trivial running statistics, so batch_stats really matter.
    rng = np.random.default_rng(seed)
    stats = variables["batch_stats"]["norm"]
    variables["batch_stats"]["norm"] = {
        "mean": jnp.asarray(rng.normal(size=stats["mean"].shape), jnp.float32),
        "var": jnp.asarray(rng.uniform(0.5, 2.0, size=stats["var"].shape), jnp.float32),
    }
    return variables


def _images(n, seed=1):
    return np.random.default_rng(seed).normal(size=(n, 8, 8, 3)).astype(np.float32)


def _reference(model, variables, images):
    """One image at a time on the default device: no batching, padding or sharding."""
    feats = [np.asarray(model.apply(variables, x[None], method="features"))[0] for x in images]
    logits = [np.asarray(model.apply(variables, x[None], train=False))[0] for x in images]
    return np.stack(feats), np.stack(logits)


@pytest.fixture(scope="module")
def tiny():
    model = TinyNet()
    variables = _init(model)
    images = _images(37)  # 37 is not divisible by the batch (16) nor the 8 devices
    feats, logits = _reference(model, variables, images)
    return model, variables, images, feats, logits


def test_eight_fake_devices_are_present():
    assert jax.device_count() == 8


def test_extract_features_matches_single_device_loop_with_padding(tiny):
    model, variables, images, ref_feats, ref_logits = tiny
    feats, logits = jaxmodels.extract_features(
        model, variables, images, batch_size=16, return_logits=True, progress=False
    )
    assert feats.shape == (37, 6) and logits.shape == (37, NUM_CLASSES)
    assert isinstance(feats, np.ndarray) and feats.dtype == np.float32
    np.testing.assert_allclose(feats, ref_feats, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-6)


def test_extract_features_without_logits_returns_features_only(tiny):
    model, variables, images, ref_feats, _ = tiny
    feats = jaxmodels.extract_features(model, variables, images, batch_size=8, progress=False)
    np.testing.assert_allclose(feats, ref_feats, rtol=1e-5, atol=1e-6)


def test_logits_reuse_the_backbone_pass(tiny):
    # features and logits are traced as two applies; XLA must merge the shared backbone, so the
    # compiled step costs the features plus the head, not twice the features.
    model, variables, images, _, _ = tiny
    mesh = sharding.data_mesh()
    x = sharding.shard_local_batch(images[:16], mesh)
    v = sharding.replicate(variables, mesh)

    def flops(with_logits):
        step = features_lib._extract_step(model, None, None, mesh, with_logits)
        return step.jitted.lower(v, x).compile().cost_analysis()["flops"]

    def unmerged(v, x):  # two passes XLA cannot merge: the second input differs
        return model.apply(v, x, method="features"), model.apply(v, x + 1.0)

    backbone, both = flops(False), flops(True)
    twice = jax.jit(unmerged).lower(v, x).compile().cost_analysis()["flops"]
    assert twice > 1.8 * backbone  # the measurement can tell one pass from two
    assert backbone < both < 1.1 * backbone


def test_iterable_of_uneven_batches_is_recut(tiny):
    model, variables, images, ref_feats, ref_logits = tiny
    labels = np.arange(37, dtype=np.int32) % 5
    cuts = [0, 5, 6, 30, 37]  # pieces of 5, 1, 24, 7 rows; re-cut into batches of 16
    dict_batches = [
        {"image": images[a:b], "label": labels[a:b]} for a, b in itertools.pairwise(cuts)
    ]
    feats, logits, got_labels = jaxmodels.extract_features(
        model,
        variables,
        iter(dict_batches),
        batch_size=16,
        return_logits=True,
        return_labels=True,
        progress=False,
    )
    np.testing.assert_allclose(feats, ref_feats, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got_labels, labels)

    plain_batches = (images[a:b] for a, b in itertools.pairwise(cuts))
    feats = jaxmodels.extract_features(
        model, variables, plain_batches, batch_size=8, progress=False
    )
    np.testing.assert_allclose(feats, ref_feats, rtol=1e-5, atol=1e-6)

    tuple_batches = [(images[:20], labels[:20]), (images[20:], labels[20:])]
    _, got_labels = jaxmodels.extract_features(
        model, variables, tuple_batches, batch_size=8, return_labels=True, progress=False
    )
    np.testing.assert_array_equal(got_labels, labels)


def test_explicit_smaller_mesh(tiny):
    model, variables, images, ref_feats, _ = tiny
    mesh = sharding.data_mesh(jax.devices()[:2])
    feats = jaxmodels.extract_features(
        model, variables, images, batch_size=6, mesh=mesh, progress=False
    )
    np.testing.assert_allclose(feats, ref_feats, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model_cls", [TinyNet, TinyNetWithDtype])
def test_bfloat16_is_close_to_float32(tiny, model_cls):
    # bfloat16 keeps 8 significand bits (relative step 2**-8 ≈ 0.4%); through one conv with
    # 27 inputs, BatchNorm and a mean, errors stay within 2% of the features' scale.
    _, variables, images, ref_feats, ref_logits = tiny
    model = model_cls()
    feats, logits = jaxmodels.extract_features(
        model,
        variables,
        images,
        batch_size=16,
        dtype=jnp.bfloat16,
        return_logits=True,
        progress=False,
    )
    assert feats.dtype == np.float32
    assert not np.array_equal(feats, ref_feats)  # the bfloat16 path really ran
    scale = np.abs(ref_feats).max()
    np.testing.assert_allclose(feats, ref_feats, atol=0.02 * scale, rtol=0)
    np.testing.assert_allclose(logits, ref_logits, atol=0.02 * np.abs(ref_logits).max(), rtol=0)


def test_bfloat16_clones_models_with_a_dtype_field():
    # A layer with dtype=float32 would silently compute in float32 on bfloat16 inputs.
    model = compute_dtype.apply_to_model(TinyNetWithDtype(), jnp.bfloat16)
    assert model.dtype == jnp.bfloat16
    assert compute_dtype.apply_to_model(TinyNet(), jnp.bfloat16) == TinyNet()


def _gram_update(carry, feats_BD, labels_B, valid_B):
    f = jnp.where(valid_B[:, None], feats_BD, 0.0)
    onehot = jax.nn.one_hot(labels_B, 5) * valid_B[:, None]
    return {
        "ftf": carry["ftf"] + f.T @ f,
        "fty": carry["fty"] + f.T @ onehot,
        "n": carry["n"] + valid_B.sum(dtype=jnp.int32),
    }


def _gram_init(d):
    return {
        "ftf": np.zeros((d, d), np.float32),
        "fty": np.zeros((d, 5), np.float32),
        "n": np.zeros((), np.int32),
    }


def test_stream_reduce_gram_matches_numpy(tiny):
    model, variables, images, ref_feats, _ = tiny
    labels = (np.arange(37) * 7) % 5
    carry = jaxmodels.stream_reduce(
        model,
        variables,
        images,
        labels=labels,
        init=_gram_init(6),
        update=_gram_update,
        batch_size=16,
        progress=False,
    )
    f = ref_feats.astype(np.float64)
    np.testing.assert_allclose(np.asarray(carry["ftf"]), f.T @ f, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        np.asarray(carry["fty"]), f.T @ np.eye(5)[labels], rtol=1e-5, atol=1e-5
    )
    assert int(carry["n"]) == 37


def test_stream_reduce_takes_labels_from_dict_batches(tiny):
    model, variables, images, ref_feats, _ = tiny
    labels = np.arange(37) % 5
    batches = [
        {"image": images[:21], "label": labels[:21]},
        {"image": images[21:], "label": labels[21:]},
    ]
    carry = jaxmodels.stream_reduce(
        model,
        variables,
        batches,
        init=_gram_init(6),
        update=_gram_update,
        batch_size=8,
        progress=False,
    )
    np.testing.assert_allclose(
        np.asarray(carry["fty"]),
        ref_feats.astype(np.float64).T @ np.eye(5)[labels],
        rtol=1e-5,
        atol=1e-5,
    )


def test_stream_reduce_rejects_update_that_changes_carry(tiny):
    model, variables, images, _, _ = tiny
    with pytest.raises(ValueError, match="update must return a carry"):
        jaxmodels.stream_reduce(
            model,
            variables,
            images,
            init=np.zeros((6,), np.float32),
            update=lambda c, f, y, v: f.sum(0, keepdims=True),
            batch_size=8,
            progress=False,
        )


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"batch_size": 12}, ValueError, "batch_size must be a positive multiple of the 8"),
        ({"batch_size": 0}, ValueError, "batch_size must be a positive multiple"),
        ({"batch_size": 8.0}, TypeError, "batch_size must be an int"),
        ({"batch_size": 8, "dtype": jnp.int32}, ValueError, "dtype must be a floating"),
        ({"batch_size": 8, "dtype": "nonsense"}, ValueError, "dtype must be a floating"),
        ({"batch_size": 8, "mesh": "all"}, TypeError, "mesh must be a jax.sharding.Mesh"),
    ],
)
def test_bad_arguments_raise(tiny, kwargs, error, match):
    model, variables, images, _, _ = tiny
    with pytest.raises(error, match=match):
        jaxmodels.extract_features(model, variables, images, progress=False, **kwargs)


def test_bad_inputs_raise(tiny):
    model, variables, images, _, _ = tiny
    extract = lambda imgs, **kw: jaxmodels.extract_features(
        model, variables, imgs, batch_size=8, progress=False, **kw
    )
    with pytest.raises(TypeError, match="model must be a Flax module with a `features`"):
        jaxmodels.extract_features(nn.Dense(3), variables, images, batch_size=8)
    with pytest.raises(ValueError, match=r"images must be a non-empty array \[N, H, W, C\]"):
        extract(images[0])
    with pytest.raises(ValueError, match="must not be empty"):
        extract(iter([]))
    with pytest.raises(TypeError, match="images must be an array"):
        extract(42)
    with pytest.raises(ValueError, match=r"batch 0 must be images \[b, H, W, C\]"):
        extract([images[0]])
    with pytest.raises(ValueError, match="image shape of the first"):
        extract([images[:3], images[:3, :4]])
    with pytest.raises(ValueError, match="without an 'image' key"):
        extract([{"img": images[:3]}])
    with pytest.raises(ValueError, match="return_labels=True needs labels"):
        extract(images, return_labels=True)
    with pytest.raises(ValueError, match=r"labels must have shape \[N\]"):
        jaxmodels.stream_reduce(
            model,
            variables,
            images,
            labels=np.zeros(3),
            init=np.zeros(()),
            update=lambda c, f, y, v: c,
            batch_size=8,
            progress=False,
        )
    with pytest.raises(TypeError, match="update must be callable"):
        jaxmodels.stream_reduce(
            model, variables, images, init=np.zeros(()), update=None, batch_size=8
        )


def test_gather_rows_concatenates_uneven_processes_in_order(monkeypatch):
    # Simulates two processes holding 3 and 1 rows: the collective sees padded arrays of the
    # largest count, and the result must be trimmed back and concatenated in process order.
    other = np.array([[9.0, 9.5]])
    local = np.arange(6, dtype=np.float64).reshape(3, 2)

    def fake_allgather(x):
        if x.shape == (1,):  # the row counts
            return np.stack([x, np.array([len(other)])])
        padded = np.zeros_like(x)
        padded[: len(other)] = other
        return np.stack([x, padded])

    monkeypatch.setattr(sharding.jax, "process_count", lambda: 2)
    monkeypatch.setattr(sharding.multihost_utils, "process_allgather", fake_allgather)
    np.testing.assert_array_equal(sharding.gather_rows(local), np.concatenate([local, other]))
    # The other process has run out of images: only this process's flag decides.
    monkeypatch.setattr(
        sharding.multihost_utils, "process_allgather", lambda x: np.stack([x, np.zeros_like(x)])
    )
    assert sharding.any_process(False) is False and sharding.any_process(True) is True
    assert sharding.check_batch_size(16, sharding.data_mesh()) == 8  # per-process share
