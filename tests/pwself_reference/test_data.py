"""Datasets: the bundled Fashion-MNIST subset, the idx reader and the error messages."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
from PIL import Image

from pwself_reference.data import (
    BUNDLED_PATH,
    ArrayImageDataset,
    build_labelled_dataset,
    build_pretrain_dataset,
    read_idx,
)


def test_bundled_subset_is_balanced_and_small():
    assert BUNDLED_PATH.stat().st_size < 5 * 2**20
    train = build_labelled_dataset("fashion-mnist-mini", None, train=True)
    test = build_labelled_dataset("fashion-mnist-mini", None, train=False)
    assert len(train) == 6000 and len(test) == 1000
    assert np.bincount(train.labels).tolist() == [600] * 10
    assert np.bincount(test.labels).tolist() == [100] * 10
    img, label = test[0]
    assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (28, 28)
    assert isinstance(label, int) and label == int(test.labels[0])
    arr = np.asarray(img)
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()
    assert arr.std() > 10  # a real picture, not a blank


def test_bundled_subset_records_its_source_indices():
    with np.load(BUNDLED_PATH) as z:
        idx = z["train_source_index"]
        assert idx.shape == (6000,) and len(np.unique(idx)) == 6000
        assert (np.diff(idx) > 0).all() and idx.max() < 60000
        assert z["test_source_index"].max() < 10000


def test_transform_is_applied():
    ds = build_labelled_dataset("fashion-mnist-mini", None, False, transform=lambda im: im.size)
    assert ds[3][0] == (28, 28)


def _write_idx(path, arr):
    header = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + b"".join(
        struct.pack(">I", s) for s in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_fashion_mnist_reads_original_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8)
    labels = np.arange(7) % 10
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", imgs)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels)
    np.testing.assert_array_equal(read_idx(tmp_path / "t10k-images-idx3-ubyte.gz"), imgs)
    ds = build_labelled_dataset("fashion-mnist", tmp_path, train=False)
    assert len(ds) == 7
    img, label = ds[4]
    assert label == 4
    np.testing.assert_array_equal(np.asarray(img)[..., 0], imgs[4])
    with pytest.raises(FileNotFoundError, match="train-images"):
        build_labelled_dataset("fashion-mnist", tmp_path, train=True)


def test_imagefolder_layout(tmp_path):
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            Image.new("L", (40, 30), 128).save(d / "a.png")
    ds = build_labelled_dataset("imagefolder", tmp_path, train=False)
    assert len(ds) == 2 and ds.labels.tolist() == [0, 1]
    img, label = ds[1]
    assert img.mode == "RGB" and img.size == (40, 30) and label == 1
    assert len(build_pretrain_dataset("imagefolder", tmp_path)) == 2


@pytest.mark.parametrize("name, root, exc, match", [
    ("mnist", None, ValueError, "unknown dataset"),
    ("cifar10", None, ValueError, "data_path"),
    ("fashion-mnist", "/nonexistent/dir", FileNotFoundError, "data_path"),
    ("imagefolder", "/nonexistent/dir", FileNotFoundError, "data_path"),
])
def test_bad_dataset_arguments(name, root, exc, match):
    with pytest.raises(exc, match=match):
        build_labelled_dataset(name, root, train=True)


def test_array_dataset_validates():
    with pytest.raises(ValueError, match="uint8"):
        ArrayImageDataset(np.zeros((2, 4, 4), np.float32), np.zeros(2))
    with pytest.raises(ValueError, match="labels"):
        ArrayImageDataset(np.zeros((2, 4, 4), np.uint8), np.zeros(3))
