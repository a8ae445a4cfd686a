"""Tests for training.sources and training.data: sources, transforms, resumable sharded batches."""

import numpy as np
import pytest
from PIL import Image

from training import data, sources


def _array_source(n=20, size=6, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, size, size, 3)).astype(np.uint8)
    return sources.ArraySource(images, rng.integers(0, 4, n))


def test_npz_source_reads_images_and_labels(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 4, 4, 3)).astype(np.uint8)
    labels = np.array([0, 2, 1, 2, 0])
    np.savez(tmp_path / "d.npz", images=images, labels=labels)
    source = sources.open_source(str(tmp_path / "d.npz"))
    assert len(source) == 5 and source.num_classes == 3
    image, label = source[3]
    np.testing.assert_array_equal(image, images[3])
    assert label == 2


def test_npz_without_labels_is_a_value_error(tmp_path):
    np.savez(tmp_path / "d.npz", images=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="must hold arrays 'images' and 'labels'"):
        sources.load_npz(str(tmp_path / "d.npz"))


@pytest.mark.parametrize(
    ("images", "labels", "error", "match"),
    [
        (np.zeros((2, 4, 4), np.uint8), np.zeros(2, int), ValueError, r"\[N, H, W, C\]"),
        (np.zeros((2, 4, 4, 3), np.float32), np.zeros(2, int), TypeError, "uint8"),
        (np.zeros((2, 4, 4, 3), np.uint8), np.zeros(3, int), ValueError, r"labels must be \[N=2\]"),
        (np.zeros((2, 4, 4, 3), np.uint8), np.array([0, -1]), ValueError, "labels must be >= 0"),
    ],
)
def test_bad_arrays_are_rejected(images, labels, error, match):
    with pytest.raises(error, match=match):
        sources.ArraySource(images, labels)


def test_image_folder_orders_classes_by_name(tmp_path):
    rng = np.random.default_rng(0)
    written = {}
    for cls in ["zebra", "ant"]:
        (tmp_path / cls).mkdir()
        for i in range(2):
            pixels = rng.integers(0, 256, (5, 7, 3)).astype(np.uint8)
            Image.fromarray(pixels).save(tmp_path / cls / f"{i}.png")
            written[(cls, i)] = pixels
    (tmp_path / "ant" / "notes.txt").write_text("not an image")
    source = sources.open_source(str(tmp_path))
    assert source.classes == ["ant", "zebra"] and len(source) == 4
    image, label = source[3]
    assert label == 1
    np.testing.assert_array_equal(image, written[("zebra", 1)])


def test_missing_data_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="data must be 'tfds:NAME"):
        sources.open_source(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="does not exist"):
        sources.open_source(str(tmp_path / "nope.npz"))
    with pytest.raises(ValueError, match="has no class sub-folders"):
        sources.open_source(str(tmp_path))
    with pytest.raises(ValueError, match="'tfds:NAME' or 'tfds:NAME:SPLIT'"):
        sources.open_source("tfds:")


def test_tfds_source_through_data_source_without_tensorflow():
    import sys

    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
        source = sources.open_source("tfds:mnist:test")
        assert len(source) == 12 and source.num_classes == 10
        image, label = source[5]
        assert image.shape == (28, 28, 1) and image.dtype == np.uint8 and 0 <= label < 10
        batch = next(data.train_batches(source, 4, data.Preprocess(image_size=8), seed=0))[1]
        assert batch["image"].shape == (4, 8, 8, 3)
    assert "tensorflow" not in sys.modules


def test_eval_transform_without_resize_crops_the_middle_and_normalises():
    image = np.arange(10 * 12 * 3, dtype=np.uint8).reshape(10, 12, 3)
    # short side 10 = resize_size already: only the crop (rows 1..8, cols 2..9) and (x/255-m)/s
    prep = data.Preprocess(image_size=8, resize_size=10, mean=(0.5, 0.25, 0.0), std=(0.5, 2, 1))
    expected = (image[1:9, 2:10] / 255.0 - np.array([0.5, 0.25, 0.0])) / np.array([0.5, 2, 1])
    np.testing.assert_allclose(data.eval_transform(image, prep), expected, rtol=1e-5, atol=1e-6)


def test_preprocess_for_model_uses_the_model_normalisation():
    vit = data.preprocess_for_model("vit_s16")
    # timm augreg ViT: crop_pct 0.9 → resize floor(224/0.9) = 248, bicubic, mean = std = 0.5
    assert (vit.image_size, vit.resize_size, vit.interpolation) == (224, 248, "bicubic")
    assert tuple(vit.mean) == (0.5, 0.5, 0.5) and tuple(vit.std) == (0.5, 0.5, 0.5)
    resnet = data.preprocess_for_model("resnet50", image_size=160, hflip=False)
    # torchvision: resize 160/0.875 = 182, bilinear, ImageNet statistics
    assert (resnet.image_size, resnet.resize_size, resnet.interpolation) == (160, 182, "bilinear")
    assert tuple(resnet.mean) == (0.485, 0.456, 0.406) and not resnet.hflip


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"image_size": 0}, "image_size must be >= 1"),
        ({"scale": (0.5, 0.2)}, "scale must satisfy"),
        ({"ratio": (0.0, 1.0)}, "ratio must satisfy"),
        ({"interpolation": "nearest"}, "interpolation must be one of"),
        ({"image_size": 8, "resize_size": 4}, "need 0 < image_size <= resize_size"),
    ],
)
def test_bad_preprocess_is_a_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        data.Preprocess(**kwargs)


