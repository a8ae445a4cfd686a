"""Tests for jaxmodels.load: parity with PyTorch (timm/torchvision), .npz schemes, orbax, errors.

The fixtures `tests/fixtures/parity_*` were written by `scripts/make_parity_fixtures.py` from
random-initialised timm / torchvision models: their safetensors weights, an input batch and
PyTorch's logits and features. Every path into `load` is checked against those PyTorch outputs.
"""

import json
import pathlib
import struct

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from safetensors.numpy import load_file, save_file

import jaxmodels
from jaxmodels.weights.checkpoint_io import load, resize_position_embedding, save

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
PARITY = ["parity_vit_tiny", "parity_resnet_basic", "parity_resnet_bottleneck"]
VIT_ARCH = {"patch_size": 8, "width": 32, "depth": 2, "num_heads": 2, "mlp_dim": 128}


def _reference(stem):
    """(name, architecture overrides, PyTorch reference arrays) of one parity fixture."""
    ref = np.load(FIXTURES / f"{stem}.npz")
    config = json.loads(str(ref["config"]))
    name = config.pop("name")
    overrides = {
        k: tuple(v) if isinstance(v, list) else v
        for k, v in config.items()
        if k not in ("num_classes", "image_size")
    }
    return name, overrides, {k: ref[k] for k in ref.files if k != "config"}


