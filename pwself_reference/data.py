"""Labelled image datasets for pretraining and evaluation.

Every dataset yields ``(image, label)`` with ``image`` a PIL RGB image (grayscale
sources are converted to 3 channels) passed through ``transform`` when one is
given, and ``label`` an ``int``.

Names
-----
``fashion-mnist-mini``
    The bundled default: a balanced, seeded subset of Fashion-MNIST (600 train
    and 100 test images per class, 28x28) shipped in
    ``pwself_reference/data/fashion_mnist_mini.npz``; works offline.
``fashion-mnist``
    Full Fashion-MNIST (60k/10k) from a directory holding the original idx
    files (``train-images-idx3-ubyte[.gz]``, ...), e.g. Debian's
    ``/usr/share/datasets/fashion-mnist``.
``cifar10``, ``cifar100``
    The python version of CIFAR under ``root`` (``root/cifar-10-batches-py/``
    with ``data_batch_1`` ... ``data_batch_5``, ``test_batch``;
    ``root/cifar-100-python/`` with ``train``, ``test``), read by
    :func:`load_cifar_arrays` with the restricted unpickler of
    :mod:`pwself_reference.safe_pickle` (the files are pickles: nothing in them
    can run code). When missing, the official archive is downloaded and its md5
    checked (if the network allows), as torchvision does.
``stl10``
    torchvision's reader of the STL-10 binary files under ``root``; downloaded
    when missing and the network allows. STL-10 pretraining uses
    ``train+unlabeled``.
``imagefolder``
    ImageNet-style layout ``root/train/<class>/*.JPEG`` and ``root/val/<class>/*``
    (ImageNet-100 and ImageNet-1K).
"""

from __future__ import annotations

import gzip
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from pwself_reference.safe_pickle import RefusedGlobalError, load_plain_pickle

__all__ = [
    "DATASETS",
    "BUNDLED_PATH",
    "ArrayImageDataset",
    "build_labelled_dataset",
    "build_pretrain_dataset",
    "read_idx",
    "load_fashion_mnist_arrays",
    "load_cifar_arrays",
]

#: Dataset names accepted by :func:`build_labelled_dataset`.
DATASETS = ("fashion-mnist-mini", "fashion-mnist", "cifar10", "cifar100", "stl10", "imagefolder")

#: The bundled Fashion-MNIST subset.
BUNDLED_PATH = Path(__file__).resolve().parent / "data" / "fashion_mnist_mini.npz"

#: Fashion-MNIST class names, label order.
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

Transform = Callable[[Image.Image], Any]


