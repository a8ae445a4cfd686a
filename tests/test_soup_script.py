"""scripts/soup.py end to end on a real sweep made by scripts/finetune.py in this module.

The sweep: a random "pre-trained" resnet_tiny (5 classes, BatchNorm) fine-tuned in full on a
2-class task made here, learning rates 0.01 and 0.03 × data seeds 0 and 1, all from one start
(the new head drawn from init_seed 0), plus one run whose head was drawn from init_seed 1
(another start). The main soup is made with ``--bn recompute``, the recommended path for
BatchNorm networks. References are computed here: the weights read with orbax, averaged in
float64, applied to images preprocessed on the host, scored with a NumPy log-softmax, the greedy
recipe re-run by hand, and recomputed BatchNorm statistics checked through an identity
(``Reference``).

Speed: the runs are trained in this process (one compiled train step for all five), and under
pytest-xdist the first worker to get here makes them and the main soup while the other waits on
a file lock and then reads them.
"""

import contextlib
import importlib.util
import io
import json
import pathlib
import shutil

import chex
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from session_folders import made_once
from tiny_classifier import random_variables

import jaxmodels
import training
from training import load_run

REPO = pathlib.Path(__file__).parents[1]
RUNS = ["lr=0.01_seed=0", "lr=0.01_seed=1", "lr=0.03_seed=0", "lr=0.03_seed=1"]
OTHER = len(RUNS)  # the run from another start, after the sweep's in Reference.runs


def _script(name="soup"):
    return importlib.import_module({"soup": "hubtune.soup.cli", "finetune": "hubtune.tune"}[name])


def _task(path, n, seed):
    """Class 1 has a redder mean than class 0, blurred by a per-image shift: not separable."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    images = rng.normal(128, 40, (n, 32, 32, 3))
    images[..., 0] += (np.where(labels == 1, 15.0, -15.0) + rng.normal(0, 20, n))[:, None, None]
    np.savez(path, images=np.clip(images, 0, 255).astype(np.uint8), labels=labels)
    return path


def _main(argv):
    """``soup.py`` in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = _script().main([*argv, "--no-progress"])
    return code, out.getvalue(), err.getvalue()


