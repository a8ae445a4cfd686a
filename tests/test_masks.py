"""Tests for training.masks: which leaves each fine-tuning mode trains and weight decay touches."""

import jax.numpy as jnp
import numpy as np
import pytest
from tiny_classifier import init_tiny

from jaxmodels.models import paths
from training import masks

ALL_SSF_BN = {
    "bn/bias", "bn/scale", "conv/bias", "conv/kernel", "hidden/bias", "hidden/kernel",
    "head/bias", "head/kernel", "norm/bias", "norm/scale",
    "ssf_bn/scale", "ssf_bn/shift", "ssf_conv/scale", "ssf_conv/shift",
    "ssf_norm/scale", "ssf_norm/shift",
}  # fmt: skip

# Written out by hand from the paper's definitions, not computed by the rules under test.
EXPECTED_TRAINABLE = {
    "full": ALL_SSF_BN,
    "linear": {"head/bias", "head/kernel"},
    "bitfit": {"head/bias", "head/kernel", "bn/bias", "conv/bias", "hidden/bias", "norm/bias"},
    "ssf": {
        "head/bias", "head/kernel", "ssf_bn/scale", "ssf_bn/shift", "ssf_conv/scale",
        "ssf_conv/shift", "ssf_norm/scale", "ssf_norm/shift",
    },
}  # fmt: skip


def _selected(mask) -> set[str]:
    return {k for k, v in paths.flatten(mask).items() if v}


@pytest.fixture(scope="module")
def ssf_params():
    _, variables = init_tiny(ssf=True, batch_norm=True)
    return variables["params"]


@pytest.mark.parametrize("mode", masks.MODES)
def test_trainable_mask_selects_the_mode_leaves(ssf_params, mode):
    assert set(paths.flatten(ssf_params)) == ALL_SSF_BN
    assert _selected(masks.trainable_mask(ssf_params, mode)) == EXPECTED_TRAINABLE[mode]


def test_mask_leaves_are_python_bools_with_params_structure(ssf_params):
    mask = masks.trainable_mask(ssf_params, "ssf")
    assert set(paths.flatten(mask)) == ALL_SSF_BN
    assert all(type(v) is bool for v in paths.flatten(mask).values())


def test_weight_decay_skips_ssf_biases_and_norm_scales(ssf_params):
    assert _selected(masks.weight_decay_mask(ssf_params)) == {
        "conv/kernel", "hidden/kernel", "head/kernel"
    }  # fmt: skip


def test_unknown_mode_is_a_value_error(ssf_params):
    with pytest.raises(ValueError, match=r"mode must be one of .*'lora'"):
        masks.trainable_mask(ssf_params, "lora")


def test_ssf_mode_on_a_model_without_ssf_is_a_value_error():
    _, variables = init_tiny(ssf=False)
    with pytest.raises(ValueError, match=r"'ssf' selects no parameter it is defined by.*ssf=True"):
        masks.trainable_mask(variables["params"], "ssf")


def test_linear_mode_without_head_is_a_value_error():
    _, variables = init_tiny(with_head=False)
    with pytest.raises(ValueError, match=r"'linear' selects no parameter it is defined by.*'head'"):
        masks.trainable_mask(variables["params"], "linear")


def test_non_mapping_params_is_a_type_error():
    with pytest.raises(TypeError, match="params must be a nested mapping"):
        masks.trainable_mask([jnp.zeros(3)], "full")


def test_split_then_merge_gives_back_params(ssf_params):
    mask = masks.trainable_mask(ssf_params, "ssf")
    trainable, frozen = masks.split_params(ssf_params, mask)
    assert set(trainable) == EXPECTED_TRAINABLE["ssf"]
    assert set(frozen) == ALL_SSF_BN - EXPECTED_TRAINABLE["ssf"]
    merged = paths.flatten(masks.merge_params(trainable, frozen))
    for path, leaf in paths.flatten(ssf_params).items():
        np.testing.assert_array_equal(merged[path], leaf)


def test_split_with_a_mask_of_other_paths_is_a_value_error(ssf_params):
    _, other = init_tiny(ssf=False)
    mask = masks.trainable_mask(other["params"], "full")
    with pytest.raises(ValueError, match="mask paths differ from params paths"):
        masks.split_params(ssf_params, mask)


def test_count_params_counts_scalars(ssf_params):
    # conv 3·3·3·4+4, bn 4+4, fc 4·8+8, head 8·3+3, norm 4+4, ssf 2·(4+4+4)
    assert masks.count_params(ssf_params) == 112 + 8 + 40 + 27 + 8 + 24


def test_mask_over_empty_params_is_a_value_error():
    with pytest.raises(ValueError, match="mode 'full' selects no parameter of this model"):
        masks.trainable_mask({}, "full")


def _shapes(name, ssf, num_classes=5):
    import jax

    import jaxmodels

    model = jaxmodels.create(name, num_classes=num_classes, ssf=ssf)
    return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


def test_ssf_mode_on_vit_tiny_trains_ssf_sites_and_head():
    params = _shapes("vit_tiny", ssf=True)["params"]
    trainable, _ = masks.split_params(params, masks.trainable_mask(params, "ssf"))
    # width 32, mlp 64, depth 2: per block γ,β on LN0 32 + qkv 96 + out 32 + LN2 32 + fc1 64 +
    # fc2 32; plus the patch embedding 32 and final norm 32; head 32·5 + 5
    ssf_count = 2 * (32 + 32) + 2 * 2 * (32 + 96 + 32 + 32 + 64 + 32)
    assert masks.count_params(trainable) == ssf_count + 32 * 5 + 5
    assert {k for k in trainable if not k.startswith("head/")} == {
        k for k in paths.flatten(params) if "/ssf_" in "/" + k
    }


def test_resnet_head_is_fc_and_bitfit_trains_batchnorm_shifts():
    assert masks.head_name_for("resnet_tiny") == "fc"
    assert masks.head_name_for("vit_tiny") == "head"
    params = _shapes("resnet_tiny", ssf=False)["params"]
    linear, _ = masks.split_params(params, masks.trainable_mask(params, "linear", "fc"))
    assert set(linear) == {"fc/kernel", "fc/bias"}
    bitfit, _ = masks.split_params(params, masks.trainable_mask(params, "bitfit", "fc"))
    # convs have no bias: BN shifts of stem 8, stages 8·2, 16·3, 32·3, 64·3 (with downsample) + fc
    assert masks.count_params(bitfit) == 8 + 16 + 48 + 96 + 192 + 64 * 5 + 5
    with pytest.raises(ValueError, match="no top-level module named 'head'"):
        masks.trainable_mask(params, "linear")


def test_ssf_mode_on_vit_b16_trains_205824_ssf_values_plus_head():
    import jax

    import jaxmodels

    model = jaxmodels.create("vit_b16", num_classes=10, ssf=True)
    params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))["params"]
    trainable, frozen = masks.split_params(params, masks.trainable_mask(params, "ssf"))
    # the SSF paper's count for ViT-B/16 (issue 5), plus the 768·10 + 10 head
    assert masks.count_params(trainable) == 205_824 + 7_690
    assert masks.count_params(frozen) == 86_567_656 - (768 * 1000 + 1000)  # timm's ViT-B/16
