"""Make ``fashion_mnist_mini.npz``: a balanced, seeded subset of Fashion-MNIST.

Usage (from the repository root)::

    cd /tmp && apt-get download dataset-fashion-mnist && dpkg -x dataset-fashion-mnist_*.deb fm
    python pwself_reference/data/make_fashion_mnist_mini.py \
        --src /tmp/fm/usr/share/datasets/fashion-mnist

Takes ``--train-per-class`` images of each class from the 60k training split and
``--test-per-class`` from the 10k test split, chosen with
``numpy.random.default_rng(seed)`` and kept in their original order.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from pwself_reference.data import load_fashion_mnist_arrays  # noqa: E402


def balanced_indices(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of ``per_class`` random examples of every class."""
    picks = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if idx.size < per_class:
            raise ValueError(f"class {c} has {idx.size} images, fewer than {per_class}")
        picks.append(rng.choice(idx, size=per_class, replace=False))
    return np.sort(np.concatenate(picks))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", required=True, help="directory with the original idx .gz files")
    parser.add_argument("--out", default=str(Path(__file__).with_name("fashion_mnist_mini.npz")))
    parser.add_argument("--train-per-class", type=int, default=600)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    out = {}
    for split, train, per_class in [("train", True, args.train_per_class),
                                    ("test", False, args.test_per_class)]:
        images, labels = load_fashion_mnist_arrays(args.src, train)
        keep = balanced_indices(labels, per_class, rng)
        out[f"{split}_images"] = images[keep]
        out[f"{split}_labels"] = labels[keep].astype(np.uint8)
        out[f"{split}_source_index"] = keep.astype(np.int32)
    np.savez_compressed(args.out, **out)
    print(f"wrote {args.out}: " + ", ".join(f"{k} {v.shape}" for k, v in out.items()))


if __name__ == "__main__":
    main()