def _make_runs(root):
    data = {name: _task(root / f"{name}.npz", n, seed)
            for name, n, seed in (("train", 48, 0), ("heldout", 64, 1), ("test", 64, 2))}  # fmt: skip
    variables = random_variables(jaxmodels.create("resnet_tiny", num_classes=5), seed=1)
    jaxmodels.save(root / "pre", "resnet_tiny", jax.device_get(variables))
    common = ["--model", f"resnet_tiny={root / 'pre'}", "--data", str(data["train"]),
              "--mode", "full", "--epochs", "4", "--warmup-epochs", "0", "--batch-size", "8",
              "--augmentation", "none", "--num-workers", "0", "--no-progress"]  # fmt: skip
    finetune = _script("finetune")
    with contextlib.redirect_stdout(io.StringIO()):
        assert finetune.main([*common, "--lr", "0.01,0.03", "--seed", "0,1",
                              "--out", str(root / "sweep")]) == 0  # fmt: skip
        # every epoch's checkpoint kept: the trajectory soup's ingredients
        assert finetune.main([*common, "--lr", "0.01", "--init-seed", "1",
                              "--checkpoint-every", "6", "--keep-checkpoints", "0",
                              "--out", str(root / "other")]) == 0  # fmt: skip


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Finished runs: ``sweep/`` (4 runs, one start) and ``other/`` (another head init)."""
    with made_once(tmp_path_factory, "soup-runs") as (root, missing):
        if missing:
            _make_runs(root)
    return {"root": root, **{s: root / f"{s}.npz" for s in ("train", "heldout", "test")}}


@pytest.fixture(scope="module")
def soup(sweep, tmp_path_factory):
    """The main soup: greedy and uniform; the default --bn auto recomputes BatchNorm statistics
    (the runs have them)."""
    with made_once(tmp_path_factory, "soup-main") as (root, missing):
        out = root / "soup"
        if missing:
            code, stdout, stderr = _main(
                ["--runs", str(sweep["root"] / "sweep"), "--heldout", str(sweep["heldout"]),
                 "--test", str(sweep["test"]), "--method", "greedy,uniform",
                 "--out", str(out)]
            )  # fmt: skip
            assert code == 0, stderr
            (root / "stdout").write_text(stdout)
            (root / "stderr").write_text(stderr)
    return {"out": out, "json": json.loads((out / "soup.json").read_text()),
            "stdout": (root / "stdout").read_text(), "stderr": (root / "stderr").read_text()}  # fmt: skip


# ------------------------------------------------------------------ independent references


class Reference:
    """Runs read straight from orbax, applied to images preprocessed on the host, scored in NumPy.

    ``recomputed_logits`` gives what a soup with BatchNorm statistics recomputed on the held-out
    set predicts there, through an identity instead of the library: a train-mode pass over the
    whole held-out set as one batch normalises every BatchNorm input with that set's exact mean
    and (biased) variance, which is what recomputed running statistics are.
    """

    def __init__(self, sweep):
        self.model = jaxmodels.create("resnet_tiny", num_classes=2)
        folders = [sweep["root"] / "sweep" / r for r in RUNS] + [sweep["root"] / "other"]
        self.runs = [_restore(folder / "model") for folder in folders]
        prep = jaxmodels.spec("resnet_tiny").preprocessing
        self.data = {}
        for split in ("heldout", "test"):
            npz = np.load(sweep[split])
            images = np.stack([jaxmodels.preprocess_for_eval(x, prep) for x in npz["images"]])
            self.data[split] = (images, npz["labels"])
        self._eval = jax.jit(lambda v, x: self.model.apply(v, x, train=False))
        self._train = jax.jit(
            lambda v, x: self.model.apply(v, x, train=True, mutable=["batch_stats"])[0]
        )

    def logits(self, variables64, split):
        return np.asarray(self._eval(jax.tree.map(np.float32, variables64), self.data[split][0]))

    def recomputed_logits(self, variables64):
        return np.asarray(
            self._train(jax.tree.map(np.float32, variables64), self.data["heldout"][0])
        )

    def score(self, logits, split):
        labels = self.data[split][1]
        z = np.asarray(logits, np.float64)
        top = z.max(1, keepdims=True)
        log_probs = z - top - np.log(np.exp(z - top).sum(1, keepdims=True))
        return {"accuracy": float(np.mean(z.argmax(1) == labels)),
                "loss": float(-log_probs[np.arange(len(labels)), labels].mean()),
                "count": len(labels)}  # fmt: skip

    def average(self, indices, weights=None):
        weights = np.full(len(indices), 1 / len(indices)) if weights is None else weights
        trees = [self.runs[i] for i in indices]
        return jax.tree.map(
            lambda *xs: sum(w * x for w, x in zip(weights, xs, strict=True)), *trees
        )


def _restore(model_dir):
    """A saved model's variables as float64 NumPy, read with orbax (not jaxmodels.load)."""
    return jax.tree.map(np.float64, ocp.StandardCheckpointer().restore(model_dir / "variables"))


@pytest.fixture(scope="module")
def reference(sweep):
    return Reference(sweep)


def _assert_scores(got, expected):
    assert got["count"] == expected["count"]
    assert got["accuracy"] == expected["accuracy"]
    assert got["loss"] == pytest.approx(expected["loss"], rel=1e-4)


# ------------------------------------------------------------------ the numbers


def _check_soup(reference, out, entry, indices, weights=None, *, recomputed):
    """The saved soup is the weighted average of runs ``indices`` and scores what ``entry`` says."""
    average = reference.average(indices, weights)
    saved = _restore(out / "model")
    chex.assert_trees_all_close(saved["params"], average["params"], rtol=1e-5, atol=1e-6)
    if recomputed:  # recomputed statistics (a single run's too): Reference's identity
        expected = reference.recomputed_logits(average)
        np.testing.assert_allclose(reference.logits(saved, "heldout"), expected,
                                   rtol=1e-4, atol=1e-4)  # fmt: skip
    else:  # averaged statistics: every leaf is the average
        chex.assert_trees_all_close(saved, average, rtol=1e-5, atol=1e-6)
        expected = reference.logits(average, "heldout")
    _assert_scores(entry["heldout"], reference.score(expected, "heldout"))
    if "test" in entry:
        _assert_scores(entry["test"], reference.score(reference.logits(saved, "test"), "test"))


