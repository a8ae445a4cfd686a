"""scripts/cascade.py and hubtune.serve.report end to end on tiny saved models and tiny data:
the report against recomputations from the cached logits, the cache, the plot, the choice of
cascade against brute force, shared inputs, sweeps, and every user error."""

import contextlib
import importlib.util
import io
import itertools
import json
import os
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from session_folders import made_once

import jaxmodels
from hubtune.serve import members as cascade_members
from hubtune.serve import output as cascade_output
from jaxmodels import host
from jaxmodels.inference import evaluate as inference
from jaxmodels.inference import prepared as prepared_lib
from jaxmodels.inference.artefact_cache import LogitsCache, ModelFacts
from jaxmodels.models import registry
from jaxmodels.weights import model_refs

SCRIPT = pathlib.Path(__file__).parent.parent / "scripts" / "cascade.py"
# label, name, overrides, feature dims the head reads: cheapest first (0.42, 0.51, 3.2 MFLOPs),
# and (on this data) more accurate with cost; the two ResNets share their preprocessing
MEMBERS = (("small", "resnet_tiny", {"width": 4}, 32), ("vit", "vit_tiny", {"depth": 1}, 1),
           ("big", "resnet_tiny", {"width": 16}, 64))  # fmt: skip
NUM_CLASSES, NUM_IMAGES, BATCH = 3, 64, 64


def _script():
    return importlib.import_module("hubtune.serve.cli")


