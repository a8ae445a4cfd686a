"""Tests for training.loop, training.run, training.sweep and scripts/finetune.py."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_classifier import init_tiny, random_variables

from jaxmodels import paths
from training import data, loop, masks, optim, sources
from training import train_step as step_lib

NUM_CLASSES = 3


def _learnable_task(n=96, size=8, seed=0):
    """Class k images are bright in colour channel k: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, NUM_CLASSES, n)
    images = rng.integers(0, 80, (n, size, size, 3))
    images[np.arange(n), :, :, labels] += 170
    return sources.ArraySource(images.astype(np.uint8), labels)


def test_fit_reduces_loss_on_a_learnable_task(tmp_path):
    mode = "ssf"
    model, variables = init_tiny(ssf=True, num_classes=NUM_CLASSES)
    source = _learnable_task()
    preprocess = data.Preprocess(image_size=8, mean=(0.5,) * 3, std=(0.25,) * 3, scale=(0.5, 1.0))
    config = loop.FitConfig(
        epochs=4, global_batch=16, mode=mode, log_path=str(tmp_path / "log.jsonl"), log_every=1,
        progress=False,
    )  # fmt: skip
    total = loop.total_steps(len(source), 16, 4)
    result = loop.fit(
        model.apply, variables, source, preprocess,
        optim.OptimConfig(learning_rate=0.03, total_steps=total, warmup_steps=2),
        step_lib.StepConfig(num_classes=NUM_CLASSES), config, eval_source=source,
    )  # fmt: skip
    assert result.finished
    # the train step donates its state; the caller's variables must not be among the donated
    assert not any(x.is_deleted() for x in jax.tree.leaves(variables))
    records = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    train = [r for r in records if r["split"] == "train"]
    evals = [r for r in records if r["split"] == "eval"]
    assert [r["step"] for r in train] == list(range(1, total + 1))
    assert [r["epoch"] for r in evals] == [1, 2, 3, 4]
    assert np.mean([r["loss"] for r in train[-4:]]) < 0.6 * np.mean([r["loss"] for r in train[:4]])
    assert evals[-1]["loss"] < evals[0]["loss"]
    assert evals[-1]["accuracy"] > 0.8
    assert evals[-1]["count"] == len(source)


def test_fit_rejects_batch_not_divisible_by_devices():
    model, variables = init_tiny(num_classes=NUM_CLASSES)
    with pytest.raises(ValueError, match="global_batch 12 must be divisible by the 8 devices"):
        loop.fit(
            model.apply, variables, _learnable_task(), data.Preprocess(image_size=8),
            optim.OptimConfig(), step_lib.StepConfig(num_classes=NUM_CLASSES),
            loop.FitConfig(global_batch=12, progress=False),
        )  # fmt: skip


def test_bad_fit_mode_is_a_value_error():
    with pytest.raises(ValueError, match=r"mode must be one of .*'prompt'"):
        loop.FitConfig(mode="prompt")


def test_sweep_grid_names_one_directory_per_run(tmp_path):
    from training import run as run_lib
    from training import sweep

    base = run_lib.RunConfig(model="vit_tiny", train_data="x.npz", out_dir=str(tmp_path))
    configs = sweep.expand_grid(base, {"lr": [0.1, 0.01], "augmentation": ["none", "strong"]})
    assert [(c.lr, c.augmentation) for c in configs] == [
        (0.1, "none"), (0.1, "strong"), (0.01, "none"), (0.01, "strong")
    ]  # fmt: skip
    assert configs[1].out_dir == str(tmp_path / "lr=0.1_aug=strong")
    assert all(c.mode == "ssf" and c.seed == 0 for c in configs)
    with pytest.raises(ValueError, match=r"sweep fields must be among .*\['epochs'\]"):
        sweep.expand_grid(base, {"epochs": [1, 2]})
    with pytest.raises(ValueError, match="'seed' repeats a value"):
        sweep.expand_grid(base, {"seed": [1, 1]})
    with pytest.raises(ValueError, match="augmentation must be one of"):
        sweep.expand_grid(base, {"augmentation": ["wild"]})


def test_run_config_rejects_unknown_model():
    from training import run as run_lib

    with pytest.raises(ValueError, match=r"model must be NAME or NAME=CHECKPOINT .*'vit_huge=x'"):
        run_lib.RunConfig(model="vit_huge=x", train_data="x.npz", out_dir="o")


