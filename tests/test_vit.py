"""ViT: parameter counts and the vision_transformer layout; forward pass against NumPy."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

import jaxmodels

# Parameter counts of timm's vit_{tiny,small,base,large}_patch16_224 / vit_base_patch32_224.
TIMM_PARAMS = {
    "vit_ti16": 5_717_416,
    "vit_s16": 22_050_664,
    "vit_b16": 86_567_656,
    "vit_l16": 304_326_632,
    "vit_b32": 88_224_232,
}
HEADS = 2


def _shapes(model, size):
    return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))


def _randomize(variables, seed=0):
    """NumPy draws into eval_shape'd variables (skips compiling the initialisers)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda leaf: np.asarray(rng.normal(0, 0.3, leaf.shape), leaf.dtype), variables
    )


def _paths(tree):
    return {
        "/".join(k.key for k in path): tuple(leaf.shape)
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


@pytest.fixture(scope="module")
def tiny():
    model = jaxmodels.create("vit_tiny", num_classes=5)
    images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    return model, _randomize(_shapes(model, 32)), images


@pytest.mark.parametrize("name", sorted(TIMM_PARAMS))
def test_param_count_matches_pytorch(name):
    shapes = _shapes(jaxmodels.create(name, num_classes=1000), 224)
    count = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes["params"]))
    assert count == TIMM_PARAMS[name]


def test_param_tree_is_the_vision_transformer_npz_layout():
    got = _paths(_shapes(jaxmodels.create("vit_tiny", num_classes=5), 32)["params"])
    block = "Transformer/encoderblock_{}/"
    want = {
        "embedding/kernel": (8, 8, 3, 32),
        "embedding/bias": (32,),
        "cls": (1, 1, 32),
        "Transformer/posembed_input/pos_embedding": (1, 17, 32),
        "Transformer/encoder_norm/scale": (32,),
        "Transformer/encoder_norm/bias": (32,),
        "head/kernel": (32, 5),
        "head/bias": (5,),
    }
    for i in range(2):
        b = block.format(i)
        for ln in ("LayerNorm_0", "LayerNorm_2"):
            want[f"{b}{ln}/scale"] = want[f"{b}{ln}/bias"] = (32,)
        for proj in ("query", "key", "value"):
            want[f"{b}MultiHeadDotProductAttention_1/{proj}/kernel"] = (32, 2, 16)
            want[f"{b}MultiHeadDotProductAttention_1/{proj}/bias"] = (2, 16)
        want[f"{b}MultiHeadDotProductAttention_1/out/kernel"] = (2, 16, 32)
        want[f"{b}MultiHeadDotProductAttention_1/out/bias"] = (32,)
        want[f"{b}MlpBlock_3/Dense_0/kernel"] = (32, 64)
        want[f"{b}MlpBlock_3/Dense_0/bias"] = (64,)
        want[f"{b}MlpBlock_3/Dense_1/kernel"] = (64, 32)
        want[f"{b}MlpBlock_3/Dense_1/bias"] = (32,)
    assert got == want


def _layer_norm(x, p):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-6) * p["scale"] + p["bias"]


