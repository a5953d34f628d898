"""boxes_from_kornia: boxes and flips read from Kornia params show the pixels the views show.

The source image encodes each pixel's own coordinates (channel 0 = column, channel 1 = row),
so every output pixel of a view says which source pixel it shows. Nearest resampling (Kornia's
slice mode uses ``nearest-exact``, on the half-pixel grid) must agree exactly with the box;
bilinear within the documented tolerance.
"""

from __future__ import annotations

import kornia.augmentation as K
import pytest
import torch
from kornia.augmentation.container.params import ParamItem

from patchaug.kornia_boxes import boxes_from_kornia
from patchaug.matching import match_patches
from patchaug.per_patch import PerPatch


def coord_image(batch: int, h: int, w: int) -> torch.Tensor:
    """``(batch, 2, h, w)`` float64: channel 0 holds the column index, channel 1 the row index."""
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64),
                            torch.arange(w, dtype=torch.float64), indexing="ij")
    return torch.stack([xs, ys])[None].expand(batch, -1, -1, -1).contiguous()


def predicted(boxes: torch.Tensor, flips: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``(B, 2, h, w)`` continuous source point of each output pixel centre under the box model."""
    i = torch.arange(w, dtype=torch.float64) + 0.5
    j = torch.arange(h, dtype=torch.float64) + 0.5
    i = torch.where(flips[:, None], w - i, i)  # a mirrored view: output column c shows w - c
    x = boxes[:, 0:1] + i * (boxes[:, 2:3] - boxes[:, 0:1]) / w  # (B, w)
    y = boxes[:, 1:2] + j * (boxes[:, 3:4] - boxes[:, 1:2]) / h  # (B, h)
    return torch.stack([x[:, None, :].expand(-1, h, -1), y[:, :, None].expand(-1, -1, w)], 1)


def assert_nearest(view: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor) -> None:
    """Every output pixel shows the source pixel containing its predicted point, exactly
    (a point on a pixel edge may show either neighbour)."""
    pred = predicted(boxes, flips, view.shape[-2], view.shape[-1])
    edge = pred.round()
    on_edge = (pred - edge).abs() < 1e-9  # float rounding may put it on either side
    ok = (view == torch.floor(pred)) | (on_edge & ((view == edge) | (view == edge - 1)))
    assert bool(ok.all()), f"{int((~ok).sum())} pixels off; boxes {boxes.tolist()}, flips {flips.tolist()}"


def run(seq, images: torch.Tensor, seed: int):
    torch.manual_seed(seed)
    out = seq(images)
    boxes, flips = boxes_from_kornia(seq._params)
    return out, boxes, flips


def nearest_crop(size=(8, 12), **kw) -> K.RandomResizedCrop:
    return K.RandomResizedCrop(size, scale=(0.1, 1.0), resample="nearest", **kw)


PIPELINES = {
    "crop": lambda: [nearest_crop()],
    "crop_flip": lambda: [nearest_crop(), K.RandomHorizontalFlip()],
    "flip_crop": lambda: [K.RandomHorizontalFlip(), nearest_crop()],
    "flip_crop_flip": lambda: [K.RandomHorizontalFlip(), nearest_crop(), K.RandomHorizontalFlip()],
    "crop_skipped_flip": lambda: [nearest_crop(p=0.0), K.RandomHorizontalFlip()],
    "crop_then_crops": lambda: [K.RandomHorizontalFlip(), nearest_crop((16, 20)),
                                K.RandomCrop((12, 16)), K.RandomHorizontalFlip(), K.CenterCrop((8, 12))],
    "nested": lambda: [K.ImageSequential(K.RandomHorizontalFlip(), nearest_crop()),
                       K.ImageSequential(K.RandomHorizontalFlip())],
}


@pytest.mark.parametrize("name", PIPELINES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nearest_views_are_exact(name: str, seed: int) -> None:
    seq = K.AugmentationSequential(*PIPELINES[name]())
    view, boxes, flips = run(seq, coord_image(6, 24, 40), seed)
    assert boxes.shape == (6, 4) and boxes.dtype == torch.float64
    assert flips.shape == (6,) and flips.dtype == torch.bool
    assert_nearest(view, boxes, flips)


def test_both_flip_orders_occur() -> None:
    """The seeds above do exercise mirrored and plain views (guards the test itself)."""
    seen = set()
    for seed in range(3):
        seq = K.AugmentationSequential(*PIPELINES["flip_crop"]())
        _, _, flips = run(seq, coord_image(6, 24, 40), seed)
        seen |= set(flips.tolist())
    assert seen == {False, True}


def test_intensity_augmentations_are_skipped() -> None:
    """Intensity augmentations in between change nothing: masks get only the geometric ones
    (nearest), so the coordinate image travels as a mask next to a photo-like input."""
    seq = K.AugmentationSequential(
        K.RandomHorizontalFlip(),
        K.ColorJiggle(0.4, 0.4, 0.4, 0.1, p=1.0),
        K.RandomResizedCrop((16, 16), scale=(0.1, 1.0)),
        K.RandomGrayscale(p=0.5),
        PerPatch(K.RandomGaussianBlur((3, 3), (0.1, 2.0), p=0.5), patch_size=8),
        K.RandomHorizontalFlip(),
        K.Normalize(mean=torch.tensor([0.5] * 3), std=torch.tensor([0.2] * 3)),
        data_keys=["input", "mask"],
    )
    torch.manual_seed(0)
    _, view = seq(torch.rand(6, 3, 24, 40, dtype=torch.float64), coord_image(6, 24, 40))
    boxes, flips = boxes_from_kornia(seq._params)
    assert_nearest(view, boxes, flips)


@pytest.mark.parametrize("align_corners", [False, True])
def test_bilinear_views(align_corners: bool) -> None:
    """Bilinear slice mode: with ``align_corners=False`` Kornia resizes on the half-pixel grid,
    so each pixel shows its predicted point (a linear ramp interpolates exactly; only the border
    clamps, by under half a pixel). Kornia's default ``align_corners=True`` spreads the samples
    from the first to the last source pixel centre instead: off by at most half an output pixel
    (in source pixels) at the borders."""
    seq = K.AugmentationSequential(
        K.RandomHorizontalFlip(),
        K.RandomResizedCrop((8, 12), scale=(0.1, 1.0), align_corners=align_corners),
        K.RandomHorizontalFlip(),
    )
    view, boxes, flips = run(seq, coord_image(8, 24, 40), 3)
    pred = predicted(boxes, flips, 8, 12) - 0.5  # value of a ramp at a point: its index coordinate
    err = (view - pred).abs()
    scale = torch.stack([(boxes[:, 2] - boxes[:, 0]) / 12, (boxes[:, 3] - boxes[:, 1]) / 8], 1)
    tol = 0.5 + 1e-6 + (0.5 * scale.clamp(min=1) if align_corners else torch.zeros_like(scale))
    assert bool((err <= tol[:, :, None, None]).all())


def test_corner_convention_is_inclusive() -> None:
    """A crop of the whole image has ``src`` corners at the last pixel indices, W - 1 and H - 1,
    and its box is the whole image."""
    crop = K.RandomResizedCrop((8, 8), scale=(1.0, 1.0), ratio=(1.0, 1.0))
    crop(torch.rand(2, 1, 16, 16))
    assert crop._params["src"][:, 2].tolist() == [[15.0, 15.0]] * 2
    boxes, flips = boxes_from_kornia(crop._params)
    assert boxes.tolist() == [[0.0, 0.0, 16.0, 16.0]] * 2 and not flips.any()


@pytest.mark.parametrize("flip_first", [False, True])
def test_single_module_params(flip_first: bool) -> None:
    """A crop's and a flip's own ``_params`` give the same boxes as the container would."""
    crop, flip = nearest_crop(), K.RandomHorizontalFlip()
    images = coord_image(6, 24, 40)
    torch.manual_seed(4)
    view = crop(flip(images)) if flip_first else flip(crop(images))
    boxes, flips = boxes_from_kornia(crop._params, flip._params, flip_first=flip_first)
    assert_nearest(view, boxes, flips)
    boxes_only, no_flips = boxes_from_kornia(crop._params)
    assert not no_flips.any()
    if not flip_first:  # a flip after the crop mirrors the view, not the region
        assert torch.equal(boxes_only, boxes)


@pytest.mark.parametrize("rule", ["half", "centre"])
def test_matched_tokens_show_the_same_source(rule: str) -> None:
    """Two views through match_patches, patch extents read from the pixels the views show.

    Both rules: each matched patch is more than half inside the region the other view shows
    (per axis; a pixel of slack for nearest resampling). "centre" pairs closest patches: the two
    overlap, per axis, by at least half of the smaller. ("half" pairs by rank when the two
    views select different counts, so only the first guarantee holds for it.)"""
    patch = 4
    images = coord_image(8, 48, 48)
    seq_a = K.AugmentationSequential(K.RandomResizedCrop((16, 16), scale=(0.3, 1.0), resample="nearest"),
                                     K.RandomHorizontalFlip())
    seq_b = K.AugmentationSequential(K.RandomHorizontalFlip(),
                                     K.RandomResizedCrop((12, 12), scale=(0.2, 0.6), resample="nearest"))
    view_a, box_a, flip_a = run(seq_a, images, 5)
    view_b, box_b, flip_b = run(seq_b, images, 6)
    m = match_patches(box_a, box_b, 16 // patch, 12 // patch, flip_a, flip_b, rule=rule, cls=False)
    assert int(m.num_valid.sum()) > 10  # the test checks something

    def extent(view: torch.Tensor, n: int, token: int) -> torch.Tensor:
        r, c = divmod(token, view.shape[-1] // patch)
        px = view[n, :, r * patch:(r + 1) * patch, c * patch:(c + 1) * patch].flatten(1)
        return torch.stack([px.amin(1), px.amax(1) + 1])  # (lo/hi, x/y) in source pixels

    def overlap(e: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        return torch.minimum(e[1], f[1]) - torch.maximum(e[0], f[0])

    for n in range(images.shape[0]):
        # the source region each whole view shows
        whole_a = torch.stack([view_a[n].flatten(1).amin(1), view_a[n].flatten(1).amax(1) + 1])
        whole_b = torch.stack([view_b[n].flatten(1).amin(1), view_b[n].flatten(1).amax(1) + 1])
        for ia, ib in zip(m.idx_a[n][m.valid[n]].tolist(), m.idx_b[n][m.valid[n]].tolist()):
            ea, eb = extent(view_a, n, ia), extent(view_b, n, ib)
            size_a, size_b = ea[1] - ea[0], eb[1] - eb[0]
            assert bool((overlap(ea, whole_b) >= size_a / 2 - 1).all()), (n, ia, ib)
            assert bool((overlap(eb, whole_a) >= size_b / 2 - 1).all()), (n, ia, ib)
            if rule == "centre":
                smaller = torch.minimum(size_a, size_b)
                assert bool((overlap(ea, eb) >= smaller / 2 - 1).all()), (n, ia, ib, ea, eb)


GEOMETRIC = {
    "RandomRotation": lambda: K.RandomRotation(30.0),
    "RandomAffine": lambda: K.RandomAffine(10.0),
    "RandomPerspective": lambda: K.RandomPerspective(0.3),
    "RandomVerticalFlip": lambda: K.RandomVerticalFlip(p=0.0),  # refused even when it did not fire
    "RandomCrop": lambda: K.RandomCrop((20, 20), padding=2),
}


@pytest.mark.parametrize("name", GEOMETRIC)
def test_inexpressible_geometry_raises(name: str) -> None:
    seq = K.AugmentationSequential(nearest_crop(), GEOMETRIC[name](), K.RandomHorizontalFlip())
    seq(torch.rand(2, 3, 24, 40))
    with pytest.raises(ValueError, match=name):
        boxes_from_kornia(seq._params)


def test_unknown_module_raises_unless_skipped() -> None:
    crop = nearest_crop()
    crop(torch.rand(2, 3, 24, 40))
    params = [ParamItem("RandomResizedCrop_0", crop._params), ParamItem("MyTint_1", None)]
    with pytest.raises(ValueError, match="MyTint"):
        boxes_from_kornia(params)
    boxes, _ = boxes_from_kornia(params, skip=("MyTint",))
    assert torch.equal(boxes, boxes_from_kornia(params[:1])[0])


def test_bad_input_raises() -> None:
    crop, flip = nearest_crop(), K.RandomHorizontalFlip()
    flip(crop(torch.rand(2, 3, 24, 40)))
    good = dict(crop._params)
    with pytest.raises(TypeError, match="params"):
        boxes_from_kornia(42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"params\[0\]"):
        boxes_from_kornia([good])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="src"):
        boxes_from_kornia({**good, "src": good["src"][:, :3]})
    with pytest.raises(ValueError, match="output_size"):
        boxes_from_kornia({"src": good["src"]})
    skewed = good["src"].clone()
    skewed[:, 1, 1] += 1
    with pytest.raises(ValueError, match="axis-aligned"):
        boxes_from_kornia({**good, "src": skewed})
    with pytest.raises(TypeError, match="flip_params"):
        boxes_from_kornia(good, [flip._params])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="flip_params"):
        boxes_from_kornia([ParamItem("RandomResizedCrop_0", good)], flip._params)
    with pytest.raises(ValueError, match="batch"):
        boxes_from_kornia([])
    with pytest.raises(TypeError, match="flip_first"):
        boxes_from_kornia(good, flip._params, flip_first=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="flip_params"):  # a flip of another batch size
        boxes_from_kornia(good, {**flip._params, "batch_prob": torch.ones(3)})
