"""Tests for training.loop, training.run, training.sweep, run folders and scripts/finetune.py."""

import importlib.util
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from tiny_classifier import init_tiny, random_variables

import jaxmodels
from jaxmodels.models import paths
from training import load_run, loop, run_folder, sweep
from training.config import RunConfig, RunError, TrainConfig

NUM_CLASSES = 3
REPO = pathlib.Path(__file__).parents[1]
PREP = jaxmodels.Preprocessing(8, 8, (0.5,) * 3, (0.25,) * 3, "bilinear")


def _learnable_task(n=96, size=8, seed=0):
    """Class k images are bright in colour channel k: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % NUM_CLASSES
    images = rng.integers(0, 80, (n, size, size, 3))
    images[np.arange(n), :, :, labels] += 170
    return jaxmodels.ArraySource(images.astype(np.uint8), labels)


def test_fit_reduces_loss_on_a_learnable_task(tmp_path):
    model, variables = init_tiny(ssf=True, num_classes=NUM_CLASSES)
    source = _learnable_task()
    # 96 examples in batches of 16: 6 steps per epoch, 2 of them warmup, 24 in all
    config = TrainConfig(mode="ssf", epochs=4, batch_size=16, lr=0.03, warmup_epochs=1 / 3,
                         num_workers=0)  # fmt: skip
    total = 24
    lines = []
    result = loop.fit(
        model, variables, source, PREP, config, eval_data=source,
        log_path=str(tmp_path / "log.jsonl"), log_every=1, progress=False, log=lines.append,
    )  # fmt: skip
    assert result.finished and result.resumed_from is None
    # the train step donates its state; the caller's variables must not be among the donated
    assert not any(x.is_deleted() for x in jax.tree.leaves(variables))
    records = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    train = [r for r in records if r["split"] == "train"]
    evals = [r for r in records if r["split"] == "eval"]
    assert [r["step"] for r in train] == list(range(1, total + 1))
    assert [r["epoch"] for r in evals] == [1, 2, 3, 4]
    assert [line.split()[1] for line in lines] == ["1/4", "2/4", "3/4", "4/4"]  # printed live
    assert np.mean([r["loss"] for r in train[-4:]]) < 0.6 * np.mean([r["loss"] for r in train[:4]])
    assert evals[-1]["loss"] < evals[0]["loss"]
    assert evals[-1]["accuracy"] > 0.8
    assert evals[-1]["count"] == len(source)


def test_eval_every_evaluates_every_kth_epoch_and_the_last(tmp_path):
    model, variables = init_tiny(ssf=True, num_classes=NUM_CLASSES)
    source = _learnable_task()
    config = TrainConfig(mode="ssf", epochs=5, batch_size=16, lr=0.03, eval_every=2,
                         num_workers=0)  # fmt: skip
    lines = []
    result = loop.fit(
        model, variables, source, PREP, config, eval_data=source, progress=False, log=lines.append
    )
    assert [r["epoch"] for r in result.evals] == [2, 4, 5]
    assert [line.split()[1] for line in lines] == ["2/5", "4/5", "5/5"]


def test_fit_rejects_batch_not_divisible_by_devices():
    model, variables = init_tiny(num_classes=NUM_CLASSES)
    with pytest.raises(ValueError, match="batch_size must be a positive multiple of the 8"):
        loop.fit(model, variables, _learnable_task(), PREP, TrainConfig(batch_size=12),
                 progress=False)  # fmt: skip


def test_sweep_grid_names_one_folder_per_run(tmp_path):
    base = RunConfig(model="vit_tiny", train_data="x.npz", out_dir=str(tmp_path))
    configs = sweep.expand_grid(base, {"lr": [1e-3, 3e-3], "seed": [0, 1]})
    assert [os.path.basename(c.out_dir) for c in configs] == [
        "lr=0.001_seed=0", "lr=0.001_seed=1", "lr=0.003_seed=0", "lr=0.003_seed=1"
    ]  # fmt: skip
    assert {c.init_seed for c in configs} == {0}  # one starting point for every ingredient
    with pytest.raises(RunError, match="repeats a value"):
        sweep.expand_grid(base, {"seed": [0, 0]})
    with pytest.raises(RunError, match="sweep fields must be among"):
        sweep.expand_grid(base, {"epochs": [1, 2]})
    with pytest.raises(RunError, match="lr must be > 0"):
        sweep.expand_grid(base, {"lr": [1e-3, 0.0]})


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"lr": 0.0}, "lr must be > 0"),
        ({"lr": -0.01}, "lr must be > 0"),
        ({"lr": float("nan")}, "lr must be a finite number"),
        ({"epochs": 0}, "epochs must be an integer ≥ 1"),
        ({"mode": "prompt"}, "mode must be one of"),
        ({"label_smoothing": 1.0}, "label_smoothing must be < 1"),
        ({"ema_decay": 1.0}, "ema_decay must be < 1"),
    ],
)
def test_run_config_rejects_bad_settings(change, match):
    with pytest.raises(RunError, match=match):
        RunConfig(model="vit_tiny", train_data="x.npz", out_dir="o", **change)


def test_run_config_differences_name_only_result_changing_fields():
    a = RunConfig(model="vit_tiny", train_data="x.npz", out_dir="o", lr=0.01)
    b = RunConfig(model="vit_tiny", train_data="x.npz", out_dir="p", lr=0.02, num_workers=0)
    assert b.differences(a.to_json()) == ["lr: 0.01 → 0.02"]


# ----------------------------------------------------------------------------- the script


def _script():
    return importlib.import_module("hubtune.tune")


def _task_npz(path, n=24, classes=2, size=32, seed=0, labels=None):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes if labels is None else labels
    images = rng.integers(0, 256, (n, size, size, 3)).astype(np.uint8)
    np.savez(path, images=images, labels=labels)
    return path


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A 'pre-trained' vit_tiny checkpoint (5 classes) and a 2-class task."""
    root = tmp_path_factory.mktemp("pre")
    variables = random_variables(jaxmodels.create("vit_tiny", num_classes=5), seed=1)
    jaxmodels.save(root / "pre", "vit_tiny", jax.device_get(dict(variables)))
    return {"root": root, "pre": root / "pre", "data": _task_npz(root / "d.npz")}


