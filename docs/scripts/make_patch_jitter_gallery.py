"""Draw the PatchJitter gallery for docs/guides/patch_augmentation.rst.

One real photo (scikit-image's ``chelsea``, centre-cropped and resized to 224 x 224) under
each operator alone (probability 1 for that operator, the presets' ranges) and under each
preset, with the 16-pixel patch grid drawn. Writes ``docs/_static/figures/
patch_jitter_gallery.png``.

Run from the repository root: ``PYTHONPATH=. python docs/scripts/make_patch_jitter_gallery.py``.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from skimage import data  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from patchaug import operators as O  # noqa: E402
from patchaug.patch_jitter import PatchJitter  # noqa: E402

OUT = ROOT / "docs" / "_static" / "figures" / "patch_jitter_gallery.png"
PATCH = 16
SIZE = 224

# each operator alone, at probability 1, with the range the presets use
SOLO: dict[str, O.PatchOp] = {
    "brightness": O.Brightness(0.4),
    "contrast": O.Contrast(0.4),
    "saturation": O.Saturation(0.2),
    "hue": O.Hue(0.1),
    "grayscale": O.Grayscale(),
    "posterize": O.Posterize(3),
    "solarize": O.Solarize(0.5),
    "sharpness": O.Sharpness(2.0),
    "blur": O.GaussianBlur((0.1, 2.0)),
    "noise": O.GaussianNoise((0.0, 0.1)),
}
CAPTIONS = {
    "brightness": "brightness x[0.6, 1.4]",
    "contrast": "contrast x[0.6, 1.4]",
    "saturation": "saturation x[0.8, 1.2]",
    "hue": "hue +-0.1 turn",
    "grayscale": "grayscale",
    "posterize": "posterize 3 bits",
    "solarize": "solarize at 0.5",
    "sharpness": "sharpness 2",
    "blur": "blur sigma 0.1-2, 13x13",
    "noise": "noise std 0-0.1",
}


def photo() -> torch.Tensor:
    """``(3, 224, 224)`` float image in [0, 1]: the centre square of chelsea, resized."""
    img = torch.from_numpy(data.chelsea()).permute(2, 0, 1).float() / 255
    _, h, w = img.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    img = img[:, top : top + side, left : left + side]
    img = F.interpolate(img[None], size=(SIZE, SIZE), mode="bilinear", antialias=True)[0]
    return img.clamp(0, 1)


def solo(name: str) -> PatchJitter:
    return PatchJitter(PATCH, [SOLO[name]])


def with_grid(img: torch.Tensor) -> np.ndarray:
    """HWC array with a one-pixel dark line on the left and top edge of every patch."""
    arr = img.permute(1, 2, 0).numpy().copy()
    arr[::PATCH, :, :] = 0.5 * arr[::PATCH, :, :]
    arr[:, ::PATCH, :] = 0.5 * arr[:, ::PATCH, :]
    return arr


def main() -> None:
    x = photo()
    panels: list[tuple[str, torch.Tensor]] = [("original", x)]
    for i, name in enumerate(SOLO):
        g = torch.Generator().manual_seed(i)
        panels.append((CAPTIONS[name], solo(name)(x, generator=g)))
    g = torch.Generator().manual_seed(100)
    panels.append(("PatchJitter.paper(16)", PatchJitter.paper(PATCH)(x, generator=g)))
    panels.append(("PatchJitter.authors(16)", PatchJitter.authors(PATCH)(x, generator=g)))
    cols = 5
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.3 * cols, 2.5 * rows), dpi=100)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (title, img) in zip(axes.flat, panels):
        ax.imshow(with_grid(img), interpolation="nearest")
        ax.set_title(title, fontsize=8)
    fig.tight_layout(pad=0.4)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    # a 256-colour palette keeps the photo gallery well under 1 MB
    im = Image.open(buf).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    im.save(OUT, optimize=True)
    print(f"wrote {OUT} ({OUT.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