def test_every_number_in_soup_json_equals_a_numpy_recomputation(soup, reference):
    report = soup["json"]
    n = len(RUNS)
    assert [row["name"] for row in report["ingredients"]] == RUNS
    logits = {s: [reference.logits(reference.runs[i], s) for i in range(n)]
              for s in ("heldout", "test")}  # fmt: skip
    for i, row in enumerate(report["ingredients"]):
        for split in ("heldout", "test"):
            _assert_scores(row[split], reference.score(logits[split][i], split))
    heldout = [reference.score(z, "heldout")["accuracy"] for z in logits["heldout"]]
    assert len(set(heldout)) > 1  # the runs differ: the greedy choice means something
    best = int(np.argmax(heldout))
    assert report["best_single"] == {"name": RUNS[best], "index": best}
    for split in ("heldout", "test"):  # the logit ensemble: mean logits of all runs
        _assert_scores(report["ensemble"][split], reference.score(np.mean(logits[split], 0), split))
    assert report["ensemble"]["inference_cost"] == n
    assert report["bn"] == "recompute"  # what --bn auto chose for BatchNorm runs

    # the greedy recipe by hand, with one yardstick (recomputed statistics): every run and every
    # candidate judged with its BatchNorm statistics recomputed; best first, then keep each run
    # if held-out accuracy does not drop
    judged = [
        reference.score(reference.recomputed_logits(reference.average([i])), "heldout")["accuracy"]
        for i in range(n)
    ]
    assert judged != heldout  # recomputed statistics change the runs' scores: two yardsticks differ
    order = sorted(range(n), key=lambda i: -judged[i])
    members, kept, candidates = [order[0]], judged[order[0]], [judged[order[0]]]
    for i in order[1:]:
        recomputed = reference.recomputed_logits(reference.average([*members, i]))
        candidates.append(reference.score(recomputed, "heldout")["accuracy"])
        if candidates[-1] >= kept:
            members, kept = [*members, i], candidates[-1]
    greedy = report["soups"]["greedy"]
    np.testing.assert_allclose(greedy["report"]["scores"], judged, atol=1e-6)
    assert greedy["members"] == [RUNS[i] for i in members]
    assert greedy["report"]["candidate_scores"] == candidates
    assert greedy["report"]["order_names"] == [RUNS[i] for i in order]
    assert len(members) < n, "the greedy soup should refuse some runs"

    for method, indices in (("greedy", members), ("uniform", list(range(n)))):
        entry = report["soups"][method]
        _check_soup(reference, soup["out"] / method, entry, indices, recomputed=True)
    print("\n" + soup["stdout"])


def test_the_greedy_soup_is_at_least_the_best_run_on_heldout_data(soup):
    report = soup["json"]
    best = max(report["soups"]["greedy"]["report"]["scores"])  # the runs, as the soups are judged
    assert report["soups"]["greedy"]["heldout"]["accuracy"] >= best
    steps = report["soups"]["greedy"]["report"]["soup_scores"]
    assert steps == sorted(steps) and steps[-1] == report["soups"]["greedy"]["heldout"]["accuracy"]


def test_each_soup_is_a_run_folder_that_loads_and_predicts_what_soup_json_says(soup, sweep):
    test_data = (np.load(sweep["test"])["images"], np.load(sweep["test"])["labels"])
    for method in ("greedy", "uniform"):
        entry = soup["json"]["soups"][method]
        run = load_run(soup["out"] / method)
        assert run.result["finished"] and run.config.out_dir == str(soup["out"] / method)
        assert run.info["kind"] == "soup" and run.info["method"] == method
        assert run.info["members"] == entry["members"] and run.info["name"] == "resnet_tiny"
        assert run.info["bn"] == "recompute" and run.name == method
        assert run.result["final_eval"]["accuracy"] == entry["test"]["accuracy"]
        logits = jaxmodels.predict(run.model, run.variables, test_data, progress=False)
        _assert_scores(jaxmodels.evaluate_logits(logits, test_data[1])._asdict(), entry["test"])
        model, variables = jaxmodels.load(soup["out"] / method)
        assert model == run.model
        chex.assert_trees_all_equal(variables, run.variables)


