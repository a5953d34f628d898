"""Datasets: the bundled Fashion-MNIST subset, the idx and CIFAR readers, the error messages."""

from __future__ import annotations

import builtins
import gzip
import io
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pwself_reference.data import (
    BUNDLED_PATH,
    ArrayImageDataset,
    build_labelled_dataset,
    build_pretrain_dataset,
    load_cifar_arrays,
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


# ------------------------------------------------------------------------------ CIFAR
def _planar(images):
    """``(N, 32, 32, 3)`` RGB -> the CIFAR rows ``(N, 3072)``: red, green, blue planes."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), 3072))


def _dump(path, obj, protocol=2):
    path.write_bytes(pickle.dumps(obj, protocol=protocol))


def _fake_cifar10(root, sizes=(2, 1, 3, 1, 2, 3), seed=0):
    """Fake ``root/cifar-10-batches-py`` (5 train batches + test batch), bytes keys as in the
    CIFAR page's Python 3 recipe; returns ``{file: (rows (N, 3072) uint8, labels)}``."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    written = {}
    for name, n in zip(names, sizes):
        rows = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n).tolist()
        _dump(folder / name, {b"batch_label": name.encode(), b"data": rows, b"labels": labels,
                              b"filenames": [f"img{i}.png".encode() for i in range(n)]})
        written[name] = (rows, labels)
    _dump(folder / "batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)],
                                    b"num_cases_per_batch": 10000, b"num_vis": 3072})
    return written


