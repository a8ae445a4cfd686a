"""DATA_SPEC parsing for scripts/rank.py: .npz, image folders and their errors."""

import numpy as np
import pytest
from PIL import Image

from scoring.hub_data import DataSpecError, open_dataset


def test_image_folder_gives_sorted_class_labels_and_reads_variable_sizes(tmp_path):
    rng = np.random.default_rng(0)
    sizes = {"cat": [(10, 12), (7, 9)], "dog": [(8, 8)], "eel": [(5, 6), (6, 5), (9, 4)]}
    for name, shapes in sizes.items():
        (tmp_path / name).mkdir()
        for i, (h, w) in enumerate(shapes):
            pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / name / f"{i}.png")
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    data = open_dataset(str(tmp_path))
    np.testing.assert_array_equal(data.labels, [0, 0, 1, 2, 2, 2])
    chunks = list(data.chunks(size=4))
    assert [start for start, _ in chunks] == [0, 4]
    images = [im for _, batch in chunks for im in batch]
    assert [im.shape for im in images] == [
        (10, 12, 3),
        (7, 9, 3),
        (8, 8, 3),
        (5, 6, 3),
        (6, 5, 3),
        (9, 4, 3),
    ]
    np.testing.assert_array_equal(images[2], np.asarray(Image.open(tmp_path / "dog" / "0.png")))
    # The fingerprint changes when the data does.
    before = data.fingerprint
    Image.fromarray(np.zeros((3, 3, 3), np.uint8)).save(tmp_path / "cat" / "2.png")
    assert open_dataset(str(tmp_path)).fingerprint != before


def test_npz_reads_images_and_labels(tmp_path):
    images = np.arange(4 * 2 * 2 * 3, dtype=np.float32).reshape(4, 2, 2, 3)
    np.savez(tmp_path / "d.npz", images=images, labels=np.array([5, 2, 5, 2]))
    data = open_dataset(str(tmp_path / "d.npz"))
    assert data.num_images == 4
    np.testing.assert_array_equal(data.labels, [5, 2, 5, 2])
    np.testing.assert_array_equal(np.stack(data.read(1, 3)), images[1:3])


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"images": np.zeros((4, 2, 2, 3))}, "lacks labels"),
        ({"images": np.zeros((4, 2, 2)), "labels": np.arange(4) % 2}, r"shape \[N=4, H, W, 3\]"),
        ({"images": np.zeros((4, 2, 2, 3)), "labels": np.zeros(4)}, "labels must be integers"),
        ({"images": np.zeros((4, 2, 2, 3)), "labels": np.zeros(4, int)}, "at least 2 classes"),
        ({"images": np.zeros((3, 2, 2, 3)), "labels": np.arange(4) % 2}, r"shape \[N=4"),
    ],
)
def test_bad_npz_raises_one_line_errors(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataSpecError, match=message):
        open_dataset(str(tmp_path / "bad.npz"))


def test_bad_paths_and_folders(tmp_path):
    with pytest.raises(DataSpecError, match="not found"):
        open_dataset(str(tmp_path / "nope.npz"))
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(DataSpecError, match=r"neither a \.npz file"):
        open_dataset(str(tmp_path / "file.txt"))
    (tmp_path / "corrupt.npz").write_text("not a zip")
    with pytest.raises(DataSpecError, match=r"not a readable \.npz"):
        open_dataset(str(tmp_path / "corrupt.npz"))
    (tmp_path / "one" / "a").mkdir(parents=True)
    with pytest.raises(DataSpecError, match="one sub-folder per class"):
        open_dataset(str(tmp_path / "one"))
    (tmp_path / "one" / "b").mkdir()
    with pytest.raises(DataSpecError, match="holds no image files"):
        open_dataset(str(tmp_path / "one"))
    with pytest.raises(DataSpecError, match="tfds:NAME:SPLIT"):
        open_dataset("tfds:cifar10")