def test_the_table_names_every_model_and_the_picture_is_drawn(soup):
    table = soup["stdout"].split("\n{")[0]  # the table, before the closing JSON line
    n = len(RUNS)
    members = len(soup["json"]["soups"]["greedy"]["members"])
    for needle in [*RUNS, "best single run", f"greedy soup ({members} of {n} runs)",
                   f"uniform soup ({n} of {n} runs)", f"ensemble of all {n} runs", f"{n}x"]:  # fmt: skip
        assert needle in table, needle
    assert str(soup["out"].parent) not in table  # run names, not paths
    import matplotlib.image

    picture = matplotlib.image.imread(soup["out"] / "soup.png")
    assert picture.shape[0] > 400 and picture.shape[1] > 600
    assert "LP-FT" not in soup["stderr"]  # one start: no warning
    assert not list(soup["out"].parent.glob(".soup.*"))  # no temporary folder left


# ------------------------------------------------------------------ starts, learned, averaged BN


def test_runs_with_different_starts_get_the_lp_ft_warning_and_a_learned_soup(
    sweep, reference, tmp_path
):
    first, other = sweep["root"] / "sweep" / RUNS[0], sweep["root"] / "other"
    starts = {load_run(p, weights=False).info["start_sha256"] for p in (first, other)}
    assert len(starts) == 2  # really two starting points (the heads were drawn apart)
    code, stdout, stderr = _main(
        ["--runs", str(first), str(other), "--heldout", str(sweep["heldout"]),
         "--method", "uniform,learned", "--bn", "average", "--out", str(tmp_path / "o")]
    )  # fmt: skip
    assert code == 0, stderr
    warning = [line for line in stderr.splitlines() if "warning" in line]
    assert len(warning) == 1 and "LP-FT" in warning[0] and "LP_RUN/model" in warning[0]
    assert f"runs {RUNS[0]} and other started from different weights" in warning[0]
    assert "learned soup (2 of 2 runs)" in stdout and "test" not in stdout.splitlines()[0]
    # --bn average: statistics averaged like every other weight
    report = json.loads((tmp_path / "o" / "soup.json").read_text())
    assert report["test_data"] is None and "test" not in report["soups"]["uniform"]
    _check_soup(reference, tmp_path / "o" / "uniform", report["soups"]["uniform"], [0, OTHER],
                recomputed=False)  # fmt: skip
    learned = report["soups"]["learned"]
    assert learned["members"] == [RUNS[0], "other"]
    weights = np.asarray(learned["weights"])
    assert weights.sum() == pytest.approx(1.0, abs=1e-6) and len(learned["report"]["losses"]) == 5
    assert not np.allclose(weights, 0.5)  # the weights moved off the uniform start
    _check_soup(reference, tmp_path / "o" / "learned", learned, [0, OTHER], weights,
                recomputed=False)  # fmt: skip
    assert load_run(tmp_path / "o" / "learned").info["weights"] == learned["weights"]


# ------------------------------------------------------------------ bad input


def _bad_cases(sweep, tmp):
    root = sweep["root"]
    (tmp / "empty").mkdir()
    (tmp / "empty" / "sweep.json").write_text(json.dumps({"runs": []}))

    def copy_run(name, edit_json, change):
        folder = tmp / name
        shutil.copytree(root / "sweep" / RUNS[1], folder)
        path = folder / edit_json
        path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
        return str(folder)

    unfinished = copy_run("unfinished", "result.json", {"finished": False})
    resnet18 = copy_run("wide", "model/model.json", {"overrides": {"width": 16}})
    classes = copy_run("classes", "model/model.json", {"num_classes": 3})
    other_classes = _task(tmp / "four.npz", 16, 3)
    np.savez(other_classes, images=np.load(other_classes)["images"], labels=np.arange(16) % 4)
    (tmp / "full").mkdir()
    (tmp / "full" / "soup.json").write_text("{}")
    sweep_dir, seed0 = str(root / "sweep"), str(root / "sweep" / RUNS[0])
    return [
        ([str(tmp / "empty")], [], "lists no runs"),
        ([sweep_dir, unfinished], [], "has not finished"),
        ([sweep_dir, resnet18], [], f"runs {RUNS[0]} and wide have different architecture overrides"),
        ([sweep_dir, classes], [], f"runs {RUNS[0]} and classes have different classes (2 vs 3)"),
        ([sweep_dir], ["--heldout", str(other_classes)], "labels beyond the 2 classes"),
        ([sweep_dir], ["--out", str(tmp / "full")], "holds an earlier result (soup.json); it is never overwritten"),
        ([seed0], [], "a soup needs at least 2 finished runs; got 1"),
        ([seed0, seed0], [], "is given twice"),
        ([sweep_dir], ["--method", "greedy,best"], "methods must be distinct names among"),
        ([sweep_dir], ["--bn", "average", "--bn-data", str(sweep["heldout"])], "not with bn='average'"),
        ([sweep_dir], ["--method", "learned", "--learned-max-mb", "0.01"],
         "a learned soup holds all 4 runs in memory"),
        ([str(tmp / "nowhere")], [], "does not exist"),
    ]  # fmt: skip


