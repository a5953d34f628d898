"""Crops drawn on the device, all teacher-student matches of the step in one call.

DINO's multi-crop recipe (2 global views, 6 local ones here) cropped on the batch's device
with ``batched_random_resized_crop``; ``match_view_pairs`` then matches every global (teacher)
view with every other view at once: on CUDA one launch of the fused Triton kernel, on the CPU
the numpy engine. The result is checked against one ``match_patches`` call per pair.

Usage: python examples/device_matching.py [--device cuda]
"""

from __future__ import annotations

import argparse

import torch

from patchaug import batched_random_resized_crop, match_patches, match_view_pairs

PATCH = 16  # ViT patch size in pixels
N_GLOBAL, N_LOCAL = 2, 6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    device = torch.device(args.device)
    g = torch.Generator(device=device).manual_seed(args.seed)
    images = torch.rand(8, 3, 160, 160, device=device)

    views, boxes, flips = [], [], []
    for size, scale in [(96, (0.4, 1.0))] * N_GLOBAL + [(48, (0.05, 0.4))] * N_LOCAL:
        view, box, flip = batched_random_resized_crop(images, size, scale=scale, flip_p=0.5,
                                                      generator=g)
        views.append(view)
        boxes.append(box)
        flips.append(flip)
    boxes, flips = torch.stack(boxes), torch.stack(flips)  # (V, B, 4) source pixels, (V, B)
    grids = [(v.shape[-2] // PATCH, v.shape[-1] // PATCH) for v in views]

    # every (teacher i, student j != i) pair of the step
    pairs = [(i, j) for i in range(N_GLOBAL) for j in range(len(views)) if j != i]
    matches = match_view_pairs(boxes, flips, grids, pairs, rule="half")

    for (i, j), m in matches.items():
        one = match_patches(boxes[i], boxes[j], grids[i], grids[j], flips[i], flips[j])
        assert torch.equal(m.idx_a, one.idx_a) and torch.equal(m.valid, one.valid), (i, j)
    pairs_per_image = torch.stack([m.num_valid for m in matches.values()]).sum(0)
    print(f"{len(matches)} view pairs on {matches[pairs[0]].idx_a.device}; matched token pairs "
          f"per image (CLS included): {pairs_per_image.tolist()}")


if __name__ == "__main__":
    main()
