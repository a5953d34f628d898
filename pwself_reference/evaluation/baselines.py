"""Baselines for reading a classification figure: the raw pixels as features.

A self-supervised backbone earns its k-NN or linear accuracy only above what the
input itself gives. :func:`pixel_features` flattens the images of a loader, exactly
as they would enter the backbone (after the evaluation transform), and
:func:`raw_pixel_knn` runs DINO's weighted k-NN on them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

__all__ = ["pixel_features", "raw_pixel_knn"]


def pixel_features(loader: Iterable[tuple[torch.Tensor, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Flattened images and labels of every batch of a loader, in loader order.

    Parameters
    ----------
    loader : iterable of ``(images, labels)``
        ``images`` is ``(B, C, H, W)`` (all batches the same image size).

    Returns
    -------
    features : Tensor, shape ``(N, C * H * W)``, float32
    labels : Tensor, shape ``(N,)``

    Examples
    --------
    >>> f, y = pixel_features([(torch.ones(2, 3, 4, 4), torch.tensor([0, 1]))])
    >>> f.shape, y.tolist()
    (torch.Size([2, 48]), [0, 1])
    """
    feats, labels = [], []
    for images, target in loader:
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            raise ValueError("loader must yield (images (B, C, H, W), labels) batches")
        feats.append(images.flatten(1).float().cpu())
        labels.append(torch.as_tensor(target).reshape(-1).cpu())
    if not feats:
        raise ValueError("the loader yielded no images")
    return torch.cat(feats), torch.cat(labels)


def raw_pixel_knn(loaders: tuple[Iterable[Any], Iterable[Any]], k: int = 20, T: float = 0.07,
                  num_classes: int | None = None) -> tuple[float, float]:
    """Top-1 / top-5 (percent) of DINO's weighted k-NN on raw pixels.

    Parameters
    ----------
    loaders : (train loader, test loader)
        Loaders of ``(images, labels)``, e.g. those of a backbone's k-NN evaluation.
    k, T, num_classes
        As :func:`pwself_reference.evaluation.knn_classify`.

    Examples
    --------
    >>> x = torch.zeros(8, 1, 2, 2)
    >>> x[:4, :, 0], x[4:, :, 1] = 1.0, 1.0     # class 0: top row lit, class 1: bottom row
    >>> y = torch.tensor([0] * 4 + [1] * 4)
    >>> raw_pixel_knn(([(x, y)], [(x + 0.1 * torch.rand(8, 1, 2, 2), y)]), k=3)[0]
    100.0
    """
    from pwself_reference.evaluation.knn import knn_classify

    train, test = pixel_features(loaders[0]), pixel_features(loaders[1])
    return knn_classify(*train, *test, k=k, T=T, num_classes=num_classes)
