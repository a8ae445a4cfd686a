"""grain pipelines: epochs, determinism, per-process slices, resumption, evaluation padding.

Examples are identified by their label (the tests give every example its own class), which
augmentation leaves alone; pixels are compared exactly between runs that must agree.
"""

import collections
import itertools

import grain
import numpy as np
import pytest
from PIL import Image

import jaxmodels
from jaxmodels.data import pipeline
from jaxmodels.data.array_source import ArraySource
from jaxmodels.data.preprocess import Preprocessing

PREP = Preprocessing(6, 7, (0.5,) * 3, (0.5,) * 3, "bilinear")


def _source(n=23, seed=0):
    """n variable-looking images of 9×11 whose label is their index."""
    images = np.random.default_rng(seed).integers(0, 256, (n, 9, 11, 3), dtype=np.uint8)
    return ArraySource(images, np.arange(n), name=f"ids{n}")


def _train(source, process_index=0, process_count=1, **kwargs):
    options = dict(global_batch=4, seed=7, epochs=3, num_threads=2)
    options.update(kwargs)
    return pipeline.train_dataset(
        source,
        pipeline.Augment(PREP),
        process_index=process_index,
        process_count=process_count,
        **options,
    )


def test_each_epoch_is_a_fresh_permutation_minus_the_remainder():
    source = _source(23)
    data = _train(source)
    assert data.steps_per_epoch == 5 == pipeline.steps_per_epoch(23, 4) and data.num_batches == 15
    batches = list(data)
    assert len(batches) == 15
    for batch in batches:
        assert batch["image"].shape == (4, 6, 6, 3) and batch["image"].dtype == np.uint8
        assert batch["label"].dtype == np.int32
    epochs = [np.concatenate([b["label"] for b in batches[e * 5 : (e + 1) * 5]]) for e in range(3)]
    for ids in epochs:
        # 20 distinct examples: no repeats within an epoch, 3 dropped.
        assert len(ids) == 20 and len(set(ids.tolist())) == 20 and set(ids) <= set(range(23))
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
    # Over many epochs every example is seen, and dropped examples vary between epochs.
    seen = collections.Counter(
        np.concatenate([b["label"] for b in _train(source, epochs=12)]).tolist()
    )
    assert set(seen) == set(range(23))


def test_same_seed_same_batches_other_seed_other_order():
    source = _source(12)
    first = list(_train(source, epochs=2))
    again = list(_train(source, epochs=2, num_threads=0))  # inline, no threads: same data
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    other = list(_train(source, epochs=2, seed=8))
    assert not all(
        np.array_equal(a["label"], b["label"]) for a, b in zip(first, other, strict=True)
    )


def test_process_slices_concatenate_to_the_single_process_batch():
    source = _source(23)
    single = list(_train(source, global_batch=8, epochs=2))
    halves = [list(_train(source, p, 2, global_batch=8, epochs=2)) for p in (0, 1)]
    assert len(single) == len(halves[0]) == len(halves[1]) == 4
    for step, whole in enumerate(single):
        for key in ("image", "label"):
            assert halves[0][step][key].shape[0] == 4
            joined = np.concatenate([halves[0][step][key], halves[1][step][key]])
            np.testing.assert_array_equal(joined, whole[key])


def test_augmentation_is_keyed_by_position_not_by_example():
    # Same example at two positions gets two different crops (epochs draw different boxes).
    source = ArraySource(
        np.random.default_rng(1).integers(0, 256, (2, 30, 30, 3), np.uint8), [0, 1]
    )
    batches = list(_train(source, global_batch=2, epochs=4))
    crops = {}
    for batch in batches:
        for image, label in zip(batch["image"], batch["label"], strict=True):
            crops.setdefault(int(label), []).append(image.tobytes())
    assert all(len(set(c)) > 1 for c in crops.values())


@pytest.mark.parametrize("epochs", [3, None])
def test_restoring_the_state_gives_the_same_next_batches(epochs):
    source = _source(13)
    data = _train(source, epochs=epochs)
    iterator = iter(data)
    assert isinstance(iterator, grain.DatasetIterator)
    for _ in range(4):  # past the first epoch's 3 batches
        next(iterator)
    state = iterator.get_state()
    expected = [next(iterator) for _ in range(5)]
    fresh = iter(_train(source, epochs=epochs))
    fresh.set_state(state)
    for want in expected:
        got = next(fresh)
        np.testing.assert_array_equal(got["image"], want["image"])
        np.testing.assert_array_equal(got["label"], want["label"])