def _argv(pretrained, out, *extra):
    return [
        "--model", f"vit_tiny={pretrained['pre']}", "--data", str(pretrained["data"]),
        "--eval-data", str(pretrained["data"]), "--mode", "ssf", "--epochs", "1",
        "--batch-size", "8", "--lr", "0.01", "--out", str(out), "--no-progress",
        "--num-workers", "0", *extra,
    ]  # fmt: skip


def _trained_state_params(folder, step):
    """The trained (unfolded) parameters in the final checkpoint: what the run optimised."""
    state = ocp.StandardCheckpointer().restore(folder / "checkpoints" / str(step) / "state")
    trained = state["ema"] or state["trainable"]
    return paths.unflatten({**state["frozen"], **trained}), state["batch_stats"]


@pytest.fixture(scope="module")
def ssf_run(pretrained):
    """finetune.py with SSF and EMA on: a finished run folder."""
    out = pretrained["root"] / "ssf"
    assert _script().main(_argv(pretrained, out, "--ema", "0.5")) == 0
    return out


def test_saved_model_predicts_what_the_trained_ssf_state_does(ssf_run, pretrained):
    run = load_run(ssf_run)
    assert run.info["ssf_folded"] and run.info["ema"] and run.result["finished"]
    assert not any("ssf_" in k for k in paths.flatten(run.variables["params"]))
    # the folded, saved model against the unfolded EMA weights of the last checkpoint
    params, _ = _trained_state_params(ssf_run, run.result["steps"])
    ssf_model = jaxmodels.create("vit_tiny", num_classes=2, ssf=True)
    data = (np.load(pretrained["data"])["images"], np.load(pretrained["data"])["labels"])
    folded = jaxmodels.predict(run.model, run.variables, data, batch_size=8, progress=False)
    unfolded = jaxmodels.predict(ssf_model, {"params": params}, data, batch_size=8, progress=False)
    np.testing.assert_allclose(folded, unfolded, rtol=1e-4, atol=1e-5)
    # and the trained weights are not the starting ones (a run that saved its start would pass
    # the comparison above only if training changed nothing)
    start = jaxmodels.build(f"vit_tiny={pretrained['pre']}", num_classes=2, ssf=True)
    assert paths.tree_digest(start.variables) == run.info["start_sha256"]
    assert paths.tree_digest(start.variables) != paths.tree_digest({"params": params})
    # backbone leaves SSF did not train are the pre-trained ones
    _, pre = jaxmodels.load(pretrained["pre"])
    np.testing.assert_array_equal(run.variables["params"]["cls"], pre["params"]["cls"])


