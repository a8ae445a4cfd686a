"""The data layer: one spec grammar (npz, image folder, TFDS) → one random-access source type.

Expected pixels and labels are recomputed here independently (NumPy rounding, PIL decoding of the
files written by the test); errors are checked to be one `DataError` line naming the data.
"""

import io
import os

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

import jaxmodels
from jaxmodels.data import array_source, preprocess
from jaxmodels.data import sources as data
from jaxmodels.data.array_source import ArraySource
from jaxmodels.data.sources import DataError, check_classes_within, open_source


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HUBTUNE_CACHE", str(tmp_path / "cache"))


def _raises_one_line(match, fn, *args, **kwargs) -> str:
    with pytest.raises(DataError, match=match) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def _images(n, h=5, w=6, c=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, c), dtype=np.uint8)


# ----------------------------------------------------------------------------- npz


def test_npz_uint8_rgb(tmp_path):
    images, labels = _images(5), np.array([2, 0, 1, 2, 0], np.uint8)
    np.savez(tmp_path / "d.npz", images=images, labels=labels)
    source = open_source(str(tmp_path / "d.npz"))
    assert isinstance(source, jaxmodels.ImageSource) and len(source) == 5
    assert source.num_classes == 3 and source.labels.dtype == np.int64
    np.testing.assert_array_equal(source.labels, [2, 0, 1, 2, 0])
    item = source[3]
    assert item["image"].dtype == np.uint8 and item["label"].dtype == np.int32
    np.testing.assert_array_equal(item["image"], images[3])
    assert int(item["label"]) == 2
    np.testing.assert_array_equal(source[-1]["image"], images[4])
    with pytest.raises(IndexError):
        source[5]
    assert "5 images, 3 classes" in source.describe() and "d.npz" in source.describe()


def test_npz_fingerprint_follows_content(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, images=_images(4), labels=np.arange(4) % 2)
    first = open_source(path).fingerprint
    assert open_source(path).fingerprint == first
    np.savez(path, images=_images(4, seed=1), labels=np.arange(4) % 2)
    assert open_source(path).fingerprint != first


@pytest.mark.parametrize("shape", [(4, 5, 6), (4, 5, 6, 1)])
def test_npz_grey_is_repeated_to_rgb(tmp_path, shape):
    grey = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    np.savez(tmp_path / "g.npz", images=grey, labels=np.array([0, 1, 1, 0]))
    image = open_source(tmp_path / "g.npz")[2]["image"]
    assert image.shape == (5, 6, 3)
    for channel in range(3):
        np.testing.assert_array_equal(image[..., channel], grey[2].reshape(5, 6))


def test_npz_float_images_with_a_stated_range(tmp_path):
    rng = np.random.default_rng(2)
    unit = rng.random((3, 4, 4, 3)).astype(np.float32)
    unit[0, 0, 0] = [0.0, 1.0, 0.2]  # the ends of the range
    np.savez(tmp_path / "u.npz", images=unit, labels=[0, 1, 1], value_range=[0, 1])
    source = open_source(tmp_path / "u.npz")
    # Independent recomputation: round half to even of x · 255, in float64.
    expected = np.rint(unit.astype(np.float64) * 255).astype(np.uint8)
    for i in range(3):
        np.testing.assert_array_equal(source[i]["image"], expected[i])
    assert source[0]["image"][0, 0].tolist() == [0, 255, 51]
    # [0, 255] floats: ties round to even.
    ties = np.array([0.5, 1.5, 2.5, 254.5, 255.0, 0.0]).reshape(2, 1, 1, 3)
    stated = ArraySource(ties, [0, 1], value_range=(0, 255))
    assert stated[0]["image"].ravel().tolist() == [0, 2, 2]
    assert stated[1]["image"].ravel().tolist() == [254, 255, 0]
    # The argument states it too; a range of [-1, 1] maps -1 → 0 and 1 → 255.
    signed = 2 * unit - 1
    arrays = ArraySource(signed, [0, 1, 1], value_range=(-1, 1))
    expected = np.rint((signed.astype(np.float64) + 1) * 127.5).astype(np.uint8)
    np.testing.assert_array_equal(arrays[1]["image"], expected[1])
    # Integers of another dtype in [0, 255] are cast exactly.
    wide = _images(2).astype(np.int64)
    np.testing.assert_array_equal(ArraySource(wide, [0, 1])[1]["image"], wide[1])