def test_random_resized_crop_shapes_and_identities():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (16, 12, 3)).astype(np.uint8)
    for seed in range(5):
        assert data.random_resized_crop(image, 4, np.random.default_rng(seed)).shape == (4, 4, 3)
    # a constant image stays constant whatever box is cut
    flat = np.full((16, 12, 3), 77, np.uint8)
    np.testing.assert_array_equal(data.random_resized_crop(flat, 5, np.random.default_rng(1)), 77)
    # full-area, square boxes of a square image: the whole image, resized to the same size
    square = image[:12]
    out = data.random_resized_crop(square, 12, np.random.default_rng(0), (1.0, 1.0), (1.0, 1.0))
    np.testing.assert_array_equal(out, square)


def test_train_transform_flips_with_the_drawn_coin():
    image = np.random.default_rng(0).integers(0, 256, (8, 8, 3)).astype(np.uint8)
    prep = data.Preprocess(image_size=8, scale=(1.0, 1.0), ratio=(1.0, 1.0), mean=(0, 0, 0),
                           std=(1, 1, 1))  # fmt: skip
    flips = []
    for seed in range(8):
        rng = np.random.default_rng(seed)
        out = data.train_transform(image, prep, rng)
        coin = np.random.default_rng(seed)
        coin.uniform(), coin.uniform()  # area and aspect draws of the first (accepted) box
        coin.integers(0, 1), coin.integers(0, 1)  # its top-left corner
        flipped = coin.random() < 0.5
        expected = image[:, ::-1] if flipped else image
        np.testing.assert_allclose(out, expected / 255.0, rtol=1e-6, atol=1e-7)
        flips.append(flipped)
    assert any(flips) and not all(flips)


def test_train_batches_resume_from_a_position_gives_the_same_stream():
    source = _array_source(n=20)
    prep = data.Preprocess(image_size=4)
    stream = data.train_batches(source, 8, prep, seed=3)  # 2 batches per epoch
    first = [next(stream) for _ in range(5)]
    assert [p for p, _ in first] == [
        data.DataPosition(0, 1), data.DataPosition(1, 0), data.DataPosition(1, 1),
        data.DataPosition(2, 0), data.DataPosition(2, 1),
    ]  # fmt: skip
    resumed = data.train_batches(source, 8, prep, seed=3, start=first[1][0])
    for (pos_a, a), (pos_b, b) in zip(first[2:], [next(resumed) for _ in range(3)], strict=True):
        assert pos_a == pos_b
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])


def test_each_epoch_is_a_permutation_and_seeds_differ():
    order0 = data.epoch_permutation(20, seed=1, epoch=0)
    order1 = data.epoch_permutation(20, seed=1, epoch=1)
    assert sorted(order0) == list(range(20)) and sorted(order1) == list(range(20))
    assert not np.array_equal(order0, order1)
    assert not np.array_equal(order0, data.epoch_permutation(20, seed=2, epoch=0))


def test_process_slices_concatenate_to_the_global_batch():
    source = _array_source(n=16)
    prep = data.Preprocess(image_size=4)
    whole = next(data.train_batches(source, 8, prep, seed=0, num_workers=2))[1]
    parts = [next(data.train_batches(source, 8, prep, seed=0, process_index=i, process_count=4))[1]
             for i in range(4)]  # fmt: skip
    np.testing.assert_array_equal(np.concatenate([p["image"] for p in parts]), whole["image"])
    np.testing.assert_array_equal(np.concatenate([p["label"] for p in parts]), whole["label"])
    with pytest.raises(ValueError, match="global batch 8 must be divisible by the process count 3"):
        next(data.train_batches(source, 8, prep, seed=0, process_count=3))


def test_batch_larger_than_dataset_is_a_value_error():
    with pytest.raises(ValueError, match="global_batch 32 exceeds the 20 training examples"):
        next(data.train_batches(_array_source(n=20), 32, data.Preprocess(image_size=4), seed=0))


def test_eval_batches_pad_the_last_batch_with_zero_weight():
    source = _array_source(n=10)
    prep = data.Preprocess(image_size=4, resize_size=4)
    batches = list(data.eval_batches(source, 4, prep))
    assert [b["weight"].tolist() for b in batches] == [[1] * 4, [1] * 4, [1, 1, 0, 0]]
    labels = np.concatenate([b["label"][b["weight"] > 0] for b in batches])
    np.testing.assert_array_equal(labels, source.labels)


def test_grayscale_images_become_rgb():
    gray = sources.ArraySource(np.full((4, 6, 6, 1), 255, np.uint8), np.zeros(4, int))
    prep = data.Preprocess(image_size=4, mean=(0, 0, 0), std=(1, 1, 1))
    batch = next(data.eval_batches(gray, 4, prep))
    np.testing.assert_allclose(batch["image"], 1.0)
    assert batch["image"].shape == (4, 4, 4, 3)
