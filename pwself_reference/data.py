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
``cifar10``, ``cifar100``, ``stl10``
    torchvision datasets under ``root``; downloaded when missing and the
    network allows. STL-10 pretraining uses ``train+unlabeled``.
``imagefolder``
    ImageNet-style layout ``root/train/<class>/*.JPEG`` and ``root/val/<class>/*``
    (ImageNet-100 and ImageNet-1K).
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

__all__ = [
    "DATASETS",
    "BUNDLED_PATH",
    "ArrayImageDataset",
    "build_labelled_dataset",
    "build_pretrain_dataset",
    "read_idx",
    "load_fashion_mnist_arrays",
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


def _torchvision(name: str, root: Path, split: str | bool, transform: Transform | None) -> Dataset:
    from torchvision import datasets

    def make(download: bool) -> Any:
        if name == "cifar10":
            return datasets.CIFAR10(str(root), train=bool(split), download=download)
        if name == "cifar100":
            return datasets.CIFAR100(str(root), train=bool(split), download=download)
        return datasets.STL10(str(root), split=str(split), download=download)

    try:
        base = make(False)
    except RuntimeError:
        try:
            base = make(True)
        except Exception as exc:  # no network, bad mirror, ...
            raise FileNotFoundError(
                f"data_path: {name} not found under {root} and could not be downloaded ({exc})"
            ) from exc
    labels = base.labels if name == "stl10" else base.targets
    return _RGBDataset(base, labels, transform)


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
    if name in ("cifar10", "cifar100"):
        return _torchvision(name, path, train, transform)
    if name == "stl10":
        return _torchvision(name, path, "train" if train else "test", transform)
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
        return _torchvision(name, _require_dir(root, name), "train+unlabeled", transform)
    return build_labelled_dataset(name, root, True, transform)
