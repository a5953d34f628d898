"""Match the tokens of two Kornia views: boxes_from_kornia + match_patches.

Usage: python examples/kornia_views.py [--seed 0]
"""

from __future__ import annotations

import argparse

import kornia.augmentation as K
import torch

from patchaug.kornia_boxes import boxes_from_kornia
from patchaug.matching import match_patches

PATCH = 16  # ViT patch size in pixels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seed", type=int, default=0, help="seed of torch's global generator")
    args = parser.parse_args()
    torch.manual_seed(args.seed)  # Kornia draws from torch's global generator
    images = torch.rand(4, 3, 128, 160)

    # the usual GPU pipeline: a global and a local view, each a crop, a flip and colour changes
    # (the flip may come before or after the crop)
    global_view = K.AugmentationSequential(
        K.RandomResizedCrop((96, 96), scale=(0.4, 1.0)),
        K.RandomHorizontalFlip(),
        K.ColorJiggle(0.4, 0.4, 0.2, 0.1, p=0.8),
        data_keys=["input", "mask"],
    )
    local_view = K.AugmentationSequential(
        K.RandomHorizontalFlip(),
        K.RandomResizedCrop((48, 48), scale=(0.1, 0.4)),
        K.RandomGrayscale(p=0.2),
        data_keys=["input", "mask"],
    )
    # Only to check the result: a map of each pixel's source (x, y), which Kornia moves with
    # the images as a mask (geometric augmentations only, nearest resampling).
    ys, xs = torch.meshgrid(torch.arange(128.0), torch.arange(160.0), indexing="ij")
    coords = torch.stack([xs, ys])[None].expand(4, -1, -1, -1)
    view_g, g_coords = global_view(images, coords)
    view_l, l_coords = local_view(images, coords)

    box_g, flip_g = boxes_from_kornia(global_view._params)  # (4, 4) source pixels, (4,) bool
    box_l, flip_l = boxes_from_kornia(local_view._params)
    grid_g, grid_l = (96 // PATCH, 96 // PATCH), (48 // PATCH, 48 // PATCH)
    m = match_patches(box_g, box_l, grid_g, grid_l, flip_g, flip_l, rule="centre", cls=False)
    print(f"views {tuple(view_g.shape)} and {tuple(view_l.shape)}; global boxes {box_g.tolist()}")
    print(f"flips {flip_g.tolist()} / {flip_l.tolist()}; matched tokens per image {m.num_valid.tolist()}")

    # each token's source centre (mean of its pixels' source coordinates) and size
    def centres(c: torch.Tensor) -> torch.Tensor:  # (B, tokens, 2)
        return torch.nn.functional.avg_pool2d(c, PATCH).flatten(2).transpose(1, 2)

    cg, cl = centres(g_coords), centres(l_coords)
    size_g = (box_g[:, 2:] - box_g[:, :2]) / 96 * PATCH  # (B, 2) a patch in source pixels
    size_l = (box_l[:, 2:] - box_l[:, :2]) / 48 * PATCH
    for n in range(images.shape[0]):
        keep = m.valid[n]
        a, b = cg[n, m.idx_a[n, keep]], cl[n, m.idx_b[n, keep]]
        # "centre" pairs a token with the token of the other view that contains its centre
        limit = torch.maximum(size_g[n], size_l[n]) / 2 + 1
        assert bool(((a - b).abs() <= limit).all()), f"image {n}: matched tokens show other pixels"
    print("every matched pair of tokens shows the same source pixels")


if __name__ == "__main__":
    main()