def test_run_folder_describes_itself(ssf_run, pretrained, monkeypatch):
    result = json.loads((ssf_run / "result.json").read_text())
    assert result["model_dir"] == "model" and result["metrics"] == "metrics.jsonl"
    assert result["config"]["out_dir"] == "."
    assert result["seed"] == 0 and result["init_seed"] == 0
    assert result["trainable_params"] == 1280 + 66  # SSF sites of vit_tiny + head 32·2 + 2
    info = jaxmodels.model_info(ssf_run)
    assert info["name"] == "vit_tiny" and info["num_classes"] == 2 and info["image_size"] == 32
    assert info["info"]["mode"] == "ssf"
    assert info["info"]["base_checkpoint_sha256"] == jaxmodels.content_digest(pretrained["pre"])
    monkeypatch.chdir(pretrained["root"].parent)  # any working directory
    model, _ = jaxmodels.load(ssf_run)  # the run folder itself; the name from model.json
    assert model.num_classes == 2
    assert load_run(ssf_run).config.out_dir == str(ssf_run)


def test_rerunning_a_finished_run_changes_nothing(ssf_run, pretrained, capsys):
    before = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in ssf_run.rglob("*")}
    result = (ssf_run / "result.json").read_bytes()
    assert _script().main(_argv(pretrained, ssf_run, "--ema", "0.5")) == 0
    out = capsys.readouterr().out
    assert "finished before" in out and json.loads(out.splitlines()[-1])["accuracy"] is not None
    assert (ssf_run / "result.json").read_bytes() == result
    assert {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in ssf_run.rglob("*")} == before


def test_other_settings_on_a_finished_run_are_refused_before_training(ssf_run, pretrained, capsys):
    before = sorted(ssf_run.rglob("*"))
    tick = time.perf_counter()
    code = _script().main(_argv(pretrained, ssf_run, "--ema", "0.5", "--epochs", "2"))
    assert code == 2 and time.perf_counter() - tick < 5
    err = capsys.readouterr().err
    assert "epochs: 1 → 2" in err and err.count("\n") == 1
    assert sorted(ssf_run.rglob("*")) == before


def _bad_cases(pretrained, tmp):
    data = str(pretrained["data"])
    stray = str(_task_npz(tmp / "stray.npz", labels=np.array([0, 1, 2, 3, 4, 99] * 4)))
    wide = str(_task_npz(tmp / "wide.npz", classes=3))
    (tmp / "a_file").write_text("x")
    return [
        (["--lr", "0"], "lr must be > 0"),
        (["--lr", "-0.01"], "lr must be > 0"),
        (["--lr", "nan"], "lr must be a finite number"),
        (["--lr", "1e-3,0"], "lr must be > 0"),
        (["--epochs", "0"], "epochs must be an integer ≥ 1"),
        (["--data", stray], "has no example of 94 of its 100 classes"),
        (["--data", stray, "--num-classes", "5"], "label 99 (4 images)"),
        (["--eval-data", wide], "labels beyond the 2 classes"),
        (["--data", str(tmp / "missing.npz")], "not found"),
        (["--model", "vit_huge"], "neither a known name"),
        (["--model", f"vit_tiny={tmp / 'nope.safetensors'}"], "not found"),
        (["--out", str(tmp / "a_file")], "is a file"),
        (["--batch-size", "12"], "multiple of the 8 devices"),
        (["--batch-size", "64"], "exceeds the 24 training examples"),
        (["--data", "tfds:no_such_dataset_xyz"], "tfds"),
        (["--data", data, "--eval-data", "tfds:mnist:test", "--tfds-data-dir", str(tmp)],
         "not prepared"),
    ]  # fmt: skip


def test_every_bad_argument_is_one_line_and_exit_2_before_training(pretrained, tmp_path, capsys):
    script = _script()
    for extra, match in _bad_cases(pretrained, tmp_path):
        out = tmp_path / "run"
        argv = _argv(pretrained, out)
        for flag, value in zip(extra[::2], extra[1::2], strict=True):
            if flag in argv:
                argv[argv.index(flag) + 1] = value
            else:
                argv += [flag, value]
        tick = time.perf_counter()
        assert script.main(argv) == 2, extra
        elapsed = time.perf_counter() - tick
        err = capsys.readouterr().err
        assert match in err and err.startswith("hubtune tune: error:"), (extra, err)
        assert err.count("\n") == 1, err
        assert elapsed < 10, (extra, elapsed)
        assert not out.exists() or not any(out.rglob("*")), extra  # nothing trained or written