def test_every_bad_input_is_one_line_exit_2_and_writes_nothing(sweep, tmp_path):
    for runs, extra, message in _bad_cases(sweep, tmp_path):
        before = sorted(tmp_path.rglob("*"))
        out = [] if "--out" in extra else ["--out", str(tmp_path / "new" / "soup")]
        code, stdout, stderr = _main(["--runs", *runs, "--heldout", str(sweep["heldout"]),
                                      *out, *extra])  # fmt: skip
        assert code == 2, (message, stderr)
        assert stderr.startswith("hubtune soup: error: ") and stderr.count("\n") == 1, stderr
        assert message in stderr, (message, stderr)
        assert stdout == ""
        assert sorted(tmp_path.rglob("*")) == before, message  # nothing written, nothing left


def test_a_trajectory_soup_averages_the_checkpoints_one_run_kept(sweep, tmp_path):
    """--trajectory: the checkpoints of one run (24 steps, one kept every 6) are the
    ingredients; the uniform soup is their average, read here straight from orbax."""
    other = sweep["root"] / "other"
    assert [c.step for c in training.trajectory(other)] == [6, 12, 18, 24]
    out = tmp_path / "t"
    code, _, stderr = _main(
        ["--runs", str(other), "--trajectory", "--heldout", str(sweep["heldout"]),
         "--method", "uniform", "--bn", "average", "--out", str(out)]
    )  # fmt: skip
    assert code == 0, stderr
    report = json.loads((out / "soup.json").read_text())
    folders = [str(other / "checkpoints" / str(s)) for s in (6, 12, 18, 24)]
    assert [row["folder"] for row in report["ingredients"]] == folders
    states = [ocp.StandardCheckpointer().restore(other / "checkpoints" / str(s) / "state")
              for s in (6, 12, 18, 24)]  # fmt: skip
    flat = lambda st: {**st["frozen"], **st["trainable"]}
    average = {k: np.mean([np.float64(flat(st)[k]) for st in states], axis=0)
               for k in flat(states[0])}  # fmt: skip
    saved = jaxmodels.models.paths.flatten(_restore(out / "uniform" / "model")["params"])
    assert saved.keys() == average.keys()
    for key, value in average.items():
        np.testing.assert_allclose(saved[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
    # the last checkpoint is the run's saved model (full fine-tuning, no EMA)
    last = training.trajectory(other)[-1].load()[1]
    chex.assert_trees_all_close(last, _restore(other / "model"), rtol=0, atol=0)
    code, _, stderr = _main(
        ["--runs", str(sweep["root"] / "sweep"), "--trajectory", "--heldout",
         str(sweep["heldout"]), "--out", str(tmp_path / "one")]
    )  # fmt: skip
    assert code == 2 and "kept 1 checkpoint(s); a trajectory soup needs at least 2" in stderr


def test_help_explains_when_to_recompute_batchnorm():
    with pytest.raises(SystemExit), contextlib.redirect_stdout(io.StringIO()) as text:
        _script().parse_args(["--help"])
    for needle in ["--bn", "recompute", "BatchNorm", "LP-FT", "greedy", "soup.json", "soup.png",
                   "load_run", "exit status 2", "MALLOC_MMAP_THRESHOLD_"]:  # fmt: skip
        assert needle in text.getvalue(), needle


def test_wise_ft_and_merges_start_from_the_runs_start(sweep, tmp_path):
    """--method wise-ft: the start rebuilt from the runs' model reference (checked against the
    runs' start hash) interpolated with the best run, α swept over 0, 0.1, …, 1 on held-out data
    (α = 1 is the best run). --method task-arithmetic,ties,dare: start + λ·τ, λ chosen the same
    way; weights only, the start's BatchNorm statistics kept (a variance is never negative)."""
    out = tmp_path / "m"
    code, stdout, stderr = _main(
        ["--runs", str(sweep["root"] / "sweep"), "--heldout", str(sweep["heldout"]),
         "--method", "task-arithmetic,ties,dare,wise-ft", "--bn", "average", "--out", str(out)]
    )  # fmt: skip
    assert code == 0, stderr
    assert all(f"{m} soup" in stdout for m in ("wise-ft", "task-arithmetic", "ties", "dare"))
    report = json.loads((out / "soup.json").read_text())
    soups = report["soups"]
    wise, best = soups["wise-ft"], report["best_single"]["index"]
    assert wise["members"] == [RUNS[best]]
    heldout = wise["curve"]["heldout_accuracy"]
    assert heldout[-1] == report["ingredients"][best]["heldout"]["accuracy"]
    assert len(set(heldout)) > 1  # the start and the runs differ
    starts = {soups[m]["curve"]["heldout_accuracy"][0] for m in soups}
    assert len(starts) == 1  # λ = 0 (α = 0) is the runs' start for every method
    for method in ("wise-ft", "task-arithmetic", "ties", "dare"):
        curve = soups[method]["curve"]
        assert curve["alphas"] == [i / 10 for i in range(11)]
        top = max(curve["heldout_accuracy"])
        assert soups[method]["alpha"] == curve["alphas"][curve["heldout_accuracy"].index(top)]
        assert soups[method]["heldout"]["accuracy"] == top
    # the start, rebuilt by the public API and anchored to the hash the runs recorded
    run = load_run(sweep["root"] / "sweep" / RUNS[0], weights=False)
    start = jaxmodels.build(run.config.model, num_classes=2, init_seed=run.config.init_seed)
    start = jax.tree.map(np.float64, jax.device_get(start.variables))
    assert (
        jaxmodels.models.paths.tree_digest(jax.tree.map(np.float32, start))
        == run.info["start_sha256"]
    )
    runs = [_restore(sweep["root"] / "sweep" / r / "model") for r in RUNS]
    scale = soups["task-arithmetic"]["alpha"]
    expected = jax.tree.map(lambda s, *rs: s + scale * sum(r - s for r in rs),
                            start["params"], *[r["params"] for r in runs])  # fmt: skip
    merged = _restore(out / "task-arithmetic" / "model")
    chex.assert_trees_all_close(merged["params"], expected, rtol=1e-5, atol=1e-5)
    for method in ("task-arithmetic", "ties", "dare"):
        stats = _restore(out / method / "model")["batch_stats"]
        chex.assert_trees_all_close(stats, start["batch_stats"], rtol=0, atol=0)
    import matplotlib.image

    assert matplotlib.image.imread(out / "soup.png").shape[1] > 1000  # the curves beside


def test_a_damaged_run_is_one_line_as_installed(sweep, tmp_path):
    """`hubtune soup` over a run whose weights are cut short: exit 2, the error the last and
    only error line (no asyncio noise), no output folder."""
    import shutil
    import subprocess
    import sys

    runs = []
    for name in RUNS[:2]:
        shutil.copytree(sweep["root"] / "sweep" / name, tmp_path / name)
        runs.append(str(tmp_path / name))
    for file in (tmp_path / RUNS[1] / "model" / "variables").rglob("*"):
        if file.is_file() and file.stat().st_size > 1024 and "_METADATA" not in file.name:
            with open(file, "r+b") as f:
                f.truncate(100)
    done = subprocess.run(
        [sys.executable, "-m", "hubtune.cli", "soup", "--runs", *runs, "--heldout",
         str(sweep["heldout"]), "--out", str(tmp_path / "o")],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and "error: " in lines[-1] and RUNS[1] in lines[-1], done.stderr
    assert not [ln for ln in lines[:-1] if "rror" in ln or "Traceback" in ln], done.stderr
    assert not (tmp_path / "o").exists()
