"""Tests for training.checkpoints: a killed run resumes to the same parameters; mismatches fail."""

import json
import os

import jax
import numpy as np
import pytest
from tiny_classifier import init_tiny

from jaxmodels import paths
from training import checkpoints, data, loop, masks, optim, sources
from training import train_step as step_lib

NUM_CLASSES = 3
BATCH = 16


def _source(n=80, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, NUM_CLASSES, n)
    return sources.ArraySource(rng.integers(0, 256, (n, 8, 8, 3)).astype(np.uint8), labels)


def _fit(
    ckpt_dir,
    *,
    mode="ssf",
    stop_after=None,
    ssf=True,
    batch_norm=True,
    ema=0.9,
    seed=0,
    log_path=None,
):
    model, variables = init_tiny(ssf=ssf, batch_norm=batch_norm, num_classes=NUM_CLASSES)
    source = _source()
    epochs = 2
    total = loop.total_steps(len(source), BATCH, epochs)  # 5 steps per epoch, 10 in all
    return loop.fit(
        model.apply, variables, source,
        data.Preprocess(image_size=8, mean=(0.5,) * 3, std=(0.25,) * 3),
        optim.OptimConfig(learning_rate=0.01, total_steps=total, warmup_steps=2),
        step_lib.StepConfig(num_classes=NUM_CLASSES, ema_decay=ema,
                            label_smoothing=0.1, update_batch_stats=True),
        loop.FitConfig(epochs=epochs, global_batch=BATCH, seed=seed, mode=mode,
                       checkpoint_dir=None if ckpt_dir is None else str(ckpt_dir),
                       checkpoint_every=3, stop_after_steps=stop_after, progress=False,
                       log_path=log_path, log_every=1),
        identity={"model": "tiny"},
    )  # fmt: skip


def _assert_states_equal(a, b):
    flat_a = jax.tree_util.tree_flatten_with_path(jax.device_get(a))[0]
    flat_b = jax.tree_util.tree_flatten_with_path(jax.device_get(b))[0]
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (path, x), (_, y) in zip(flat_a, flat_b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted run; the same run killed after 7 steps, resumed, then started again."""
    root = tmp_path_factory.mktemp("runs")
    ckpt = root / "ckpt"
    uninterrupted = _fit(None)
    killed = _fit(ckpt, stop_after=7)
    listing_after_kill = sorted(os.listdir(ckpt))
    resumed = _fit(ckpt, log_path=str(root / "log.jsonl"))
    again = _fit(ckpt, log_path=str(root / "again.jsonl"))
    return {
        "root": root,
        "ckpt": ckpt,
        "uninterrupted": uninterrupted,
        "killed": killed,
        "listing_after_kill": listing_after_kill,
        "resumed": resumed,
        "again": again,
    }


def test_killed_run_resumes_to_the_uninterrupted_parameters(runs):
    assert runs["uninterrupted"].finished
    # "killed" after 7 steps: the newest checkpoint is step 6 (every 3), mid-epoch 2
    assert not runs["killed"].finished and int(runs["killed"].state.step) == 7
    assert runs["listing_after_kill"] == ["3", "6"]
    resumed = runs["resumed"]
    assert resumed.finished and int(resumed.state.step) == 10
    # the resumed run re-did steps 7..10 only
    steps = [json.loads(x)["step"] for x in open(runs["root"] / "log.jsonl")]
    assert steps == [7, 8, 9, 10]
    _assert_states_equal(resumed.state, runs["uninterrupted"].state)
    # the final checkpoint (step 10) holds the end position: epoch 2, batch 0
    meta = json.load(open(runs["ckpt"] / "10" / "meta" / "metadata"))
    assert meta["position"] == {"epoch": 2, "batch": 0}


def test_starting_a_finished_run_again_changes_nothing(runs):
    assert runs["again"].finished
    assert not (runs["root"] / "again.jsonl").read_text()
    _assert_states_equal(runs["again"].state, runs["uninterrupted"].state)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"mode": "linear"}, r"mode: this run has 'linear', checkpoint has 'ssf'"),
        ({"seed": 1}, r"seed: this run has 1, checkpoint has 0"),
        ({"batch_norm": False}, r"frozen/bn/bias: checkpoint has \[4\], this run has none"),
    ],
)
def test_resume_into_a_different_run_is_a_value_error(runs, change, match):
    with pytest.raises(ValueError, match=rf"does not match this run \({match}"):
        _fit(runs["ckpt"], **change)


def test_data_position_round_trips_through_a_checkpoint(tmp_path):
    _, variables = init_tiny(num_classes=NUM_CLASSES)
    mask = masks.trainable_mask(variables["params"], "linear")
    trainable, _ = masks.split_params(variables["params"], mask)
    decay = paths.flatten(masks.weight_decay_mask(variables["params"]))
    optimizer, _ = optim.init_optimizer(optim.OptimConfig(), trainable, decay)
    state = step_lib.init_train_state(variables, mask, optimizer)
    identity = checkpoints.run_identity(state, model="tiny")
    manager = checkpoints.make_manager(str(tmp_path / "c"))
    checkpoints.save(manager, state, data.DataPosition(3, 4), identity, wait=True)
    restored, position = checkpoints.restore_latest(manager, state, identity)
    assert position == data.DataPosition(3, 4)
    _assert_states_equal(restored, state)
    manager.close()


def test_restore_from_an_empty_directory_gives_none(tmp_path):
    manager = checkpoints.make_manager(str(tmp_path / "empty"))
    assert checkpoints.restore_latest(manager, None, {}) is None
    manager.close()