def _gelu(x, approximate):
    if approximate:
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
    return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def _numpy_vit(params, images, approximate):
    """An independent float64 ViT forward: returns (features [B, D], logits [B, K])."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    x = np.asarray(images, np.float64)
    kernel = p["embedding"]["kernel"]  # [P, P, 3, D]
    size, width = kernel.shape[0], kernel.shape[-1]
    batch, side = x.shape[0], x.shape[1] // size
    patches = x.reshape(batch, side, size, side, size, 3).transpose(0, 1, 3, 2, 4, 5)
    tokens = patches.reshape(batch, side * side, -1) @ kernel.reshape(-1, width)
    tokens = tokens + p["embedding"]["bias"]
    cls = np.broadcast_to(p["cls"], (batch, 1, width))
    x = np.concatenate([cls, tokens], axis=1)
    x = x + p["Transformer"]["posembed_input"]["pos_embedding"]
    for i in range(2):
        blk = p["Transformer"][f"encoderblock_{i}"]
        att = blk["MultiHeadDotProductAttention_1"]
        y = _layer_norm(x, blk["LayerNorm_0"])
        q, k, v = (
            np.einsum("bnd,dhe->bnhe", y, att[n]["kernel"]) + att[n]["bias"]
            for n in ("query", "key", "value")
        )
        scores = np.einsum("bqhe,bkhe->bhqk", q, k) / np.sqrt(q.shape[-1])
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        scores /= scores.sum(-1, keepdims=True)
        o = np.einsum("bhqk,bkhe->bqhe", scores, v)
        x = x + np.einsum("bqhe,hed->bqd", o, att["out"]["kernel"]) + att["out"]["bias"]
        y = _layer_norm(x, blk["LayerNorm_2"])
        mlp = blk["MlpBlock_3"]
        y = _gelu(y @ mlp["Dense_0"]["kernel"] + mlp["Dense_0"]["bias"], approximate)
        x = x + y @ mlp["Dense_1"]["kernel"] + mlp["Dense_1"]["bias"]
    feats = _layer_norm(x, p["Transformer"]["encoder_norm"])[:, 0]
    return feats, feats @ p["head"]["kernel"] + p["head"]["bias"]


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("approximate", [False, True])
def test_forward_matches_numpy_reference(tiny, jit, approximate):
    _, variables, images = tiny
    model = jaxmodels.create("vit_tiny", num_classes=5, gelu_approximate=approximate)
    apply = jax.jit(model.apply, static_argnames=("method",)) if jit else model.apply
    logits = apply(variables, images)
    feats = apply(variables, images, method="features")
    want_feats, want_logits = _numpy_vit(variables["params"], images, approximate)
    assert logits.shape == (2, 5) and feats.shape == (2, 32)
    np.testing.assert_allclose(feats, want_feats, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(logits, want_logits, rtol=1e-4, atol=1e-4)
    # The features are the head's input: logits == head(features) to float32 rounding.
    head = variables["params"]["head"]
    np.testing.assert_allclose(
        logits, np.asarray(feats, np.float64) @ head["kernel"] + head["bias"], rtol=1e-5, atol=1e-5
    )


def test_exact_and_tanh_gelu_differ(tiny):
    _, variables, images = tiny
    exact = jaxmodels.create("vit_tiny", num_classes=5).apply(variables, images)
    tanh = jaxmodels.create("vit_tiny", num_classes=5, gelu_approximate=True).apply(
        variables, images
    )
    assert np.abs(np.asarray(exact) - np.asarray(tanh)).max() > 1e-4


def test_image_size_override_sizes_position_embedding():
    model = jaxmodels.create("vit_tiny", num_classes=3, image_size=48)
    shapes = _shapes(model, 48)
    assert shapes["params"]["Transformer"]["posembed_input"]["pos_embedding"].shape == (1, 37, 32)
    out = jax.eval_shape(model.apply, shapes, jnp.zeros((4, 48, 48, 3)))
    assert out.shape == (4, 3) and out.dtype == jnp.float32
    with pytest.raises(ValueError, match=r"image_size=48"):
        jax.eval_shape(model.apply, shapes, jnp.zeros((4, 32, 32, 3)))


def test_bfloat16_compute_keeps_float32_params_and_outputs(tiny):
    _, variables, images = tiny
    model = jaxmodels.create("vit_tiny", num_classes=5, dtype=jnp.bfloat16)
    shapes = _shapes(model, 32)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(shapes))
    logits = model.apply(variables, images)
    assert logits.dtype == jnp.float32
    want = jaxmodels.create("vit_tiny", num_classes=5).apply(variables, images)
    scale = np.abs(np.asarray(want)).max()
    np.testing.assert_allclose(logits, want, atol=0.05 * scale)  # bfloat16 has 8 mantissa bits
