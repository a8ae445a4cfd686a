"""SSF: parameter sites and counts, masks, and folding into the plain model."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmodels
from jaxmodels.models.ssf import ScaleShift, fold, is_ssf_path, ssf_mask


def _shapes(model, size):
    return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))


def _paths(tree):
    return [tuple(k.key for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _randomize(variables, seed=0):
    """NumPy draws: weights N(0, 0.3), γ ~ N(1, 0.3), β ~ N(0, 0.3), BN var ~ U(0.5, 2)."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        names = [k.key for k in path]
        if names[-1] == "var":
            value = rng.uniform(0.5, 2.0, leaf.shape)
        elif is_ssf_path(path) and names[-1] == "scale":
            value = rng.normal(1.0, 0.3, leaf.shape)
        else:
            value = rng.normal(0.0, 0.3, leaf.shape)
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, variables)


def _strip_ssf(tree):
    return {
        k: (_strip_ssf(v) if isinstance(v, dict) else v)
        for k, v in tree.items()
        if not k.startswith("ssf_")
    }


def test_vit_b16_has_205824_ssf_params():
    plain = _shapes(jaxmodels.create("vit_b16", num_classes=1000), 224)["params"]
    tuned = _shapes(jaxmodels.create("vit_b16", num_classes=1000, ssf=True), 224)["params"]
    leaves = jax.tree_util.tree_flatten_with_path(tuned)[0]
    ssf_count = sum(math.prod(leaf.shape) for path, leaf in leaves if is_ssf_path(path))
    assert ssf_count == 205_824
    total = lambda tree: sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))
    assert total(tuned) - total(plain) == 205_824


@pytest.mark.parametrize("name, size", [("vit_b16", 224), ("resnet50", 64)])
def test_ssf_false_is_exactly_the_plain_tree(name, size):
    plain = _shapes(jaxmodels.create(name, num_classes=10), size)
    tuned = _shapes(jaxmodels.create(name, num_classes=10, ssf=True), size)
    assert not any(is_ssf_path(p) for p in _paths(plain))
    stripped = {k: _strip_ssf(v) for k, v in tuned.items()}
    assert jax.tree.structure(stripped) == jax.tree.structure(plain)
    assert jax.tree.map(lambda s: s.shape, stripped) == jax.tree.map(lambda s: s.shape, plain)


def test_vit_ssf_sites_are_the_reference_ones():
    tuned = _shapes(jaxmodels.create("vit_tiny", num_classes=5, ssf=True), 32)["params"]
    sites = {"/".join(p[:-1]) for p in _paths(tuned) if is_ssf_path(p)}
    want = {"ssf_embedding", "Transformer/ssf_encoder_norm"}
    for i in range(2):
        b = f"Transformer/encoderblock_{i}/"
        att = b + "MultiHeadDotProductAttention_1/"
        want |= {b + "ssf_LayerNorm_0", b + "ssf_LayerNorm_2"}
        want |= {att + "ssf_query", att + "ssf_key", att + "ssf_value", att + "ssf_out"}
        want |= {b + "MlpBlock_3/ssf_Dense_0", b + "MlpBlock_3/ssf_Dense_1"}
    assert sites == want
    # query/key/value together carry the 3·D channels of timm's fused qkv.
    att = tuned["Transformer"]["encoderblock_0"]["MultiHeadDotProductAttention_1"]
    assert sum(att[f"ssf_{n}"]["scale"].shape[0] for n in ("query", "key", "value")) == 3 * 32


def test_resnet_ssf_follows_every_batchnorm():
    tuned = _shapes(jaxmodels.create("resnet50", num_classes=10, ssf=True), 64)["params"]
    modules = {p[:-1] for p in _paths(tuned)}
    bns = {m for m in modules if m[-1].startswith(("bn", "downsample_bn"))}
    ssfs = {m for m in modules if m[-1].startswith("ssf_")}
    assert len(bns) == 53
    assert ssfs == {(*m[:-1], "ssf_" + m[-1]) for m in bns}
    for m in bns:
        node = tuned
        for k in m:
            node = node[k]
        parent = tuned
        for k in m[:-1]:
            parent = parent[k]
        assert parent["ssf_" + m[-1]]["shift"].shape == node["bias"].shape


