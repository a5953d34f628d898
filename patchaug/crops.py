"""Random resized crops that report where they came from.

Patch matching needs each view's crop box in source pixels and whether it was
mirrored. torchvision's ``RandomResizedCrop`` samples the box but never returns
it; the transforms here sample the same distribution and return the box.

Box convention: ``(x0, y0, x1, y1)`` in source-image pixels with ``x1 > x0`` and
``y1 > y0``; the crop covers columns ``x0 <= x < x1`` and rows ``y0 <= y < y1``.
Sampled boxes are integer-valued (as torchvision's), stored as float.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "sample_crop_boxes",
    "resized_crop_boxes",
    "batched_random_resized_crop",
    "BatchedRandomResizedCrop",
    "RandomResizedCropWithBox",
]

_ATTEMPTS = 10  # torchvision's number of tries before the central-crop fallback


def _check_range(value: object, name: str, positive: bool = True) -> tuple[float, float]:
    if (
        not isinstance(value, Sequence)
        or len(value) != 2
        or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in value)
    ):
        raise TypeError(f"{name} must be a (min, max) pair of numbers, got {value!r}")
    lo, hi = float(value[0]), float(value[1])
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi or (positive and lo <= 0):
        raise ValueError(f"{name} must satisfy 0 < min <= max < inf, got {value!r}")
    return lo, hi


def _check_size(size: object, name: str = "size") -> tuple[int, int]:
    if isinstance(size, numbers.Integral) and not isinstance(size, bool):
        size = (int(size), int(size))
    if (
        not isinstance(size, Sequence)
        or len(size) != 2
        or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in size)
    ):
        raise TypeError(f"{name} must be an int or an (height, width) pair of ints, got {size!r}")
    if size[0] <= 0 or size[1] <= 0:
        raise ValueError(f"{name} must be positive, got {tuple(size)}")
    return int(size[0]), int(size[1])


def _check_prob(p: object, name: str) -> float:
    if not isinstance(p, numbers.Real) or isinstance(p, bool):
        raise TypeError(f"{name} must be a number in [0, 1], got {p!r}")
    if not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {p!r}")
    return float(p)


def _uniform(shape, lo: float, hi: float, generator, device) -> torch.Tensor:
    u = torch.rand(shape, generator=generator, device=device, dtype=torch.float64)
    return lo + (hi - lo) * u


def sample_crop_boxes(
    n: int,
    height: int,
    width: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Draw ``n`` crop boxes as torchvision's ``RandomResizedCrop`` does.

    Area fraction uniform in ``scale``, log aspect ratio uniform in ``log(ratio)``,
    up to 10 tries per box, then the largest central crop within ``ratio``.
    All boxes are drawn at once (no loop over samples).

    Parameters
    ----------
    n : int
        Number of boxes.
    height, width : int
        Size of the source image in pixels.
    scale, ratio : (float, float)
        Area fraction and aspect ratio (width / height) ranges.
    generator : torch.Generator, optional
        Source of randomness (on ``device``).
    device : torch.device or str, optional
        Device of the result.

    Returns
    -------
    torch.Tensor
        ``(n, 4)`` float32 integer-valued boxes ``(x0, y0, x1, y1)``.

    Examples
    --------
    >>> g = torch.Generator().manual_seed(0)
    >>> boxes = sample_crop_boxes(3, 32, 32, (0.4, 1.0), generator=g)
    >>> boxes.shape, bool((boxes[:, 2] <= 32).all())
    (torch.Size([3, 4]), True)
    """
    if not isinstance(n, numbers.Integral) or isinstance(n, bool) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    height, width = _check_size((height, width), "(height, width)")
    s_lo, s_hi = _check_range(scale, "scale")
    r_lo, r_hi = _check_range(ratio, "ratio")
    if device is None and generator is not None:
        device = generator.device
    area = float(height * width)
    shape = (n, _ATTEMPTS)
    target = area * _uniform(shape, s_lo, s_hi, generator, device)
    aspect = torch.exp(_uniform(shape, math.log(r_lo), math.log(r_hi), generator, device))
    # torchvision rounds with Python's round (half to even), as torch.round does
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = ok.to(torch.int8).argmax(-1, keepdim=True)
    found = ok.any(-1)
    w = w.gather(-1, first).squeeze(-1)
    h = h.gather(-1, first).squeeze(-1)

    # fallback: whole image, clipped to the ratio range
    in_ratio = width / height
    if in_ratio < r_lo:
        fw, fh = width, int(round(width / r_lo))
    elif in_ratio > r_hi:
        fh = height
        fw = int(round(height * r_hi))
    else:
        fw, fh = width, height
    w = torch.where(found, w, torch.full_like(w, fw))
    h = torch.where(found, h, torch.full_like(h, fh))
    # offsets: uniform integers in [0, H - h] and [0, W - w] (central for the fallback)
    u = torch.rand((n, 2), generator=generator, device=device, dtype=torch.float64)
    top = torch.floor(u[:, 0] * (height - h + 1)).clamp(max=height - h)
    left = torch.floor(u[:, 1] * (width - w + 1)).clamp(max=width - w)
    top = torch.where(found, top, torch.full_like(top, (height - fh) // 2))
    left = torch.where(found, left, torch.full_like(left, (width - fw) // 2))
    return torch.stack([left, top, left + w, top + h], -1).to(torch.float32)


def _check_images(images: object, name: str = "images") -> torch.Tensor:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(images).__name__}")
    if images.dim() != 4:
        raise ValueError(f"{name} must have shape (B, C, H, W), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"{name} must be a floating point tensor, got dtype {images.dtype}")
    return images


def resized_crop_boxes(
    images: torch.Tensor,
    boxes: torch.Tensor,
    size: int | tuple[int, int],
    flips: torch.Tensor | None = None,
    *,
    mode: str = "bilinear",
) -> torch.Tensor:
    """Crop each image to its box, resize, and mirror where asked, in one pass.

    The output pixel ``(v, u)`` samples the source at
    ``x = x0 + (u + 0.5) * (x1 - x0) / w`` (pixel centres), so float boxes work
    and a box is reproduced exactly by its crop. No antialiasing: for strong
    downscaling prefer the per-image :class:`RandomResizedCropWithBox`.

    Parameters
    ----------
    images : torch.Tensor
        ``(B, C, H, W)`` floating point images.
    boxes : torch.Tensor
        ``(B, 4)`` boxes ``(x0, y0, x1, y1)`` in source pixels.
    size : int or (int, int)
        Output ``(h, w)``.
    flips : torch.Tensor, optional
        ``(B,)`` bool, mirror the crop horizontally.
    mode : {"bilinear", "nearest", "bicubic"}
        Interpolation of :func:`torch.nn.functional.grid_sample`.

    Returns
    -------
    torch.Tensor
        ``(B, C, h, w)`` crops, same dtype and device as ``images``.

    Examples
    --------
    >>> x = torch.arange(16.).view(1, 1, 4, 4)
    >>> resized_crop_boxes(x, torch.tensor([[0., 0., 2., 2.]]), 2, mode="nearest")
    tensor([[[[0., 1.],
              [4., 5.]]]])
    """
    images = _check_images(images)
    out_h, out_w = _check_size(size)
    if mode not in ("bilinear", "nearest", "bicubic"):
        raise ValueError(f"mode must be 'bilinear', 'nearest' or 'bicubic', got {mode!r}")
    b, _, height, width = images.shape
    if not isinstance(boxes, torch.Tensor) or boxes.shape != (b, 4):
        raise ValueError(f"boxes must be a ({b}, 4) tensor, got {getattr(boxes, 'shape', boxes)!r}")
    if flips is not None and (not isinstance(flips, torch.Tensor) or flips.dtype != torch.bool
                              or flips.shape != (b,)):
        raise TypeError(f"flips must be a ({b},) bool tensor, got {flips!r}")
    boxes = boxes.to(device=images.device, dtype=torch.float32)
    dtype = images.dtype if images.dtype in (torch.float32, torch.float64) else torch.float32
    col = torch.arange(out_w, device=images.device, dtype=dtype).expand(b, out_w)
    if flips is not None:  # mirrored output column u reads column w - 1 - u (exactly)
        col = torch.where(flips.to(images.device).unsqueeze(-1), out_w - 1 - col, col)
    u = (col + 0.5) / out_w
    v = (torch.arange(out_h, device=images.device, dtype=dtype) + 0.5) / out_h
    bx = boxes.to(dtype)
    x = bx[:, 0:1] + u * (bx[:, 2:3] - bx[:, 0:1])  # (B, w) source x of each column
    y = bx[:, 1:2] + v * (bx[:, 3:4] - bx[:, 1:2])  # (B, h)
    gx = 2 * x / width - 1  # align_corners=False: -1 and 1 are the image borders
    gy = 2 * y / height - 1
    grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), -1)
    out = F.grid_sample(images.to(dtype), grid, mode=mode, padding_mode="border", align_corners=False)
    return out.to(images.dtype)


def batched_random_resized_crop(
    images: torch.Tensor,
    size: int | tuple[int, int],
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip_p: float = 0.5,
    *,
    shared: bool = False,
    generator: torch.Generator | None = None,
    mode: str = "bilinear",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random resized crop + horizontal flip of a batch, returning boxes and flips.

    Parameters
    ----------
    images : torch.Tensor
        ``(B, C, H, W)`` floating point images on any device.
    size : int or (int, int)
        Output size ``(h, w)``.
    scale, ratio : (float, float)
        As torchvision's ``RandomResizedCrop``.
    flip_p : float
        Probability of a horizontal flip.
    shared : bool
        One box and flip for the whole batch (the paper's shortcut).
    generator : torch.Generator, optional
        Randomness source, on the images' device.
    mode : str
        Interpolation, see :func:`resized_crop_boxes`.

    Returns
    -------
    crops : torch.Tensor
        ``(B, C, h, w)``.
    boxes : torch.Tensor
        ``(B, 4)`` float32 ``(x0, y0, x1, y1)``.
    flips : torch.Tensor
        ``(B,)`` bool.

    Examples
    --------
    >>> x = torch.rand(4, 3, 32, 32)
    >>> crops, boxes, flips = batched_random_resized_crop(x, 16, (0.4, 1.0))
    >>> crops.shape, boxes.shape, flips.shape
    (torch.Size([4, 3, 16, 16]), torch.Size([4, 4]), torch.Size([4]))
    """
    images = _check_images(images)
    flip_p = _check_prob(flip_p, "flip_p")
    if not isinstance(shared, bool):
        raise TypeError(f"shared must be a bool, got {type(shared).__name__}")
    b, _, height, width = images.shape
    n = 1 if shared else b
    boxes = sample_crop_boxes(n, height, width, scale, ratio, generator=generator, device=images.device)
    flips = torch.rand(n, generator=generator, device=images.device) < flip_p
    if shared:
        boxes, flips = boxes.expand(b, 4).contiguous(), flips.expand(b).contiguous()
    crops = resized_crop_boxes(images, boxes, size, flips, mode=mode)
    return crops, boxes, flips


class BatchedRandomResizedCrop(nn.Module):
    """Module form of :func:`batched_random_resized_crop`.

    Examples
    --------
    >>> crop = BatchedRandomResizedCrop(96, scale=(0.05, 0.4))
    >>> crops, boxes, flips = crop(torch.rand(2, 3, 224, 224))
    >>> crops.shape
    torch.Size([2, 3, 96, 96])
    """

    def __init__(
        self,
        size: int | tuple[int, int],
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip_p: float = 0.5,
        *,
        shared: bool = False,
        mode: str = "bilinear",
    ) -> None:
        super().__init__()
        self.size = _check_size(size)
        self.scale = _check_range(scale, "scale")
        self.ratio = _check_range(ratio, "ratio")
        self.flip_p = _check_prob(flip_p, "flip_p")
        self.shared = shared
        self.mode = mode

    def forward(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return batched_random_resized_crop(
            images, self.size, self.scale, self.ratio, self.flip_p,
            shared=self.shared, generator=generator, mode=self.mode,
        )

    def extra_repr(self) -> str:
        return f"size={self.size}, scale={self.scale}, ratio={self.ratio}, flip_p={self.flip_p}, shared={self.shared}"


def _v2():
    from torchvision.transforms import v2  # torchvision is optional for patchaug

    return v2


class RandomResizedCropWithBox(nn.Module):
    """Per-image random resized crop + flip that returns ``(crop, box, flip)``.

    Samples like torchvision's ``RandomResizedCrop`` (see :func:`sample_crop_boxes`),
    crops and resizes with torchvision's ``resized_crop`` (antialiased), then
    mirrors with probability ``flip_p``. Works on PIL images and on ``(..., C, H, W)``
    tensors (or tv_tensors). As the first step of a ``torchvision.transforms.v2.Compose``
    its tuple flows through later v2 transforms: they change the crop and leave the
    plain box tensor and the flag untouched. Needs torchvision.

    Parameters
    ----------
    size : int or (int, int)
        Output ``(h, w)``.
    scale, ratio : (float, float)
        As torchvision's ``RandomResizedCrop``.
    interpolation : torchvision.transforms.InterpolationMode or str
        Resize interpolation (default bilinear, as torchvision).
    flip_p : float
        Probability of a horizontal flip.
    generator : torch.Generator, optional
        Randomness source (CPU); default: torch's global generator.

    Returns (when called)
    ---------------------
    crop
        Same type as the input, ``(..., C, h, w)``.
    box : torch.Tensor
        ``(4,)`` float32 ``(x0, y0, x1, y1)`` in the input's pixels.
    flip : bool
        Whether the crop was mirrored.

    Examples
    --------
    >>> t = RandomResizedCropWithBox(96, scale=(0.05, 0.4))
    >>> crop, box, flip = t(torch.rand(3, 224, 224))
    >>> crop.shape, box.shape, isinstance(flip, bool)
    (torch.Size([3, 96, 96]), torch.Size([4]), True)
    """

    def __init__(
        self,
        size: int | tuple[int, int],
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        interpolation: object = "bilinear",
        flip_p: float = 0.5,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        v2 = _v2()
        self.size = _check_size(size)
        self.scale = _check_range(scale, "scale")
        self.ratio = _check_range(ratio, "ratio")
        self.flip_p = _check_prob(flip_p, "flip_p")
        if isinstance(interpolation, str):
            try:
                interpolation = v2.InterpolationMode(interpolation.lower())
            except ValueError as err:
                raise ValueError(f"interpolation must be a torchvision InterpolationMode, got {interpolation!r}") from err
        if not isinstance(interpolation, v2.InterpolationMode):
            raise TypeError(f"interpolation must be a torchvision InterpolationMode, got {interpolation!r}")
        self.interpolation = interpolation
        self.generator = generator

    def forward(self, image):  # noqa: D102 - documented on the class
        v2 = _v2()
        F2 = v2.functional
        height, width = v2.query_size([image])
        box = sample_crop_boxes(1, height, width, self.scale, self.ratio, generator=self.generator)[0]
        flip = bool(torch.rand((), generator=self.generator) < self.flip_p)
        x0, y0, x1, y1 = (int(v) for v in box.tolist())
        crop = F2.resized_crop(image, y0, x0, y1 - y0, x1 - x0, list(self.size),
                               interpolation=self.interpolation, antialias=True)
        if flip:
            crop = F2.horizontal_flip(crop)
        return crop, box, flip

    def extra_repr(self) -> str:
        return (f"size={self.size}, scale={self.scale}, ratio={self.ratio}, "
                f"interpolation={self.interpolation.value}, flip_p={self.flip_p}")