def test_array_source_and_num_classes():
    source = ArraySource(_images(4), np.array([0, 1, 0, 1]), num_classes=5, name="mine")
    assert source.num_classes == 5 and source.spec == "mine"
    assert open_source(source) is source
    narrowed = open_source(source, num_classes=2)
    assert narrowed.num_classes == 2 and source.num_classes == 5
    np.testing.assert_array_equal(narrowed[1]["image"], source[1]["image"])
    # The fingerprint covers the pixels.
    other = _images(4)
    other[0, 0, 0, 0] ^= 1
    assert (
        ArraySource(other, [0, 1, 0, 1]).fingerprint
        != ArraySource(_images(4), [0, 1, 0, 1]).fingerprint
    )


@pytest.mark.parametrize(
    ("arrays", "kwargs", "match"),
    [
        ({"images": _images(4)}, {}, "lacks the array labels"),
        ({"images": _images(4), "labels": [0, 1, 0]}, {}, "labels has 3 entries but images has 4"),
        (
            {"images": _images(3), "labels": [0, 1, 0, 1]},
            {},
            "labels has 4 entries but images has 3",
        ),
        ({"images": _images(3), "labels": [0, 7, 7]}, {"num_classes": 5}, r"label 7 \(2 images\)"),
        ({"images": _images(2)[..., 0, 0], "labels": [0, 1]}, {}, r"got shape \(2, 5\)"),
        ({"images": _images(2, c=4), "labels": [0, 1]}, {}, r"\[N, H, W, 3\]; got shape"),
        ({"images": _images(2), "labels": [0.0, 1.0]}, {}, "labels must be integers"),
        ({"images": _images(2), "labels": [[0, 1]]}, {}, r"shape \[N\]"),
        ({"images": _images(2), "labels": [-1, 1]}, {}, "labels must be >= 0"),
        ({"images": _images(2), "labels": [0, 0]}, {}, "at least 2 classes"),
        ({"images": _images(0), "labels": np.zeros(0, int)}, {}, "holds no images"),
        ({"images": np.full((2, 3, 3), np.nan), "labels": [0, 1]}, {}, "NaN or infinite"),
        (
            {"images": np.full((2, 3, 3), 0.5), "labels": [0, 1], "value_range": [0, 1]},
            {"value_range": (0, 255)},
            "drop one",
        ),
        (
            {"images": np.full((2, 3, 3), 1.5), "labels": [0, 1], "value_range": [0, 1]},
            {},
            r"outside the stated value_range \[0, 1\]",
        ),
        ({"images": np.full((2, 3, 3), 300), "labels": [0, 1]}, {}, r"outside \[0, 255\]"),
        (
            {"images": _images(2), "labels": [0, 1], "value_range": [0, 1]},
            {},
            "uint8 images always span",
        ),
    ],
)
def test_bad_npz_is_one_data_error(tmp_path, arrays, kwargs, match):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    message = _raises_one_line(match, array_source.open_npz, path, **kwargs)
    assert "bad.npz" in message


def test_float_unit_images_without_a_range_say_how_to_state_it(tmp_path):
    np.savez(tmp_path / "f.npz", images=np.full((2, 3, 3, 3), 0.25), labels=[0, 1])
    message = _raises_one_line("must say their value range", open_source, tmp_path / "f.npz")
    assert "value_range=[0, 1]" in message and "[0.25, 0.25]" in message


