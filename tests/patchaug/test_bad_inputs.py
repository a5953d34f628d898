"""Bad inputs to every public function and class of patchaug: a clear, early error.

Each case is a call a user can plausibly get wrong (wrong shape, dtype, type, range, NaN,
empty, reversed boxes, a generator that is not one, ...). The test asserts the exception
type AND that the message names the argument (``match``), so that the error says what to fix.
Valid edge cases (empty batch, batch of one, extreme but legal boxes) are at the end and
assert the results.
"""

from __future__ import annotations

import kornia.augmentation as K
import matplotlib
import pytest
import torch

import patchaug
from patchaug import (
    BatchedRandomResizedCrop,
    CropBox,
    CropFlip,
    PatchJitter,
    PatchJitterParams,
    PatchMatch,
    PerPatch,
    RandomResizedCropWithBox,
    batched_random_resized_crop,
    boxes_from_kornia,
    draw_matches,
    match_patches,
    patch_centres,
    resized_crop_boxes,
    sample_crop_boxes,
)
from patchaug import operators as O

matplotlib.use("Agg")

NAN = float("nan")
INF = float("inf")


def img(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.rand(*shape).to(dtype)


def m4() -> PatchMatch:
    return match_patches((0, 0, 32, 32), (8, 8, 24, 24), 4, 2)


def jitter_params(b: int = 2) -> PatchJitterParams:
    _, params = PatchJitter.paper(16)(img(b, 3, 32, 32), return_params=True)
    return params


def case(name, call, exc, match):
    return pytest.param(call, exc, match, id=name)


BOX = torch.tensor([[0.0, 0.0, 16.0, 16.0], [4.0, 4.0, 20.0, 28.0]])
FLIPS = torch.zeros(2, 2, dtype=torch.bool)

CASES = [
    # ------------------------------------------------------------------ match_patches
    case("match/box_a-3-numbers", lambda: match_patches((0, 0, 8), (0, 0, 8, 8), 2, 2), ValueError, "box_a"),
    case("match/box_a-nan", lambda: match_patches((0, 0, NAN, 8), (0, 0, 8, 8), 2, 2), ValueError, "box_a"),
    case("match/box_b-inf", lambda: match_patches((0, 0, 8, 8), (0, 0, INF, 8), 2, 2), ValueError, "box_b"),
    case("match/box_a-reversed", lambda: match_patches((8, 0, 0, 8), (0, 0, 8, 8), 2, 2), ValueError, "box_a"),
    case("match/box_b-empty", lambda: match_patches((0, 0, 8, 8), (0, 4, 8, 4), 2, 2), ValueError, "box_b"),
    case("match/box_a-string", lambda: match_patches("0 0 8 8", (0, 0, 8, 8), 2, 2), TypeError, "box_a"),
    case("match/grid_a-zero", lambda: match_patches((0, 0, 8, 8), (0, 0, 8, 8), 0, 2), ValueError, "grid_a"),
    case("match/grid_b-float", lambda: match_patches((0, 0, 8, 8), (0, 0, 8, 8), 2, 2.0), TypeError, "grid_b"),
    case("match/grid_a-triple", lambda: match_patches((0, 0, 8, 8), (0, 0, 8, 8), (2, 2, 2), 2), TypeError, "grid_a"),
    case("match/rule", lambda: match_patches((0, 0, 8, 8), (0, 0, 8, 8), 2, 2, rule="centers"), ValueError, "rule"),
    case("match/flip_a-string", lambda: match_patches((0, 0, 8, 8), (0, 0, 8, 8), 2, 2, "yes"), TypeError, "flip_a"),
    case("match/flip_b-float-tensor",
         lambda: match_patches((0, 0, 8, 8), (0, 0, 8, 8), 2, 2, False, torch.tensor(1.0)), TypeError, "flip_b"),
    case("match/boxes-do-not-broadcast",
         lambda: match_patches(torch.zeros(2, 4) + BOX[0], torch.zeros(3, 4) + BOX[0], 2, 2), ValueError, "box"),
    case("match/flip-does-not-broadcast",
         lambda: match_patches(BOX, BOX, 2, 2, torch.zeros(3, dtype=torch.bool)), ValueError, "flip"),
    case("match/cls-string", lambda: match_patches((0, 0, 8, 8), (0, 0, 8, 8), 2, 2, cls="no"), TypeError, "cls"),
    case("PatchMatch.pairs/batched", lambda: match_patches(BOX, BOX, 2, 2).pairs(), ValueError, "pairs"),
    # ------------------------------------------------------------------ patch_centres
    case("centres/grid-zero", lambda: patch_centres((0, 0, 8, 8), 0), ValueError, "grid"),
    case("centres/box-shape", lambda: patch_centres((0, 0, 8), 2), ValueError, "box"),
    case("centres/box-nan", lambda: patch_centres((0, 0, NAN, 8), 2), ValueError, "box"),
    case("centres/flip-string", lambda: patch_centres((0, 0, 8, 8), 2, "left"), TypeError, "flip"),
    # ------------------------------------------------------------------ sample_crop_boxes
    case("sample/n-negative", lambda: sample_crop_boxes(-1, 32, 32), ValueError, "n must"),
    case("sample/height-zero", lambda: sample_crop_boxes(2, 0, 32), ValueError, "height"),
    case("sample/scale-reversed", lambda: sample_crop_boxes(2, 32, 32, (1.0, 0.5)), ValueError, "scale"),
    case("sample/scale-zero", lambda: sample_crop_boxes(2, 32, 32, (0.0, 0.5)), ValueError, "scale"),
    case("sample/ratio-string", lambda: sample_crop_boxes(2, 32, 32, ratio="4:3"), TypeError, "ratio"),
    case("sample/generator-int", lambda: sample_crop_boxes(2, 32, 32, generator=42), TypeError, "generator"),
    # ------------------------------------------------------------------ resized_crop_boxes
    case("crop/images-list", lambda: resized_crop_boxes([img(3, 8, 8)], BOX[:1], 4), TypeError, "images"),
    case("crop/images-3d", lambda: resized_crop_boxes(img(3, 32, 32), BOX[:1], 4), ValueError, "images"),
    case("crop/images-uint8", lambda: resized_crop_boxes(img(2, 3, 32, 32, dtype=torch.uint8), BOX, 4),
         TypeError, "images"),
    case("crop/boxes-shape", lambda: resized_crop_boxes(img(2, 3, 32, 32), BOX[:1], 4), ValueError, "boxes"),
    case("crop/boxes-nan", lambda: resized_crop_boxes(img(2, 3, 32, 32), BOX * torch.tensor([1, 1, NAN, 1]), 4),
         ValueError, "boxes must be finite"),
    case("crop/boxes-reversed", lambda: resized_crop_boxes(img(2, 3, 32, 32), BOX[:, [2, 1, 0, 3]], 4),
         ValueError, "boxes must have x1 > x0"),
    case("crop/boxes-outside", lambda: resized_crop_boxes(img(2, 3, 32, 32), BOX + 100, 4),
         ValueError, "boxes must overlap"),
    case("crop/flips-int", lambda: resized_crop_boxes(img(2, 3, 32, 32), BOX, 4, torch.tensor([0, 1])),
         TypeError, "flips"),
    case("crop/size-zero", lambda: resized_crop_boxes(img(2, 3, 32, 32), BOX, 0), ValueError, "size"),
    case("crop/mode", lambda: resized_crop_boxes(img(2, 3, 32, 32), BOX, 4, mode="area"), ValueError, "mode"),
    # ------------------------------------------------------------------ batched_random_resized_crop
    case("batched/images-3d", lambda: batched_random_resized_crop(img(3, 32, 32), 16), ValueError, "images"),
    case("batched/images-int", lambda: batched_random_resized_crop(img(2, 3, 8, 8, dtype=torch.int64), 4),
         TypeError, "images"),
    case("batched/size-pair-of-floats", lambda: batched_random_resized_crop(img(2, 3, 32, 32), (16.0, 16.0)),
         TypeError, "size"),
    case("batched/flip_p", lambda: batched_random_resized_crop(img(2, 3, 32, 32), 16, flip_p=1.5), ValueError, "flip_p"),
    case("batched/shared-string", lambda: batched_random_resized_crop(img(2, 3, 32, 32), 16, shared="yes"),
         TypeError, "shared"),
    case("batched/generator-int", lambda: batched_random_resized_crop(img(2, 3, 32, 32), 16, generator=42),
         TypeError, "generator"),
    case("batched/mode", lambda: batched_random_resized_crop(img(2, 3, 32, 32), 16, mode="area"), ValueError, "mode"),
    case("batched/scale-negative", lambda: batched_random_resized_crop(img(2, 3, 32, 32), 16, (-0.5, 1.0)),
         ValueError, "scale"),
    # ------------------------------------------------------------------ BatchedRandomResizedCrop
    case("Batched/size", lambda: BatchedRandomResizedCrop(-1), ValueError, "size"),
    case("Batched/mode", lambda: BatchedRandomResizedCrop(16, mode="area"), ValueError, "mode"),
    case("Batched/shared", lambda: BatchedRandomResizedCrop(16, shared=1), TypeError, "shared"),
    case("Batched/flip_p", lambda: BatchedRandomResizedCrop(16, flip_p=-0.1), ValueError, "flip_p"),
    case("Batched/forward-images-3d", lambda: BatchedRandomResizedCrop(16)(img(3, 32, 32)), ValueError, "images"),
    case("Batched/forward-generator", lambda: BatchedRandomResizedCrop(16)(img(2, 3, 32, 32), generator=42),
         TypeError, "generator"),
    # ------------------------------------------------------------------ RandomResizedCropWithBox
    case("RRC/size-zero", lambda: RandomResizedCropWithBox(0), ValueError, "size"),
    case("RRC/scale-reversed", lambda: RandomResizedCropWithBox(16, scale=(1.0, 0.1)), ValueError, "scale"),
    case("RRC/ratio-zero", lambda: RandomResizedCropWithBox(16, ratio=(0.0, 1.0)), ValueError, "ratio"),
    case("RRC/flip_p", lambda: RandomResizedCropWithBox(16, flip_p=2), ValueError, "flip_p"),
    case("RRC/generator-int", lambda: RandomResizedCropWithBox(16, generator=42), TypeError, "generator"),
    case("RRC/interpolation", lambda: RandomResizedCropWithBox(16, interpolation="linear-ish"),
         ValueError, "interpolation"),
    case("RRC/antialias-string", lambda: RandomResizedCropWithBox(16, antialias="yes"), TypeError, "antialias"),
    # ------------------------------------------------------------------ CropBox / CropFlip
    case("CropBox/data-3-numbers", lambda: CropBox([0, 0, 8], canvas_size=(8, 8)), ValueError, "CropBox|data"),
    case("CropBox/canvas_size", lambda: CropBox([0, 0, 8, 8], canvas_size=(0, 8)), ValueError, "canvas_size"),
    case("CropBox/data-nan", lambda: CropBox([0, 0, NAN, 8], canvas_size=(8, 8)), ValueError, "CropBox|data"),
    case("CropFlip/data-2", lambda: CropFlip([True, False]), TypeError, "data"),
    # ------------------------------------------------------------------ PatchJitter
    case("PJ/patch_size-zero", lambda: PatchJitter(0), ValueError, "patch_size"),
    case("PJ/patch_size-float", lambda: PatchJitter(16.0), TypeError, "patch_size"),
    case("PJ/operators-strings", lambda: PatchJitter(16, ["hue"]), TypeError, "operators"),
    case("PJ/p_patch", lambda: PatchJitter(16, p_patch=1.5), ValueError, "p_patch"),
    case("PJ/p", lambda: PatchJitter(16, p=-1), ValueError, "p"),
    case("PJ/backend", lambda: PatchJitter(16, backend="gpu"), ValueError, "backend"),
    case("PJ/generator-int", lambda: PatchJitter(16, generator=42), TypeError, "generator"),
    case("PJ/random_order-string", lambda: PatchJitter(16, random_order="yes"), TypeError, "random_order"),
    case("PJ/forward-list", lambda: PatchJitter.paper(16)([img(3, 32, 32)]), TypeError, "images"),
    case("PJ/forward-uint8", lambda: PatchJitter.paper(16)(img(2, 3, 32, 32, dtype=torch.uint8)),
         TypeError, "images"),
    case("PJ/forward-5d", lambda: PatchJitter.paper(16)(img(1, 2, 3, 32, 32)), ValueError, "images"),
    case("PJ/forward-not-multiple", lambda: PatchJitter.paper(16)(img(2, 3, 40, 32)), ValueError, "patch_size|multiple"),
    case("PJ/forward-generator-int", lambda: PatchJitter.paper(16)(img(2, 3, 32, 32), generator=42),
         TypeError, "generator"),
    case("PJ/forward-params-dict", lambda: PatchJitter.paper(16)(img(2, 3, 32, 32), params={"b": 1}),
         ValueError, "params"),
    case("PJ/forward-params-int", lambda: PatchJitter.paper(16)(img(2, 3, 32, 32), params=3),
         TypeError, "params"),
    case("PJ/forward-params-other-batch", lambda: PatchJitter.paper(16)(img(3, 3, 32, 32), params=jitter_params(2)),
         ValueError, "params"),
    case("PJ/forward-requires-grad", lambda: PatchJitter.paper(16)(img(2, 3, 32, 32).requires_grad_()),
         ValueError, "input|grad"),
    case("PJ/paper-patch_size", lambda: PatchJitter.paper(-16), ValueError, "patch_size"),
    # ------------------------------------------------------------------ operators
    case("op/brightness-p", lambda: O.Brightness(0.4, p=1.5), ValueError, "p"),
    case("op/brightness-negative", lambda: O.Brightness(-0.4), ValueError, "brightness"),
    case("op/hue-too-far", lambda: O.Hue(0.7), ValueError, "hue"),
    case("op/blur-reversed", lambda: O.GaussianBlur((2.0, 0.1)), ValueError, "sigma|blur"),
    case("op/blur-even-kernel", lambda: O.GaussianBlur((0.1, 2.0), kernel_size=4), ValueError, "kernel"),
    case("op/posterize-bits", lambda: O.Posterize(9), ValueError, "posterize|bits"),
    case("op/noise-nan", lambda: O.GaussianNoise((0.0, NAN)), ValueError, "noise|std"),
    # ------------------------------------------------------------------ PerPatch
    case("PerPatch/no-augs", lambda: PerPatch(patch_size=16), TypeError, "augs"),
    case("PerPatch/geometric", lambda: PerPatch(K.RandomRotation(30.0), patch_size=16), TypeError, "augs|intensity"),
    case("PerPatch/torch-module", lambda: PerPatch(torch.nn.Identity(), patch_size=16), TypeError, "augs"),
    case("PerPatch/patch_size-zero", lambda: PerPatch(K.ColorJiggle(0.4), patch_size=0), ValueError, "patch_size"),
    case("PerPatch/p", lambda: PerPatch(K.ColorJiggle(0.4), patch_size=16, p=3.0), ValueError, "p"),
    case("PerPatch/forward-not-multiple", lambda: PerPatch(K.ColorJiggle(0.4), patch_size=16)(img(2, 3, 40, 32)),
         ValueError, "patch_size|multiple"),
    case("PerPatch/forward-list", lambda: PerPatch(K.ColorJiggle(0.4), patch_size=16)([img(3, 32, 32)]),
         TypeError, "input"),
    # ------------------------------------------------------------------ boxes_from_kornia
    case("kornia/params-int", lambda: boxes_from_kornia(3), TypeError, "params"),
    case("kornia/params-empty-list", lambda: boxes_from_kornia([]), ValueError, "params"),
    case("kornia/params-list-of-dicts", lambda: boxes_from_kornia([{"src": torch.zeros(1, 4, 2)}]),
         TypeError, r"params\[0\]"),
    case("kornia/flip_first-string", lambda: boxes_from_kornia({}, flip_first="yes"), TypeError, "flip_first"),
    case("kornia/skip-int", lambda: boxes_from_kornia({}, skip=3), TypeError, "skip"),
    case("kornia/flip_params-list", lambda: boxes_from_kornia({}, flip_params=[1]), TypeError, "flip_params"),
    # ------------------------------------------------------------------ draw_matches
    case("draw/image_a-4d", lambda: draw_matches(img(1, 3, 32, 32), img(3, 16, 16), 4, 2, m4()), ValueError, "image_a"),
    case("draw/image_b-2-channels", lambda: draw_matches(img(3, 32, 32), img(2, 16, 16), 4, 2, m4()),
         ValueError, "image_b"),
    case("draw/grid_a-zero", lambda: draw_matches(img(3, 32, 32), img(3, 16, 16), 0, 2, m4()), ValueError, "grid_a"),
    case("draw/grid_b-float", lambda: draw_matches(img(3, 32, 32), img(3, 16, 16), 4, 2.0, m4()), TypeError, "grid_b"),
    case("draw/match-other-grids", lambda: draw_matches(img(3, 32, 32), img(3, 16, 16), 8, 4, m4()),
         ValueError, "match .*other grids"),
    case("draw/match-tuple", lambda: draw_matches(img(3, 32, 32), img(3, 16, 16), 4, 2, (0, 0)), TypeError, "match"),
    case("draw/match-batched", lambda: draw_matches(img(3, 8, 8), img(3, 8, 8), 2, 2, match_patches(BOX, BOX, 2, 2)),
         ValueError, "match must be unbatched"),
    case("draw/max_labels-zero", lambda: draw_matches(img(3, 32, 32), img(3, 16, 16), 4, 2, m4(), max_labels=0),
         ValueError, "max_labels"),
]

# match_view_pairs: the multi-pair matching engine, public once patchaug exports it
if hasattr(patchaug, "match_view_pairs"):
    match_view_pairs = patchaug.match_view_pairs
    CASES += [
        case("pairs/boxes-2d", lambda: match_view_pairs(BOX, FLIPS[0], [2], [(0, 0)]), ValueError, "boxes"),
        case("pairs/flips-float", lambda: match_view_pairs(BOX[None], FLIPS[:1].float(), [2], [(0, 0)]),
             TypeError, "flips"),
        case("pairs/flips-shape", lambda: match_view_pairs(BOX[None], FLIPS, [2], [(0, 0)]), ValueError, "flips"),
        case("pairs/grids-count", lambda: match_view_pairs(BOX[None], FLIPS[:1], [2, 2], [(0, 0)]), ValueError, "grids"),
        case("pairs/grids-zero", lambda: match_view_pairs(BOX[None], FLIPS[:1], [0], [(0, 0)]), ValueError, "grids"),
        case("pairs/view-out-of-range", lambda: match_view_pairs(BOX[None], FLIPS[:1], [2], [(0, 1)]),
             ValueError, "pairs"),
        case("pairs/rule", lambda: match_view_pairs(BOX[None], FLIPS[:1], [2], [(0, 0)], rule="x"), ValueError, "rule"),
        case("pairs/boxes-nan", lambda: match_view_pairs((BOX * NAN)[None], FLIPS[:1], [2], [(0, 0)]),
             ValueError, "box"),
    ]


@pytest.mark.parametrize(("call", "exc", "match"), CASES)
def test_bad_input_raises_a_clear_error(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_every_public_name_has_bad_input_cases():
    constants = {"OPERATORS", "RULES", "PatchOp", "PatchMatch", "PatchJitterParams"}
    covered = " ".join(c.id for c in CASES).lower()
    short = {"match_patches": "match/", "patch_centres": "centres/", "sample_crop_boxes": "sample/",
             "resized_crop_boxes": "crop/", "batched_random_resized_crop": "batched/",
             "BatchedRandomResizedCrop": "batched/", "RandomResizedCropWithBox": "rrc/",
             "CropBox": "cropbox/", "CropFlip": "cropflip/", "PatchJitter": "pj/",
             "PerPatch": "perpatch/", "boxes_from_kornia": "kornia/", "draw_matches": "draw/",
             "match_view_pairs": "pairs/"}
    missing = [n for n in patchaug.__all__ if n not in constants and short.get(n, "?") not in covered]
    assert not missing


# ---------------------------------------------------------------------- valid edge cases


def test_empty_batch_gives_empty_results():
    empty = img(0, 3, 32, 32)
    out, params = PatchJitter.paper(16)(empty, return_params=True)
    assert out.shape == (0, 3, 32, 32) and params.applied.shape[0] == 0
    assert PatchJitter.paper(16)(empty, params=params).shape == (0, 3, 32, 32)
    assert PerPatch(K.ColorJiggle(0.4), patch_size=16)(empty).shape == (0, 3, 32, 32)
    crops, boxes, flips = batched_random_resized_crop(empty, 16)
    assert crops.shape == (0, 3, 16, 16) and boxes.shape == (0, 4) and flips.shape == (0,)
    assert resized_crop_boxes(empty, torch.zeros(0, 4), 8).shape == (0, 3, 8, 8)
    assert sample_crop_boxes(0, 32, 32).shape == (0, 4)
    m = match_patches(torch.zeros(0, 4), (0, 0, 8, 8), 2, 2)
    assert m.idx_a.shape == m.valid.shape == (0, 5)


def test_batch_of_one():
    x = img(1, 3, 32, 32)
    assert torch.equal(PatchJitter.paper(16, p=0.0)(x), x)
    out, params = PatchJitter.paper(16)(x, return_params=True)
    assert out.shape == (1, 3, 32, 32) and params.applied.shape[0] == 1
    assert torch.equal(PatchJitter.paper(16)(x, params=params), out)  # replay
    boxes = torch.tensor([[0.0, 0.0, 32.0, 32.0]])
    assert torch.equal(resized_crop_boxes(x, boxes, 32, mode="nearest"), x)  # the whole image
    crops, b, f = batched_random_resized_crop(x, 16, generator=torch.Generator().manual_seed(0))
    assert crops.shape == (1, 3, 16, 16) and b.shape == (1, 4) and f.shape == (1,)
    assert match_patches(boxes, boxes, 2, 2).valid.shape == (1, 5)
    assert match_patches(boxes[0], boxes[0], 2, 2).pairs() == [(0, 0), (1, 1), (2, 2), (3, 3), (4, 4)]


def test_extreme_legal_boxes():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    # a one-pixel box reads that pixel everywhere
    one_pixel = resized_crop_boxes(x, torch.tensor([[2.0, 1.0, 3.0, 2.0]]), 3, mode="nearest")
    assert torch.equal(one_pixel, torch.full((1, 1, 3, 3), 6.0))
    # a box partly outside repeats the border pixels
    past_right = resized_crop_boxes(x, torch.tensor([[3.0, 0.0, 5.0, 1.0]]), (1, 2), mode="nearest")
    assert past_right.flatten().tolist() == [3.0, 3.0]
    # the whole image, mirrored: exactly the flipped image
    whole = resized_crop_boxes(x, torch.tensor([[0.0, 0.0, 4.0, 4.0]]), 4, torch.tensor([True]))
    assert torch.equal(whole, x.flip(-1))
    # boxes that only touch share no pixel: only CLS is matched
    assert match_patches((0, 0, 8, 8), (8, 0, 16, 8), 2, 2).pairs() == [(0, 0)]
    # a one-patch view inside a big one: the patch under it
    assert match_patches((0, 0, 64, 64), (16, 16, 32, 32), 4, 1).pairs() == [(0, 0), (6, 1)]


def test_patch_jitter_params_repr_is_short():
    params = jitter_params(4)
    text = repr(params)
    assert len(text) < 400 and "tensor(" not in text and "B=4" in text
