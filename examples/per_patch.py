"""Any Kornia intensity augmentation, per ViT patch: PerPatch on random images.

Usage: python examples/per_patch.py [--seed 0]
"""

from __future__ import annotations

import argparse

import kornia.augmentation as K
import torch
from PIL import Image
from torchvision.transforms import v2

from patchaug.patch_ops import patchify
from patchaug.per_patch import PerPatch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seed", type=int, default=0, help="seed of torch's global generator")
    args = parser.parse_args()
    torch.manual_seed(args.seed)  # Kornia draws from torch's global generator
    images = torch.rand(4, 3, 64, 64)  # 4 images, a 4 x 4 grid of 16-pixel patches each

    # ColorJiggle, then a blur, each with its own draw for every one of the 64 patches
    aug = PerPatch(
        K.ColorJiggle(0.4, 0.4, 0.2, 0.1, p=0.8),
        K.RandomGaussianBlur((5, 5), (0.1, 2.0), p=0.5),
        patch_size=16,
    )
    out = aug(images)
    params = aug._params  # flat: "0.<ColorJiggle param>", "1.<blur param>", one row per patch
    factors = params["0.brightness_factor"]
    print(f"output {tuple(out.shape)}; brightness factor of the first 4 patches {factors[:4]}")
    print(f"patches blurred: {int(params['1.batch_prob'].sum())} of {factors.numel()}")

    # replay: the same parameters give the same output, bit for bit
    assert torch.equal(aug(images, params=params), out)

    # every patch's parameters apply to that patch alone: a change inside patch 5 of image 0
    # leaves every other output patch as it was
    edited = images.clone()
    edited[0, :, 16:32, 16:32] = 0.0  # patch 5 (row 1, column 1)
    changed = (patchify(aug(edited, params=params), 16) != patchify(out, 16)).flatten(1).any(1)
    print(f"patches changed by the edit: {changed.nonzero().flatten().tolist()}")
    assert changed.nonzero().flatten().tolist() == [5]

    # it is a Kornia augmentation: it composes in AugmentationSequential, boxes pass through,
    # and the container replays it
    seq = K.AugmentationSequential(
        K.RandomHorizontalFlip(p=1.0), aug, data_keys=["input", "bbox_xyxy"]
    )
    boxes = torch.tensor([[[8.0, 8.0, 40.0, 24.0]]]).expand(4, 1, 4)
    out_seq, boxes_seq = seq(images, boxes)
    again, _ = seq(images, boxes, params=seq._params)
    assert torch.equal(again, out_seq)
    print(f"AugmentationSequential: flipped box {boxes_seq[0, 0].tolist()}, replay exact")

    # [torchvision]
    view = v2.Compose([
        v2.RandomResizedCrop(224, scale=(0.4, 1.0)),
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        PerPatch(K.RandomPlanckianJitter(p=0.5), K.RandomEqualize(p=0.2), patch_size=16),
    ])
    photo = Image.fromarray((torch.rand(256, 320, 3) * 255).byte().numpy())
    x = view(photo)  # a tv_tensors.Image of 3 x 224 x 224
    # [torchvision]
    print(f"torchvision v2 on a PIL image: {type(x).__name__} {tuple(x.shape)}")


if __name__ == "__main__":
    main()
