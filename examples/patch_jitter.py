"""Per-patch photometric augmentation with PatchJitter, on random images.

Usage: python examples/patch_jitter.py
"""

from __future__ import annotations

import kornia
import kornia.augmentation as K
import torch
from PIL import Image
from torchvision.transforms import v2

from patchaug import PatchJitter
from patchaug import operators as O


def presets_and_replay(images: torch.Tensor) -> None:
    # [presets]
    jitter = PatchJitter.paper(patch_size=16)  # the paper's operators, DINO's ranges
    out, params = jitter(images, return_params=True)  # (B, C, H, W) floats in [0, 1]
    assert torch.equal(jitter(images, params=params), out)  # exact replay
    assert torch.equal(jitter(images, params=jitter._params), out)  # Kornia's way
    a = jitter(images, generator=torch.Generator().manual_seed(0))  # reproducible draws
    b = jitter(images, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    assert torch.equal(PatchJitter.paper(16, p=0.0)(images), images)  # identity
    # [presets]
    print(f"paper preset: {jitter.ops}; params {params}")


def operators(images: torch.Tensor) -> None:
    # [operators]
    jitter = PatchJitter(
        16,
        [
            O.Brightness(0.4, p=0.8),  # factor in [0.6, 1.4] with probability 0.8, per patch
            O.Hue(0.1, p=0.8),  # shift in [-0.1, 0.1] turns
            O.Posterize((3, 6), p=0.3),
            O.GaussianBlur((0.1, 2.0), kernel_size=(5, 1), p=0.5),  # vertical blur
        ],
        p_patch=0.9,  # a patch is augmented at all with probability 0.9
        random_order=True,  # an independent order of the operators per patch
    )
    out, params = jitter(images, return_params=True)
    print(params.values["hue"].shape, params.gates["blur"].float().mean())  # (B, N), rate
    # [operators]
    assert out.shape == images.shape


# [custom]
class Invert(O.PatchOp):
    """A new operator is one class: its range, probability, formula and Kornia reference."""

    name = "invert"
    identity = 0.0  # an amount of 0 returns the patch bit for bit

    def __init__(self, amount: tuple[float, float] = (0.0, 1.0), p: float = 1.0) -> None:
        self.low, self.high = amount
        self.p = p

    def apply(self, patches, values, noise=None):  # (K, C, p, p), (K,)
        a = values.view(-1, 1, 1, 1)
        return patches * (1 - a) + (1 - patches) * a

    def reference(self, patches, values, noise=None):
        a = values.view(-1, 1, 1, 1)
        return kornia.enhance.add_weighted(patches, 1 - a, kornia.enhance.invert(patches), a, 0)
# [custom]


def custom_operator(images: torch.Tensor) -> None:
    # [use-custom]
    jitter = PatchJitter(16, [O.Brightness(0.4, p=0.8), Invert(p=0.3)])
    out = jitter(images)  # runs on the torch engine (the Triton kernel does not know Invert)
    # [use-custom]
    assert out.shape == images.shape


def pipelines(images: torch.Tensor) -> None:
    # [kornia]
    seq = K.AugmentationSequential(
        K.RandomHorizontalFlip(),
        PatchJitter.paper(16),
        data_keys=["input", "bbox_xyxy"],
    )
    boxes = torch.tensor([[[4.0, 4.0, 40.0, 30.0]]]).expand(images.shape[0], 1, 4)
    out, out_boxes = seq(images, boxes)  # boxes follow the flip, pass through PatchJitter
    again, _ = seq(images, boxes, params=seq._params)  # replays the whole pipeline
    assert torch.equal(again, out)
    # [kornia]
    # [torchvision]
    view = v2.Compose([
        v2.RandomResizedCrop(224, scale=(0.4, 1.0)),
        v2.RandomHorizontalFlip(),
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        PatchJitter.authors(16),  # on a (C, H, W) image, returns (C, H, W)
    ])
    photo = Image.fromarray((torch.rand(256, 320, 3) * 255).byte().numpy())
    x = view(photo)  # a tv_tensors.Image of 3 x 224 x 224
    # [torchvision]
    print(f"AugmentationSequential: {tuple(out.shape)}; torchvision v2: {tuple(x.shape)}")


def main() -> None:
    torch.manual_seed(0)
    images = torch.rand(4, 3, 64, 64)  # 4 images, a 4 x 4 grid of 16-pixel patches each
    presets_and_replay(images)
    operators(images)
    custom_operator(images)
    pipelines(images)


if __name__ == "__main__":
    main()