def _images(n, seed, classes=NUM_CLASSES):
    """uint8 [n, 12, 12, 3] noise tinted by class (a colour per class), labels [n]."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    tint = 40 * np.eye(3, dtype=np.int64)[labels % 3]
    images = rng.integers(0, 216, (n, 12, 12, 3)) + tint[:, None, None, :]
    return images.astype(np.uint8), labels


def _data(path, n, seed, classes=NUM_CLASSES):
    images, labels = _images(n, seed, classes)
    np.savez(path, images=images, labels=labels)
    return str(path)


def _he_variables(model, seed: int) -> dict:
    """Variables shaped like `model.init`'s without compiling it: He-scaled kernels, unit norm
    scales and variances, zero biases and means (features then vary with the input as a
    trained network's do, unlike a uniformly small random fill)."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        key = jax.tree_util.keystr(path)
        if key.endswith("['kernel']") or key.endswith("['embedding']"):
            fan_in = np.prod(leaf.shape[:-1]) if leaf.ndim > 1 else 1
            return (np.sqrt(2.0 / fan_in) * rng.standard_normal(leaf.shape)).astype(leaf.dtype)
        if key.endswith("['scale']") or key.endswith("['var']"):
            return np.ones(leaf.shape, leaf.dtype)
        if "pos_embedding" in key or key.endswith("['cls']"):
            return (0.02 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)
        return np.zeros(leaf.shape, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, dict(shapes))


def _save(root, label, name, overrides, dims, seed, num_classes=NUM_CLASSES, bias_nan=False,
          probe=None):  # fmt: skip
    """A random network with a least-squares head on its first `dims` features (fitted on
    separate data), saved with `jaxmodels.save`. Returns its folder and, given `probe` images
    [N, H, W, 3], its logits on them: the head applied in float64 NumPy to the features, which
    come from the model's `features` method (not the logits path the script uses)."""
    model = registry.create(name, num_classes=num_classes, **overrides)
    variables = _he_variables(model, seed)
    head = variables["params"][registry.spec_of(model).head]
    if num_classes == NUM_CLASSES and not bias_nan:
        images, labels = _images(NUM_IMAGES, 100)
        probe = images[:0] if probe is None else probe
        everything = np.concatenate([images, probe])
        feats_all = jaxmodels.extract_features(  # labels unused: any valid ones
            model, variables, (everything, np.arange(len(everything)) % NUM_CLASSES),
            batch_size=BATCH, progress=False).astype(np.float64)  # fmt: skip
        feats = feats_all[: len(images), :dims]
        mean, std = feats.mean(0), feats.std(0) + 1e-6
        z = (feats - mean) / std
        w = np.linalg.solve(z.T @ z + np.eye(dims), z.T @ (2 * np.eye(3)[labels] - 1))
        kernel = np.zeros(head["kernel"].shape)
        kernel[:dims] = 2 * w / std[:, None]
        head["kernel"], head["bias"] = kernel.astype(np.float32), (-2 * (mean / std) @ w)
    else:  # members for the error cases: any head of the right shape
        rng = np.random.default_rng(seed)
        head["kernel"] = rng.standard_normal(head["kernel"].shape).astype(np.float32)
        head["bias"] = np.full(num_classes, np.nan if bias_nan else 0.0)
    head["bias"] = np.asarray(head["bias"], np.float32)
    jaxmodels.save(root / label, name, variables, **overrides)
    if probe is None:
        return root / label
    probe_logits = feats_all[len(images) :] @ head["kernel"].astype(np.float64) + head["bias"]
    return root / label, probe_logits


def _run(argv) -> tuple[int, str, str]:
    """main(argv) in this process (jit caches are shared), with its stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = _script().main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def _argv(hub, out, *extra, members=None):
    # not in cost order: the report must order them (small, vit, big)
    members = members or [hub["members"][i] for i in (2, 0, 1)]
    return ["--models", *members, "--heldout", hub["heldout"],
            "--test", hub["test"], "--out", out, "--cache-dir", hub["cache"],
            "--batch-size", BATCH, *extra]  # fmt: skip


def _make_hub(root: pathlib.Path) -> None:
    """The saved members, the data, each member's expected test logits, and one full run of the
    script with timing (its outputs, stdout and stderr in ``first/``); ``hub.json`` last."""
    test = _data(root / "test.npz", NUM_IMAGES, 2)
    saved = [_save(root, *member, seed, probe=np.load(test)["images"])
             for seed, member in enumerate(MEMBERS)]  # fmt: skip
    np.save(root / "test_logits.npy", np.stack([logits for _, logits in saved]))
    hub = {
        "members": [str(folder) for folder, _ in saved],
        "heldout": _data(root / "heldout.npz", NUM_IMAGES, 1),
        "test": test,
        "cache": str(root / "cache"),
    }
    code, stdout, stderr = _run(_argv(hub, root / "first", "--repeats", 1))
    assert code == 0, stderr
    (root / "first" / "stdout.txt").write_text(stdout)
    (root / "first" / "stderr.txt").write_text(stderr)
    (root / "hub.json").write_text(json.dumps(hub))


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """`_make_hub`'s folder, made once per session and shared by the xdist workers, so its
    compiles happen once."""
    with made_once(tmp_path_factory, "cascade_script_hub") as (root, missing):
        if missing:
            _make_hub(root)
    hub = json.loads((root / "hub.json").read_text())
    return {**hub, "root": root, "test_logits": np.load(root / "test_logits.npy")}


@pytest.fixture(scope="module")
def first(hub):
    """The full run with timing: (report, stdout, stderr, out folder)."""
    out = hub["root"] / "first"
    texts = [(out / name).read_text() for name in ("cascade.json", "stdout.txt", "stderr.txt")]
    return json.loads(texts[0]), texts[1], texts[2], out


# ----------------------------------------------------------------------------- recomputations


def _softmax_max(logits_NK):
    z = logits_NK - logits_NK.max(axis=1, keepdims=True)
    p = np.exp(z)
    return (p / p.sum(axis=1, keepdims=True)).max(axis=1)


def _numpy_cascade(logits_MNK, thresholds, costs_M, labels_N):
    """The paper's cascade in float64 NumPy: stage k = mean logits of members 0..k, exit when
    its top probability > t_k. Returns (accuracy, average cost, exit fractions, the smallest
    |confidence − threshold| met, so ties at a threshold can be ruled out)."""
    logits = logits_MNK.astype(np.float64)
    num_members, n = logits.shape[:2]
    exit_N = np.full(n, num_members - 1)
    undecided = np.ones(n, bool)
    closest = np.inf
    for k in range(num_members - 1):
        conf_N = _softmax_max(logits[: k + 1].mean(axis=0))
        closest = min(closest, np.abs(conf_N[undecided] - thresholds[k]).min(initial=np.inf))
        leave = undecided & (conf_N > thresholds[k])
        exit_N[leave] = k
        undecided &= ~leave
    combined_NK = np.stack([logits[: e + 1].mean(axis=0)[i] for i, e in enumerate(exit_N)])
    accuracy = np.mean(combined_NK.argmax(axis=1) == labels_N)
    cost = np.cumsum(costs_M)[exit_N].mean()
    return accuracy, cost, np.bincount(exit_N, minlength=num_members) / n, closest


def _cached(report, role):
    """logits_MNK of the report's members (in its order) read straight from the cache files."""
    return np.stack([np.load(m["logits_cache"][role])["logits"] for m in report["members"]])


def _brute_force_pairs(logits_PNK, labels_N, costs_P):
    """(accuracy, cost) of every single model and every two-stage cascade at every threshold
    between distinct confidences (float64 NumPy)."""
    points = [
        (np.mean(x.argmax(1) == labels_N), c) for x, c in zip(logits_PNK, costs_P, strict=True)
    ]
    for i, j in itertools.combinations(range(len(costs_P)), 2):
        conf = _softmax_max(logits_PNK[i].astype(np.float64))
        values = np.unique(conf)
        for t in np.concatenate([[0.0], (values[1:] + values[:-1]) / 2, [1.0]]):
            acc, cost, _, _ = _numpy_cascade(logits_PNK[[i, j]], [t], costs_P[[i, j]], labels_N)
            points.append((acc, cost))
    return points


# ----------------------------------------------------------------------------- end to end


def test_report_equals_recomputation_from_the_cached_logits(hub, first):
    report, stdout, stderr, _ = first
    labels = {role: np.load(hub[key])["labels"] for role, key in
              (("held-out", "heldout"), ("test", "test"))}  # fmt: skip
    members = report["members"]
    specs = [jaxmodels.spec(name, num_classes=NUM_CLASSES, **kw) for _, name, kw, _ in MEMBERS]
    assert [m["label"] for m in members] == ["small", "vit", "big"]  # by cost
    assert [m["gflops"] for m in members] == [s.flops_per_image / 1e9 for s in specs]
    for m, expect in zip(members, hub["test_logits"], strict=True):
        # the cache holds this model's logits, computed with its own preprocessing
        cached = np.load(m["logits_cache"]["test"])["logits"]
        np.testing.assert_allclose(cached, expect, rtol=1e-4, atol=1e-4, err_msg=m["label"])
        for role, key in (("held-out", "heldout_accuracy"), ("test", "test_accuracy")):
            logits = np.load(m["logits_cache"][role])["logits"]
            assert m[key] == np.mean(logits.argmax(1) == labels[role])
    costs = np.array([s.flops_per_image for s in specs], np.float64)
    for role in ("held-out", "test"):
        logits = _cached(report, role)
        key = "heldout_accuracy" if role == "held-out" else "test_accuracy"
        for k, ensemble in enumerate(report["ensembles"]):
            expect = np.mean(logits[: k + 1].mean(0).argmax(1) == labels[role])
            assert ensemble[key] == pytest.approx(expect, abs=1e-12)
            assert ensemble["gflops"] == pytest.approx(costs[: k + 1].sum() / 1e9)

    # the chosen cascade and every frontier point, recomputed with NumPy from the cache
    names = [m["label"] for m in members]
    chosen = report["cascade"]
    for role, summary in (("held-out", chosen["heldout"]), ("test", chosen["test"])):
        idx = [names.index(n) for n in chosen["members"]]
        acc, cost, exits, closest = _numpy_cascade(
            _cached(report, role)[idx], chosen["thresholds"], costs[idx], labels[role]
        )
        assert closest > 1e-6  # no example sits on a threshold: float rounding cannot flip it
        assert summary["accuracy"] == acc
        assert summary["gflops"] == pytest.approx(cost / 1e9, rel=1e-12)
        np.testing.assert_allclose(summary["exit_fractions"], exits)
    test_logits = _cached(report, "test")
    assert 2 <= len(report["frontier"]) <= report["frontier_points_found"]
    for point in report["frontier"]:
        idx = [names.index(n) for n in point["members"]]
        acc, cost, _, closest = _numpy_cascade(
            test_logits[idx], point["thresholds"], costs[idx], labels["test"]
        )
        if closest > 1e-6:
            assert point["test"]["accuracy"] == acc, point
            assert point["test"]["gflops"] == pytest.approx(cost / 1e9, rel=1e-12)

    # the goal: the costliest model's held-out accuracy, met at the lowest cost there is
    target = members[-1]["heldout_accuracy"]
    assert report["goal"]["target_accuracy"] == target and report["goal"]["reached"]
    assert chosen["heldout"]["accuracy"] >= target
    heldout = _cached(report, "held-out")
    cheapest = min(c for a, c in _brute_force_pairs(heldout, labels["held-out"], costs)
                   if a >= target)  # fmt: skip
    assert chosen["heldout"]["gflops"] <= cheapest / 1e9 * (1 + 1e-12)

    # measured: every contender timed, the executor's answers are the simulation's
    timing = report["timing"]
    assert len(timing["member_ms_per_image"]) == 3 and timing["cascade_ms_per_image"] > 0
    assert timing["ensemble_ms_per_image"] > 0 and timing["images"] == NUM_IMAGES
    assert timing["executor"]["agreement_with_simulation"] >= 0.95
    assert timing["executor"]["gflops"] == pytest.approx(chosen["test"]["gflops"], rel=0.05)
    assert report["cpu"] == host.cpu_description()  # whose timings they are
    for text in ("Pareto frontier", "ensemble of all 3", "cascade ", "ms/image", "speedup"):
        assert text in stdout

    # deployed by measured time: a cascade only when predicted ≥ 1.1× the baseline, else the
    # baseline alone with a message saying so (stderr)
    deployed = timing["deployment"]
    assert len(deployed["member_ms_per_image"]) == 3
    if len(deployed["members"]) > 1:
        assert deployed["predicted_speedup_over_baseline"] >= 1.1 and deployed["message"] == ""
    else:
        assert deployed["members"] == [deployed["baseline"]]
        assert deployed["message"].startswith(f"serving {deployed['baseline']} alone")
        assert deployed["message"] in stderr


def test_plot_is_written(first):
    _, _, stderr, out = first
    image = __import__("matplotlib.image", fromlist=["imread"]).imread(out / "cascade.png")
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 500
    assert image[..., :3].std() > 0.05  # not a blank canvas
    assert f"wrote {out / 'cascade.png'}" in stderr


def test_plot_shows_every_model_cascade_and_ensemble_where_the_report_says(first):
    report = first[0]
    fig = cascade_output.report_figure(report)
    (ax,) = fig.axes
    members = report["members"]
    # every single model: a point at (GFLOPs, test accuracy), labelled by its short name
    labels = {t.get_text(): t.xy for t in ax.texts}
    assert labels == {m["label"]: (m["gflops"], m["test_accuracy"]) for m in members}
    points = np.concatenate([c.get_offsets() for c in ax.collections])
    for m in members:
        assert np.any(np.all(points == [m["gflops"], m["test_accuracy"]], axis=1)), m["label"]
    # the curves: the frontier (by test cost) and the ensembles of the cheapest k
    curves = {line.get_label(): np.column_stack(line.get_data()) for line in ax.lines}
    frontier = sorted((p["test"]["gflops"], p["test"]["accuracy"]) for p in report["frontier"])
    np.testing.assert_array_equal(curves["cascades (held-out frontier)"], frontier)
    np.testing.assert_array_equal(curves["ensembles of the cheapest k"],
                                  [(e["gflops"], e["test_accuracy"]) for e in report["ensembles"]])  # fmt: skip
    chosen = report["cascade"]
    star = [c for c in ax.collections if c.get_label().startswith("chosen: ")]
    assert len(star) == 1 and star[0].get_label() == "chosen: " + " → ".join(chosen["members"])
    np.testing.assert_array_equal(star[0].get_offsets(), [[chosen["test"]["gflops"],
                                                           chosen["test"]["accuracy"]]])  # fmt: skip
    # the legend stands beside the axes, over none of their points
    canvas = FigureCanvasAgg(fig)  # what savefig draws a PNG with
    canvas.draw()
    renderer = canvas.get_renderer()
    legend, axes = ax.get_legend().get_window_extent(renderer), ax.get_window_extent(renderer)
    assert legend.x0 >= axes.x1
    assert fig.get_window_extent(renderer).contains(legend.x1 - 1, legend.y0 + 1)  # not cut off


def test_a_report_is_never_written_over_another(first, tmp_path):
    """A folder filled by another run between the check and the write: the report goes to the
    next free OUT-k, whole (both files), and what was there is untouched."""
    report = first[0]
    out = tmp_path / "out"
    out.mkdir()
    (out / "cascade.png").write_bytes(b"another run's")  # only one of the two: still taken
    (tmp_path / "out-2").mkdir()
    (tmp_path / "out-2" / "cascade.json").write_text("{}")
    (tmp_path / "out-3").write_text("a file, not a folder")
    paths = cascade_output.write_outputs(report, out)
    assert paths == [tmp_path / "out-4" / name for name in cascade_output.OUTPUTS]
    assert json.loads(paths[0].read_text()) == report and paths[1].stat().st_size > 1000
    assert (out / "cascade.png").read_bytes() == b"another run's"
    assert not (out / "cascade.json").exists()
    assert (tmp_path / "out-2" / "cascade.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted(
        ["out", "cascade.png", "out-2", "cascade.json", "out-3", "out-4", *cascade_output.OUTPUTS]
    )  # no temporary left behind


def test_plot_labels_drop_what_a_sweep_s_runs_share():
    sweep = ["lr=0.001_seed=0_aug=light", "lr=0.001_seed=1_aug=light", "lr=0.01_seed=0_aug=light"]
    assert cascade_output.short_labels(sweep) == ["lr=0.001_seed=0", "lr=0.001_seed=1",
                                                  "lr=0.01_seed=0"]  # fmt: skip
    assert cascade_output.short_labels(["small", "a_very_long_label_indeed"]) == [
        "small", "a_very_long_label…"]  # fmt: skip
    assert cascade_output.short_labels(["x_1", "x_1"]) == ["x_1", "x_1"]  # would not differ


def test_second_run_reads_the_cache_and_builds_no_model(hub, first, monkeypatch, tmp_path):
    report = first[0]

    def refuse(*args, **kwargs):
        raise AssertionError("a cached run must build and run no model")

    for module, name in ((jaxmodels, "build"), (model_refs, "build"), (registry, "create"),
                         (inference, "predict"), (prepared_lib, "prepare")):  # fmt: skip
        monkeypatch.setattr(module, name, refuse)
    out = tmp_path / "out"
    code, _, stderr = _run(_argv(hub, out, "--no-timing"))
    assert code == 0, stderr
    again = json.loads((out / "cascade.json").read_text())
    assert all(all(m["from_cache"].values()) for m in again["members"])
    assert not any(any(m["from_cache"].values()) for m in report["members"])
    for key in ("members", "ensembles", "frontier", "cascade"):
        strip = lambda rows: json.dumps(rows).replace("true", "false")  # from_cache differs
        assert strip(again[key]) == strip(report[key]), key
    assert again["timing"] is None


def test_unreachable_target_is_a_message_and_the_best_is_reported(hub, first, tmp_path):
    out = tmp_path / "out"
    code, stdout, stderr = _run(_argv(hub, out, "--no-timing", "--target-accuracy", 1.0))
    assert code == 0, stderr
    report = json.loads((out / "cascade.json").read_text())
    assert not report["goal"]["reached"] and "no cascade reaches" in report["goal"]["message"]
    assert "no cascade reaches" in stdout
    best = max(p["heldout_accuracy"] for p in report["frontier"])
    assert best < 1.0 and report["cascade"]["heldout"]["accuracy"] == best


def test_flops_budget_picks_the_most_accurate_cascade_within_it(hub, first, tmp_path):
    report = first[0]
    budget = (report["members"][0]["gflops"] + report["members"][1]["gflops"]) / 2
    out = tmp_path / "out"
    code, _, stderr = _run(_argv(hub, out, "--no-timing", "--flops-budget", budget))
    assert code == 0, stderr
    chosen = json.loads((out / "cascade.json").read_text())["cascade"]["heldout"]
    assert chosen["gflops"] <= budget * (1 + 1e-12)
    costs = np.array([m["gflops"] for m in report["members"]])
    labels = np.load(hub["heldout"])["labels"]
    points = _brute_force_pairs(_cached(report, "held-out"), labels, costs)
    assert chosen["accuracy"] >= max(a for a, c in points if c <= budget * (1 + 1e-12))


# ----------------------------------------------------------------------------- pieces


def test_members_of_equal_preprocessing_share_one_prepared_array(hub):
    source = jaxmodels.open_source(hub["test"])
    preps = [jaxmodels.spec(name, **kw).preprocessing for _, name, kw, _ in MEMBERS]
    prepared = cascade_members.PreparedSets({"test": source}, BATCH, log=lambda _: None)
    inputs = prepared.member_inputs("test", preps)
    assert inputs[0] is inputs[2] and inputs[0] is not inputs[1]  # the two ResNets share
    for x, prep in zip(inputs, preps, strict=True):
        expect = np.stack([jaxmodels.prepare_for_eval(source[i]["image"], prep)
                           for i in range(len(source))])  # fmt: skip
        np.testing.assert_array_equal(x, expect)


def test_facts_from_model_json_equal_the_built_models(hub, tmp_path):
    cache = LogitsCache(tmp_path)
    for folder in hub["members"]:
        ref = jaxmodels.parse_model_ref(folder)
        key = cache.weights_key(ref, seed=0, random_init_classes=NUM_CLASSES)
        assert key == jaxmodels.content_digest(folder)
        facts = cache.facts(ref, key, random_init_classes=NUM_CLASSES)
        assert facts == ModelFacts.of_model(jaxmodels.load(folder)[0])
    # a checkpoint file is known only once it was built and noted
    ref = jaxmodels.ModelRef("f", "resnet_tiny", tmp_path / "w.safetensors", "f")
    assert cache.facts(ref, "abc", random_init_classes=3) is None
    cache.note_facts(ref, "abc", facts)
    assert LogitsCache(tmp_path).facts(ref, "abc", random_init_classes=3) == facts


def test_content_digest_memo_follows_size_and_mtime(tmp_path):
    path, memo = tmp_path / "w.bin", tmp_path / "memo" / "digests.json"
    path.write_bytes(b"abc")
    first = jaxmodels.content_digest(path, memo=memo)
    assert first == jaxmodels.content_digest(path) and memo.is_file()
    assert jaxmodels.content_digest(path, memo=memo) == first
    path.write_bytes(b"abd")
    os.utime(path, ns=(1, 1))  # another mtime: the memo must not answer
    assert jaxmodels.content_digest(path, memo=memo) == jaxmodels.content_digest(path) != first


def _run_folder(root, name, model_folder=None, finished=True):
    run = root / name
    run.mkdir(parents=True)
    (run / "config.json").write_text("{}")
    if model_folder is not None:
        jaxmodels.save(run / "model", *model_folder)
        (run / "result.json").write_text(json.dumps({"finished": finished}))
    return run


def test_a_sweep_folder_stands_for_its_runs(tmp_path):
    model = registry.create("resnet_tiny", num_classes=NUM_CLASSES, width=4)
    variables = _he_variables(model, 0)
    sweep = tmp_path / "sweep"
    for name in ("lr=0.1", "lr=0.01"):
        _run_folder(sweep, name, ("resnet_tiny", variables))
    runs = [{"folder": "lr=0.1", "finished": True}, {"folder": "lr=0.01", "finished": True}]
    (sweep / "sweep.json").write_text(json.dumps({"runs": runs}))
    refs = cascade_members.parse_members([str(sweep), f"S:{sweep}"])
    assert [r.label for r in refs] == ["lr=0.1", "lr=0.01", "S/lr=0.1", "S/lr=0.01"]
    assert refs[1].checkpoint == sweep / "lr=0.01" / "model"
    # a run folder whose name holds '=' is a folder, not NAME=CHECKPOINT
    refs = cascade_members.parse_members([str(sweep / "lr=0.1"), f"x:{sweep / 'lr=0.01'}"])
    assert [(r.label, r.name) for r in refs] == [("lr=0.1", "resnet_tiny"), ("x", "resnet_tiny")]
    runs[1]["finished"] = False
    (sweep / "sweep.json").write_text(json.dumps({"runs": runs}))
    with pytest.raises(cascade_members.CascadeInputError, match=r"lr=0\.01.*has not finished"):
        cascade_members.parse_members([str(sweep)])


# ----------------------------------------------------------------------------- user errors


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    done = root / "done"
    done.mkdir()
    (done / "cascade.json").write_text("{}")
    return {
        "four": str(_save(root, "four", "resnet_tiny", {"width": 4}, 0, 5, num_classes=4)),
        "nan": str(_save(root, "nan", "resnet_tiny", {"width": 4}, 0, 6, bias_nan=True)),
        "unfinished": str(_run_folder(root, "unfinished")),
        "labels": _data(root / "five.npz", 20, 3, classes=5),
        "done": str(done),
    }


ERRORS = {
    "missing run": (lambda h, b: ["--models", h["members"][0], str(h["root"] / "nope")],
                    "is neither a known name"),
    "unfinished run": (lambda h, b: ["--models", h["members"][0], b["unfinished"]],
                       "has not finished"),
    "different classes": (lambda h, b: ["--models", h["members"][0], b["four"]],
                          r"class counts differ \(small: 3, four: 4\)"),
    "held-out classes": (lambda h, b: ["--heldout", b["labels"]],
                         "held-out data .* has labels beyond the 3 classes"),
    "one model": (lambda h, b: ["--models", h["members"][0]], "at least two models"),
    "same label": (lambda h, b: ["--models", f"a:{h['members'][0]}", f"a:{h['members'][1]}"],
                   "two models are labelled 'a'"),
    "output exists": (lambda h, b: ["--out", b["done"]],
                      r"holds an earlier result \(cascade.json\); it is never overwritten: .* --out '.*done-2'"),
    "target": (lambda h, b: ["--target-accuracy", 1.5], "--target-accuracy must lie in"),
    "batch": (lambda h, b: ["--batch-size", 12], "multiple of the 8 devices"),
    "nan logits": (lambda h, b: ["--models", h["members"][0], b["nan"]],
                   "model 'nan' gives NaN or infinite logits on 64 of 64 held-out images"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(ERRORS))
def test_user_errors_exit_2_with_one_line(hub, bad, case, tmp_path, monkeypatch):
    make, pattern = ERRORS[case]
    argv = _argv(hub, tmp_path / "out", "--no-timing") + make(hub, bad)  # later flags win
    if case != "nan logits":  # everything else is caught before any model is built or run
        monkeypatch.setattr(model_refs, "build", lambda *a, **k: 1 / 0)
        monkeypatch.setattr(inference, "predict", lambda *a, **k: 1 / 0)
    code, stdout, stderr = _run(argv)
    lines = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert code == 2 and stdout == "", stderr
    assert len(lines) == 1 and lines[0] == stderr.strip().splitlines()[-1], stderr
    assert lines[0].startswith("hubtune serve: error: ")
    assert re.search(pattern, lines[0]), lines[0]
    assert not (tmp_path / "out" / "cascade.json").exists()


@pytest.mark.parametrize(
    "argv, pattern",
    [(["--max-stages", "two"], "argument --max-stages: invalid int value: 'two'"),
     (["--target-accuracy", "0.9", "--flops-budget", "1"], "not allowed with argument"),
     (["--confidence", "entropy"], "argument --confidence: invalid choice: 'entropy'")],
)  # fmt: skip
def test_bad_options_are_one_line_and_exit_2(hub, tmp_path, argv, pattern):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_:
        _script().main([str(a) for a in _argv(hub, tmp_path / "out") + argv])
    assert exit_.value.code == 2
    assert len(err.getvalue().splitlines()) == 1, err.getvalue()
    assert err.getvalue().startswith("hubtune serve: error: ") and re.search(
        pattern, err.getvalue()
    )


def test_help_answers_a_newcomer():
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
        _script().main(["--help"])
    text = out.getvalue()
    assert exit_.value.code == 0
    for words in ("RUN_FOLDER", "SWEEP_FOLDER", "--target-accuracy", "--flops-budget",
                  "--no-timing", "never overwritten", "cascade.png", "resnet50", "tfds:",
                  str(jaxmodels.cache_root() / "logits")):  # fmt: skip
        assert words in text, words
