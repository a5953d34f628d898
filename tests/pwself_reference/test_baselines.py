"""Raw-pixel baselines: the same DINO k-NN, on the flattened input."""

from __future__ import annotations

import pytest
import torch

from pwself_reference.evaluation import knn_classify
from pwself_reference.evaluation.baselines import pixel_features, raw_pixel_knn


def test_raw_pixel_knn_is_knn_on_flattened_images_in_loader_order():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(30, 3, 6, 6, generator=gen), torch.randint(0, 3, (30,), generator=gen)
    train = [(x[:12], y[:12]), (x[12:20], y[12:20])]
    test = [(x[20:], y[20:])]
    f, labels = pixel_features(train)
    assert torch.equal(f, x[:20].reshape(20, -1)) and torch.equal(labels, y[:20])
    expected = knn_classify(x[:20].reshape(20, -1), y[:20], x[20:].reshape(10, -1), y[20:], k=5)
    assert raw_pixel_knn((train, test), k=5) == expected


def test_pixel_features_rejects_bad_loaders():
    with pytest.raises(ValueError, match="no images"):
        pixel_features([])
    with pytest.raises(ValueError, match="B, C, H, W"):
        pixel_features([(torch.zeros(2, 4), torch.zeros(2))])
