"""Draw the matched patches of a global and a local crop of a real photo (docs figure).

Usage: python docs/scripts/make_matching_figure.py [--out docs/_static/figures]
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
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "_static" / "figures")
    parser.add_argument("--seed", type=int, default=3, help="seed of the crop sampler")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    photo = Image.fromarray(data.chelsea())  # 451 x 300 cat photo shipped with scikit-image
    g = torch.Generator().manual_seed(args.seed)
    glob = RandomResizedCropWithBox(224, scale=(0.4, 1.0), flip_p=1.0, generator=g)
    local = RandomResizedCropWithBox(96, scale=(0.05, 0.4), flip_p=0.0, generator=g)
    crop_g, box_g, flip_g = glob(photo)
    # keep drawing local crops until one overlaps the global crop well (for a readable figure)
    for _ in range(100):
        crop_l, box_l, flip_l = local(photo)
        m = match_patches(box_g, box_l, 14, 6, flip_g, flip_l)
        if int(m.num_valid) > 12:
            break
    for rule in ("half", "official", "centre"):
        m = match_patches(box_g, box_l, 14, 6, flip_g, flip_l, rule=rule)
        fig = draw_matches(crop_g, crop_l, 14, 6, m,
                           titles=(f"global 224 px, flip={flip_g}", f"local 96 px, rule={rule}"))
        fig.savefig(args.out / f"matching_{rule}.png", dpi=80)
    print(f"boxes: global {box_g.tolist()} flip={flip_g}, local {box_l.tolist()} flip={flip_l}")
    print(f"wrote {args.out}/matching_*.png")


if __name__ == "__main__":
    main()
