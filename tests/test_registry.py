"""Registry: names and argument checks, specs (preprocessing, cost), preprocessing functions."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmodels
from jaxmodels.data.preprocess import center_crop, normalize, resize_shorter_side
from jaxmodels.models.resnet import ResNet, resnet_macs
from jaxmodels.models.vit import VisionTransformer

FULL_NAMES = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "vit_ti16",
    "vit_s16",
    "vit_b16",
    "vit_l16",
    "vit_b32",
)
# torchvision's published "GFLOPS" (really GMACs, fvcore counting) at 224 px, 2 decimals.
TORCHVISION_GMACS = {
    "resnet18": 1.81,
    "resnet34": 3.66,
    "resnet50": 4.09,
    "resnet101": 7.80,
    "resnet152": 11.51,
    "vit_b16": 17.56,
    "vit_b32": 4.41,
    "vit_l16": 61.55,
}


def test_every_name_creates_its_family():
    assert set(FULL_NAMES) | {"resnet_tiny", "vit_tiny"} == set(jaxmodels.MODEL_NAMES)
    for name in jaxmodels.MODEL_NAMES:
        model = jaxmodels.create(name, num_classes=10)
        family = ResNet if name.startswith("resnet") else VisionTransformer
        assert type(model) is family and model.num_classes == 10 and not model.ssf
        assert jaxmodels.spec(name).family == ("resnet" if family is ResNet else "vit")


@pytest.mark.parametrize("name", ["resnet_tiny", "vit_tiny", "resnet50", "vit_s16"])
def test_apply_shapes_and_feature_dim(name):
    model = jaxmodels.create(name, num_classes=10)
    spec = jaxmodels.spec(name)
    size = spec.preprocessing.image_size
    images = jnp.zeros((3, size, size, 3))
    shapes = jax.eval_shape(model.init, jax.random.key(0), images)
    logits = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), shapes, images)
    feats = jax.eval_shape(lambda v, x: model.apply(v, x, method="features"), shapes, images)
    assert logits.shape == (3, 10)
    assert feats.shape == (3, spec.feature_dim)


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError, match=r"resnet50.*vit_b16"):
        jaxmodels.create("resnet51", num_classes=10)
    with pytest.raises(ValueError, match="unknown model name"):
        jaxmodels.spec("vit_h14")


@pytest.mark.parametrize("bad", [0, -3, 2.0, True, None])
def test_num_classes_must_be_positive_int(bad):
    with pytest.raises(ValueError, match="num_classes"):
        jaxmodels.create("vit_tiny", num_classes=bad)


def test_num_classes_is_keyword_only_and_required():
    with pytest.raises(TypeError):
        jaxmodels.create("vit_tiny", 10)
    with pytest.raises(TypeError):
        jaxmodels.create("vit_tiny")


def test_bad_overrides():
    with pytest.raises(TypeError, match="patch_size"):
        jaxmodels.create("resnet50", num_classes=10, patch_size=16)  # not a ResNet field
    with pytest.raises(TypeError, match="unknown overrides"):
        jaxmodels.create("vit_b16", num_classes=10, hidden=3)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        jaxmodels.create("vit_b16", num_classes=10, image_size=200)
    with pytest.raises(ValueError, match="multiple of num_heads"):
        jaxmodels.create("vit_tiny", num_classes=10, num_heads=3)
    with pytest.raises(ValueError, match="block"):
        jaxmodels.create("resnet_tiny", num_classes=10, block="wide")
    with pytest.raises(ValueError, match="stage_sizes"):
        jaxmodels.create("resnet_tiny", num_classes=10, stage_sizes=(1, 0))
    with pytest.raises(ValueError, match="width"):
        jaxmodels.create("resnet_tiny", num_classes=10, width=0)
    with pytest.raises(TypeError, match="ssf"):
        jaxmodels.create("resnet_tiny", num_classes=10, ssf="yes")


@pytest.mark.parametrize("name", sorted(TORCHVISION_GMACS))
def test_macs_match_torchvision_published_table(name):
    spec = jaxmodels.spec(name)
    assert round(spec.macs_per_image / 1e9, 2) == TORCHVISION_GMACS[name]
    assert spec.flops_per_image == 2 * spec.macs_per_image


def test_vit_cost_follows_image_size():
    s224, s384 = jaxmodels.spec("vit_b16"), jaxmodels.spec("vit_b16", image_size=384)
    assert s384.preprocessing.image_size == 384
    # tokens 197 → 577: the projections scale with N, attention with N².
    n1, n2, d, m = 197, 577, 768, 3072
    per_block = lambda n: 4 * n * d * d + 2 * n * n * d + 2 * n * d * m
    embed = lambda n: (n - 1) * 16 * 16 * 3 * d
    assert s384.macs_per_image - s224.macs_per_image == (
        12 * (per_block(n2) - per_block(n1)) + embed(n2) - embed(n1)
    )


def _xla_flops(model, size):
    images = jnp.zeros((1, size, size, 3))
    shapes = jax.eval_shape(model.init, jax.random.key(0), images)
    cost = jax.jit(model.apply).lower(shapes, images).compile().cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]


# XLA counts 2 flops per multiply-accumulate of every dot/conv, like ours, plus ~1 per element of
# each elementwise op (bias/BN affine, ReLU, residual add, LayerNorm, softmax, GELU, pooling) that
# the analytic count leaves out. At these widths every activation element costs hundreds of matmul
# flops but only ~10-20 elementwise ones (measured ratio 1.01-1.03), so XLA's total must lie in
# [analytic, 1.05·analytic]: an analytic count that over-counts (e.g. padded taps) falls below 1,
# one that misses a layer (a 1×1 downsample, an attention matmul) goes above 1.05.
@pytest.mark.parametrize(
    "name, overrides",
    [
        ("vit_tiny", dict(width=512, num_heads=4, mlp_dim=2048)),
        ("resnet_tiny", dict(width=32)),
        ("resnet_tiny", dict(width=32, block="bottleneck")),
    ],
)
def test_flops_agree_with_xla_cost_analysis(name, overrides):
    size = 64 if name.startswith("resnet") else 32
    model = jaxmodels.create(name, num_classes=10, **overrides)
    xla = _xla_flops(model, size)
    spec = jaxmodels.spec(name, num_classes=10, image_size=size, **overrides)
    if name.startswith("resnet"):
        # XLA skips kernel taps that fall on padding; compare with that convention.
        analytic = 2 * resnet_macs(
            stage_sizes=(1, 1, 1, 1),
            block=model.block,
            width=32,
            num_classes=10,
            image_size=size,
            count_padding=False,
        )
        assert analytic < spec.flops_per_image  # the published convention counts padded taps
    else:
        analytic = spec.flops_per_image
    assert analytic <= xla <= 1.05 * analytic, (xla, analytic)


def test_preprocessing_defaults():
    r = jaxmodels.spec("resnet50").preprocessing
    assert (r.image_size, r.resize_size, r.interpolation) == (224, 256, "bilinear")
    assert r.mean == (0.485, 0.456, 0.406) and r.std == (0.229, 0.224, 0.225)
    v = jaxmodels.spec("vit_b16").preprocessing
    assert (v.image_size, v.resize_size, v.interpolation) == (224, 248, "bicubic")
    assert jaxmodels.spec("vit_b16", image_size=384).preprocessing.resize_size == 426
    assert jaxmodels.spec("resnet_tiny").preprocessing.image_size == 32


@pytest.mark.parametrize("as_jax", [False, True])
def test_normalize_on_host_and_device(as_jax):
    pixels = np.array([[0, 51, 255]], np.uint8).T.repeat(3, axis=1)  # [3, 3]: three RGB pixels
    images = jnp.asarray(pixels) if as_jax else pixels
    vit = normalize(images, jaxmodels.spec("vit_b16").preprocessing)
    assert isinstance(vit, jax.Array) == as_jax and vit.dtype == np.float32
    np.testing.assert_allclose(vit[:, 0], [-1.0, 51 / 127.5 - 1, 1.0], rtol=1e-6)
    res = normalize(images, jaxmodels.spec("resnet50").preprocessing)
    np.testing.assert_allclose(
        res[1], (0.2 - np.array([0.485, 0.456, 0.406])) / [0.229, 0.224, 0.225], rtol=1e-5
    )


def test_center_crop_and_resize():
    image = np.arange(6 * 10 * 3, dtype=np.uint8).reshape(6, 10, 3)
    np.testing.assert_array_equal(center_crop(image, 4), image[1:5, 3:7])
    np.testing.assert_array_equal(center_crop(jnp.asarray(image)[None], 4)[0], image[1:5, 3:7])
    with pytest.raises(ValueError, match="smaller than the crop"):
        center_crop(image, 7)
    rng = np.random.default_rng(0)
    smooth = np.kron(rng.integers(0, 256, (6, 9, 3)), np.ones((8, 8, 1))).astype(np.uint8)
    host = resize_shorter_side(smooth, 24, "bilinear")
    assert host.shape == (24, 36, 3) and host.dtype == np.uint8
    device = resize_shorter_side(jnp.asarray(smooth), 24, "bilinear")
    assert device.shape == (24, 36, 3) and device.dtype == jnp.uint8
    # PIL and jax.image.resize use the same antialiased triangle filter; they differ by rounding
    # and at block edges.
    assert np.abs(host.astype(int) - np.asarray(device).astype(int)).mean() < 2.0


def test_preprocess_for_eval_shape():
    image = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    prep = jaxmodels.spec("resnet_tiny").preprocessing  # resize 36, crop 32
    out = jaxmodels.preprocess_for_eval(image, prep)
    assert out.shape == (32, 32, 3) and out.dtype == np.float32
    with pytest.raises(ValueError, match="interpolation"):
        jaxmodels.Preprocessing(32, 36, (0.5,) * 3, (0.5,) * 3, "nearest")
    with pytest.raises(ValueError, match="resize_size"):
        jaxmodels.Preprocessing(32, 30, (0.5,) * 3, (0.5,) * 3, "bilinear")


class PreprocessSplitTest(chex.TestCase):
    """Host prepare_for_eval + device normalize (inside jit) = host preprocess_for_eval."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_device_normalize_of_prepared_images_matches_host(self):
        images = np.random.default_rng(1).integers(0, 256, (2, 40, 60, 3), dtype=np.uint8)
        prep = jaxmodels.spec("resnet_tiny").preprocessing
        host = np.stack([jaxmodels.preprocess_for_eval(image, prep) for image in images])
        prepared = np.stack([jaxmodels.prepare_for_eval(image, prep) for image in images])
        assert prepared.dtype == np.uint8
        device = self.variant(lambda x: normalize(x, prep))(jnp.asarray(prepared))
        assert isinstance(device, jax.Array)
        chex.assert_shape(device, (2, 32, 32, 3))
        chex.assert_trees_all_close(np.asarray(device), host, atol=1e-6)