def test_ssf_mask_and_is_ssf_path():
    tuned = _shapes(jaxmodels.create("vit_tiny", num_classes=5, ssf=True), 32)["params"]
    mask = ssf_mask(tuned)
    assert jax.tree.structure(mask) == jax.tree.structure(tuned)
    flags = jax.tree.leaves(mask)
    assert all(isinstance(f, bool) for f in flags)
    assert sum(flags) == 2 * (2 + 2 * 8)  # scale+shift × (embedding, final norm, 8 per block)
    assert is_ssf_path(("params", "layer1_0", "ssf_bn1", "scale"))
    assert not is_ssf_path(("params", "layer1_0", "bn1", "scale"))
    assert not is_ssf_path(("params", "head", "kernel"))


def test_scale_shift_init_and_broadcast():
    layer = ScaleShift(feature_ndim=2)
    x = jax.random.normal(jax.random.key(3), (2, 5, 100, 40))
    variables = jax.jit(layer.init)(jax.random.key(0), x)
    scale, shift = variables["params"]["scale"], variables["params"]["shift"]
    assert scale.shape == shift.shape == (4000,)
    # γ ~ N(1, 0.02), β ~ N(0, 0.02): with 4000 draws the sample std is within ±5% of 0.02.
    assert abs(float(scale.mean()) - 1.0) < 0.002 and abs(float(shift.mean())) < 0.002
    assert 0.019 < float(scale.std()) < 0.021 and 0.019 < float(shift.std()) < 0.021
    want = np.asarray(x) * np.asarray(scale).reshape(100, 40) + np.asarray(shift).reshape(100, 40)
    np.testing.assert_allclose(layer.apply(variables, x), want, rtol=1e-6, atol=1e-6)


