"""PerPatch: Kornia intensity augmentations per patch, as a Kornia augmentation."""

from __future__ import annotations

import copy
import io
import pickle

import kornia.augmentation as K
import pytest
import torch
from torch import nn

from patchaug.patch_ops import patchify, unpatchify
from patchaug.per_patch import PerPatch

B, C, H, W, P = 2, 3, 32, 32, 8
N = (H // P) * (W // P)


def _augs() -> dict[str, nn.Module]:
    """The wrapped augmentations under test (fresh instances)."""
    return {
        "planckian": K.RandomPlanckianJitter(p=0.7),
        "equalize": K.RandomEqualize(p=0.7),
        "jiggle": K.ColorJiggle(0.4, 0.4, 0.2, 0.1, p=0.8),
        "blur": K.RandomGaussianBlur((5, 5), (0.1, 2.0), p=0.7),
    }


def _images(seed: int = 0, b: int = B) -> torch.Tensor:
    return torch.rand(b, C, H, W, generator=torch.Generator().manual_seed(seed))


def _own(params: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    """Augmentation ``i``'s parameters, without their prefix."""
    prefix = f"{i}."
    return {k[len(prefix) :]: v for k, v in params.items() if k.startswith(prefix)}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)  # Kornia draws from the global generator


@pytest.mark.parametrize(
    "names",
    [
        ["planckian"],
        ["equalize"],
        ["jiggle"],
        ["blur"],
        ["jiggle", "blur", "equalize", "planckian"],
    ],
)
def test_equals_kornia_on_the_patch_batch(names: list[str]) -> None:
    augs = [_augs()[name] for name in names]
    reference = copy.deepcopy(augs)  # run outside PerPatch
    pp = PerPatch(*augs, patch_size=P)
    x = _images()
    out = pp(x)
    patches = patchify(x, P)
    for i, aug in enumerate(reference):
        own = _own(pp._params, i)
        assert own["batch_prob"].shape == (B * N,)
        assert own["forward_input_shape"].tolist() == [B * N, C, P, P]
        patches = aug(patches, params=own)
    torch.testing.assert_close(out, unpatchify(patches, B, H, W), rtol=0, atol=0)


def test_every_patch_gets_its_own_parameters() -> None:
    pp = PerPatch(
        K.ColorJiggle(0.4, 0.4, 0.2, 0.1, p=1.0),
        K.RandomGaussianBlur((5, 5), (0.1, 2.0), p=0.5),
        patch_size=P,
    )
    pp(_images())
    assert set(pp._params) == {
        "0.brightness_factor",
        "0.contrast_factor",
        "0.saturation_factor",
        "0.hue_factor",
        "0.order",
        "0.batch_prob",
        "0.forward_input_shape",
        "1.sigma",
        "1.batch_prob",
        "1.forward_input_shape",
        "batch_prob",
        "forward_input_shape",
    }
    assert all(isinstance(v, torch.Tensor) for v in pp._params.values())
    for key in ("0.brightness_factor", "0.hue_factor", "1.sigma"):
        assert pp._params[key].shape == (B * N,)
        assert pp._params[key].unique().numel() == B * N  # distinct draws, not one per image
    gate = pp._params["1.batch_prob"]
    assert 0 < int(gate.sum()) < B * N  # blurred or not, patch by patch
    assert pp._params["batch_prob"].shape == (B,)
    assert pp._params["forward_input_shape"].tolist() == [B, C, H, W]


def test_neighbour_reading_operators_stay_inside_their_patch() -> None:
    pp = PerPatch(
        K.RandomGaussianBlur((7, 7), (1.0, 2.0), p=1.0),
        K.ColorJiggle(0.0, 0.4, 0.0, 0.0, p=1.0),  # contrast reads the patch mean
        K.RandomEqualize(p=1.0),
        patch_size=P,
    )
    x = _images()
    out = pp(x)
    params = pp._params
    for b, n in [(0, 0), (1, 6), (1, N - 1)]:
        edited = patchify(x, P)
        edited[b * N + n] = torch.rand(C, P, P)
        changed = patchify(pp(unpatchify(edited, B, H, W), params=params), P) != patchify(out, P)
        assert changed.flatten(1).any(1).nonzero().flatten().tolist() == [b * N + n]


@pytest.mark.parametrize("p", [1.0, 0.5])
def test_replay_is_exact(p: float) -> None:
    augs = _augs()
    pp = PerPatch(augs["jiggle"], augs["blur"], augs["planckian"], patch_size=P, p=p)
    x = _images(b=8)
    out = pp(x)
    params = pp._params
    torch.manual_seed(123)  # a replay draws nothing
    assert torch.equal(pp(x, params=params), out)
    assert pp._params is params
    assert not torch.equal(pp(x), out)  # a new call draws anew


def test_per_image_gate() -> None:
    x = _images(b=8)
    assert torch.equal(
        PerPatch(K.ColorJiggle(0.4, 0.4, 0.2, 0.1, p=1.0), patch_size=P, p=0.0)(x), x
    )
    pp = PerPatch(K.ColorJiggle(0.4, 0.4, 0.2, 0.1, p=1.0), patch_size=P, p=0.5)
    out = pp(x)
    kept = pp._params["batch_prob"] < 0.5
    assert 0 < int(kept.sum()) < 8
    assert torch.equal(out[kept], x[kept])
    assert not (out[~kept] == x[~kept]).flatten(1).all(1).any()


def test_augmentation_sequential_boxes_and_replay() -> None:
    seq = K.AugmentationSequential(
        K.RandomHorizontalFlip(p=0.5),
        PerPatch(
            K.ColorJiggle(0.4, 0.4, 0.2, 0.1, p=0.8),
            K.RandomGaussianBlur((5, 5), (0.1, 2.0), p=0.5),
            patch_size=P,
        ),
        data_keys=["input", "bbox_xyxy"],
    )
    x = _images(b=4)
    boxes = torch.tensor([[[1.0, 2.0, 10.0, 12.0]], [[0.0, 0.0, 31.0, 31.0]]]).repeat(2, 1, 1)
    out, out_boxes = seq(x, boxes)
    replay, replay_boxes = seq(x, boxes, params=seq._params)
    assert torch.equal(replay, out) and torch.equal(replay_boxes, out_boxes)
    assert isinstance(seq._params[1].data, dict)  # flat, as the containers require
    # PerPatch alone passes boxes, masks and keypoints through unchanged
    only = K.AugmentationSequential(
        PerPatch(K.RandomEqualize(p=1.0), patch_size=P),
        data_keys=["input", "bbox_xyxy", "mask", "keypoints"],
    )
    masks = (torch.rand(4, 1, H, W) > 0.5).float()
    keypoints = torch.rand(4, 5, 2) * (W - 1)
    out, out_boxes, out_masks, out_keypoints = only(x, boxes, masks, keypoints)
    assert torch.equal(out_boxes, boxes) and torch.equal(out_masks, masks)
    assert torch.equal(out_keypoints, keypoints)
    assert torch.equal(only(x, boxes, masks, keypoints, params=only._params)[0], out)


@pytest.mark.parametrize(
    "aug",
    [
        K.RandomRotation(30.0),
        K.RandomResizedCrop((8, 8)),
        nn.Identity(),
        lambda x: x,
        "ColorJiggle",
        K.AugmentationSequential(K.RandomEqualize()),
    ],
)
def test_rejects_non_intensity_augmentations(aug: object) -> None:
    with pytest.raises(TypeError, match=r"augs\[1\]"):
        PerPatch(K.RandomEqualize(), aug, patch_size=P)


def test_needs_an_augmentation() -> None:
    with pytest.raises(TypeError, match="augs"):
        PerPatch(patch_size=P)


@pytest.mark.parametrize(
    "patch_size, error", [(0, ValueError), (-8, ValueError), (8.0, TypeError), (True, TypeError)]
)
def test_bad_patch_size(patch_size: object, error: type) -> None:
    with pytest.raises(error, match="patch_size"):
        PerPatch(K.RandomEqualize(), patch_size=patch_size)


def test_bad_image_size_raises_before_drawing() -> None:
    pp = PerPatch(K.ColorJiggle(0.4, 0.4, 0.2, 0.1, p=0.5), patch_size=P)
    bad = torch.rand(2, 3, 30, 32)
    state = torch.get_rng_state()
    with pytest.raises(ValueError, match=r"input: .*patch_size=8.*30x32"):
        pp(bad)
    assert torch.equal(torch.get_rng_state(), state)  # nothing was drawn
    pp(_images())
    with pytest.raises(ValueError, match="input"):  # a replay on images of the wrong size
        pp(torch.rand(2, 3, 32, 36), params=pp._params)


def test_empty_batch_and_single_image() -> None:
    pp = PerPatch(*_augs().values(), patch_size=P)
    assert pp(torch.rand(0, C, H, W)).shape == (0, C, H, W)
    image = _images()[0]
    out = pp(image)
    assert out.shape == (C, H, W)
    assert torch.equal(pp(image[None], params=pp._params)[0], out)
    assert PerPatch(K.RandomEqualize(), patch_size=P, keepdim=False)(image).shape == (1, C, H, W)


def test_module_plumbing() -> None:
    pp = PerPatch(
        K.ColorJiggle(0.4, 0.4, 0.2, 0.1, p=0.8),
        K.RandomGaussianBlur((5, 5), (0.1, 2.0), p=0.5),
        patch_size=P,
    )
    x = _images()
    out = pp(x)
    params = pp._params
    assert "ColorJiggle" in repr(pp) and "patch_size=8" in repr(pp)
    assert pp.to("cpu") is pp and pp.cpu() is pp
    # a copy replays the same output
    seq = nn.Sequential(pp)
    copies = [
        copy.deepcopy(pp),
        pickle.loads(pickle.dumps(pp)),
        copy.deepcopy(seq)[0],
        pickle.loads(pickle.dumps(seq))[0],
    ]
    buffer = io.BytesIO()
    torch.save(seq, buffer)
    buffer.seek(0)
    copies.append(torch.load(buffer, weights_only=False)[0])
    for other in copies:
        assert isinstance(other, PerPatch) and other is not pp
        assert torch.equal(other(x, params=params), out)
    fresh = PerPatch(
        K.ColorJiggle(0.4, 0.4, 0.2, 0.1, p=0.8),
        K.RandomGaussianBlur((5, 5), (0.1, 2.0), p=0.5),
        patch_size=P,
    )
    fresh.load_state_dict(pp.state_dict())
    assert torch.equal(fresh(x, params=params), out)
    half = copy.deepcopy(pp).half()
    assert half.dtype == torch.float16 and half.augs[0].dtype == torch.float16
    assert half(x.half()).dtype == torch.float16
    assert half.float()(x).dtype == torch.float32


def test_torchvision_v2_compose() -> None:
    v2 = pytest.importorskip("torchvision.transforms.v2")
    tv_tensors = pytest.importorskip("torchvision.tv_tensors")
    from PIL import Image

    pil = Image.fromarray((torch.rand(H, W, 3) * 255).to(torch.uint8).numpy())
    pipeline = v2.Compose(
        [
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            PerPatch(
                K.ColorJiggle(0.4, 0.4, 0.2, 0.1, p=0.8),
                K.RandomGaussianBlur((5, 5), (0.1, 2.0), p=0.5),
                patch_size=P,
            ),
        ]
    )
    out = pipeline(pil)
    assert type(out) is tv_tensors.Image and out.shape == (3, H, W)
    assert out.dtype == torch.float32
    pp = pipeline.transforms[-1]
    image = v2.ToDtype(torch.float32, scale=True)(v2.ToImage()(pil))
    assert torch.equal(pp(image, params=pp._params), out)
    plain = pp(image.as_subclass(torch.Tensor))
    assert type(plain) is torch.Tensor


def test_same_draws_as_kornia_patch_sequential() -> None:
    # Kornia 0.9's PatchSequential(patchwise_apply=False) draws each child's parameters for
    # the whole patch batch too, in the same order: one seed, the same output (the docs say so)
    def augs() -> list[nn.Module]:
        return [K.ColorJiggle(0.4, 0.4, 0.2, 0.1, p=0.8), K.RandomGaussianBlur((5, 5), (0.1, 2.0))]

    x = _images()
    torch.manual_seed(7)
    ours = PerPatch(*augs(), patch_size=P)(x)
    torch.manual_seed(7)
    grid = (H // P, W // P)
    theirs = K.PatchSequential(*augs(), grid_size=grid, patchwise_apply=False)(x)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_composes_with_patch_jitter_in_one_kornia_pipeline() -> None:
    from patchaug import PatchJitter

    seq = K.AugmentationSequential(
        PatchJitter.paper(8),
        PerPatch(K.RandomPlanckianJitter(p=1.0), patch_size=8),
        data_keys=["input", "bbox_xyxy"],
    )
    x = torch.rand(2, 3, 16, 24, generator=torch.Generator().manual_seed(0))
    boxes = torch.tensor([[[1.0, 2.0, 10.0, 12.0]], [[0.0, 0.0, 5.0, 5.0]]])
    out, out_boxes = seq(x, boxes)
    assert out.shape == x.shape and not torch.equal(out, x)
    torch.testing.assert_close(out_boxes, boxes)
    again, _ = seq(x, boxes, params=seq._params)
    assert torch.equal(again, out)
