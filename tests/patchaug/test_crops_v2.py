"""CropBox / RandomResizedCropWithBox in torchvision v2 pipelines: the box and flip stay right.

The source image encodes its own coordinates (channel 0 = x + 0.5, channel 1 = y + 0.5, the
pixel centre), so every view pixel says which source pixel it shows and the final CropBox can
be checked against it, whatever flips, crops, resizes and dtype changes came after the crop.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F2

from patchaug import match_patches
from patchaug.crops import CropBox, CropFlip, RandomResizedCropWithBox

NEAREST = v2.InterpolationMode.NEAREST_EXACT  # picks the pixel containing the mapped centre
H, W = 60, 80


def coord_image(height: int = H, width: int = W) -> torch.Tensor:
    """``(2, H, W)`` float64: channel 0 the x, channel 1 the y of each pixel centre."""
    y, x = torch.meshgrid(torch.arange(height, dtype=torch.float64) + 0.5,
                          torch.arange(width, dtype=torch.float64) + 0.5, indexing="ij")
    return torch.stack([x, y])


def view_error(view: torch.Tensor, box: CropBox) -> float:
    """Largest distance (source pixels) between what a view pixel shows and where the box says."""
    h, w = view.shape[-2:]
    assert box.canvas_size == (h, w)
    v, u = torch.meshgrid(torch.arange(h, dtype=torch.float64) + 0.5,
                          torch.arange(w, dtype=torch.float64) + 0.5, indexing="ij")
    want = box.to_source(torch.stack([u, v], -1))  # (h, w, 2)
    got = view.as_subclass(torch.Tensor).double().permute(1, 2, 0)
    return float((got - want).abs().max())


RESAMPLING = (v2.Resize, v2.RandomResizedCrop, RandomResizedCropWithBox)


def run_steps(steps, sample):
    """Apply the transforms one by one; also return the worst-case error of nearest resampling.

    The first crop reads the source: a view pixel shows the source pixel containing its mapped
    centre, at most 0.5 px away. Each later resampling step reads a view whose pixels span
    ``footprint`` source pixels and picks the one containing the mapped centre: it adds at most
    half a footprint. Crops and flips only select pixels: they add nothing.
    """
    tol = 0.5 + 1e-6
    for i, t in enumerate(steps):
        if i > 0 and isinstance(t, RESAMPLING):
            box = sample[1]
            x0, y0, x1, y1 = box.tolist()
            tol += 0.5 * max((x1 - x0) / box.canvas_size[1], (y1 - y0) / box.canvas_size[0])
        sample = t(sample)
    return sample, tol


def rrc(size=48, **kw) -> RandomResizedCropWithBox:
    kw.setdefault("scale", (0.1, 0.6))
    kw.setdefault("interpolation", NEAREST)
    return RandomResizedCropWithBox(size, **kw)


PIPELINES = {
    "flip_todtype": lambda: [rrc(flip_p=0.0), v2.RandomHorizontalFlip(p=1.0), v2.ToDtype(torch.float32)],
    "crop_flip_resize": lambda: [rrc(), v2.RandomCrop(30), v2.RandomHorizontalFlip(p=1.0),
                                 v2.Resize(40, interpolation=NEAREST)],
    "flip_centercrop_flip": lambda: [rrc(flip_p=1.0), v2.CenterCrop((20, 28)), v2.ToDtype(torch.float32),
                                     v2.RandomHorizontalFlip(p=0.5)],
    "flip_rrc": lambda: [rrc(), v2.RandomHorizontalFlip(p=1.0),
                         v2.RandomResizedCrop(36, scale=(0.2, 0.9), interpolation=NEAREST)],
    "resize_flip_crop_resize": lambda: [rrc(), v2.Resize((64, 50), interpolation=NEAREST),
                                        v2.RandomHorizontalFlip(p=1.0), v2.RandomCrop((30, 20)),
                                        v2.Resize(24, interpolation=NEAREST), v2.ToDtype(torch.float64)],
    "two_boxed_crops": lambda: [rrc(64, scale=(0.3, 0.9)), v2.RandomHorizontalFlip(p=0.5),
                                rrc(40, scale=(0.3, 0.9), flip_p=0.5), v2.CenterCrop(30)],
}


@pytest.mark.parametrize("name", sorted(PIPELINES))
@pytest.mark.parametrize("seed", range(6))
def test_final_box_says_which_source_pixels_the_view_shows(name, seed):
    torch.manual_seed(seed)
    (view, box, flip), tol = run_steps(PIPELINES[name](), coord_image())
    assert isinstance(box, CropBox) and isinstance(flip, CropFlip) and bool(flip) == box.flip
    assert view_error(view, box) <= tol


@pytest.mark.parametrize("seed", range(4))
def test_bilinear_antialiased_views_are_within_a_pixel_or_so(seed):
    # bilinear reproduces a linear ramp except at the crop's edges, where it clamps (or the
    # antialias filter is cut): allow one source pixel
    torch.manual_seed(seed)
    steps = [RandomResizedCropWithBox(40, scale=(0.2, 0.8)), v2.RandomHorizontalFlip(p=0.5),
             v2.RandomResizedCrop(24, scale=(0.3, 1.0)), v2.ToDtype(torch.float32)]
    (view, box, _), _ = run_steps(steps, coord_image())
    assert view_error(view, box) <= 1.0


def test_a_wrong_flip_or_a_stale_box_would_be_caught():
    # the check itself is sharp: the same view against a mirrored or an unupdated box fails
    torch.manual_seed(0)
    view, box, _ = v2.Compose([rrc(flip_p=0.0), v2.RandomHorizontalFlip(p=1.0)])(coord_image())
    assert view_error(view, box) <= 0.5 + 1e-6
    assert view_error(view, CropBox.wrap(box.as_subclass(torch.Tensor), box, flip=False)) > 5
    cropped, new_box, _ = v2.CenterCrop(20)((view, box, CropFlip(torch.tensor(True))))
    assert view_error(cropped, new_box) <= 0.5 + 1e-6
    assert view_error(cropped, CropBox.wrap(box.as_subclass(torch.Tensor), box, canvas_size=(20, 20))) > 5


def test_the_reported_bug_case_now_says_flipped():
    torch.manual_seed(0)
    pipeline = v2.Compose([RandomResizedCropWithBox(64, flip_p=0.0), v2.RandomHorizontalFlip(p=1.0),
                           v2.ToDtype(torch.float32)])
    crop, box, flip = pipeline(torch.rand(3, 100, 120, dtype=torch.float64))
    assert crop.dtype == torch.float32 and crop.shape == (3, 64, 64)
    assert bool(flip) and box.flip and f"{flip}" == "True"
    other = CropBox([0.0, 0.0, 120.0, 100.0], canvas_size=(100, 120))
    m = match_patches(box, other, 8, 10, flip, False)  # the tuple items feed match_patches directly
    ref_box, ref_flip = box.to_match()
    assert type(ref_box) is torch.Tensor and ref_flip.dtype == torch.bool and bool(ref_flip)
    m_ref = match_patches(ref_box, torch.tensor([0.0, 0.0, 120.0, 100.0]), 8, 10, ref_flip, False)
    assert torch.equal(m.idx_a, m_ref.idx_a) and torch.equal(m.idx_b, m_ref.idx_b)


def test_functional_kernels_on_a_box():
    box = CropBox([10.0, 20.0, 50.0, 40.0], canvas_size=(10, 20))
    flipped = F2.horizontal_flip(box)
    assert flipped.flip and torch.equal(flipped.as_subclass(torch.Tensor), box.as_subclass(torch.Tensor))
    assert not F2.horizontal_flip(flipped).flip
    resized = F2.resize(flipped, [30])  # smaller edge 30: (10, 20) -> (30, 60), same source box
    assert resized.canvas_size == (30, 60) and resized.tolist() == box.tolist() and resized.flip
    # right half of the mirrored view = left half of the source box
    right = F2.crop(resized, top=0, left=30, height=30, width=30)
    assert right.tolist() == [10.0, 20.0, 30.0, 40.0] and right.canvas_size == (30, 30)
    rc = F2.resized_crop(box, top=5, left=0, height=5, width=5, size=[7, 9])
    assert rc.tolist() == [10.0, 30.0, 20.0, 40.0] and rc.canvas_size == (7, 9) and not rc.flip
    cc = F2.center_crop(box, [4])
    assert cc.tolist() == [26.0, 26.0, 34.0, 34.0] and cc.canvas_size == (4, 4)
    assert F2.to_dtype(box, torch.float64) is box  # the image's dtype, not the box's
    assert F2.normalize(box, [0.5], [0.5]) is box
    assert F2.adjust_brightness(box, 1.5) is box
    flag = CropFlip(torch.tensor(False))
    assert bool(F2.horizontal_flip(flag)) and F2.resize(flag, [3]) is flag


@pytest.mark.parametrize(
    ("transform", "name"),
    [
        (v2.RandomVerticalFlip(p=1.0), "vertical_flip"),
        (v2.RandomRotation(10), "rotate"),
        (v2.RandomAffine(5, translate=(0.1, 0.1)), "affine"),
        (v2.RandomPerspective(p=1.0), "perspective"),
        (v2.ElasticTransform(alpha=5.0), "elastic"),
        (v2.Pad(2), "pad"),
        (v2.RandomCrop(30, padding=3), "pad"),
        (v2.RandomZoomOut(p=1.0), "pad"),
    ],
)
def test_transforms_a_box_cannot_describe_raise_naming_them(transform, name):
    pipeline = v2.Compose([RandomResizedCropWithBox(32), transform])
    with pytest.raises(TypeError, match=name):
        pipeline(torch.rand(3, 50, 50))


def test_crops_reaching_outside_the_view_raise():
    box = CropBox([0.0, 0.0, 10.0, 10.0], canvas_size=(10, 10))
    with pytest.raises(ValueError, match="center_crop"):
        F2.center_crop(box, [12, 12])  # torchvision pads here
    with pytest.raises(ValueError, match="crop"):
        F2.crop(box, top=-1, left=0, height=5, width=5)
    with pytest.raises(TypeError, match="five_crop"):
        F2.five_crop(box, [4, 4])


@pytest.mark.parametrize("kind", ["pil", "tensor", "tv_image", "uint8"])
def test_image_label_samples_and_pil_images_pass_through_compose(kind):
    arr = (np.random.default_rng(0).random((50, 70, 3)) * 255).astype(np.uint8)
    img = {"pil": Image.fromarray(arr), "tensor": torch.from_numpy(arr).permute(2, 0, 1).float() / 255,
           "tv_image": F2.to_image(arr), "uint8": torch.from_numpy(arr).permute(2, 0, 1).contiguous()}[kind]
    pipeline = v2.Compose([RandomResizedCropWithBox(32, scale=(0.3, 1.0)), v2.ColorJitter(0.4, 0.4),
                           v2.RandomHorizontalFlip(), v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                           v2.Normalize([0.5] * 3, [0.2] * 3)])
    torch.manual_seed(1)
    crop, box, flip, label = pipeline(img, 3)
    assert isinstance(crop, tv_tensors.Image) and crop.shape == (3, 32, 32) and crop.dtype == torch.float32
    assert isinstance(box, CropBox) and box.canvas_size == (32, 32) and bool(flip) == box.flip
    assert label == 3
    # one tuple argument and a tensor label behave the same; the label is left alone
    crop2, box2, flip2, label2 = pipeline((img, torch.tensor(5)))
    assert crop2.shape == (3, 32, 32) and isinstance(box2, CropBox) and int(label2) == 5
    out = pipeline({"image": img, "label": 4})
    assert set(out) == {"image", "label", "box", "flip"} and out["image"].shape == (3, 32, 32)
    assert out["box"].flip == bool(out["flip"])


def test_masks_in_the_sample_are_cropped_with_the_image():
    img = tv_tensors.Image(coord_image())
    mask = tv_tensors.Mask((coord_image()[0] - 0.5).long())  # each pixel's column
    torch.manual_seed(3)
    # torchvision always resizes masks with (legacy) NEAREST: use it for the image too
    steps = [rrc(interpolation=v2.InterpolationMode.NEAREST), v2.RandomHorizontalFlip(0.5)]
    crop, box, flip, mask_crop = v2.Compose(steps)(img, mask)
    assert isinstance(mask_crop, tv_tensors.Mask)
    assert torch.equal(mask_crop.as_subclass(torch.Tensor) + 0.5, crop[0].as_subclass(torch.Tensor))
    # legacy NEAREST samples at the view pixel's left/top edge, not its centre: half a
    # footprint (< 1 px here, the view is upsampled) more
    assert view_error(crop, box) <= 1.0


def test_old_three_tuple_callers_keep_working():
    t = RandomResizedCropWithBox(24, scale=(0.2, 0.8), generator=torch.Generator().manual_seed(0))
    assert isinstance(t, v2.Transform)
    crops, boxes, flips = zip(*(t(torch.rand(3, 40, 40)) for _ in range(4)))
    boxes, flips = torch.stack(boxes), torch.tensor(flips, dtype=torch.bool)
    assert type(boxes) is torch.Tensor and boxes.shape == (4, 4) and boxes.dtype == torch.float32
    assert flips.shape == (4,)
    m = match_patches(boxes[0], boxes[1], 4, 4, flips[0], flips[1])
    assert m.valid.dtype == torch.bool


def test_box_metadata_survives_clone_to_and_pickling():
    box = CropBox([1.0, 2.0, 5.0, 9.0], canvas_size=(3, 4), flip=True)
    for other in (box.clone(), box.to(torch.float64), pickle.loads(pickle.dumps(box))):
        assert isinstance(other, CropBox) and other.flip and other.canvas_size == (3, 4)
    assert type(box + 1) is torch.Tensor  # ordinary ops give plain tensors (tv_tensor rule)


@pytest.mark.parametrize(
    ("call", "exc", "word"),
    [
        (lambda: CropBox([0, 0, 1], canvas_size=(2, 2)), ValueError, "data"),
        (lambda: CropBox([3, 0, 1, 1], canvas_size=(2, 2)), ValueError, "data"),
        (lambda: CropBox([0, 0, 1, 1], canvas_size=(0, 2)), ValueError, "canvas_size"),
        (lambda: CropBox([0, 0, 1, 1], canvas_size=(2, 2), flip="yes"), TypeError, "flip"),
        (lambda: CropFlip(torch.tensor([True])), TypeError, "data"),
        (lambda: RandomResizedCropWithBox(8, antialias=None), TypeError, "antialias"),
        (lambda: RandomResizedCropWithBox(8)((3, torch.rand(3, 9, 9))), TypeError, "image"),
        (lambda: RandomResizedCropWithBox(8)({"image": torch.rand(3, 9, 9), "box": 1}), ValueError, "box"),
        (lambda: RandomResizedCropWithBox(8)((torch.rand(3, 9, 9), CropBox([0, 0, 4, 4], canvas_size=(5, 5)))),
         ValueError, "canvas_size"),
    ],
)
def test_bad_input_names_the_argument(call, exc, word):
    with pytest.raises(exc, match=word):
        call()


def test_dataloader_collates_boxes_and_flips_into_match_patches_inputs():
    from torch.utils.data import DataLoader

    t = v2.Compose([RandomResizedCropWithBox(16), v2.RandomHorizontalFlip()])
    data = [t(torch.rand(3, 32, 32), i) for i in range(4)]
    crops, boxes, flips, labels = next(iter(DataLoader(data, batch_size=4, collate_fn=None)))
    assert boxes.shape == (4, 4) and flips.shape == (4,) and flips.dtype == torch.bool
    assert torch.equal(flips, torch.tensor([d[1].flip for d in data]))
    assert match_patches(boxes, boxes.flip(0), 4, 4, flips, flips.flip(0)).valid.shape[0] == 4
