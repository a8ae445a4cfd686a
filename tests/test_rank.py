"""scripts/rank.py end to end on a tiny .npz with three tiny models, and its bad-spec errors."""

import importlib.util
import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

import jaxmodels
import scoring
from scoring import hub_ranking

SCRIPT = pathlib.Path(__file__).parent.parent / "scripts" / "rank.py"
SCORES = "logme,hscore,leep,nce"


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A tiny labelled .npz, an orbax checkpoint and ground-truth accuracies."""
    root = tmp_path_factory.mktemp("hub")
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 12)
    tint = np.array([[60, 90, 200], [200, 60, 90], [90, 200, 60]])[labels]
    images = rng.uniform(0, 80, size=(36, 12, 12, 3)) + tint[:, None, None, :]
    np.savez(root / "tiny.npz", images=images.astype(np.uint8), labels=labels)
    model = jaxmodels.create("resnet_tiny", num_classes=5)
    variables = model.init(jax.random.key(7), np.zeros((1, 32, 32, 3), np.float32))
    jaxmodels.save(root / "ckpt", "resnet_tiny", variables)
    accs = {"resnet_tiny": 0.6, "vit_tiny": 0.7, f"resnet_tiny={root / 'ckpt'}": 0.5}
    (root / "accs.json").write_text(json.dumps(accs))
    return root


def test_rank_hub_writes_json_and_reuses_the_cache(hub, capsys):
    models = ["resnet_tiny", "vit_tiny", f"resnet_tiny={hub / 'ckpt'}"]
    kwargs = dict(scores=SCORES, ground_truth=hub / "accs.json", cache_dir=hub / "cache")
    first = hub_ranking.rank_hub(models, str(hub / "tiny.npz"), **kwargs)
    assert not any(first.cached.values())
    assert len(list((hub / "cache").glob("*.npz"))) == 3
    second = hub_ranking.rank_hub(models, str(hub / "tiny.npz"), **kwargs)
    assert all(second.cached.values())
    assert second.values == first.values

    written = hub_ranking.write_outputs(second, hub / "out")
    assert [p.name for p in written] == ["ranking.json", "ranking.png"]
    report = json.loads((hub / "out" / "ranking.json").read_text())
    assert report["scores"] == SCORES.split(",")
    assert [m["model"] for m in report["models"]] == models
    # The cached features give the same scores when recomputed here from scratch.
    cache = {
        p.name.split("-")[0] + str(i): p for i, p in enumerate(sorted((hub / "cache").iterdir()))
    }
    assert cache
    for entry in report["models"]:
        assert sorted(entry["ranks"].values()) != []
        assert set(entry["scores"]) == set(SCORES.split(","))
    for name in SCORES.split(","):
        ranks = sorted(m["ranks"][name] for m in report["models"])
        assert ranks == [1, 2, 3] or len({m["scores"][name] for m in report["models"]}) < 3
        values = [m["scores"][name] for m in report["models"]]
        accs = [m["accuracy"] for m in report["models"]]
        corr = report["rank_correlation"][name]
        assert corr["weighted_tau"] == pytest.approx(scoring.weighted_kendall_tau(values, accs))
        assert corr["top1_regret"] == pytest.approx(scoring.top1_regret(values, accs))


def test_cached_features_score_like_direct_calls(hub):
    ranking = hub_ranking.rank_hub(
        ["vit_tiny"], str(hub / "tiny.npz"), scores="logme,nce", cache_dir=hub / "cache"
    )
    (path,) = (hub / "cache").glob("vit_tiny-*.npz")
    with np.load(path) as cached, jax.enable_x64(True):
        feats = cached["features"].astype(np.float64)
        logits = cached["logits"].astype(np.float64)
        labels = cached["labels"]
        assert ranking.values["vit_tiny"]["logme"] == pytest.approx(
            float(scoring.logme(feats, labels).score), rel=1e-12
        )
        assert ranking.values["vit_tiny"]["nce"] == pytest.approx(
            float(scoring.nce(logits.argmax(1), labels)), rel=1e-12
        )


def test_streamed_ranking_matches_in_memory_ranking(hub):
    models = ["vit_tiny"]
    data = str(hub / "tiny.npz")
    in_memory = hub_ranking.rank_hub(models, data, scores=SCORES, cache_dir=hub / "cache")
    streamed = hub_ranking.rank_hub(
        models, data, scores=SCORES, cache_dir=hub / "cache", stream=True
    )
    assert not any(streamed.cached.values())
    for model in models:
        for name in SCORES.split(","):
            assert streamed.values[model][name] == pytest.approx(
                in_memory.values[model][name], rel=1e-5
            ), (model, name)


def load_script():
    spec = importlib.util.spec_from_file_location("rank_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--models", "resnet_tiny=missing.safetensors", "--data", "{npz}"], "not found"),
        (["--models", "resnet_tiny", "--data", "missing.npz"], "data 'missing.npz' not found"),
        (["--models", "resnet_tiny", "--data", "{nolabels}"], "lacks labels"),
        (
            ["--models", "resnet_tiny", "--data", "{npz}", "--scores", "logme,nope"],
            "unknown scores",
        ),
        (
            ["--models", "resnet_tiny", "--data", "{npz}", "--stream", "--scores", "sfda"],
            "--stream",
        ),
        (["--models", "resnet_tiny", "--data", "tfds:no_such_dataset_xyz:train"], "tfds data"),
        (["--models", "resnet_tiny", "--data", "{npz}", "--ground-truth", "{npz}"], "ground truth"),
    ],
)
def test_bad_specs_return_2_with_one_line(hub, tmp_path, capsys, args, message):
    np.savez(tmp_path / "nolabels.npz", images=np.zeros((4, 8, 8, 3), np.uint8))
    args = [a.format(npz=hub / "tiny.npz", nolabels=tmp_path / "nolabels.npz") for a in args]
    assert load_script().main([*args, "--out", str(tmp_path / "out")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rank.py: error:"), lines
    assert message in lines[0]


def test_script_exits_2_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--models", "resnet_nope", "--data", "x.npz", "--out", "o"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"rank.py: error: unknown model 'resnet_nope' in 'resnet_nope'; known: "
        f"{', '.join(jaxmodels.MODEL_NAMES)}"
    ]