def test_cifar10_pixels_and_labels_round_trip(tmp_path):
    written = _fake_cifar10(tmp_path)
    rows, labels = written["test_batch"]
    # a known pixel, written directly into the channel-planar row: (y=1, x=2) of image 0
    rows[0, [0 * 1024 + 1 * 32 + 2, 1 * 1024 + 34, 2 * 1024 + 34]] = (10, 20, 30)
    _dump(tmp_path / "cifar-10-batches-py" / "test_batch", {b"data": rows, b"labels": labels})
    test = build_labelled_dataset("cifar10", tmp_path, train=False)
    assert len(test) == 3 and test.labels.tolist() == labels and test.labels.dtype == np.int64
    assert test.classes == tuple(f"c{i}" for i in range(10))
    img, label = test[0]
    assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (32, 32)
    assert img.getpixel((2, 1)) == (10, 20, 30)
    assert isinstance(label, int) and label == labels[0]
    for i in range(3):
        arr = np.asarray(test[i][0])  # (H, W, 3): red plane first in the file
        np.testing.assert_array_equal(arr.transpose(2, 0, 1).reshape(3072), rows[i])
    # the training split concatenates data_batch_1..5 in order
    train = build_labelled_dataset("cifar10", tmp_path, train=True)
    train_rows = np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)])
    train_labels = sum((written[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert len(train) == 9 and train.labels.tolist() == train_labels
    np.testing.assert_array_equal(_planar(np.stack([np.asarray(train[i][0]) for i in range(9)])),
                                  train_rows)


def test_cifar_works_with_the_pretraining_pipeline(tmp_path):
    from torchvision.transforms import ToTensor

    from pwself_reference.augment import CropSpec, ImageTensorDataset, MultiCropDataset
    from pwself_reference.train import seeded_subset

    written = _fake_cifar10(tmp_path)
    rows = np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)])
    labels = sum((written[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    base = seeded_subset(build_pretrain_dataset("cifar10", tmp_path), 5, seed=1)
    assert len(base) == 5
    for j, i in enumerate(base.indices):
        x = ImageTensorDataset(base)[j]  # the "batched" crops path of train.py
        assert x.dtype == torch.uint8 and x.shape == (3, 32, 32)
        np.testing.assert_array_equal(x.numpy().reshape(3072), rows[i])
        assert base.labels[j] == labels[i]
    sample = MultiCropDataset(base, CropSpec(32, 16, n_local=2))[0]  # the "loader" path
    assert [tuple(v.shape) for v in sample.crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 2
    assert all(v.dtype == torch.uint8 for v in sample.crops)
    ds = build_labelled_dataset("cifar10", tmp_path, False, transform=ToTensor())
    x, label = ds[2]
    np.testing.assert_allclose(x.numpy().reshape(3072), written["test_batch"][0][2] / 255.0,
                               atol=1e-6)


class _Py2Pickler(pickle._Pickler):
    """Writes ``bytes`` as Python 2 ``str`` (BINSTRING) and Python 2 module names, as the
    real CIFAR files (pickled by Python 2's cPickle) are."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj):
        n = len(obj)
        head = pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else (
            pickle.BINSTRING + struct.pack("<i", n))
        self.write(head + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str

    def save_global(self, obj, name=None):
        module = obj.__module__.replace("numpy._core", "numpy.core")
        module = "__builtin__" if module == "builtins" else module
        self.write(pickle.GLOBAL + f"{module}\n{name or obj.__qualname__}\n".encode())
        self.memoize(obj)


def _dump_py2(path, obj):
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    path.write_bytes(buf.getvalue())


def test_cifar100_python2_style_files(tmp_path):
    rng = np.random.default_rng(3)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    data = {}
    for split, n in (("train", 4), ("test", 2)):
        rows = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = [99, 0, 57, 3][:n]
        _dump_py2(folder / split, {b"filenames": [b"x.png"] * n, b"batch_label": b"b",
                                   b"fine_labels": fine, b"coarse_labels": [19] * n,
                                   b"data": rows})
        data[split] = rows, fine
    _dump_py2(folder / "meta", {b"fine_label_names": [b"apple%d" % i for i in range(100)],
                                b"coarse_label_names": [b"c"] * 20})
    assert b"cnumpy.core.multiarray\n_reconstruct" in (folder / "train").read_bytes()
    assert b"U\x04data" in (folder / "train").read_bytes()  # a Python 2 str key
    for train, split in ((True, "train"), (False, "test")):
        ds = build_labelled_dataset("cifar100", tmp_path, train=train)
        rows, fine = data[split]
        assert ds.labels.tolist() == fine and [ds[i][1] for i in range(len(ds))] == fine
        got = np.stack([np.asarray(ds[i][0]) for i in range(len(ds))])
        np.testing.assert_array_equal(_planar(got), rows)
        assert ds.classes[0] == "apple0" and len(ds.classes) == 100
    # --data-path may also be the cifar-100-python folder itself; meta is optional
    (folder / "meta").unlink()
    ds = build_pretrain_dataset("cifar100", folder)
    assert len(ds) == 4 and ds.classes is None and ds[0][0].size == (32, 32)


def test_cifar_download_uses_the_official_archive(tmp_path, monkeypatch):
    import torchvision.datasets
    import torchvision.datasets.utils as tv_utils

    import pwself_reference.data as data_mod

    calls = []

    def fake_download(url, download_root, filename=None, md5=None, **kwargs):
        calls.append((url, download_root, filename, md5))
        _fake_cifar10(Path(download_root))  # "extract" the archive

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", fake_download)
    ds = build_labelled_dataset("cifar10", tmp_path, train=False)
    assert len(ds) == 3
    tv = torchvision.datasets.CIFAR10
    assert calls == [(tv.url, str(tmp_path), tv.filename, tv.tgz_md5)]
    calls.clear()
    (tmp_path / "c100").mkdir()
    with pytest.raises(FileNotFoundError):  # the fake "archive" holds CIFAR-10, not 100
        build_labelled_dataset("cifar100", tmp_path / "c100", train=False)
    tv = torchvision.datasets.CIFAR100
    assert calls == [(tv.url, str(tmp_path / "c100"), tv.filename, tv.tgz_md5)]

    def no_network(name, root):
        raise OSError("no network")

    monkeypatch.setattr(data_mod, "_download_cifar", no_network)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"--data-path.*cifar-10-batches-py/\{data_batch_1"
                       r" \.\.\. data_batch_5, test_batch\}.*no network"):
        build_labelled_dataset("cifar10", tmp_path / "empty", train=True)
    with pytest.raises(FileNotFoundError, match=r"cifar-100-python/\{train, test\}"):
        build_labelled_dataset("cifar100", tmp_path / "empty", train=False)


def test_cifar_never_unpickles_code(tmp_path, monkeypatch):
    import pwself_reference.data as data_mod

    marker = tmp_path / "marker"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    class EvalPayload:
        def __reduce__(self):
            return (builtins.eval, (f"open({str(marker)!r}, 'w').close()",))

    monkeypatch.setattr(data_mod, "_download_cifar", lambda name, root: None)
    _fake_cifar10(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    _dump(folder / "test_batch", {b"data": np.zeros((1, 3072), np.uint8), b"labels": [Payload()]})
    with pytest.raises(pickle.UnpicklingError, match=r"test_batch.*global posix\.system"):
        build_labelled_dataset("cifar10", tmp_path, train=False)
    _dump(folder / "data_batch_3", EvalPayload())
    with pytest.raises(pickle.UnpicklingError, match=r"data_batch_3.*global __builtin__\.eval"):
        build_pretrain_dataset("cifar10", tmp_path)
    _dump(folder / "data_batch_3", {b"data": np.zeros((1, 3072), np.uint8), b"labels": [0]})
    _dump(folder / "batches.meta", {b"label_names": EvalPayload()}, protocol=4)
    with pytest.raises(pickle.UnpicklingError, match=r"batches\.meta.*global builtins\.eval"):
        build_pretrain_dataset("cifar10", tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize("content, match", [
    ({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, "uint8 \\(N, 3072\\)"),
    ({b"data": np.zeros((2, 1024), np.uint8), b"labels": [0, 1]}, "uint8 \\(N, 3072\\)"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, "2 int labels"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, "outside \\[0, 10\\)"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [0, 1]}, "no 'labels' key"),
    ([1, 2], "not a dict"),
])
def test_cifar_bad_files(tmp_path, content, match):
    _fake_cifar10(tmp_path)
    _dump(tmp_path / "cifar-10-batches-py" / "test_batch", content)
    with pytest.raises(ValueError, match=match):
        build_labelled_dataset("cifar10", tmp_path, train=False)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(b"\x80\x02}q")
    with pytest.raises(ValueError, match="not a CIFAR python batch file"):
        build_labelled_dataset("cifar10", tmp_path, train=False)
    with pytest.raises(ValueError, match="name must be one of"):
        load_cifar_arrays("cifar1000", tmp_path, True)