def test_a_held_folder_is_refused_and_a_stale_lock_taken_over(pretrained, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "lock").write_text(json.dumps({"host": os.uname().nodename, "pid": os.getpid()}))
    assert _script().main(_argv(pretrained, out)) == 2
    assert "is in use by pid" in capsys.readouterr().err
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    (out / "lock").write_text(json.dumps({"host": os.uname().nodename, "pid": int(dead.stdout)}))
    with pytest.warns(UserWarning, match="its process .* is gone"):
        assert _script().main(_argv(pretrained, out, "--max-steps", "1")) == 0
    assert not (out / "lock").exists()


def test_two_commands_on_one_folder_at_once(pretrained, tmp_path):
    out = tmp_path / "run"
    # the session's 8 CPU devices: the commands then read the programs this file's earlier tests
    # compiled from the run's compilation cache (tests/conftest.py) instead of compiling them
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "JAX_PLATFORMS": "cpu",
        "JAX_NUM_CPU_DEVICES": "8",
    }
    cmd = [sys.executable, str(REPO / "scripts/finetune.py"), *_argv(pretrained, out)[:-2],
           "--epochs", "2"]  # fmt: skip
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while not (out / "lock").exists() and time.time() < deadline and first.poll() is None:
        time.sleep(0.05)
    # The first holds the folder, frozen, while the second runs: with its compiles cached it
    # could otherwise finish (and let go of the folder) before the second looks.
    first.send_signal(signal.SIGSTOP)
    try:
        assert (out / "lock").exists(), "the first command never took the folder"
        second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    finally:
        first.send_signal(signal.SIGCONT)
    _, first_err = first.communicate(timeout=300)
    assert first.returncode == 0, first_err.decode()[-2000:]
    assert second.returncode == 2 and "is in use by pid" in second.stderr, second.stderr
    result = json.loads((out / "result.json").read_text())
    assert result["finished"] and result["steps"] == 6
    records = [json.loads(x) for x in open(out / "metrics.jsonl")]
    train_steps = [r["step"] for r in records if r["split"] == "train"]
    assert train_steps == sorted(set(train_steps)) and train_steps[-1] == 6  # one writer


def test_seed_sweep_shares_its_start_writes_sweep_json_and_loads_anywhere(
    pretrained, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "sweep"
    assert _script().main(_argv(pretrained, out, "--seed", "0,1")) == 0
    printed = capsys.readouterr().out
    assert "* best:" in printed and "seed=0" in printed and "seed=1" in printed
    manifest = json.loads((out / "sweep.json").read_text())
    assert [r["folder"] for r in manifest["runs"]] == ["seed=0", "seed=1"]
    assert manifest["swept"] == {"seed": [0, 1]}
    assert all(r["finished"] and r["accuracy"] is not None for r in manifest["runs"])
    monkeypatch.chdir("/")
    runs = load_run(out)
    assert [r.name for r in runs] == ["seed=0", "seed=1"] and [r.config.seed for r in runs] == [
        0,
        1,
    ]
    # one starting point (head and SSF drawn from init_seed 0), then different data orders
    expected = jaxmodels.build(f"vit_tiny={pretrained['pre']}", num_classes=2, ssf=True)
    assert {r.info["start_sha256"] for r in runs} == {paths.tree_digest(expected.variables)}
    logits = [np.asarray(r.model.apply(r.variables, jnp.ones((1, 32, 32, 3)))) for r in runs]
    assert not np.allclose(logits[0], logits[1])
    with pytest.raises(RunError, match="not a run folder"):
        load_run(tmp_path)
    (out / "seed=1" / "result.json").write_text(json.dumps({"finished": False}))
    with pytest.raises(RunError, match="has not finished"):
        load_run(out)


def test_finetune_script_help_answers_newcomers():
    out = subprocess.run(
        [sys.executable, str(REPO / "scripts/finetune.py"), "--help"],
        capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(REPO)},
    ).stdout  # fmt: skip
    for needle in ["--mode", "ssf", "sweep", "result.json", "tfds:NAME", "--init-seed",
                   "load_run", "never retrained"]:  # fmt: skip
        assert needle in out, needle


def test_tune_says_what_it_read_and_warns_of_a_stray_class(pretrained, tmp_path, capsys):
    # 10 classes of 12 images, and one image labelled 10: an 11-output head, said out loud
    labels = np.concatenate([np.arange(120) % 10, [10]])
    data = _task_npz(tmp_path / "stray.npz", n=121, labels=labels, size=16)
    argv = [
        "--model", f"vit_tiny={pretrained['pre']}", "--data", str(data), "--mode", "linear",
        "--epochs", "1", "--batch-size", "8", "--lr", "0.01", "--out", str(tmp_path / "o"),
        "--no-progress", "--num-workers", "0", "--max-steps", "1",
    ]  # fmt: skip
    assert _script().main(argv) == 0
    out = capsys.readouterr().out
    assert f"training data: npz {str(data)!r}: 121 images, 11 classes, images 16×16" in out
    assert "warning: class 10 (1 images) against a median of 12 per class: stray labels?" in out


