"""Tests for training.checkpoints through training.loop.fit: a killed run resumes bit-identically,
an unreadable checkpoint is moved aside and the previous one used, another run's checkpoint is
refused."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from tiny_classifier import init_tiny

import jaxmodels
from training import checkpoints, loop
from training.config import RunError, TrainConfig

NUM_CLASSES = 3
BATCH = 16
PREP = jaxmodels.Preprocessing(8, 8, (0.5,) * 3, (0.25,) * 3, "bilinear")


def _source(n=80, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % NUM_CLASSES
    images = rng.integers(0, 256, (n, 10, 10, 3)).astype(np.uint8)
    return jaxmodels.ArraySource(images, labels)


def _fit(ckpt_dir, *, mode="full", stop_after=None, batch_norm=True, seed=0, log_path=None,
         lines=None):  # fmt: skip
    """Full fine-tuning of an SSF model with EMA, label smoothing, moving BatchNorm statistics,
    mixup and cutmix (the "strong" augmentation): every source of randomness and state."""
    model, variables = init_tiny(ssf=True, batch_norm=batch_norm, num_classes=NUM_CLASSES)
    # 80 examples in batches of 16: 5 steps per epoch, 10 in all
    config = TrainConfig(
        mode=mode, epochs=2, batch_size=BATCH, lr=0.01, warmup_epochs=0.4, ema_decay=0.9,
        label_smoothing=0.1, augmentation="strong", seed=seed, checkpoint_every=3,
        stop_after_steps=stop_after, num_workers=0,
    )  # fmt: skip
    return loop.fit(
        model, variables, _source(), PREP, config, eval_data=_source(24, seed=1),
        checkpoint_dir=None if ckpt_dir is None else str(ckpt_dir), log_path=log_path,
        log_every=1, identity={"model": "tiny"}, progress=False,
        log=(lines.append if lines is not None else lambda _: None),
    )  # fmt: skip


def _assert_states_equal(a, b):
    flat_a = jax.tree_util.tree_flatten_with_path(jax.device_get(a))[0]
    flat_b = jax.tree_util.tree_flatten_with_path(jax.device_get(b))[0]
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (path, x), (_, y) in zip(flat_a, flat_b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


def _steps(log_path):
    return [(r["split"], r["step"]) for r in map(json.loads, open(log_path))]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted run; the same run killed after 7 steps, resumed, then started again."""
    root = tmp_path_factory.mktemp("runs")
    ckpt = root / "ckpt"
    log = str(root / "log.jsonl")
    uninterrupted = _fit(None, log_path=str(root / "full.jsonl"))
    killed = _fit(ckpt, stop_after=7, log_path=log)
    listing_after_kill = sorted(os.listdir(ckpt))
    lines = []
    resumed = _fit(ckpt, log_path=log, lines=lines)
    again = _fit(ckpt, log_path=str(root / "again.jsonl"))
    return {
        "root": root, "ckpt": ckpt, "log": log, "uninterrupted": uninterrupted,
        "killed": killed, "listing_after_kill": listing_after_kill, "resumed": resumed,
        "resume_lines": lines, "again": again,
    }  # fmt: skip


def test_killed_run_with_mixup_and_cutmix_resumes_bit_identically(runs):
    assert runs["uninterrupted"].finished
    # "killed" after 7 steps: the newest checkpoint is step 6 (every 3), mid-epoch 2
    assert not runs["killed"].finished and int(runs["killed"].state.step) == 7
    assert runs["listing_after_kill"] == ["3", "6"]
    resumed = runs["resumed"]
    assert resumed.finished and int(resumed.state.step) == 10 and resumed.resumed_from == 6
    assert any("resumed from step 6" in line for line in runs["resume_lines"])
    _assert_states_equal(resumed.state, runs["uninterrupted"].state)
    # step 7 ran twice (killed, then redone) but is logged once; the epoch-1 evaluation from
    # before the kill is kept and reported with the new one
    assert _steps(runs["log"]) == _steps(runs["root"] / "full.jsonl")
    assert [e["step"] for e in resumed.evals] == [5, 10]
    assert resumed.evals == runs["uninterrupted"].evals


def test_starting_a_finished_run_again_changes_nothing(runs):
    assert runs["again"].finished and runs["again"].resumed_from == 10
    assert not (runs["root"] / "again.jsonl").read_text()
    _assert_states_equal(runs["again"].state, runs["uninterrupted"].state)


def test_unreadable_latest_checkpoint_is_moved_aside_and_the_previous_used(runs, tmp_path):
    ckpt = tmp_path / "ckpt"
    log = str(tmp_path / "log.jsonl")
    _fit(ckpt, stop_after=7, log_path=log)
    # truncate every data file of the newest checkpoint's state (a half-written save)
    broken = 0
    for root, _, files in os.walk(ckpt / "6" / "state"):
        for name in files:
            if os.path.getsize(os.path.join(root, name)) > 64:
                with open(os.path.join(root, name), "r+b") as f:
                    f.truncate(16)
                broken += 1
    assert broken
    lines = []
    resumed = _fit(ckpt, log_path=log, lines=lines)
    assert resumed.resumed_from == 3
    assert any("checkpoint at step 6 is unreadable" in line for line in lines), lines
    aside = os.listdir(str(ckpt) + "-unreadable")
    assert len(aside) == 1 and aside[0].startswith("6-")
    _assert_states_equal(resumed.state, runs["uninterrupted"].state)
    assert _steps(log) == _steps(runs["root"] / "full.jsonl")


def test_empty_checkpoint_metadata_is_reported_not_a_traceback(runs, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(runs["ckpt"], ckpt)
    (ckpt / "10" / "meta" / "metadata").write_text("")
    lines = []
    resumed = _fit(ckpt, lines=lines)
    assert resumed.resumed_from == 9 and resumed.finished  # checkpoints 9 and 10 are kept
    assert any("checkpoint at step 10 is unreadable" in line for line in lines), lines
    _assert_states_equal(resumed.state, runs["uninterrupted"].state)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"mode": "linear"}, r"mode: this run has 'linear', checkpoint has 'full'"),
        ({"seed": 1}, r"seed: this run has 1, checkpoint has 0"),
        ({"batch_norm": False}, r"trainable/bn/bias: checkpoint has \[4\], this run has none"),
    ],
)
def test_resume_into_a_different_run_is_refused(runs, change, match):
    with pytest.raises(RunError, match=rf"belongs to another run \({match}"):
        _fit(runs["ckpt"], **change)


def test_restore_from_an_empty_directory_gives_none(tmp_path):
    manager = checkpoints.make_manager(str(tmp_path / "empty"))
    assert checkpoints.restore_latest(manager, None, {}) is None
    manager.close()