def test_fold_rules_on_a_hand_made_tree():
    rng = np.random.default_rng(0)
    r = lambda *s: rng.normal(size=s).astype(np.float32)
    params = {
        "dense": {"kernel": r(3, 4), "bias": r(4)},
        "ssf_dense": {"scale": r(4), "shift": r(4)},
        "block": {
            "query": {"kernel": r(4, 2, 3), "bias": r(2, 3)},
            "ssf_query": {"scale": r(6), "shift": r(6)},
            "norm": {"scale": r(4), "bias": r(4)},
            "ssf_norm": {"scale": r(4), "shift": r(4)},
        },
    }
    stats = {"norm": {"mean": r(4)}}
    out = fold({"params": params, "batch_stats": stats})
    assert out["batch_stats"] is stats
    d, s = params["dense"], params["ssf_dense"]
    np.testing.assert_allclose(out["params"]["dense"]["kernel"], d["kernel"] * s["scale"][None])
    np.testing.assert_allclose(out["params"]["dense"]["bias"], d["bias"] * s["scale"] + s["shift"])
    q, s = params["block"]["query"], params["block"]["ssf_query"]
    gamma = s["scale"].reshape(2, 3)
    np.testing.assert_allclose(out["params"]["block"]["query"]["kernel"], q["kernel"] * gamma[None])
    np.testing.assert_allclose(
        out["params"]["block"]["query"]["bias"], q["bias"] * gamma + s["shift"].reshape(2, 3)
    )
    n, s = params["block"]["norm"], params["block"]["ssf_norm"]
    np.testing.assert_allclose(out["params"]["block"]["norm"]["scale"], n["scale"] * s["scale"])
    np.testing.assert_allclose(
        out["params"]["block"]["norm"]["bias"], n["bias"] * s["scale"] + s["shift"]
    )
    assert sorted(out["params"]) == ["block", "dense"]
    assert sorted(out["params"]["block"]) == ["norm", "query"]


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("name", ["vit_tiny", "resnet_tiny"])
def test_fold_preserves_logits(name, jit):
    tuned_model = jaxmodels.create(name, num_classes=6, ssf=True)
    plain_model = jaxmodels.create(name, num_classes=6)
    variables = _randomize(_shapes(tuned_model, 32))
    images = jax.random.normal(jax.random.key(1), (3, 32, 32, 3))
    fold_fn = jax.jit(fold) if jit else fold
    tuned_apply = jax.jit(tuned_model.apply) if jit else tuned_model.apply
    plain_apply = jax.jit(plain_model.apply) if jit else plain_model.apply
    folded = fold_fn(variables)
    assert jax.tree.structure(folded) == jax.tree.structure(_shapes(plain_model, 32))
    want = np.asarray(tuned_apply(variables, images))
    got = np.asarray(plain_apply(folded, images))
    assert np.abs(want).max() > 0.1  # a non-trivial output
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("name", ["vit_tiny", "resnet_tiny"])
def test_ssf_at_identity_equals_plain_model(name):
    tuned_model = jaxmodels.create(name, num_classes=6, ssf=True)
    plain_model = jaxmodels.create(name, num_classes=6)
    variables = _randomize(_shapes(tuned_model, 32))
    images = jax.random.normal(jax.random.key(1), (3, 32, 32, 3))
    identity = jax.tree_util.tree_map_with_path(
        lambda p, x: (
            (jnp.ones_like(x) if p[-1].key == "scale" else jnp.zeros_like(x))
            if is_ssf_path(p)
            else x
        ),
        variables,
    )
    plain_vars = {k: _strip_ssf(v) for k, v in variables.items()}
    np.testing.assert_allclose(
        jax.jit(tuned_model.apply)(identity, images),
        jax.jit(plain_model.apply)(plain_vars, images),
        rtol=1e-6,
        atol=1e-6,
    )


def test_fold_keeps_dtypes_and_batch_stats():
    model = jaxmodels.create("resnet_tiny", num_classes=4, ssf=True)
    variables = _randomize(_shapes(model, 32))
    half = jax.tree.map(lambda x: x.astype(jnp.bfloat16), variables)
    folded = jax.jit(fold)(half)
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(folded))
    jax.tree.map(np.testing.assert_array_equal, folded["batch_stats"], half["batch_stats"])
    # Float32 arithmetic then one rounding: equals the float32 fold rounded to bfloat16.
    want = jax.jit(fold)(jax.tree.map(lambda x: x.astype(jnp.float32), half))
    jax.tree.map(
        lambda a, b: np.testing.assert_array_equal(
            np.asarray(a, np.float32), np.asarray(b.astype(jnp.bfloat16), np.float32)
        ),
        folded,
        want,
    )


def test_fold_errors():
    plain = _randomize(_shapes(jaxmodels.create("resnet_tiny", num_classes=4), 32))
    with pytest.raises(ValueError, match="no SSF parameters"):
        fold(plain)
    with pytest.raises(TypeError, match="'params'"):
        fold(plain["params"])
    with pytest.raises(TypeError, match="mapping"):
        fold([1, 2])
    scale_shift = {"scale": np.ones(4, np.float32), "shift": np.zeros(4, np.float32)}
    with pytest.raises(ValueError, match="no sibling module named 'norm'"):
        fold({"params": {"ssf_norm": scale_shift}})
    with pytest.raises(ValueError, match="bias has shape"):
        fold(
            {"params": {"d": {"kernel": np.ones((2, 3)), "bias": np.ones(3)}, "ssf_d": scale_shift}}
        )
    with pytest.raises(ValueError, match="without a bias"):
        fold({"params": {"d": {"kernel": np.ones((2, 4))}, "ssf_d": scale_shift}})
