"""scripts/rank.py and scoring.hub.ranking end to end on tiny data and tiny models: scores against
direct computations, the cache, streamed statistics, labels, and every user error."""

import importlib.util
import itertools
import json
import os
import pathlib
import subprocess
import sys
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmodels
import scoring
from scoring.hub import features as hub_features
from scoring.hub import ranking as hub_ranking

SCRIPT = pathlib.Path(__file__).parent.parent / "scripts" / "rank.py"
SCORES = "logme,hscore,leep,nce"


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """Tiny labelled data; two checkpoints whose heads are random (non-zero kernel and bias)."""
    root = tmp_path_factory.mktemp("hub")
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 12)
    tint = np.array([[60, 90, 200], [200, 60, 90], [90, 200, 60]])[labels]
    images = rng.uniform(0, 80, size=(36, 12, 12, 3)) + tint[:, None, None, :]
    np.savez(root / "tiny.npz", images=images.astype(np.uint8), labels=labels)
    for name, seed in (("resnet_tiny", 7), ("vit_tiny", 8)):
        model = jaxmodels.create(name, num_classes=5)
        # the library's init (compiled cheaply): a default-optimised init of the ResNet
        # compiles for 6 s on 2 cores, a third of this file's compile time
        variables = jax.device_get(jaxmodels.models.registry.init_variables(model, seed))
        head = variables["params"][jaxmodels.spec_of(model).head]
        # a confident head with a real bias: LEEP and NCE then depend on both
        head["kernel"] = 5 * rng.standard_normal(head["kernel"].shape).astype(np.float32)
        head["bias"] = 2 * rng.standard_normal(head["bias"].shape).astype(np.float32)
        jaxmodels.save(root / name, name, variables)
    models = [
        f"r:resnet_tiny={root / 'resnet_tiny'}",
        f"v:vit_tiny={root / 'vit_tiny'}",
        "vit_tiny",
    ]
    accs = {"r": 0.6, "v": 0.7, "vit_tiny": 0.5}
    (root / "accs.json").write_text(json.dumps(accs))
    return {"root": root, "models": models, "data": str(root / "tiny.npz")}


def _direct(hub, ref_text):
    """Features and logits of a model computed here, without the ranking machinery."""
    built = jaxmodels.build(ref_text)
    source = jaxmodels.open_source(hub["data"])
    prep = jaxmodels.spec_of(built.model).preprocessing
    images = np.stack([jaxmodels.preprocess_for_eval(source[i]["image"], prep) for i in
                       range(len(source))])  # fmt: skip
    # jitted whole (one compile each), not op by op: the same arithmetic to float32 rounding
    feats = jax.jit(partial(built.model.apply, method="features"))(built.variables, images)
    logits = jax.jit(built.model.apply)(built.variables, images)
    return np.asarray(feats, np.float64), np.asarray(logits, np.float64), source.labels