class ArrayImageDataset(Dataset):
    """Images held in a uint8 array, served as PIL RGB images.

    Parameters
    ----------
    images : np.ndarray
        ``(N, H, W)`` grayscale or ``(N, H, W, 3)`` RGB, dtype uint8.
    labels : np.ndarray
        ``(N,)`` integer labels.
    transform : callable, optional
        Applied to the PIL RGB image.
    classes : sequence of str, optional
        Class names.

    Examples
    --------
    >>> ds = ArrayImageDataset(np.zeros((2, 28, 28), np.uint8), np.array([0, 1]))
    >>> img, label = ds[1]
    >>> img.mode, img.size, label
    ('RGB', (28, 28), 1)
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        transform: Transform | None = None,
        classes: tuple[str, ...] | None = None,
    ) -> None:
        images = np.asarray(images)
        labels = np.asarray(labels)
        if images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise ValueError(
                f"images must be uint8 (N, H, W) or (N, H, W, 3), got {images.dtype} {images.shape}"
            )
        if images.ndim == 4 and images.shape[-1] != 3:
            raise ValueError(f"RGB images must have 3 channels last, got shape {images.shape}")
        if labels.shape != (images.shape[0],):
            raise ValueError(
                f"labels must have shape ({images.shape[0]},), got {labels.shape}"
            )
        self.images = images
        self.labels = labels.astype(np.int64)
        self.transform = transform
        self.classes = classes

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[Any, int]:
        arr = self.images[index]
        img = Image.fromarray(arr, mode="L" if arr.ndim == 2 else "RGB").convert("RGB")
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.labels[index])


class _RGBDataset(Dataset):
    """Wrap a dataset of (PIL image, label) so images are RGB before ``transform``."""

    def __init__(self, base: Any, labels: Any, transform: Transform | None) -> None:
        self.base = base
        self.labels = np.asarray(labels, dtype=np.int64)
        self.transform = transform
        self.classes = getattr(base, "classes", None)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img, label = self.base[index]
        if not isinstance(img, Image.Image):
            raise TypeError(f"expected a PIL image from the dataset, got {type(img).__name__}")
        img = img.convert("RGB")
        if self.transform is not None:
            img = self.transform(img)
        return img, int(label)


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an idx file (the MNIST/Fashion-MNIST format), gzipped or not.

    Returns
    -------
    np.ndarray
        uint8 array, ``(N, rows, cols)`` for images or ``(N,)`` for labels.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an idx file")
    if data[2] != 0x08:
        raise ValueError(f"{path}: only unsigned-byte idx files are supported (type {data[2]:#x})")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    arr = np.frombuffer(data, dtype=np.uint8, offset=offset)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape}, file holds {arr.size} values")
    return arr.reshape(shape)


def _find_idx(root: Path, stem: str) -> Path:
    for folder in (root, root / "raw", root / "FashionMNIST" / "raw"):
        for name in (stem + ".gz", stem):
            if (folder / name).is_file():
                return folder / name
    raise FileNotFoundError(
        f"root: no {stem}[.gz] under {root} (expected the original Fashion-MNIST idx files, "
        "e.g. from the Debian package dataset-fashion-mnist: /usr/share/datasets/fashion-mnist)"
    )


def load_fashion_mnist_arrays(
    root: str | os.PathLike[str], train: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(N, 28, 28)`` uint8 and labels ``(N,)`` from the original idx files."""
    root = Path(root)
    prefix = "train" if train else "t10k"
    images = read_idx(_find_idx(root, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_find_idx(root, f"{prefix}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.shape != (images.shape[0],):
        raise ValueError(f"root: inconsistent idx files in {root}: {images.shape}, {labels.shape}")
    return images, labels


def _require_dir(root: str | os.PathLike[str] | None, name: str) -> Path:
    if root is None or str(root) == "":
        raise ValueError(f"data_path: dataset {name!r} needs a data directory (--data-path)")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"data_path: {path} is not a directory (dataset {name!r})")
    return path


class _CifarSpec(NamedTuple):
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: str
    num_classes: int
    meta_file: str
    meta_key: str
    url: str
    md5: str


#: The python-version CIFAR archives; URLs and archive md5 as in torchvision 0.29's
#: ``torchvision.datasets.CIFAR10`` / ``CIFAR100``.
_CIFAR: dict[str, _CifarSpec] = {
    "cifar10": _CifarSpec(
        "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",),
        "labels", 10, "batches.meta", "label_names",
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "c58f30108f718f92721af3b95e74349a",
    ),
    "cifar100": _CifarSpec(
        "cifar-100-python", ("train",), ("test",), "fine_labels", 100, "meta", "fine_label_names",
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "eb9058c3a382ffc7106e4002c42a8d85",
    ),
}


def _cifar_layout(name: str) -> str:
    spec = _CIFAR[name]
    files = spec.train_files + spec.test_files
    listed = ", ".join(files) if len(files) <= 2 else f"{files[0]} ... {files[-2]}, {files[-1]}"
    return f"{spec.folder}/{{{listed}}}"


def _cifar_dir(name: str, root: Path) -> Path:
    """``root/<folder>``, or ``root`` itself when it already is that folder."""
    spec = _CIFAR[name]
    if not (root / spec.folder).is_dir() and (root / spec.train_files[0]).is_file():
        return root
    return root / spec.folder


def _entry(batch: dict[Any, Any], key: str, path: Path) -> Any:
    # Python 2 wrote the keys as str: they load as str with encoding="latin1" and as
    # bytes with encoding="bytes" (the recipe on the CIFAR page); accept both
    for k in (key, key.encode("ascii")):
        if k in batch:
            return batch[k]
    raise ValueError(f"{path}: not a CIFAR python batch (no {key!r} key; has {list(batch)[:6]})")


def _load_pickle(path: Path, what: str) -> Any:
    try:
        return load_plain_pickle(path, encoding="latin1")
    except RefusedGlobalError as exc:
        raise RefusedGlobalError(f"{path}: {exc}", exc.module, exc.name) from exc
    except (pickle.UnpicklingError, EOFError) as exc:
        raise ValueError(f"{path}: not a {what} ({exc})") from exc


def _read_cifar_batch(path: Path, spec: _CifarSpec) -> tuple[np.ndarray, np.ndarray]:
    batch = _load_pickle(path, "CIFAR python batch file")
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: not a CIFAR python batch (a {type(batch).__name__}, not a dict)")
    data = _entry(batch, "data", path)
    labels = _entry(batch, spec.label_key, path)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != 3 * 32 * 32:
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise ValueError(f"{path}: 'data' must be a uint8 (N, 3072) array, got {got}")
    try:
        labels = np.asarray(labels)
    except (TypeError, ValueError) as exc:  # ragged nested lists
        raise ValueError(f"{path}: {spec.label_key!r} must be a list of int labels") from exc
    if labels.shape != (data.shape[0],) or labels.dtype.kind not in "iu":
        raise ValueError(
            f"{path}: {spec.label_key!r} must be {data.shape[0]} int labels, "
            f"got {labels.dtype} {labels.shape}"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= spec.num_classes):
        raise ValueError(f"{path}: {spec.label_key!r} outside [0, {spec.num_classes})")
    return data, labels.astype(np.int64)


def load_cifar_arrays(
    name: str, root: str | os.PathLike[str], train: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels of CIFAR-10/100 from the python-version files (no download).

    The files are pickles of dicts with ``data`` (``(N, 3072)`` uint8, each row
    the red, green and blue 32x32 planes) and ``labels`` (CIFAR-10) or
    ``fine_labels`` (CIFAR-100); they are read with
    :func:`pwself_reference.safe_pickle.load_plain_pickle`, which refuses any
    pickle that would run code.

    Parameters
    ----------
    name : {"cifar10", "cifar100"}
        Which dataset.
    root : str or PathLike
        The directory holding ``cifar-10-batches-py/`` (``data_batch_1`` ...
        ``data_batch_5``, ``test_batch``) or ``cifar-100-python/`` (``train``,
        ``test``), or that folder itself.
    train : bool
        The 50k training images (``True``) or the 10k test images.

    Returns
    -------
    images : np.ndarray
        ``(N, 32, 32, 3)`` uint8, RGB.
    labels : np.ndarray
        ``(N,)`` int64 (fine labels for CIFAR-100).

    Raises
    ------
    FileNotFoundError
        When a file is missing (the message names ``--data-path`` and the layout).
    pwself_reference.safe_pickle.RefusedGlobalError
        A :class:`pickle.UnpicklingError`: a file names a global (code) it may not.
    ValueError
        When a file does not hold a CIFAR batch.

    Examples
    --------
    Needs the extracted ``cifar-10-python.tar.gz``::

        images, labels = load_cifar_arrays("cifar10", "data", train=False)
        images.shape, labels[:3]  # (10000, 32, 32, 3), array([3, 8, 8])
    """
    if name not in _CIFAR:
        raise ValueError(f"name must be one of {list(_CIFAR)}, got {name!r}")
    if not isinstance(train, bool):
        raise TypeError(f"train must be a bool, got {type(train).__name__}")
    spec = _CIFAR[name]
    root = Path(root).expanduser()
    folder = _cifar_dir(name, root)
    files = spec.train_files if train else spec.test_files
    for file in files:
        if not (folder / file).is_file():
            raise FileNotFoundError(
                f"data_path: {folder / file} not found; --data-path must be the directory "
                f"holding the python version of {name} ({_cifar_layout(name)}, "
                f"extracted from {spec.url})"
            )
    parts = [_read_cifar_batch(folder / file, spec) for file in files]
    data = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
    labels = np.concatenate([p[1] for p in parts])
    images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return images, labels


def _cifar_classes(name: str, root: Path) -> tuple[str, ...] | None:
    """Class names from the ``batches.meta`` / ``meta`` file, ``None`` when absent."""
    spec = _CIFAR[name]
    path = _cifar_dir(name, root) / spec.meta_file
    if not path.is_file():
        return None
    meta = _load_pickle(path, "CIFAR meta file")
    names = _entry(meta, spec.meta_key, path) if isinstance(meta, dict) else None
    if not isinstance(names, (list, tuple)) or len(names) != spec.num_classes \
            or not all(isinstance(n, (str, bytes)) for n in names):
        raise ValueError(f"{path}: {spec.meta_key!r} must be {spec.num_classes} class names")
    return tuple(n.decode("latin-1") if isinstance(n, bytes) else n for n in names)


def _download_cifar(name: str, root: Path) -> None:
    """Fetch and extract the official archive; torchvision checks its md5 (never unpickles)."""
    from torchvision.datasets.utils import download_and_extract_archive

    spec = _CIFAR[name]
    download_and_extract_archive(spec.url, str(root), filename=spec.url.rsplit("/", 1)[-1],
                                 md5=spec.md5)


def _cifar(name: str, root: Path, train: bool, transform: Transform | None) -> Dataset:
    try:
        images, labels = load_cifar_arrays(name, root, train)
    except FileNotFoundError as missing:
        try:
            _download_cifar(name, root)
        except Exception as exc:  # no network, bad mirror, wrong md5, ...
            raise FileNotFoundError(f"{missing}; downloading it failed too ({exc})") from exc
        images, labels = load_cifar_arrays(name, root, train)
    return ArrayImageDataset(images, labels, transform, _cifar_classes(name, root))


def _stl10(root: Path, split: str, transform: Transform | None) -> Dataset:
    from torchvision import datasets

    try:
        base = datasets.STL10(str(root), split=split, download=False)
    except RuntimeError:
        try:
            base = datasets.STL10(str(root), split=split, download=True)
        except Exception as exc:  # no network, bad mirror, ...
            raise FileNotFoundError(
                f"data_path: stl10 not found under {root} and could not be downloaded ({exc}); "
                "--data-path must hold stl10_binary/ (train_X.bin, train_y.bin, test_X.bin, ...)"
            ) from exc
    return _RGBDataset(base, base.labels, transform)


def build_labelled_dataset(
    name: str,
    root: str | os.PathLike[str] | None,
    train: bool,
    transform: Transform | None = None,
) -> Dataset:
    """Build a labelled dataset of ``(PIL RGB image, int label)`` items.

    Parameters
    ----------
    name : str
        One of :data:`DATASETS`.
    root : str or PathLike or None
        Data directory (ignored by ``fashion-mnist-mini``; ImageNet layout root
        for ``imagefolder``).
    train : bool
        Training split (``True``) or test/validation split.
    transform : callable, optional
        Applied to each PIL RGB image.

    Returns
    -------
    Dataset
        Has ``labels`` (``(N,)`` int64 array) besides ``__getitem__``.

    Examples
    --------
    >>> ds = build_labelled_dataset("fashion-mnist-mini", None, train=False)
    >>> len(ds), ds[0][0].size, ds[0][0].mode
    (1000, (28, 28), 'RGB')
    """
    if name not in DATASETS:
        raise ValueError(f"dataset: unknown dataset {name!r}, expected one of {list(DATASETS)}")
    if not isinstance(train, bool):
        raise TypeError(f"train must be a bool, got {type(train).__name__}")
    if name == "fashion-mnist-mini":
        path = Path(root) if root and Path(root).is_file() else BUNDLED_PATH
        with np.load(path) as z:
            split = "train" if train else "test"
            images, labels = z[f"{split}_images"], z[f"{split}_labels"]
        return ArrayImageDataset(images, labels, transform, FASHION_MNIST_CLASSES)
    path = _require_dir(root, name)
    if name == "fashion-mnist":
        images, labels = load_fashion_mnist_arrays(path, train)
        return ArrayImageDataset(images, labels, transform, FASHION_MNIST_CLASSES)
    if name in _CIFAR:
        return _cifar(name, path, train, transform)
    if name == "stl10":
        return _stl10(path, "train" if train else "test", transform)
    from torchvision.datasets import ImageFolder

    split_dir = path / ("train" if train else "val")
    if not split_dir.is_dir():
        raise FileNotFoundError(
            f"data_path: imagefolder expects {split_dir} (layout root/train/<class>/..., "
            "root/val/<class>/...)"
        )
    base = ImageFolder(str(split_dir))
    return _RGBDataset(base, base.targets, transform)


def build_pretrain_dataset(
    name: str, root: str | os.PathLike[str] | None, transform: Transform | None = None
) -> Dataset:
    """The images used for self-supervised pretraining (labels unused).

    The training split of :func:`build_labelled_dataset`, except STL-10 which
    adds its 100k unlabelled images (``train+unlabeled``, label -1).
    """
    if name == "stl10":
        return _stl10(_require_dir(root, name), "train+unlabeled", transform)
    return build_labelled_dataset(name, root, True, transform)
