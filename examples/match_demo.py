"""Crop a real photo twice, match the patches of the two views and save the picture.

Usage: python examples/match_demo.py [--out outputs/match_demo.png] [--seed 0]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import torch
from PIL import Image
from skimage import data

from patchaug import RandomResizedCropWithBox, draw_matches, match_patches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("outputs/match_demo.png"), help="PNG to write")
    parser.add_argument("--seed", type=int, default=0, help="seed of the crop sampler")
    args = parser.parse_args()
    photo = Image.fromarray(data.astronaut())
    g = torch.Generator().manual_seed(args.seed)
    glob = RandomResizedCropWithBox(224, scale=(0.4, 1.0), generator=g)
    local = RandomResizedCropWithBox(96, scale=(0.05, 0.4), generator=g)
    crop_g, box_g, flip_g = glob(photo)
    crop_l, box_l, flip_l = local(photo)
    for rule in ("half", "official", "centre"):
        m = match_patches(box_g, box_l, 14, 6, flip_g, flip_l, rule=rule)
        print(f"{rule:>8}: {int(m.num_valid) - 1} patch pairs + CLS; first pairs {m.pairs()[1:5]}")
    m = match_patches(box_g, box_l, 14, 6, flip_g, flip_l)
    print(f"global box {box_g.tolist()} flip={flip_g}; local box {box_l.tolist()} flip={flip_l}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    draw_matches(crop_g, crop_l, 14, 6, m, titles=("global 224 px", "local 96 px")).savefig(args.out, dpi=80)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