def test_bad_specs(tmp_path):
    _raises_one_line("not found", open_source, str(tmp_path / "nope.npz"))
    (tmp_path / "file.txt").write_text("x")
    _raises_one_line(r"neither a \.npz file", open_source, tmp_path / "file.txt")
    (tmp_path / "corrupt.npz").write_text("not a zip")
    _raises_one_line(r"not a readable \.npz", open_source, tmp_path / "corrupt.npz")
    _raises_one_line("empty", open_source, "")
    _raises_one_line("tfds:NAME", open_source, "tfds:")
    with pytest.raises(TypeError, match="spec must be"):
        open_source(3)


def test_check_classes_within():
    train = ArraySource(_images(3), [0, 1, 2])
    check_classes_within(ArraySource(_images(2), [2, 0]), train.num_classes)
    held_out = ArraySource(_images(4), [0, 3, 5, 3])
    message = _raises_one_line(
        "beyond the 3 classes", check_classes_within, held_out, train.num_classes, "held-out"
    )
    assert "label 3 (2 images), label 5 (1 image)" in message and message.startswith("held-out")


def test_cache_root(monkeypatch, tmp_path):
    monkeypatch.setenv("HUBTUNE_CACHE", str(tmp_path / "h"))
    assert data.cache_root() == tmp_path / "h"
    monkeypatch.delenv("HUBTUNE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert data.cache_root() == tmp_path / "x" / "hubtune"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert str(data.cache_root()) == os.path.expanduser("~/.cache/hubtune")


# ----------------------------------------------------------------------------- folders


def _write_folder(root):
    """cat: 2 PNGs (one grey, one in a sub-folder); dog: 1 JPEG; plus files to be ignored."""
    rng = np.random.default_rng(3)
    (root / "dog").mkdir(parents=True)
    (root / "cat" / "more").mkdir(parents=True)
    (root / ".hidden").mkdir()
    Image.fromarray(rng.integers(0, 256, (7, 9, 3), dtype=np.uint8)).save(root / "cat" / "a.png")
    Image.fromarray(rng.integers(0, 256, (6, 5), dtype=np.uint8)).save(
        root / "cat" / "more" / "b.PNG"
    )
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / "dog" / "c.jpg")
    Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).save(
        root / ".hidden" / "d.png"
    )
    (root / "dog" / "notes.txt").write_text("not an image")


def test_image_folder(tmp_path):
    _write_folder(tmp_path)
    source = open_source(str(tmp_path))
    assert source.classes == ["cat", "dog"] and source.num_classes == 2
    np.testing.assert_array_equal(source.labels, [0, 0, 1])
    expected = [
        np.asarray(Image.open(tmp_path / "cat" / "a.png")),
        np.repeat(np.asarray(Image.open(tmp_path / "cat" / "more" / "b.PNG"))[..., None], 3, -1),
        np.asarray(Image.open(tmp_path / "dog" / "c.jpg").convert("RGB")),
    ]
    for i, image in enumerate(expected):
        np.testing.assert_array_equal(source[i]["image"], image)
    assert source[2]["image"].dtype == np.uint8 and int(source[2]["label"]) == 1
    assert open_source(tmp_path, num_classes=4).num_classes == 4
    before = source.fingerprint
    assert open_source(tmp_path).fingerprint == before
    # Same file names, new content: the fingerprint follows.
    Image.fromarray(np.zeros((3, 3, 3), np.uint8)).save(tmp_path / "cat" / "a.png")
    rewritten = open_source(tmp_path).fingerprint
    assert rewritten != before
    Image.fromarray(np.zeros((3, 3, 3), np.uint8)).save(tmp_path / "dog" / "e.png")
    assert open_source(tmp_path).fingerprint not in (before, rewritten)


def test_bad_folders(tmp_path):
    (tmp_path / "one" / "a").mkdir(parents=True)
    _raises_one_line("one sub-folder per class", open_source, tmp_path / "one")
    (tmp_path / "one" / "b").mkdir()
    _raises_one_line("holds no image files", open_source, tmp_path / "one")
    (tmp_path / "one" / "b" / "x.png").write_bytes(b"not a png")
    source = open_source(tmp_path / "one")
    _raises_one_line("x.png' is not readable", source.__getitem__, 0)


