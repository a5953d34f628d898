"""Two views through torchvision v2 pipelines, then patch matching on their CropBoxes.

``RandomResizedCropWithBox`` is a v2 transform whose output carries a ``CropBox`` (the view's
box in source pixels plus its flip flag); later ``v2.RandomHorizontalFlip`` / ``v2.ToDtype``
keep it right, so ``match_patches`` gets the true geometry. The sample also carries an image
of source coordinates, cropped and flipped with the photo, to check that every matched token
pair shows the same part of the source.

Run: ``python examples/crops_v2.py`` (a few seconds on CPU, no downloads).
"""

from __future__ import annotations

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from patchaug import match_patches
from patchaug.crops import RandomResizedCropWithBox

PATCH = 16


def source_images(height: int, width: int) -> tuple[tv_tensors.Image, tv_tensors.Image]:
    """A photo (skimage's astronaut, else noise) and a 2-channel image of pixel-centre (x, y)."""
    try:
        from skimage import data

        photo = torch.from_numpy(data.astronaut()).permute(2, 0, 1)[:, :height, :width].contiguous()
    except ImportError:  # scikit-image is optional: any picture does
        photo = torch.randint(0, 256, (3, height, width), dtype=torch.uint8)
    y, x = torch.meshgrid(torch.arange(height, dtype=torch.float64) + 0.5,
                          torch.arange(width, dtype=torch.float64) + 0.5, indexing="ij")
    return tv_tensors.Image(photo), tv_tensors.Image(torch.stack([x, y]))


def patch_centres_seen(coords: torch.Tensor) -> torch.Tensor:
    """``(rows * cols, 2)`` mean source (x, y) shown by each patch, row-major as the tokens."""
    c, h, w = coords.shape
    grid = coords.as_subclass(torch.Tensor).double().reshape(c, h // PATCH, PATCH, w // PATCH, PATCH)
    return grid.mean((2, 4)).flatten(1).T


def main() -> None:
    torch.manual_seed(0)
    photo, coords = source_images(512, 512)
    views = {
        "global": v2.Compose([RandomResizedCropWithBox(224, scale=(0.4, 1.0), flip_p=0.0),
                              v2.RandomHorizontalFlip(p=0.5), v2.ToDtype(torch.float32, scale=True)]),
        "local": v2.Compose([RandomResizedCropWithBox(96, scale=(0.05, 0.4), flip_p=0.0),
                             v2.RandomHorizontalFlip(p=1.0), v2.ToDtype(torch.float32, scale=True)]),
    }
    out = {}
    for name, pipeline in views.items():
        # sample (image, *rest) -> (crop, box, flip, *rest): the coordinates ride along as `rest`
        crop, box, flip, seen = pipeline(photo, coords)
        out[name] = (crop, box, flip, patch_centres_seen(seen))
        print(f"{name:>6}: {tuple(crop.shape)} {crop.dtype}, box {[round(v) for v in box.tolist()]}, "
              f"flip={flip}, canvas {box.canvas_size}")

    (crop_g, box_g, flip_g, seen_g), (crop_l, box_l, flip_l, seen_l) = out["global"], out["local"]
    rows_g, rows_l = crop_g.shape[-2] // PATCH, crop_l.shape[-2] // PATCH
    # "centre": each patch is paired with the other view's patch containing its centre
    m = match_patches(box_g, box_l, rows_g, rows_l, flip_g, flip_l, rule="centre")
    pairs = torch.tensor(m.pairs()[1:])  # drop (CLS, CLS)
    assert len(pairs) > 0, "the two views do not overlap; try another seed"
    gap = (seen_g[pairs[:, 0] - 1] - seen_l[pairs[:, 1] - 1]).abs().max()
    # paired patches' centres are at most half a (larger) patch apart in source pixels
    patch_src = max(float(box[i + 2] - box[i]) / rows for box, rows in ((box_g, rows_g), (box_l, rows_l))
                    for i in (0, 1))
    print(f"{len(pairs)} matched patch pairs; largest centre gap {gap:.1f} source px "
          f"(patches span up to {patch_src:.1f} px)")
    assert gap <= 0.5 * patch_src + 1.0

    # what the old pipeline reported (flip never updated): the same pairs land far apart
    stale = match_patches(box_g, box_l, rows_g, rows_l, flip_g, False, rule="centre")
    stale_pairs = torch.tensor(stale.pairs()[1:])
    stale_gap = (seen_g[stale_pairs[:, 0] - 1] - seen_l[stale_pairs[:, 1] - 1]).abs().max()
    print(f"with the local view's flip ignored, the largest gap would be {stale_gap:.1f} px")
    assert stale_gap > gap


if __name__ == "__main__":
    main()
