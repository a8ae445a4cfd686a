"""BatchNorm statistics recomputed over a dataset: exact moments of every BatchNorm's input."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_classifier import init_tiny, random_variables

import jaxmodels
from jaxmodels.sharding import data_mesh
from training import recompute_batch_stats


def _conv_same_stride2(images_NHWC, kernel_HWIO, bias_O):
    """NumPy float64 3×3 stride-2 'SAME' convolution (TinyClassifier's conv), by taps."""
    n, h, w, _ = images_NHWC.shape
    k = kernel_HWIO.shape[0]
    out_h, out_w = -(-h // 2), -(-w // 2)
    pad_h = max((out_h - 1) * 2 + k - h, 0)
    pad_w = max((out_w - 1) * 2 + k - w, 0)
    padded = np.pad(
        images_NHWC,
        ((0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0)),
    )
    out = np.zeros((n, out_h, out_w, kernel_HWIO.shape[-1]))
    for dy in range(k):
        for dx in range(k):
            window = padded[:, dy : dy + 2 * out_h : 2, dx : dx + 2 * out_w : 2, :]
            out += np.einsum("nhwi,io->nhwo", window, kernel_HWIO[dy, dx])
    return out + bias_O


def _dataset(seed=0, sizes=(3, 5, 2), offset=0.5, spread=1.0):
    """Batches of different sizes of [B, 8, 8, 3] images."""
    rng = np.random.default_rng(seed)
    return [(offset + spread * rng.normal(size=(b, 8, 8, 3))).astype(np.float32) for b in sizes]


def test_one_layer_model_gets_the_exact_mean_and_variance_of_its_bn_input():
    model, variables = init_tiny(seed=3, batch_norm=True)
    # BN inputs with means ~1e3 times their spread, where E[x²] − E[x]² in float32 cancels
    conv = dict(variables["params"]["conv"], bias=jnp.asarray([3e3, -1e3, 5e2, 2e3]))
    variables = {**variables, "params": {**variables["params"], "conv": conv}}
    batches = _dataset()
    new = recompute_batch_stats(model, variables, batches)

    params = variables["params"]
    conv_NHWC = _conv_same_stride2(
        np.concatenate(batches).astype(np.float64),
        np.asarray(params["conv"]["kernel"], np.float64),
        np.asarray(params["conv"]["bias"], np.float64),
    )
    mean_C = conv_NHWC.mean(axis=(0, 1, 2))
    var_C = conv_NHWC.var(axis=(0, 1, 2))  # biased, over every position of every image
    assert np.all(np.abs(mean_C) > 300 * np.sqrt(var_C))
    np.testing.assert_allclose(np.asarray(new["batch_stats"]["bn"]["mean"]), mean_C, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(new["batch_stats"]["bn"]["var"]), var_C, rtol=2e-5)

    # only batch_stats changed; the other collections are the caller's own arrays
    assert set(new) == set(variables)
    assert new["params"] is variables["params"]
    assert new["batch_stats"]["bn"]["mean"].dtype == variables["batch_stats"]["bn"]["mean"].dtype


def test_statistics_do_not_depend_on_how_the_dataset_is_batched():
    model, variables = init_tiny(seed=3, batch_norm=True)
    batches = _dataset(seed=1, sizes=(1, 6, 3))
    split = recompute_batch_stats(model, variables, batches)
    whole = recompute_batch_stats(model, variables, [np.concatenate(batches)])
    for stat in ("mean", "var"):
        np.testing.assert_allclose(
            split["batch_stats"]["bn"][stat], whole["batch_stats"]["bn"][stat], rtol=2e-5
        )


def test_sharded_over_a_mesh_gives_the_same_statistics():
    model, variables = init_tiny(seed=3, batch_norm=True)
    batches = _dataset(seed=2, sizes=(8, 16))
    mesh = data_mesh()
    sharded = recompute_batch_stats(model, variables, batches, mesh=mesh)
    single = recompute_batch_stats(model, variables, batches)
    for stat in ("mean", "var"):
        np.testing.assert_allclose(
            sharded["batch_stats"]["bn"][stat], single["batch_stats"]["bn"][stat], rtol=1e-5
        )
    with pytest.raises(ValueError, match="multiple of the 8 devices"):
        recompute_batch_stats(model, variables, _dataset(sizes=(4,)), mesh=mesh)


def _conv_name(bn_path):
    """The conv whose output a jaxmodels ResNet BatchNorm normalises: bn1 ← conv1, …"""
    *parents, bn = bn_path
    return (*parents, bn.replace("bn", "conv"))


def test_resnet_every_batchnorm_gets_the_pooled_moments_of_its_train_mode_inputs():
    model = jaxmodels.create("resnet_tiny", num_classes=3)
    variables = random_variables(model, image_size=16, seed=0)
    rng = np.random.default_rng(0)
    batches = [rng.normal(0.5, 1.0, (b, 16, 16, 3)).astype(np.float32) for b in (4, 6)]
    new = recompute_batch_stats(model, variables, batches)

    # independent record of each BatchNorm's input: the conv outputs of train-mode passes
    conv_outputs = jax.jit(
        lambda v, x: model.apply(
            v,
            x,
            train=True,
            mutable=["batch_stats", "intermediates"],
            capture_intermediates=lambda mdl, _: isinstance(mdl, nn.Conv),
        )[1]["intermediates"]
    )
    pooled: dict = {}
    for images in batches:
        convs = jax.tree_util.tree_flatten_with_path(conv_outputs(variables, images))[0]
        for path, out in convs:
            names = tuple(str(k.key) for k in path[:-2])  # drop '__call__' and the tuple index
            pooled.setdefault(names, []).append(np.asarray(out, np.float64))

    stats = jax.tree_util.tree_flatten_with_path(new["batch_stats"])[0]
    assert len(stats) == 2 * 12  # resnet_tiny has 12 BatchNorms
    for path, value in stats:
        *bn_path, stat = (str(k.key) for k in path)
        inputs = np.concatenate(pooled[_conv_name(bn_path)])  # weights each batch by its size
        expected = inputs.mean(axis=(0, 1, 2)) if stat == "mean" else inputs.var(axis=(0, 1, 2))
        np.testing.assert_allclose(np.asarray(value), expected, rtol=2e-4, atol=1e-6)
    chex_equal = jax.tree.map(
        lambda a, b: bool(jnp.all(a == b)), new["params"], variables["params"]
    )
    assert all(jax.tree.leaves(chex_equal))


def test_recompute_batch_stats_validates_its_inputs():
    model, variables = init_tiny(seed=3, batch_norm=True)
    with pytest.raises(TypeError, match="'params' and 'batch_stats'"):
        recompute_batch_stats(model, {"params": variables["params"]}, _dataset())
    with pytest.raises(ValueError, match="no batch"):
        recompute_batch_stats(model, variables, [])
    with pytest.raises(TypeError, match="float images"):
        recompute_batch_stats(model, variables, [np.zeros((2, 8, 8, 3), np.uint8)])
    with pytest.raises(ValueError, match=r"batches\[1\] must be images \[B, H, W, 3\]"):
        recompute_batch_stats(model, variables, [np.zeros((2, 8, 8, 3)), np.zeros((2, 8, 8))])
    extra = {
        **variables,
        "batch_stats": {**variables["batch_stats"], "other": {"mean": jnp.zeros(4)}},
    }
    with pytest.raises(ValueError, match="batch_stats/other"):
        recompute_batch_stats(model, extra, _dataset())