# ----------------------------------------------------------------------------- TFDS


def _png_bytes(pixels):
    buffer = io.BytesIO()
    Image.fromarray(pixels.squeeze(-1) if pixels.shape[-1] == 1 else pixels).save(buffer, "PNG")
    return buffer.getvalue()


class HubtuneTinyImages(tfds.core.GeneratorBasedBuilder):
    """A real TFDS dataset, prepared by the tests in ArrayRecord format (no TensorFlow needed
    when the images are given as encoded bytes)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        features = tfds.features.FeaturesDict(
            {
                "image": tfds.features.Image(shape=(None, None, 3)),
                "label": tfds.features.ClassLabel(num_classes=4),
            }
        )
        return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(9), "test": self._generate_examples(3)}

    def _generate_examples(self, count):
        for i in range(count):
            yield i, {"image": _png_bytes(_tiny_image(count, i)), "label": i % 3}


def _tiny_image(count, i):
    return np.random.default_rng([count, i]).integers(0, 256, (4 + i, 5, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tfds")
    HubtuneTinyImages(data_dir=str(root), file_format="array_record").download_and_prepare()
    return str(root)


def test_tfds_labels_come_without_decoding_images(tfds_dir, monkeypatch):
    decoded = []
    real_decode = tfds.features.Image.decode_example_np
    monkeypatch.setattr(
        tfds.features.Image,
        "decode_example_np",
        lambda self, example: decoded.append(1) or real_decode(self, example),
    )
    source = open_source("tfds:hubtune_tiny_images", data_dir=tfds_dir)
    assert decoded == []  # 9 labels read, no image decoded
    assert len(source) == 9 and source.num_classes == 4  # from the ClassLabel metadata
    # Independent truth: the generator's (image, label) pairs, matched by image.
    truth = {_tiny_image(9, i).tobytes(): i % 3 for i in range(9)}
    for i in range(9):
        item = source[i]
        assert truth[item["image"].tobytes()] == source.labels[i] == item["label"]
    assert len(decoded) == 9
    # The labels are cached: a second open reads no record.
    (cached,) = (data.cache_root() / "labels").iterdir()
    np.testing.assert_array_equal(np.load(cached), source.labels)
    reads = []
    monkeypatch.setattr(
        tfds.core.data_sources.array_record.ArrayRecordDataSource,
        "__getitem__",
        lambda self, key: reads.append(key),
    )
    again = open_source("tfds:hubtune_tiny_images:train", data_dir=tfds_dir)
    assert reads == [] and again.fingerprint == source.fingerprint


def test_tfds_spec_forms(tfds_dir):
    test = open_source("tfds:hubtune_tiny_images:test", data_dir=tfds_dir)
    assert len(test) == 3
    assert len(open_source("tfds:hubtune_tiny_images", split="test", data_dir=tfds_dir)) == 3
    sliced = open_source("tfds:hubtune_tiny_images:1.0.0:train[:5]", data_dir=tfds_dir)
    assert len(sliced) == 5 and sliced.name == "hubtune_tiny_images:1.0.0"
    assert sliced.fingerprint != test.fingerprint
    _raises_one_line(
        "Unknown split", open_source, "tfds:hubtune_tiny_images:dev", data_dir=tfds_dir
    )
    _raises_one_line(
        r"label 2 \(1 image\)",
        open_source,
        "tfds:hubtune_tiny_images:test",
        data_dir=tfds_dir,
        num_classes=2,
    )


def test_unprepared_tfds_dataset_says_how_to_prepare_it(tmp_path):
    empty = str(tmp_path / "empty")
    message = _raises_one_line(
        "is not prepared", open_source, "tfds:hubtune_tiny_images:test", data_dir=empty
    )
    assert (
        f"tfds build hubtune_tiny_images --data_dir {empty} --file_format array_record" in message
    )
    assert not os.path.exists(empty) or not os.listdir(empty)  # nothing was downloaded or built
    _raises_one_line("no TFDS dataset 'no_such_dataset'", open_source, "tfds:no_such_dataset")


def test_tfds_mock_mnist_grey_to_rgb_labels_with_skip_decoding(monkeypatch):
    # TFDS's mock encodes images with TensorFlow when a decoder is given (the label pass gives
    # SkipDecoding); TensorFlow is not installed, so the mock's encoder writes PNGs with PIL.
    monkeypatch.setattr(
        tfds.core.features.image_feature._ImageEncoder,
        "_encode_image",
        lambda self, x: _png_bytes(x),
    )
    calls = []
    real_data_source = tfds.data_source

    def spy(*args, **kwargs):
        calls.append(kwargs.get("decoders"))
        return real_data_source(*args, **kwargs)

    monkeypatch.setattr(tfds, "data_source", spy)
    with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
        source = open_source("tfds:mnist:test")
        assert len(source) == 6 and source.num_classes == 10
        decoded_labels = [int(source[i]["label"]) for i in range(6)]
        np.testing.assert_array_equal(source.labels, decoded_labels)
        image = source[0]["image"]
        assert image.shape == (28, 28, 3) and image.dtype == np.uint8
        assert (image[..., 0] == image[..., 2]).all()
        # One decoding source for the images, one label pass with every other feature skipped.
        assert calls[0] is None and set(calls[1]) == {"image"}
        assert isinstance(calls[1]["image"], tfds.decode.SkipDecoding)
        open_source("tfds:mnist:test")
        assert len(calls) == 3  # the labels came from the cache


# ----------------------------------------------------------------------------- preprocessing


def _hand_resize_crop(image, resize, crop, resample):
    """torchvision's Resize(int) + CenterCrop, written out with PIL."""
    h, w = image.shape[:2]
    if h <= w:
        size = (int(resize * w / h), resize)
    else:
        size = (resize, int(resize * h / w))
    resized = np.asarray(Image.fromarray(image).resize(size, resample))
    top = round((resized.shape[0] - crop) / 2.0)
    left = round((resized.shape[1] - crop) / 2.0)
    return resized[top : top + crop, left : left + crop]