@pytest.mark.parametrize("epochs", [3, None])
def test_a_stream_started_at_a_step_is_the_rest_of_the_stream_under_any_process_count(epochs):
    """What a resumed run reads: from the step alone, for 1 or 2 processes (checkpoints hold no
    per-process iterator state)."""
    source = _source(13)
    whole = list(itertools.islice(iter(_train(source, epochs=epochs)), 9))  # 3 batches per epoch
    rest = list(_train(source, epochs=epochs, start_step=4)) if epochs else None
    if epochs:
        assert len(rest) == 5
    for process_count in (1, 2):
        slices = [
            iter(_train(source, p, process_count, epochs=epochs, start_step=4))
            for p in range(process_count)
        ]
        for want in whole[4:]:
            parts = [next(s) for s in slices]
            got = {k: np.concatenate([part[k] for part in parts]) for k in ("image", "label")}
            np.testing.assert_array_equal(got["image"], want["image"])
            np.testing.assert_array_equal(got["label"], want["label"])
    with pytest.raises(ValueError, match=r"start_step must lie in \[0, 9\]; got 10"):
        _train(source, epochs=3, start_step=10)


def test_augment_crop_recipe():
    image = np.random.default_rng(2).integers(0, 256, (9, 11, 3), dtype=np.uint8)
    # Whole-image "crop" without flips: a plain PIL resize of the image.
    whole = pipeline.Augment(PREP, scale=(1.0, 1.0), ratio=(11 / 9, 11 / 9), hflip=False)
    expected = np.asarray(Image.fromarray(image).resize((6, 6), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(whole(image, np.random.default_rng(0)), expected)
    # With flips, each output is the unflipped one or its mirror, and both happen.
    flip = pipeline.Augment(PREP, scale=(1.0, 1.0), ratio=(11 / 9, 11 / 9), hflip=True)
    outs = [flip(image, np.random.default_rng(s)) for s in range(16)]
    assert all(np.array_equal(o, expected) or np.array_equal(o, expected[:, ::-1]) for o in outs)
    assert any(np.array_equal(o, expected[:, ::-1]) for o in outs)
    # Random boxes stay inside the image and respect the area range.
    augment = pipeline.Augment(PREP, scale=(0.25, 0.5))
    rng = np.random.default_rng(3)
    for _ in range(50):
        top, left, h, w = augment.crop_box(40, 60, rng)
        assert 0 <= top and top + h <= 40 and 0 <= left and left + w <= 60
        assert 0.2 <= h * w / 2400 <= 0.55
    # No try fits a 100×2 (or 2×100) image: the fallback is the centred box with the aspect
    # clipped to the ratio range, h = w / 0.5 (or w = h · 2).
    clipped = pipeline.Augment(PREP, scale=(0.9, 1.0), ratio=(0.5, 2.0))
    assert clipped.crop_box(100, 2, np.random.default_rng(0)) == (48, 0, 4, 2)
    assert clipped.crop_box(2, 100, np.random.default_rng(0)) == (0, 48, 2, 4)


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_dataset_pads_and_marks_exactly_the_tail(process_count):
    source = _source(10)
    slices = [
        list(
            pipeline.eval_dataset(
                source,
                PREP,
                global_batch=4,
                process_index=p,
                process_count=process_count,
                num_threads=2,
            )
        )
        for p in range(process_count)
    ]
    assert all(len(s) == 3 for s in slices)
    for step in range(3):
        batch = {
            k: np.concatenate([s[step][k] for s in slices]) for k in ("image", "label", "valid")
        }
        assert batch["image"].dtype == np.uint8 and batch["valid"].dtype == np.bool_
        for row in range(4):
            index = step * 4 + row
            if index < 10:
                assert batch["valid"][row] and batch["label"][row] == index
                np.testing.assert_array_equal(
                    batch["image"][row], jaxmodels.prepare_for_eval(source[index]["image"], PREP)
                )
            else:
                assert not batch["valid"][row] and batch["label"][row] == 0
                assert not batch["image"][row].any()
    valid = np.concatenate([s[step]["valid"] for step in range(3) for s in slices])
    assert valid.sum() == 10


def test_bad_arguments():
    source = _source(6)
    augment = pipeline.Augment(PREP)
    with pytest.raises(ValueError, match="divisible by the process count 4"):
        pipeline.train_dataset(
            source, augment, global_batch=6, seed=0, process_index=0, process_count=4
        )
    with pytest.raises(ValueError, match="exceeds the 6 training examples"):
        pipeline.train_dataset(source, augment, global_batch=8, seed=0)
    with pytest.raises(ValueError, match="process_index"):
        pipeline.eval_dataset(source, PREP, global_batch=4, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="seed"):
        pipeline.train_dataset(source, augment, global_batch=2, seed=-1)
    with pytest.raises(TypeError, match="ImageSource"):
        pipeline.eval_dataset(np.zeros((4, 8, 8, 3), np.uint8), PREP, global_batch=2)
    with pytest.raises(ValueError, match="scale"):
        pipeline.Augment(PREP, scale=(0.5, 0.1))
