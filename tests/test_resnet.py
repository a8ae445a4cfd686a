"""ResNet: torchvision parameter counts and names, explicit paddings, BatchNorm semantics."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmodels
from jaxmodels.models.resnet import ResidualBlock

# Published parameter counts of torchvision.models.resnet*(weights=...) with 1000 classes.
TORCHVISION_PARAMS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
}


def _shapes(model, size=32):
    return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))


def _randomize(variables, seed=0):
    """Random params and running statistics (var > 0), so no check passes by symmetry.

    Works on ``jax.eval_shape(model.init, ...)`` output: filling shapes with NumPy draws avoids
    compiling the initialisers, which takes seconds per model on a loaded CPU.
    """
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        if name == "var":
            return np.asarray(rng.uniform(0.5, 2.0, leaf.shape), leaf.dtype)
        return np.asarray(rng.normal(0, 0.3, leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, variables)


@pytest.fixture(scope="module")
def tiny():
    model = jaxmodels.create("resnet_tiny", num_classes=7)
    images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    variables = _randomize(_shapes(model))
    return model, variables, images


@pytest.mark.parametrize("name", sorted(TORCHVISION_PARAMS))
def test_param_count_matches_torchvision(name):
    shapes = _shapes(jaxmodels.create(name, num_classes=1000), 64)
    count = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes["params"]))
    assert count == TORCHVISION_PARAMS[name]


def test_param_names_mirror_torchvision_state_dict():
    shapes = _shapes(jaxmodels.create("resnet50", num_classes=1000), 64)
    paths = {
        "/".join(k.key for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(shapes)[0]
    }
    # torchvision key → our path, by the documented rule (written out here, not derived).
    expected = {
        "conv1.weight": "params/conv1/kernel",
        "bn1.weight": "params/bn1/scale",
        "bn1.running_var": "batch_stats/bn1/var",
        "layer1.0.conv3.weight": "params/layer1_0/conv3/kernel",
        "layer1.0.downsample.0.weight": "params/layer1_0/downsample_conv/kernel",
        "layer1.0.downsample.1.running_mean": "batch_stats/layer1_0/downsample_bn/mean",
        "layer3.5.bn2.bias": "params/layer3_5/bn2/bias",
        "layer4.2.conv2.weight": "params/layer4_2/conv2/kernel",
        "fc.weight": "params/fc/kernel",
        "fc.bias": "params/fc/bias",
    }
    assert set(expected.values()) <= paths
    # torchvision: 161 tensors in params (53 conv + 53·2 BN + 2 fc), 53·2 running stats.
    assert sum(p.startswith("params/") for p in paths) == 53 + 53 * 2 + 2
    assert sum(p.startswith("batch_stats/") for p in paths) == 53 * 2
    assert not any("downsample" in p for p in paths if p.split("/")[1] in ("layer1_1", "layer2_1"))
    assert shapes["params"]["layer2_0"]["conv2"]["kernel"].shape == (3, 3, 128, 128)
    assert shapes["params"]["fc"]["kernel"].shape == (2048, 1000)


def _capture(model, variables, images):
    _, state = model.apply(variables, images, capture_intermediates=True, mutable=["intermediates"])
    return state["intermediates"]


def _conv_explicit(x, kernel, stride, pad):
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        (stride, stride),
        [(pad, pad), (pad, pad)],
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision="highest",
    )


def test_stride2_convs_pad_like_torch_not_same(tiny):
    model, variables, images = tiny
    inter = _capture(model, variables, images)
    params = variables["params"]
    stem = inter["conv1"]["__call__"][0]
    want = _conv_explicit(images, params["conv1"]["kernel"], 2, 3)
    np.testing.assert_allclose(stem, want, rtol=1e-5, atol=1e-5)
    same = jax.lax.conv_general_dilated(
        images,
        params["conv1"]["kernel"],
        (2, 2),
        "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    assert np.abs(np.asarray(stem) - np.asarray(same)).max() > 1e-2  # SAME pads (2, 3) here
    # First conv of stage 2: 3×3 stride 2, pad 1, fed by stage 1's output.
    block_in = inter["layer1_0"]["__call__"][0]
    got = inter["layer2_0"]["conv1"]["__call__"][0]
    want = _conv_explicit(block_in, params["layer2_0"]["conv1"]["kernel"], 2, 1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    down = inter["layer2_0"]["downsample_conv"]["__call__"][0]
    want = _conv_explicit(block_in, params["layer2_0"]["downsample_conv"]["kernel"], 2, 0)
    np.testing.assert_allclose(down, want, rtol=1e-5, atol=1e-5)


def test_eval_batchnorm_uses_running_stats_with_eps_1e5(tiny):
    model, variables, images = tiny
    inter = _capture(model, variables, images)
    x = np.asarray(inter["conv1"]["__call__"][0], np.float64)
    bn, stats = variables["params"]["bn1"], variables["batch_stats"]["bn1"]
    want = (x - stats["mean"]) / np.sqrt(np.asarray(stats["var"], np.float64) + 1e-5)
    want = want * bn["scale"] + bn["bias"]
    np.testing.assert_allclose(inter["bn1"]["__call__"][0], want, rtol=1e-5, atol=1e-5)


def test_maxpool_is_3x3_stride2_pad1_not_same(tiny):
    model, variables, images = tiny
    inter = _capture(model, variables, images)
    x = np.maximum(np.asarray(inter["bn1"]["__call__"][0]), 0.0)  # [B, 16, 16, C]
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
    pooled = np.full((x.shape[0], 8, 8, x.shape[-1]), -np.inf, np.float32)
    for i in range(3):
        for j in range(3):
            pooled = np.maximum(pooled, padded[:, i : i + 16 : 2, j : j + 16 : 2])
    block = ResidualBlock(features=8, stride=1, kind="basic")
    block_vars = {k: v["layer1_0"] for k, v in variables.items()}
    got = block.apply(block_vars, jnp.asarray(pooled), False)
    np.testing.assert_allclose(got, inter["layer1_0"]["__call__"][0], rtol=1e-5, atol=1e-5)


def test_bottleneck_strides_on_the_3x3_conv():
    model = jaxmodels.create("resnet_tiny", num_classes=3, block="bottleneck")
    images = jnp.zeros((1, 32, 32, 3))
    shapes = _shapes(model)
    inter = jax.eval_shape(lambda v: _capture(model, v, images), shapes)["layer2_0"]
    assert inter["conv1"]["__call__"][0].shape == (1, 8, 8, 16)  # 1×1, stride 1
    assert inter["conv2"]["__call__"][0].shape == (1, 4, 4, 16)  # 3×3, stride 2
    assert inter["conv3"]["__call__"][0].shape == (1, 4, 4, 64)  # 1×1, ×4 channels
    assert shapes["params"]["fc"]["kernel"].shape == (8 * 8 * 4, 3)


@pytest.mark.parametrize("jit", [False, True])
def test_logits_are_fc_of_features(tiny, jit):
    model, variables, images = tiny
    apply = jax.jit(model.apply, static_argnames=("train", "method")) if jit else model.apply
    logits = apply(variables, images, train=False)
    feats = apply(variables, images, method="features")
    assert logits.shape == (2, 7) and feats.shape == (2, 64)
    assert logits.dtype == jnp.float32 and feats.dtype == jnp.float32
    fc = variables["params"]["fc"]
    want = np.asarray(feats, np.float64) @ np.asarray(fc["kernel"], np.float64) + fc["bias"]
    np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5)
    inter = _capture(model, variables, images)
    pooled = np.asarray(inter["layer4_0"]["__call__"][0]).mean(axis=(1, 2))
    np.testing.assert_allclose(feats, pooled, rtol=1e-5, atol=1e-6)


def test_train_mode_normalises_with_batch_stats_and_updates_momentum_0_1(tiny):
    model, variables, images = tiny
    _, state = model.apply(
        variables,
        images,
        train=True,
        capture_intermediates=True,
        mutable=["batch_stats", "intermediates"],
    )
    x = np.asarray(state["intermediates"]["conv1"]["__call__"][0], np.float64)
    mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
    old = variables["batch_stats"]["bn1"]
    np.testing.assert_allclose(
        state["batch_stats"]["bn1"]["mean"],
        0.9 * np.asarray(old["mean"]) + 0.1 * mean,
        rtol=1e-5,
        atol=1e-5,
    )
    bn = variables["params"]["bn1"]
    want = (x - mean) / np.sqrt(var + 1e-5) * bn["scale"] + bn["bias"]
    np.testing.assert_allclose(
        state["intermediates"]["bn1"]["__call__"][0], want, rtol=1e-4, atol=1e-4
    )


def test_zero_init_last_bn_option():
    assert jaxmodels.create("resnet_tiny", num_classes=2, zero_init_last_bn=True).zero_init_last_bn
    # One block is enough to see the initialiser, and an "rbg" key compiles far quicker than
    # threefry (a whole model's init takes seconds to compile on a loaded CPU).
    block = ResidualBlock(features=4, stride=2, kind="bottleneck", zero_init_last_bn=True)
    key = jax.random.key(0, impl="rbg")
    variables = block.init(key, jnp.zeros((1, 4, 4, 8)), False)["params"]
    assert not np.any(variables["bn3"]["scale"])
    assert np.all(variables["bn1"]["scale"] == 1) and np.all(variables["bn2"]["scale"] == 1)
    assert np.all(variables["downsample_bn"]["scale"] == 1)


def test_rejects_nchw_images(tiny):
    model, variables, _ = tiny
    with pytest.raises(ValueError, match="NHWC"):
        model.apply(variables, jnp.zeros((2, 3, 32, 32)))
