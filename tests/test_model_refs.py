"""Tests for model references (jaxmodels.weights.model_refs), self-describing model folders
(jaxmodels.load / save / model_info), parameter paths and the registry's spec_of."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_classifier import random_variables

import jaxmodels
from jaxmodels.models import paths, registry


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("refs")
    model = jaxmodels.create("vit_tiny", num_classes=5, gelu_approximate=True, image_size=64)
    variables = jax.device_get(random_variables(model, image_size=64, seed=2))
    overrides = registry.overrides_of("vit_tiny", model)
    jaxmodels.save(root / "run" / "model", "vit_tiny", variables, info={"mode": "x"}, **overrides)
    return {"root": root, "model": model, "variables": variables}


def test_overrides_of_rebuilds_the_module():
    model = jaxmodels.create("vit_tiny", num_classes=5, gelu_approximate=True, image_size=64)
    overrides = registry.overrides_of("vit_tiny", model)
    assert overrides == {"image_size": 64, "gelu_approximate": True}
    assert jaxmodels.create("vit_tiny", num_classes=5, **overrides) == model
    assert (
        registry.overrides_of("resnet_tiny", jaxmodels.create("resnet_tiny", num_classes=2)) == {}
    )


def test_spec_of_reads_the_module():
    vit = jaxmodels.create("vit_tiny", num_classes=7, image_size=64)
    assert jaxmodels.spec_of(vit) == jaxmodels.spec("vit_tiny", num_classes=7, image_size=64)
    resnet = jaxmodels.create("resnet18", num_classes=10, image_size=160)
    spec = jaxmodels.spec_of(resnet)
    assert spec.name == "resnet18" and spec.head == "fc" and spec.preprocessing.image_size == 160
    assert (
        spec.flops_per_image
        == jaxmodels.spec("resnet18", num_classes=10, image_size=160).flops_per_image
    )
    odd = jaxmodels.create("resnet18", num_classes=10, width=16)
    assert jaxmodels.spec_of(odd).name == "resnet*"
    with pytest.raises(TypeError, match="not a jaxmodels architecture"):
        jaxmodels.spec_of(jax.nn)


def test_a_saved_folder_loads_without_a_name_from_itself_or_its_run(saved):
    for path in (saved["root"] / "run" / "model", saved["root"] / "run"):
        model, variables = jaxmodels.load(path)
        assert model == saved["model"]
        chex_equal = jax.tree.map(np.array_equal, variables, saved["variables"])
        assert all(jax.tree.leaves(chex_equal))
    info = jaxmodels.model_info(saved["root"] / "run")
    assert info["num_classes"] == 5 and info["image_size"] == 64 and info["info"] == {"mode": "x"}


def test_a_folder_without_model_json_needs_a_name(saved, tmp_path):
    import orbax.checkpoint as ocp

    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "bare", saved["variables"])
    checkpointer.wait_until_finished()
    with pytest.raises(ValueError, match=r"has no model\.json naming its architecture"):
        jaxmodels.load(tmp_path / "bare")
    model, _ = jaxmodels.load("vit_tiny", tmp_path / "bare", gelu_approximate=True)
    assert model.image_size == 64


def test_a_truncated_orbax_checkpoint_is_one_clear_error(saved, tmp_path):
    import shutil

    shutil.copytree(saved["root"] / "run" / "model", tmp_path / "cut")
    for file in (tmp_path / "cut" / "variables").rglob("*"):
        if file.is_file() and file.stat().st_size > 1024 and "_METADATA" not in file.name:
            with open(file, "r+b") as f:
                f.truncate(100)
    with pytest.raises(ValueError, match=r"checkpoint '.*cut' cannot be read"):
        jaxmodels.load(tmp_path / "cut")


def test_content_digest_follows_the_bytes(saved, tmp_path):
    folder = saved["root"] / "run" / "model"
    assert jaxmodels.content_digest(folder) == jaxmodels.content_digest(folder)
    (tmp_path / "a.bin").write_bytes(b"abc")
    first = jaxmodels.content_digest(tmp_path / "a.bin")
    (tmp_path / "a.bin").write_bytes(b"abd")
    assert jaxmodels.content_digest(tmp_path / "a.bin") != first


def test_paths_round_trip_and_tree_digest():
    tree = {"params": {"a": {"kernel": np.ones((2, 3))}, "b": np.zeros(4)}, "batch_stats": {}}
    flat = paths.flatten(tree)
    assert sorted(flat) == ["params/a/kernel", "params/b"]
    assert paths.unflatten(flat) == {
        "params": {"a": {"kernel": flat["params/a/kernel"]}, "b": flat["params/b"]}
    }
    same = {"params": {"b": np.zeros(4), "a": {"kernel": np.ones((2, 3))}}}
    assert paths.tree_digest(tree) == paths.tree_digest(same)
    changed = {"params": {"a": {"kernel": np.ones((2, 3))}, "b": np.array([0, 0, 0, 1e-30])}}
    assert paths.tree_digest(tree) != paths.tree_digest(changed)
    as_f64 = {"params": {"a": {"kernel": np.ones((2, 3), np.float64)}, "b": np.zeros(4)}}
    as_f32 = {"params": {"a": {"kernel": np.ones((2, 3), np.float32)}, "b": np.zeros(4)}}
    assert paths.tree_digest(as_f64) != paths.tree_digest(as_f32)


def test_parse_model_ref_forms_and_labels(saved):
    run = saved["root"] / "run"
    cases = {
        "vit_tiny": ("vit_tiny", "vit_tiny", None),
        "lp:vit_tiny": ("lp", "vit_tiny", None),
        str(run): ("run", "vit_tiny", run / "model"),
        str(run / "model"): ("run", "vit_tiny", run / "model"),
        f"x:{run}": ("x", "vit_tiny", run / "model"),
        f"vit_tiny={run / 'model'}": ("run", "vit_tiny", run / "model"),
    }
    for text, (label, name, checkpoint) in cases.items():
        ref = jaxmodels.parse_model_ref(text)
        assert (ref.label, ref.name) == (label, name), text
        assert (ref.checkpoint is None) == (checkpoint is None), text
        if checkpoint is not None:
            assert ref.checkpoint.resolve() == checkpoint.resolve(), text


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "non-empty"),
        ("vit_huge", "neither a known name"),
        ("vit_huge=x.npz", "unknown model"),
        ("vit_tiny=missing.npz", "not found"),
    ],
)
def test_parse_model_ref_errors(text, match):
    with pytest.raises(jaxmodels.ModelRefError, match=match):
        jaxmodels.parse_model_ref(text)


def test_build_draws_every_fresh_parameter_from_init_seed(saved):
    text = f"vit_tiny={saved['root'] / 'run'}"
    a = jaxmodels.build(text, num_classes=3, ssf=True, init_seed=0)
    b = jaxmodels.build(text, num_classes=3, ssf=True, init_seed=0)
    c = jaxmodels.build(text, num_classes=3, ssf=True, init_seed=1)
    assert paths.tree_digest(a.variables) == paths.tree_digest(b.variables)
    flat_a, flat_c = paths.flatten(a.variables), paths.flatten(c.variables)
    fresh = [k for k in flat_a if "ssf_" in k or k.startswith("params/head/")]
    kept = [k for k in flat_a if k not in fresh]
    assert fresh and kept
    # SSF leaves are drawn from the seed; a ViT's new head starts at zero whatever the seed
    assert all(not np.array_equal(flat_a[k], flat_c[k]) for k in fresh if "ssf_" in k)
    assert not np.any(flat_a["params/head/kernel"]) and flat_a["params/head/kernel"].shape == (
        32,
        3,
    )
    assert all(np.array_equal(flat_a[k], flat_c[k]) for k in kept)  # the checkpoint's
    np.testing.assert_array_equal(flat_a["params/cls"], saved["variables"]["params"]["cls"])
    assert a.checkpoint_sha256 == jaxmodels.content_digest(saved["root"] / "run" / "model")
    # SSF starts at the identity up to N(0, 0.02) noise
    scales = np.concatenate(
        [v.ravel() for k, v in flat_a.items() if k.endswith("/scale") and "ssf_" in k]
    )
    assert abs(scales.mean() - 1) < 0.01 and 0.01 < scales.std() < 0.03
    logits = a.model.apply(a.variables, jnp.zeros((1, 64, 64, 3)))
    assert logits.shape == (1, 3)


def test_a_truncated_checkpoint_leaves_no_event_loop_noise(saved, tmp_path):
    """The one-line error is all a user sees: orbax's in-flight reads used to print 7–43 lines
    of "RuntimeError: Event loop is closed" after it, at exit."""
    import shutil
    import subprocess
    import sys

    shutil.copytree(saved["root"] / "run" / "model", tmp_path / "cut")
    for file in (tmp_path / "cut" / "variables").rglob("*"):
        if file.is_file() and file.stat().st_size > 1024 and "_METADATA" not in file.name:
            with open(file, "r+b") as f:
                f.truncate(100)
    code = (
        "import sys, jaxmodels\n"
        f"try:\n    jaxmodels.load({str(tmp_path / 'cut')!r})\n"
        "except ValueError as err:\n    print(err, file=sys.stderr)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "cannot be read" in lines[0], done.stderr[-2000:]


@pytest.fixture(scope="module")
def damaged(saved, tmp_path_factory):
    """A model folder whose weight files are cut short, and a small 5-class data set."""
    import shutil

    root = tmp_path_factory.mktemp("damaged")
    shutil.copytree(saved["root"] / "run" / "model", root / "cut")
    for file in (root / "cut" / "variables").rglob("*"):
        if file.is_file() and file.stat().st_size > 1024 and "_METADATA" not in file.name:
            with open(file, "r+b") as f:
                f.truncate(100)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
    np.savez(root / "d.npz", images=images, labels=np.arange(20) % 5)
    return root


@pytest.mark.parametrize(
    "step, argv",
    [
        ("rank", ["--models", "{cut}", "--data", "{data}", "--scores", "logme"]),
        ("tune", ["--model", "{cut}", "--data", "{data}", "--epochs", "1", "--batch-size", "4"]),
        ("serve", ["--models", "{cut}", "vit_tiny", "--heldout", "{data}", "--test", "{data}"]),
    ],
)
def test_every_command_given_a_damaged_model_says_so_in_one_line(damaged, tmp_path, step, argv):
    """The installed command, as a user runs it: exit 2, one line on stderr naming the folder,
    no asyncio noise after it, and no output folder left in the way of the corrected command."""
    import subprocess
    import sys

    argv = [a.format(cut=damaged / "cut", data=damaged / "d.npz") for a in argv]
    done = subprocess.run(
        [sys.executable, "-m", "hubtune.cli", step, *argv, "--out", str(tmp_path / "o")],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    # progress lines may come first (serve logs to stderr); the error is one line, the last
    assert done.returncode == 2 and "error: " in lines[-1] and "cut" in lines[-1], done.stderr
    assert not [ln for ln in lines[:-1] if "rror" in ln or "Traceback" in ln], done.stderr
    out = tmp_path / "o"
    assert not out.exists() or not (out / "hubtune.json").exists()
    assert not out.exists() or not (out / "config.json").exists()