def _load_script():
    import importlib.util
    import pathlib

    script = pathlib.Path(__file__).parents[1] / "scripts" / "finetune.py"
    spec = importlib.util.spec_from_file_location("finetune_script", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_finetune_script_writes_a_loadable_folded_model(tmp_path, capsys):
    import pathlib

    import jaxmodels

    rng = np.random.default_rng(0)
    labels = np.arange(16) % 2
    images = rng.integers(0, 256, (16, 32, 32, 3)).astype(np.uint8)
    np.savez(tmp_path / "d.npz", images=images, labels=labels)
    # a "pre-trained" checkpoint for NAME=CHECKPOINT (SSF is added to it, then folded away)
    pre_vars = random_variables(jaxmodels.create("vit_tiny", num_classes=5), seed=1)
    jaxmodels.save(tmp_path / "pre", "vit_tiny", jax.device_get(dict(pre_vars)))
    out = tmp_path / "run"
    argv = ["--model", f"vit_tiny={tmp_path / 'pre'}", "--data", str(tmp_path / "d.npz"),
            "--eval-data", str(tmp_path / "d.npz"), "--mode", "ssf", "--epochs", "1",
            "--batch-size", "8", "--lr", "0.01", "--out", str(out), "--no-progress",
            "--num-workers", "0"]  # fmt: skip
    assert _load_script().main(argv) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["out_dir"] == str(out) and line["finished"]
    result = json.load(open(out / "result.json"))
    assert result["finished"] and result["steps"] == 2
    # SSF sites of vit_tiny (1280, see test_masks) + head 32·2 + 2
    assert result["trainable_params"] == 1280 + 66
    assert result["final_eval"]["count"] == 16
    assert sorted(os.listdir(out / "checkpoints")) == ["2"]
    _, variables = jaxmodels.load("vit_tiny", out / "model")
    # backbone leaves the SSF run did not train are the pre-trained ones; no SSF leaf is left
    np.testing.assert_array_equal(
        np.asarray(variables["params"]["cls"]), np.asarray(pre_vars["params"]["cls"])
    )
    assert variables["params"]["head"]["kernel"].shape == (32, 2)
    assert not any("ssf_" in k for k in paths.flatten(variables["params"]))
    assert pathlib.Path(out / "metrics.jsonl").exists()
    # the same folder with another learning rate is another run: refused, not silently mixed
    argv[argv.index("--lr") + 1] = "0.02"
    with pytest.raises(
        ValueError,
        match=r"does not match this run \(lr: this run has 0.02, "
        r"checkpoint has 0.01\)",
    ):
        _load_script().main(argv)


def test_finetune_script_sweep_runs_every_point_and_skips_finished(tmp_path, monkeypatch, capsys):
    from training import run as run_lib

    calls = []

    def fake_run(config, progress=True):
        calls.append(config)
        result = {"config": {"out_dir": config.out_dir}, "finished": True, "steps": 1,
                  "final_eval": None, "trainable_params": 1}  # fmt: skip
        os.makedirs(config.out_dir)
        with open(os.path.join(config.out_dir, "result.json"), "w") as f:
            json.dump(result, f)
        return result

    monkeypatch.setattr(run_lib, "run", fake_run)
    argv = ["--model", "vit_tiny", "--data", "x.npz", "--seed", "0,1", "--label-smoothing",
            "0,0.1", "--out", str(tmp_path)]  # fmt: skip
    script = _load_script()
    assert script.main(argv) == 0
    assert [(c.seed, c.label_smoothing) for c in calls] == [(0, 0.0), (0, 0.1), (1, 0.0), (1, 0.1)]
    assert calls[3].out_dir == str(tmp_path / "seed=1_ls=0.1")
    assert script.main(argv) == 0
    assert len(calls) == 4
    assert capsys.readouterr().out.count("finished before, skipped") == 4


def test_finetune_script_help_answers_newcomers():
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(__file__), "..", "scripts", "finetune.py")
    out = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    for needle in ["--mode", "ssf", "sweep", "result.json", "tfds:NAME", "jaxmodels.load"]:
        assert needle in out


def test_fit_rejects_a_schedule_of_another_length():
    model, variables = init_tiny(num_classes=NUM_CLASSES)
    with pytest.raises(ValueError, match=r"total_steps must equal .* = 1 \* 6 = 6; got 1000"):
        loop.fit(
            model.apply, variables, _learnable_task(), data.Preprocess(image_size=8),
            optim.OptimConfig(total_steps=1000), step_lib.StepConfig(num_classes=NUM_CLASSES),
            loop.FitConfig(global_batch=16, progress=False),
        )  # fmt: skip


def test_build_variables_adds_fresh_ssf_to_a_checkpoint(tmp_path):
    import jaxmodels
    from training import run as run_lib

    pre = random_variables(jaxmodels.create("vit_tiny", num_classes=4), seed=2)
    jaxmodels.save(tmp_path / "pre", "vit_tiny", jax.device_get(pre))
    model, variables = run_lib.build_variables("vit_tiny", str(tmp_path / "pre"), 4, ssf=True)
    flat = paths.flatten(variables["params"])
    loaded = paths.flatten(pre["params"])
    for path, leaf in loaded.items():
        np.testing.assert_array_equal(np.asarray(flat[path]), np.asarray(leaf), err_msg=path)
    ssf_paths = set(flat) - set(loaded)
    assert ssf_paths and all(masks.is_ssf_path(p) for p in ssf_paths)
    scales = np.concatenate([np.asarray(flat[p]) for p in ssf_paths if p.endswith("/scale")])
    shifts = np.concatenate([np.asarray(flat[p]) for p in ssf_paths if p.endswith("/shift")])
    assert scales.size == shifts.size == 640  # half of vit_tiny's 1280 SSF values each
    # γ ~ N(1, 0.02²), β ~ N(0, 0.02²): 640 draws put the mean within ~4 standard errors
    assert abs(scales.mean() - 1) < 4 * 0.02 / np.sqrt(640)
    assert abs(shifts.mean()) < 4 * 0.02 / np.sqrt(640)
    np.testing.assert_allclose([scales.std(), shifts.std()], 0.02, rtol=0.15)
    logits = jax.jit(model.apply)(variables, jnp.zeros((2, 32, 32, 3)))
    assert logits.shape == (2, 4)