def _assert_matches_torch(model, variables, ref):
    def run(v, x):
        return model.apply(v, x, train=False), model.apply(v, x, method="features")

    logits, feats = jax.jit(run)(variables, ref["images"])
    np.testing.assert_allclose(np.asarray(logits), ref["logits"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(feats), ref["features"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("stem", PARITY)
def test_safetensors_match_pytorch_logits_and_features(stem):
    # Loading is NumPy work with no jit path; the models are run jitted (the models' own tests
    # cover jit vs no jit).
    name, overrides, ref = _reference(stem)
    model, variables = load(name, FIXTURES / f"{stem}.safetensors", **overrides)
    assert model.num_classes == ref["logits"].shape[1]
    _assert_matches_torch(model, variables, ref)


def test_resnet_batch_stats_come_from_running_statistics():
    name, overrides, _ = _reference("parity_resnet_basic")
    state = load_file(FIXTURES / "parity_resnet_basic.safetensors")
    _, variables = load(name, FIXTURES / "parity_resnet_basic.safetensors", **overrides)
    np.testing.assert_array_equal(
        variables["batch_stats"]["layer2_0"]["downsample_bn"]["var"],
        state["layer2.0.downsample.1.running_var"],
    )
    np.testing.assert_array_equal(
        variables["params"]["conv1"]["kernel"], state["conv1.weight"].transpose(2, 3, 1, 0)
    )


@pytest.mark.parametrize("side", [6, 2])
def test_image_size_resamples_position_embedding_like_timm(side):
    _, _, ref = _reference("parity_vit_tiny")
    model, variables = load(
        "vit_ti16", FIXTURES / "parity_vit_tiny.safetensors", image_size=8 * side, **VIT_ARCH
    )
    pos = variables["params"]["Transformer"]["posembed_input"]["pos_embedding"]
    assert model.image_size == 8 * side
    np.testing.assert_allclose(pos, ref[f"pos_embed_grid{side}"], rtol=1e-6, atol=1e-6)
    images = np.zeros((2, 8 * side, 8 * side, 3), np.float32)
    assert model.apply(variables, images).shape == (2, 5)


def test_resize_position_embedding_keeps_identity_and_class_row():
    pos = np.random.default_rng(0).normal(size=(1, 1 + 16, 3)).astype(np.float32)
    np.testing.assert_allclose(resize_position_embedding(pos, 4), pos, atol=1e-6)
    np.testing.assert_array_equal(resize_position_embedding(pos, 7)[:, 0], pos[:, 0])


@pytest.mark.parametrize("stem", ["parity_vit_tiny", "parity_resnet_basic"])
def test_new_num_classes_reinitialises_only_the_head(stem):
    name, overrides, ref = _reference(stem)
    path = FIXTURES / f"{stem}.safetensors"
    _, kept = load(name, path, **overrides)
    model, fresh = load(name, path, num_classes=11, **overrides)
    head = "head" if name.startswith("vit") else "fc"
    assert model.num_classes == 11
    assert fresh["params"][head]["kernel"].shape == (ref["features"].shape[1], 11)
    assert fresh["params"][head]["bias"].shape == (11,)
    body = lambda v: {k: x for k, x in v["params"].items() if k != head}
    jax.tree.map(np.testing.assert_array_equal, body(fresh), body(kept))
    feats = model.apply(fresh, ref["images"], method="features")
    np.testing.assert_allclose(feats, ref["features"], rtol=1e-4, atol=1e-4)
    assert model.apply(fresh, ref["images"]).shape == (3, 11)


def test_headless_checkpoint_needs_num_classes(tmp_path):
    def drop_head(state):
        del state["fc.weight"], state["fc.bias"]

    name, overrides, ref = _reference("parity_resnet_basic")
    path = _edited(tmp_path, "parity_resnet_basic", drop_head)
    with pytest.raises(ValueError, match="has no classification head"):
        load(name, path, **overrides)
    model, variables = load(name, path, num_classes=3, **overrides)
    assert variables["params"]["fc"]["kernel"].shape == (ref["features"].shape[1], 3)
    feats = model.apply(variables, ref["images"], method="features")
    np.testing.assert_allclose(feats, ref["features"], rtol=1e-4, atol=1e-4)


def test_reinitialised_resnet_head_is_seeded():
    name, overrides, _ = _reference("parity_resnet_basic")
    path = FIXTURES / "parity_resnet_basic.safetensors"

    def head_kernel(seed):
        _, variables = load(name, path, num_classes=4, seed=seed, **overrides)
        return np.asarray(variables["params"]["fc"]["kernel"])

    first, again, other = head_kernel(3), head_kernel(3), head_kernel(4)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    assert np.all(np.isfinite(first)) and np.std(first) > 0


def _write_bfloat16_safetensors(state, path):
    """Writes the safetensors layout by hand (safetensors.numpy cannot write bfloat16)."""
    header, chunks, offset = {}, [], 0
    for name, value in state.items():
        raw = np.ascontiguousarray(value.astype(jnp.bfloat16)).tobytes()
        header[name] = {
            "dtype": "BF16",
            "shape": list(value.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        chunks.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(chunks))


def test_bfloat16_safetensors_are_read(tmp_path):
    state = load_file(FIXTURES / "parity_vit_tiny.safetensors")
    _write_bfloat16_safetensors(state, tmp_path / "bf16.safetensors")
    _, variables = load("vit_ti16", tmp_path / "bf16.safetensors", **VIT_ARCH)
    assert variables["params"]["cls"].dtype == jnp.float32
    expected = state["cls_token"].astype(jnp.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(variables["params"]["cls"], expected)
    np.testing.assert_array_equal(
        variables["params"]["embedding"]["kernel"],
        state["patch_embed.proj.weight"]
        .astype(jnp.bfloat16)
        .astype(np.float32)
        .transpose(2, 3, 1, 0),
    )


# ----------------------------------------------------------------------------- .npz


def _vit_variables():
    _, variables = load("vit_ti16", FIXTURES / "parity_vit_tiny.safetensors", **VIT_ARCH)
    flat = {}
    for keys, leaf in jax.tree_util.tree_flatten_with_path(variables["params"])[0]:
        flat["/".join(k.key for k in keys)] = np.asarray(leaf)
    return flat


def _old_scheme(flat):
    """vision_transformer layout under the old Flax optimizer prefix 'opt/target/'."""
    return {f"opt/target/{k}": v for k, v in flat.items()}


def _new_scheme(flat, scanned=False):
    """big_vision layout: renamed block modules, top-level pos_embedding without a class row."""
    renames = {
        "MultiHeadDotProductAttention_1": "MultiHeadDotProductAttention_0",
        "LayerNorm_2": "LayerNorm_1",
        "MlpBlock_3": "MlpBlock_0",
    }
    out = {}
    pos = flat["Transformer/posembed_input/pos_embedding"]
    for key, value in flat.items():
        if key == "Transformer/posembed_input/pos_embedding":
            out["pos_embedding"] = pos[:, 1:]
            continue
        if key == "cls":  # big_vision adds no position term to the class token
            value = value + pos[:, :1]
        parts = key.split("/")
        if len(parts) > 2 and parts[1].startswith("encoderblock_"):
            parts[2] = renames.get(parts[2], parts[2])
        out["/".join(parts)] = value
    if scanned:
        blocks = sorted({k.split("/")[1] for k in out if "encoderblock_" in k})
        for leaf in {
            k.split("/", 2)[2] for k in out if k.startswith("Transformer/encoderblock_0/")
        }:
            stacked = [out.pop(f"Transformer/{b}/{leaf}") for b in blocks]
            out[f"Transformer/encoderblock/{leaf}"] = np.stack(stacked)
    return {f"params/{k}": v for k, v in out.items()}


@pytest.mark.parametrize("scheme", ["old", "new", "new_scanned"])
def test_npz_schemes_match_pytorch(tmp_path, scheme):
    _, _, ref = _reference("parity_vit_tiny")
    flat = _vit_variables()
    arrays = {
        "old": _old_scheme,
        "new": _new_scheme,
        "new_scanned": lambda f: _new_scheme(f, scanned=True),
    }[scheme](flat)
    if scheme != "old":  # the test really exercises the renamed layout
        assert "params/pos_embedding" in arrays
        assert not any("MlpBlock_3" in k or "posembed_input" in k for k in arrays)
    path = tmp_path / "vit.npz"
    np.savez(path, **arrays)
    # The fixture model uses timm's exact GELU; .npz files default to the tanh approximation.
    model, variables = load("vit_ti16", path, gelu_approximate=False, **VIT_ARCH)
    _assert_matches_torch(model, variables, ref)
    model_tanh, _ = load("vit_ti16", path, **VIT_ARCH)
    assert model_tanh.gelu_approximate


# ----------------------------------------------------------------------------- orbax


@pytest.mark.parametrize("stem", ["parity_vit_tiny", "parity_resnet_bottleneck"])
def test_orbax_round_trip(tmp_path, stem):
    name, overrides, ref = _reference(stem)
    model, variables = load(name, FIXTURES / f"{stem}.safetensors", **overrides)
    save(tmp_path / "ckpt", name, variables, **overrides)
    model2, restored = load(name, tmp_path / "ckpt")  # overrides come from model.json
    assert model2 == model
    jax.tree.map(np.testing.assert_array_equal, restored, variables)
    _assert_matches_torch(model2, restored, ref)


def test_plain_orbax_directory_with_overrides(tmp_path):
    name, overrides, ref = _reference("parity_resnet_basic")
    _, variables = load(name, FIXTURES / "parity_resnet_basic.safetensors", **overrides)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save((tmp_path / "plain").absolute(), jax.tree.map(np.asarray, variables))
    checkpointer.wait_until_finished()
    model, restored = load(name, tmp_path / "plain", **overrides)
    _assert_matches_torch(model, restored, ref)


# ----------------------------------------------------------------------------- errors


def _edited(tmp_path, stem, edit):
    state = dict(load_file(FIXTURES / f"{stem}.safetensors"))
    edit(state)
    path = tmp_path / f"{stem}.safetensors"
    save_file(state, str(path))
    return path


def test_unknown_key_is_named(tmp_path):
    path = _edited(
        tmp_path,
        "parity_vit_tiny",
        lambda s: s.update({"blocks.0.ls1.gamma": np.ones(32, np.float32)}),
    )
    with pytest.raises(ValueError, match=r"1 unknown keys: blocks\.0\.ls1\.gamma"):
        load("vit_ti16", path, **VIT_ARCH)


def test_unmapped_key_reports_its_target(tmp_path):
    path = _edited(
        tmp_path,
        "parity_resnet_basic",
        lambda s: s.update({"layer1.0.se.fc.weight": np.ones((2, 2), np.float32)}),
    )
    name, overrides, _ = _reference("parity_resnet_basic")
    with pytest.raises(ValueError, match=r"layer1\.0\.se\.fc\.weight \(→ params/layer1_0/se/fc"):
        load(name, path, **overrides)


def test_missing_keys_are_named(tmp_path):
    def drop(state):
        del state["norm.weight"], state["blocks.1.attn.qkv.bias"]

    path = _edited(tmp_path, "parity_vit_tiny", drop)
    with pytest.raises(ValueError, match="4 missing keys") as raised:
        load("vit_ti16", path, **VIT_ARCH)
    for key in (
        "params/Transformer/encoder_norm/scale",
        "params/Transformer/encoderblock_1/MultiHeadDotProductAttention_1/key/bias",
    ):
        assert key in str(raised.value)


def test_unsplittable_qkv_is_named(tmp_path):
    path = _edited(
        tmp_path,
        "parity_vit_tiny",
        lambda s: s.update({"blocks.0.attn.qkv.bias": np.zeros(95, np.float32)}),
    )
    with pytest.raises(
        ValueError,
        match=r"blocks\.0\.attn\.qkv\.bias \(shape \(95,\) does not "
        r"split into 3 x 2 heads\)",
    ):
        load("vit_ti16", path, **VIT_ARCH)


def test_missing_running_statistics_are_named(tmp_path):
    path = _edited(tmp_path, "parity_resnet_basic", lambda s: s.pop("bn1.running_var"))
    name, overrides, _ = _reference("parity_resnet_basic")
    with pytest.raises(ValueError, match="1 missing keys: batch_stats/bn1/var"):
        load(name, path, **overrides)


def test_misshaped_key_is_named(tmp_path):
    path = _edited(
        tmp_path,
        "parity_vit_tiny",
        lambda s: s.update({"blocks.0.mlp.fc1.bias": np.zeros(64, np.float32)}),
    )
    with pytest.raises(
        ValueError,
        match=r"mis-shaped keys: blocks\.0\.mlp\.fc1\.bias: "
        r"checkpoint \(64,\)",
    ):
        load("vit_ti16", path, **VIT_ARCH)


def test_wrong_architecture_is_reported():
    name, overrides, _ = _reference("parity_resnet_basic")
    with pytest.raises(ValueError, match="does not fit ResNet"):
        load(name, FIXTURES / "parity_resnet_basic.safetensors", **{**overrides, "width": 16})
    with pytest.raises(ValueError, match="width must be a multiple of num_heads"):
        load("vit_ti16", FIXTURES / "parity_vit_tiny.safetensors", **{**VIT_ARCH, "num_heads": 3})
    with pytest.raises(ValueError, match="missing keys"):  # 2-block checkpoint, 3-block model
        load("vit_ti16", FIXTURES / "parity_vit_tiny.safetensors", **{**VIT_ARCH, "depth": 3})


def test_npz_without_class_token_is_reported(tmp_path):
    arrays = _new_scheme(_vit_variables())
    del arrays["params/cls"]
    np.savez(tmp_path / "gap.npz", **arrays)
    with pytest.raises(ValueError, match="1 missing keys: params/cls"):
        load("vit_ti16", tmp_path / "gap.npz", **VIT_ARCH)


def test_bad_arguments_raise(tmp_path):
    path = FIXTURES / "parity_vit_tiny.safetensors"
    with pytest.raises(ValueError, match="name must be one of"):
        load("vit_h14", path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load("vit_ti16", tmp_path / "nope.safetensors")
    (tmp_path / "w.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"path must be a '\.safetensors' or '\.npz'"):
        load("vit_ti16", tmp_path / "w.pt")
    np.savez(tmp_path / "r.npz", x=np.zeros(1))
    with pytest.raises(ValueError, match="ViT models only"):
        load("resnet50", tmp_path / "r.npz")
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        load("vit_ti16", path, num_classes=0, **VIT_ARCH)
    with pytest.raises(ValueError, match="image_size must be a positive int"):
        load("vit_ti16", path, image_size=-8, **VIT_ARCH)
    with pytest.raises(TypeError, match="unknown overrides"):
        load("vit_ti16", path, heads=2)


def test_save_errors_and_name_check(tmp_path):
    name, overrides, _ = _reference("parity_resnet_basic")
    _, variables = load(name, FIXTURES / "parity_resnet_basic.safetensors", **overrides)
    save(tmp_path / "ckpt", name, variables, **overrides)
    with pytest.raises(ValueError, match="already exists"):
        save(tmp_path / "ckpt", name, variables, **overrides)
    with pytest.raises(ValueError, match="holds a 'resnet18' model; asked to load it as"):
        load("resnet34", tmp_path / "ckpt")
    with pytest.raises(ValueError, match="'params' collection"):
        save(tmp_path / "other", name, {"weights": {}})
    with pytest.raises(TypeError, match="overrides and info must be JSON values"):
        save(tmp_path / "other", name, variables, dtype=np.float16)
    with pytest.raises(ValueError, match="name must be one of"):
        save(tmp_path / "other", "resnet5", variables)


def test_load_is_exported():
    assert jaxmodels.load is load and jaxmodels.save is save
