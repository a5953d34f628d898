"""Batched crops on the device: drawn there, inside the image, equal to the CPU crop."""

from __future__ import annotations

import torch

from patchaug import batched_random_resized_crop, resized_crop_boxes


def test_crops_follow_device_and_equal_the_cpu_resample(device):
    g = torch.Generator(device=device).manual_seed(0)
    images = torch.rand(16, 3, 64, 48, generator=torch.Generator().manual_seed(1))
    crops, boxes, flips = batched_random_resized_crop(images.to(device), 24, (0.2, 1.0),
                                                      generator=g)
    assert crops.device.type == boxes.device.type == flips.device.type == device.type
    assert crops.shape == (16, 3, 24, 24) and boxes.dtype == torch.float32
    b = boxes.cpu()
    assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all()
    assert (b[:, 2] <= 48).all() and (b[:, 3] <= 64).all()
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) / (64 * 48)
    assert (area >= 0.2 - 1e-5).all() and (area <= 1 + 1e-5).all()
    assert flips.any() and (~flips).any()
    want = resized_crop_boxes(images, b, 24, flips.cpu())
    torch.testing.assert_close(crops.cpu(), want, atol=1e-5, rtol=0)


def test_shared_boxes_on_device(device):
    g = torch.Generator(device=device).manual_seed(2)
    _, boxes, flips = batched_random_resized_crop(torch.rand(5, 1, 32, 32, device=device), 8,
                                                  shared=True, generator=g)
    assert (boxes == boxes[:1]).all() and (flips == flips[:1]).all()


def test_same_generator_seed_same_crops(device):
    x = torch.rand(4, 3, 40, 40, device=device)
    runs = [batched_random_resized_crop(x, 16, generator=torch.Generator(device=device)
                                        .manual_seed(7)) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)
