"""Crops that report their boxes: sampling, cropping, batching and the v2 pipeline."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F2

from patchaug import (
    BatchedRandomResizedCrop,
    RandomResizedCropWithBox,
    batched_random_resized_crop,
    resized_crop_boxes,
    sample_crop_boxes,
)

sizes = st.integers(8, 300)
scales = st.tuples(st.floats(0.02, 1.0), st.floats(0.02, 1.0)).map(sorted).map(tuple)


@given(sizes, sizes, scales, st.integers(0, 2**31 - 1))
def test_sampled_boxes_are_integer_and_inside_the_image(h, w, scale, seed):
    g = torch.Generator().manual_seed(seed)
    boxes = sample_crop_boxes(16, h, w, scale, generator=g)
    assert boxes.shape == (16, 4) and boxes.dtype == torch.float32
    assert torch.equal(boxes, boxes.round())
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()


def test_sampled_boxes_follow_scale_and_ratio_like_torchvision():
    g = torch.Generator().manual_seed(0)
    boxes = sample_crop_boxes(4000, 256, 256, (0.05, 0.4), generator=g)
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    area = (w * h / 256**2).numpy()
    ratio = (w / h).numpy()
    # rounding to whole pixels moves area and ratio a little past the nominal ranges
    assert area.min() > 0.05 * 0.9 and area.max() < 0.4 * 1.1
    assert ratio.min() > 0.75 * 0.9 and ratio.max() < 4 / 3 * 1.1
    torch.manual_seed(0)
    ref = np.array([v2.RandomResizedCrop.get_params(torch.zeros(3, 256, 256), [0.05, 0.4], [3 / 4, 4 / 3])
                    for _ in range(4000)], dtype=np.float64)
    ref_area = ref[:, 2] * ref[:, 3] / 256**2
    # same distribution: quantiles of the area agree within sampling noise
    for q in (0.1, 0.5, 0.9):
        assert abs(np.quantile(area, q) - np.quantile(ref_area, q)) < 0.02
    assert abs(np.log(ratio).mean() - np.log(ref[:, 3] / ref[:, 2]).mean()) < 0.03
    # offsets are uniform over the valid range: mean relative offset near 0.5
    rel = (boxes[:, 0] / (256 - w).clamp(min=1)).numpy()
    assert abs(rel.mean() - 0.5) < 0.03


def test_impossible_request_falls_back_to_the_central_crop_within_ratio():
    boxes = sample_crop_boxes(5, 100, 300, (1.0, 1.0), (0.5, 1.0))
    # 300 / 100 = 3 is wider than ratio 1: height kept, width = round(100 * 1) = 100, centred
    assert boxes.tolist() == [[100.0, 0.0, 200.0, 100.0]] * 5


def test_same_generator_seed_gives_same_boxes():
    a = sample_crop_boxes(8, 64, 48, (0.1, 0.9), generator=torch.Generator().manual_seed(5))
    b = sample_crop_boxes(8, 64, 48, (0.1, 0.9), generator=torch.Generator().manual_seed(5))
    c = sample_crop_boxes(8, 64, 48, (0.1, 0.9), generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


@given(st.integers(1, 20), st.integers(1, 20), st.integers(0, 10), st.integers(0, 10), st.booleans())
def test_crop_at_box_size_reproduces_the_box_pixels_exactly(w, h, x0, y0, flip):
    img = torch.rand(2, 3, 32, 40)
    box = torch.tensor([[x0, y0, x0 + w, y0 + h]] * 2, dtype=torch.float32)
    out = resized_crop_boxes(img, box, (h, w), torch.tensor([flip, False]))
    want = img[:, :, y0:y0 + h, x0:x0 + w]
    assert torch.allclose(out[1], want[1], atol=1e-6)
    assert torch.allclose(out[0], want[0].flip(-1) if flip else want[0], atol=1e-6)


def test_crop_resize_of_a_linear_ramp_samples_pixel_centres():
    # image value = x coordinate of the pixel centre; a 2x downscale of [0, 8) reads x = 0.5+2u... -0.5
    ramp = torch.arange(16.0).view(1, 1, 1, 16).expand(1, 1, 4, 16).contiguous()
    out = resized_crop_boxes(ramp, torch.tensor([[0.0, 0.0, 8.0, 4.0]]), (4, 4))
    assert torch.allclose(out[0, 0, 0], torch.tensor([0.5, 2.5, 4.5, 6.5]))


@given(st.booleans(), st.integers(0, 1000))
def test_batched_crop_returns_per_sample_or_shared_boxes(shared, seed):
    images = torch.rand(6, 3, 40, 30, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    crops, boxes, flips = batched_random_resized_crop(images, (12, 10), (0.2, 1.0), shared=shared, generator=g)
    assert crops.shape == (6, 3, 12, 10) and crops.dtype == torch.float64
    assert boxes.shape == (6, 4) and flips.shape == (6,) and flips.dtype == torch.bool
    if shared:
        assert (boxes == boxes[0]).all() and (flips == flips[0]).all()
    else:
        assert len({tuple(b) for b in boxes.tolist()}) > 1
    assert torch.allclose(crops, resized_crop_boxes(images, boxes, (12, 10), flips))


def test_batched_crop_module_is_reproducible_with_a_generator():
    crop = BatchedRandomResizedCrop(16, scale=(0.3, 1.0))
    x = torch.rand(4, 1, 32, 32)
    a = crop(x, torch.Generator().manual_seed(1))
    b = crop(x, torch.Generator().manual_seed(1))
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_flip_probability_extremes():
    x = torch.rand(32, 3, 16, 16)
    assert not batched_random_resized_crop(x, 8, flip_p=0.0)[2].any()
    assert batched_random_resized_crop(x, 8, flip_p=1.0)[2].all()


@pytest.mark.parametrize("kind", ["pil", "tensor", "tv_image"])
def test_per_image_crop_matches_torchvision_resized_crop_of_its_box(kind):
    arr = (np.random.default_rng(0).random((60, 80, 3)) * 255).astype(np.uint8)
    img = {"pil": Image.fromarray(arr), "tensor": torch.from_numpy(arr).permute(2, 0, 1).float() / 255,
           "tv_image": v2.functional.to_image(arr)}[kind]
    t = RandomResizedCropWithBox(24, scale=(0.2, 0.8), flip_p=0.5, generator=torch.Generator().manual_seed(0))
    for _ in range(6):
        crop, box, flip = t(img)
        x0, y0, x1, y1 = (int(v) for v in box)
        assert 0 <= x0 < x1 <= 80 and 0 <= y0 < y1 <= 60
        want = F2.resized_crop(img, y0, x0, y1 - y0, x1 - x0, [24, 24], antialias=True)
        if flip:
            want = F2.horizontal_flip(want)
        assert type(crop) is type(want)
        np.testing.assert_array_equal(np.asarray(crop), np.asarray(want))


def test_per_image_crop_inside_a_v2_pipeline_keeps_box_and_flag():
    pipeline = v2.Compose([
        RandomResizedCropWithBox(32, scale=(0.4, 1.0), generator=torch.Generator().manual_seed(3)),
        v2.ColorJitter(0.4, 0.4, 0.2, 0.1),
        v2.RandomGrayscale(0.2),
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
    ])
    img = Image.fromarray((np.random.default_rng(1).random((50, 70, 3)) * 255).astype(np.uint8))
    crop, box, flip = pipeline(img)
    assert crop.shape == (3, 32, 32) and crop.dtype == torch.float32
    assert box.dtype == torch.float32 and box.shape == (4,)
    assert torch.equal(box, box.round()) and 0 <= box[0] < box[2] <= 70
    # the flag is a CropFlip (0-d bool tv_tensor), equal to the box's own flag
    assert flip.shape == () and flip.dtype == torch.bool and bool(flip) == box.flip


@pytest.mark.parametrize(
    ("call", "exc", "word"),
    [
        (lambda: sample_crop_boxes(2, 10, 10, (0.5, 0.1)), ValueError, "scale"),
        (lambda: sample_crop_boxes(2, 10, 10, (0.0, 1.0)), ValueError, "scale"),
        (lambda: sample_crop_boxes(2, 10, 10, ratio=(1.0,)), TypeError, "ratio"),
        (lambda: sample_crop_boxes(-1, 10, 10), ValueError, "n"),
        (lambda: sample_crop_boxes(2, 0, 10), ValueError, "height"),
        (lambda: batched_random_resized_crop(torch.rand(3, 8, 8), 4), ValueError, "images"),
        (lambda: batched_random_resized_crop(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), 4), TypeError, "images"),
        (lambda: batched_random_resized_crop(torch.rand(1, 3, 8, 8), 0), ValueError, "size"),
        (lambda: batched_random_resized_crop(torch.rand(1, 3, 8, 8), 4, flip_p=1.5), ValueError, "flip_p"),
        (lambda: resized_crop_boxes(torch.rand(2, 3, 8, 8), torch.zeros(3, 4), 4), ValueError, "boxes"),
        (lambda: resized_crop_boxes(torch.rand(1, 3, 8, 8), torch.zeros(1, 4), 4, mode="area"), ValueError, "mode"),
        (lambda: RandomResizedCropWithBox(8, interpolation="sinc"), ValueError, "interpolation"),
        (lambda: RandomResizedCropWithBox(8, scale=(math.nan, 1.0)), ValueError, "scale"),
    ],
)
def test_bad_input_names_the_argument(call, exc, word):
    with pytest.raises(exc, match=word):
        call()