def test_rank_hub_scores_equal_direct_computation_and_reuse_the_cache(hub, monkeypatch):
    kwargs = dict(scores=SCORES, ground_truth=hub["root"] / "accs.json",
                  cache_dir=hub["root"] / "cache", log=lambda _: None)  # fmt: skip
    first = hub_ranking.rank_hub(hub["models"], hub["data"], **kwargs)
    assert first.models == ["r", "v", "vit_tiny"] and not any(first.cached.values())
    source = jaxmodels.open_source(hub["data"])
    for label, text in zip(first.models, hub["models"], strict=True):
        # the cached features are the model's (to float32 rounding), and the scores are
        # exactly what the score functions give on them
        feats, logits, labels = _direct(hub, text)  # outside x64: random init draws differ there
        ref = jaxmodels.parse_model_ref(text)
        with jax.enable_x64(True):
            path = hub_features._cache_path(ref, source, 0, hub["root"] / "cache", "features")
            with np.load(path) as cached:
                np.testing.assert_allclose(
                    cached["features"], feats, rtol=1e-4, atol=1e-5, err_msg=label
                )
                np.testing.assert_allclose(cached["logits"], logits, rtol=1e-4, atol=1e-5)
                feats = cached["features"].astype(np.float64)
                logits = cached["logits"].astype(np.float64)
            probs = np.asarray(jax.nn.softmax(logits, axis=1))
            expected = {
                "logme": scoring.logme(feats, labels).score,
                "hscore": scoring.hscore(feats, labels),
                "leep": scoring.leep(probs, labels),
                "nce": scoring.nce(logits.argmax(1), labels),
            }
            for name, value in expected.items():
                assert first.values[label][name] == pytest.approx(float(value), rel=1e-9), name

    # a cached re-rank builds no model (nothing compiles): building now would fail
    def no_build(*args, **kwargs):
        raise AssertionError("a cached re-rank built a model")

    monkeypatch.setattr(jaxmodels, "build", no_build)
    second = hub_ranking.rank_hub(hub["models"], hub["data"], **kwargs)
    assert all(second.cached.values()) and second.values == first.values

    written = hub_ranking.write_outputs(second, hub["root"] / "out")
    assert [p.name for p in written] == ["ranking.json", "ranking.png"]
    report = json.loads((hub["root"] / "out" / "ranking.json").read_text())
    assert [m["model"] for m in report["models"]] == ["r", "v", "vit_tiny"]
    assert [m["accuracy"] for m in report["models"]] == [0.6, 0.7, 0.5]
    for name in SCORES.split(","):
        values = [m["scores"][name] for m in report["models"]]
        order = np.argsort(-np.asarray(values), kind="stable")
        assert [report["models"][i]["ranks"][name] for i in order] == [1, 2, 3]
        corr = report["rank_correlation"][name]
        assert corr["weighted_tau"] == pytest.approx(
            scoring.weighted_kendall_tau(values, [0.6, 0.7, 0.5]), nan_ok=True
        )


def test_streamed_leep_and_nce_use_the_real_head(hub):
    # random heads with non-zero bias: dropping the bias or using uniform source probabilities
    # changes LEEP and NCE, so the streamed values must equal the in-memory ones
    kwargs = dict(scores=SCORES, cache_dir=hub["root"] / "cache", log=lambda _: None)
    in_memory = hub_ranking.rank_hub(hub["models"][:2], hub["data"], **kwargs)
    streamed = hub_ranking.rank_hub(hub["models"][:2], hub["data"], stream=True, **kwargs)
    for label in ("r", "v"):
        for name in ("logme", "leep", "nce"):  # (streamed H-score at N < D: tests/test_stats.py)
            assert streamed.values[label][name] == pytest.approx(
                in_memory.values[label][name], rel=1e-4
            ), (label, name)
    _, logits, labels = _direct(hub, hub["models"][0])
    with jax.enable_x64(True):
        uniform = np.full_like(logits, 1 / logits.shape[1])
        assert abs(float(scoring.leep(uniform, labels)) - streamed.values["r"]["leep"]) > 1e-3


def test_stream_without_scores_uses_the_streamable_ones(hub):
    ranking = hub_ranking.rank_hub(
        hub["models"][:1], hub["data"], stream=True, cache_dir=hub["root"] / "cache",
        log=lambda _: None,
    )  # fmt: skip
    assert ranking.scores == list(hub_ranking.STREAM_SCORES)


def _script():
    return importlib.import_module("hubtune.rank")


def test_script_prints_the_table_with_labels(hub, tmp_path, capsys):
    argv = ["--models", *hub["models"], "--data", hub["data"], "--scores", "logme,nce",
            "--ground-truth", str(hub["root"] / "accs.json"), "--out", str(tmp_path / "o"),
            "--cache-dir", str(hub["root"] / "cache")]  # fmt: skip
    assert _script().main(argv) == 0
    out = capsys.readouterr().out
    rows = [
        line.split()[0]
        for line in out.splitlines()
        if line.split()[:1] in (["r"], ["v"], ["vit_tiny"])
    ]
    assert rows == ["r", "v", "vit_tiny"]
    assert "weighted τ" in out and "top-1 regret" in out


def test_a_run_folder_is_labelled_by_its_name(hub, tmp_path):
    run = tmp_path / "lp_run"
    (run / "model").parent.mkdir(parents=True)
    import shutil

    shutil.copytree(hub["root"] / "vit_tiny", run / "model")
    ref = jaxmodels.parse_model_ref(str(run))
    assert (ref.label, ref.name) == ("lp_run", "vit_tiny")
    assert jaxmodels.parse_model_ref(f"x:{run}").label == "x"
    assert jaxmodels.parse_model_ref(f"vit_tiny={hub['root'] / 'vit_tiny'}").label == "vit_tiny"