def test_ctrl_c_saves_a_checkpoint_exits_130_and_the_same_command_resumes(
    pretrained, tmp_path, capsys, monkeypatch
):
    from training import loop

    calls = {"n": 0}
    real = loop.sharding.shard_local_batch

    def interrupt_third(batch, mesh):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(batch, mesh)

    argv = _argv(pretrained, tmp_path / "run", "--epochs", "2")  # 3 steps per epoch
    monkeypatch.setattr(loop.sharding, "shard_local_batch", interrupt_third)
    assert _script().main(argv) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "hubtune tune: interrupted at step 2 (saved a checkpoint there); the same command "
        "resumes the run from its newest checkpoint"
    ]
    assert (tmp_path / "run" / "checkpoints" / "2").is_dir()
    monkeypatch.setattr(loop.sharding, "shard_local_batch", real)
    assert _script().main(argv) == 0
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["finished"] and result["resumed_from"] == 2


def test_every_command_answers_ctrl_c_in_one_line_with_130(capsys):
    from hubtune.parsing import interruptible

    @interruptible("x.py")
    def main(argv=None):
        raise KeyboardInterrupt

    assert main() == 130
    assert capsys.readouterr().err == "x.py: interrupted; nothing incomplete was kept\n"


def test_a_run_that_fails_to_load_its_model_leaves_nothing_to_refuse(
    pretrained, tmp_path, monkeypatch, capsys
):
    """A damaged model folder fails the run before its first step; the corrected command (here
    other settings) is then accepted, not refused as "a run with other settings"."""
    out = tmp_path / "run"

    def damaged(*args, **kwargs):
        raise jaxmodels.ModelRefError("model folder 'pre' is damaged (test)")

    monkeypatch.setattr(jaxmodels, "build", damaged)
    assert _script().main(_argv(pretrained, out)) == 2
    assert "is damaged (test)" in capsys.readouterr().err
    assert not (out / "config.json").exists() and not (out / "checkpoints").exists()
    monkeypatch.undo()
    assert _script().main(_argv(pretrained, out, "--lr", "0.02", "--max-steps", "1")) == 0


def test_rank_takes_its_ground_truth_from_run_folders(ssf_run, pretrained, tmp_path, capsys):
    """`rank --ground-truth RUN...`: each base model's best run accuracy, keyed by checkpoint
    path (or name for a random start), written beside the ranking and correlated."""
    scratch = tmp_path / "scratch"
    # a random start, evaluated on 5 images: an accuracy k/5 that the other run's k/24 is not
    five = str(_task_npz(tmp_path / "five.npz", n=5))
    assert (
        _script().main(_argv(pretrained, scratch, "--model", "vit_tiny", "--eval-data", five)) == 0
    )
    table = run_folder.ground_truth([ssf_run, scratch])
    accuracy = lambda run: json.loads((run / "result.json").read_text())["final_eval"]["accuracy"]
    assert table == {
        str(pretrained["pre"].resolve()): accuracy(ssf_run),
        "vit_tiny": accuracy(scratch),
    }
    rank = importlib.import_module("hubtune.rank")
    out = tmp_path / "ranking"
    code = rank.main(["--models", f"vit_tiny={pretrained['pre']}", "vit_tiny", "--data",
                      str(pretrained["data"]), "--scores", "logme,hscore", "--ground-truth",
                      str(ssf_run), str(scratch), "--out", str(out)])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert json.loads((out / "ground_truth.json").read_text()) == table
    ranking = json.loads((out / "ranking.json").read_text())
    assert ranking["rank_correlation"]["logme"]["weighted_tau"] in (-1.0, 1.0)  # 2 models
    # 2 classes and D ≥ N − 1: the H-score saturates at C − 1 = 1 for both, ranking nothing
    assert ranking["rank_correlation"]["hscore"] is None
    capsys.readouterr()
    assert rank.main(["--models", f"vit_tiny={pretrained['pre']}", "vit_tiny", "--data",
                      str(pretrained["data"]), "--ground-truth", str(tmp_path / "ranking"),
                      "--out", str(tmp_path / "r2")]) == 2  # fmt: skip
    assert "hubtune rank: error:" in capsys.readouterr().err and not (tmp_path / "r2").exists()