@pytest.mark.parametrize("shape", [(40, 60), (61, 37), (9, 12), (36, 36)])
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_prepare_for_eval_is_pil_resize_and_centre_crop(shape, interpolation):
    image = np.random.default_rng(4).integers(0, 256, (*shape, 3), dtype=np.uint8)
    prep = preprocess.Preprocessing(32, 36, (0.5,) * 3, (0.25,) * 3, interpolation)
    prepared = jaxmodels.prepare_for_eval(image, prep)
    assert prepared.dtype == np.uint8 and prepared.shape == (32, 32, 3)
    resample = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
    np.testing.assert_array_equal(
        prepared, _hand_resize_crop(image, 36, 32, resample[interpolation])
    )
    # The host float path is the same pixels, normalised.
    expected = (prepared / 255.0 - 0.5) / 0.25
    np.testing.assert_allclose(jaxmodels.preprocess_for_eval(image, prep), expected, atol=1e-6)


def test_prepare_for_eval_rejects_non_uint8():
    prep = jaxmodels.spec("resnet_tiny").preprocessing
    with pytest.raises(TypeError, match="uint8"):
        jaxmodels.prepare_for_eval(np.zeros((8, 8, 3), np.float32), prep)
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        jaxmodels.prepare_for_eval(np.zeros((8, 8), np.uint8), prep)
    with pytest.raises(TypeError, match="NumPy"):
        jaxmodels.preprocess_for_eval(jax.numpy.zeros((8, 8, 3), jax.numpy.uint8), prep)
    with pytest.raises(TypeError, match="uint8 pixels"):
        jaxmodels.preprocess_for_eval(np.full((8, 8, 3), 0.5), prep)