def _bad_cases(hub, tmp):
    npz = hub["data"]
    np.savez(tmp / "nolabels.npz", images=np.zeros((4, 8, 8, 3), np.uint8))
    np.savez(tmp / "stray.npz", images=np.zeros((6, 8, 8, 3), np.uint8),
             labels=np.array([0, 1, 2, 0, 1, 99]))  # fmt: skip
    np.savez(tmp / "small.npz", images=np.zeros((9, 8, 8, 3), np.uint8),
             labels=np.arange(9) % 3)  # fmt: skip
    (tmp / "empty.safetensors").write_bytes(b"")
    (tmp / "garbage.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    good = (hub["root"] / "tiny.npz").read_bytes()
    (tmp / "cut.npz").write_bytes(good[: len(good) // 2])
    (tmp / "a_file").write_text("x")
    (tmp / "equal.json").write_text('{"resnet_tiny": 0.5, "vit_tiny": 0.5}')
    return [
        (["--models", "resnet_tiny=missing.safetensors"], "not found"),
        (["--models", f"resnet_tiny={tmp / 'empty.safetensors'}"], "is empty"),
        (["--models", f"resnet_tiny={tmp / 'garbage.safetensors'}"], "cannot be read"),
        (["--models", f"vit_tiny={tmp / 'cut.npz'}"], "cannot be read"),
        (["--models", "resnet_nope"], "neither a known name"),
        (["--data", "missing.npz"], "not found"),
        (["--data", str(tmp / "nolabels.npz")], "labels"),
        (["--data", str(tmp / "stray.npz")], "no example of 96 of its 100 classes"),
        (["--scores", "logme,nope"], "unknown scores"),
        (["--data", str(tmp / "small.npz"), "--scores", "nleep"], "needs at least 15 samples"),
        (["--stream", "--scores", "sfda"], "--stream"),
        (["--data", "tfds:no_such_dataset_xyz:train"], "tfds"),
        (["--ground-truth", npz], "ground truth"),
        (
            ["--models", "resnet_tiny", "vit_tiny", "--ground-truth", str(tmp / "equal.json")],
            "gives every model the same accuracy",
        ),
        (["--out", str(tmp / "a_file")], "is a file"),
        (["--models", "vit_tiny", "vit_tiny"], "labels must be distinct"),
    ]


def test_every_bad_input_is_one_line_and_exit_2(hub, tmp_path, capsys):
    for change, message in _bad_cases(hub, tmp_path):
        args = {
            "--models": ["resnet_tiny"],
            "--data": [hub["data"]],
            "--out": [str(tmp_path / "o")],
        }
        flags = [i for i, a in enumerate(change) if a.startswith("--")] + [len(change)]
        for start, stop in itertools.pairwise(flags):
            args[change[start]] = change[start + 1 : stop]
        argv = [x for flag, values in args.items() for x in (flag, *values)]
        assert _script().main(argv) == 2, change
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("hubtune rank: error:"), (change, lines)
        assert message in lines[0], (change, lines[0])
        assert not (tmp_path / "o").exists()  # nothing written before the error


def test_a_failing_score_keeps_the_finished_ones(hub, tmp_path, monkeypatch, capsys):
    def broken(f, y, p):
        raise ValueError("features must not be constant: every column has zero variance")

    monkeypatch.setitem(hub_ranking.SCORES, "gbc", broken)
    argv = ["--models", *hub["models"][:2], "--data", hub["data"], "--scores", "logme,gbc",
            "--out", str(tmp_path / "o"), "--cache-dir", str(hub["root"] / "cache")]  # fmt: skip
    assert _script().main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (after the progress bars)
    assert err.startswith("hubtune rank: error: score 'gbc' failed on model 'r'")
    report = json.loads((tmp_path / "o" / "ranking.json").read_text())
    assert report["scores"] == ["logme"] and "zero variance" in report["error"]
    assert [sorted(m["scores"]) for m in report["models"]] == [["logme"], ["logme"]]


# a script run as a file imports the packages of this tree, not those installed from another
_THIS_TREE = {**os.environ, "PYTHONPATH": str(SCRIPT.parents[1])}


def test_help_lists_models_and_the_cache(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path, env=_THIS_TREE)  # fmt: skip
    assert proc.returncode == 0
    assert "resnet50" in proc.stdout and "vit_b16" in proc.stdout
    assert str(jaxmodels.cache_root() / "features") in proc.stdout


def test_script_exits_2_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--models", "resnet_nope", "--data", "x.npz", "--out", "o"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env=_THIS_TREE,
    )  # fmt: skip
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.startswith(
        "hubtune rank: error: model 'resnet_nope' is neither a known name"
    )


def test_float64_scores_run_pinned_to_the_host_cpu(hub, monkeypatch):
    """On an accelerator host the default device is the accelerator: scoring must name the CPU
    itself (here every device is a CPU, so the pin is what is checked)."""
    seen = []

    def spy(f, y, p):
        seen.append((jax.config.jax_default_device, jnp.zeros(1).dtype))
        return 0.0

    monkeypatch.setitem(hub_ranking.SCORES, "gbc", spy)
    kwargs = dict(scores=["gbc"], cache_dir=hub["root"] / "cache", log=lambda _: None)
    hub_ranking.rank_hub(hub["models"][:1], hub["data"], **kwargs)
    ((device, dtype),) = seen
    assert device is not None and device.platform == "cpu" and dtype == jnp.float64


@pytest.mark.parametrize("num_scores", [1, 8, 9])
def test_ranking_plot_names_the_data_and_shows_every_model_once(num_scores, tmp_path, monkeypatch):
    """One panel per score; the models' legend in the grid's empty slots when there are any
    (nine scores on four columns), else below the panels; the heading names the data."""
    import matplotlib.figure

    from scoring.hub import report as hub_report

    drawn = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: drawn.append(fig))
    models = [f"model-{i}" for i in range(5)]
    scores = [f"score{j}" for j in range(num_scores)]
    ranking = hub_report.Ranking(
        data="/some/folder/target.npz", scores=scores, models=models,
        values={m: {s: float(i + j) for j, s in enumerate(scores)} for i, m in enumerate(models)},
        ranks={}, cached={}, accuracies={m: 0.1 * i for i, m in enumerate(models)},
        agreement=dict.fromkeys(scores),  # every panel titled "all models tie"
    )  # fmt: skip
    hub_report.plot_ranking(ranking, tmp_path / "ranking.png")
    (fig,) = drawn
    assert "target.npz" in fig._suptitle.get_text() and "/some" not in fig._suptitle.get_text()
    panels = [ax for ax in fig.axes if ax.axison]
    assert [ax.get_xlabel() for ax in panels] == scores
    legends = fig.legends + [ax.get_legend() for ax in fig.axes if ax.get_legend()]
    (legend,) = legends
    assert [t.get_text() for t in legend.get_texts()] == models
    assert (legend in fig.legends) == (num_scores in (1, 8))  # no empty slot: below the panels


def test_a_score_on_which_all_models_tie_gets_plain_ticks_around_its_value(tmp_path, monkeypatch):
    """Values equal up to rounding (1 and 1 + 1e-12) drew ticks 9, 10 and an offset
    "1e-12+10e-1"; the panel now spans the value with its own ticks."""
    import matplotlib.figure

    from scoring.hub import report as hub_report

    drawn = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: drawn.append(fig))
    ranking = hub_report.Ranking(
        data="d.npz", scores=["hscore"], models=["a", "b"],
        values={"a": {"hscore": 1.0}, "b": {"hscore": 1.0 + 1e-12}}, ranks={}, cached={},
        accuracies={"a": 0.5, "b": 0.4}, agreement={"hscore": None},
    )  # fmt: skip
    hub_report.plot_ranking(ranking, tmp_path / "ranking.png")
    (fig,) = drawn
    fig.canvas.draw()
    (panel,) = [ax for ax in fig.axes if ax.axison]
    assert panel.get_title() == "all models tie"
    low, high = panel.get_xlim()
    assert low < 1.0 < high and high - low > 0.01
    assert panel.xaxis.get_offset_text().get_text() == ""
