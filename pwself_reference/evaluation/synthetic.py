"""A small Copydays-layout benchmark made from the photos scikit-image ships.

No public copy-detection set is reachable offline, so this builds one with the
same layout and the same kinds of attacks (for tests, docs and smoke runs):
``original/`` holds photos, ``strong/`` two strong attacks of each (crop +
rotation, blur, heavy JPEG, colour changes, in random combinations),
``jpegqual/<q>/`` and ``crops/<c>/`` one attack per original, and
``distractors/`` and ``whitening/`` hold crops of *other* photos.
Requires ``scikit-image``.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

__all__ = ["ORIGINAL_PHOTOS", "OTHER_PHOTOS", "make_copy_detection_benchmark"]

#: scikit-image photos used as originals (colour, distinct scenes).
ORIGINAL_PHOTOS = (
    "astronaut", "chelsea", "coffee", "rocket", "retina", "immunohistochemistry",
    "hubble_deep_field", "colorwheel", "camera", "coins", "moon", "clock",
)
#: photos whose crops become distractors and whitening images.
OTHER_PHOTOS = ("brick", "grass", "gravel", "page", "text", "cell", "logo", "cat")


def _photo(name: str):
    from PIL import Image
    from skimage import data

    arr = np.asarray(getattr(data, name)())
    if arr.dtype != np.uint8:
        arr = (255 * (arr.astype(np.float64) / max(float(arr.max()), 1e-9))).astype(np.uint8)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    return Image.fromarray(arr[..., :3]).convert("RGB")


def _jpeg(img, quality: int):
    from PIL import Image

    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    with Image.open(buf) as out:
        return out.convert("RGB")


def _crop(img, fraction: float, rng: np.random.Generator):
    w, h = img.size
    cw, ch = max(8, int(w * fraction)), max(8, int(h * fraction))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    return img.crop((x, y, x + cw, y + ch))


def _strong(img, rng: np.random.Generator):
    from PIL import ImageEnhance, ImageFilter

    out = _crop(img, float(rng.uniform(0.55, 0.8)), rng)
    out = out.rotate(float(rng.uniform(-20, 20)), expand=False)
    out = out.filter(ImageFilter.GaussianBlur(float(rng.uniform(1.0, 3.0))))
    out = ImageEnhance.Color(out).enhance(float(rng.uniform(0.2, 1.8)))
    out = ImageEnhance.Brightness(out).enhance(float(rng.uniform(0.6, 1.4)))
    out = ImageEnhance.Contrast(out).enhance(float(rng.uniform(0.6, 1.4)))
    arr = np.asarray(out).astype(np.float64)
    arr = arr * rng.uniform(0.7, 1.3, size=3)  # colour cast
    from PIL import Image

    out = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    return _jpeg(out, int(rng.integers(8, 20)))


def make_copy_detection_benchmark(
    root: str | os.PathLike[str],
    seed: int = 0,
    max_side: int = 160,
    n_strong: int = 2,
    n_distractors: int = 24,
    n_whitening: int = 64,
) -> Path:
    """Write a Copydays-layout benchmark under ``root`` and return ``root``.

    Parameters
    ----------
    root : path
        Output directory (created).
    seed : int
        Seeds every random attack.
    max_side : int
        Originals are shrunk so their longer side is at most this.
    n_strong : int
        Strong attacks per original.
    n_distractors, n_whitening : int
        Images in ``distractors/`` and ``whitening/`` (random crops of
        :data:`OTHER_PHOTOS` and flips/crops thereof).

    Examples
    --------
    Writes a few hundred small JPEG files (a few seconds)::

        import tempfile
        root = make_copy_detection_benchmark(tempfile.mkdtemp())
        sorted(p.name for p in root.iterdir())
        # ['crops', 'distractors', 'jpegqual', 'original', 'strong', 'whitening']
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    root = Path(root)
    dirs = {name: root / name for name in
            ("original", "strong", "jpegqual/10", "crops/50", "distractors", "whitening")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(ORIGINAL_PHOTOS):
        img = _photo(name)
        img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        stem = f"{1000 + i}00"
        img.save(dirs["original"] / f"{stem}.jpg", quality=95)
        for s in range(n_strong):
            _strong(img, rng).save(dirs["strong"] / f"{1000 + i}{s:02d}.jpg", quality=95)
        _jpeg(img, 10).save(dirs["jpegqual/10"] / f"{stem}.jpg", quality=100)
        _crop(img, 0.5 ** 0.5, rng).save(dirs["crops/50"] / f"{stem}.jpg", quality=95)
    others = [_photo(n) for n in OTHER_PHOTOS]
    for target, count in (("distractors", n_distractors), ("whitening", n_whitening)):
        for j in range(count):
            img = _crop(others[int(rng.integers(len(others)))], float(rng.uniform(0.3, 0.9)), rng)
            if rng.random() < 0.5:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
            img.save(dirs[target] / f"{j:05d}.jpg", quality=90)
    return root
