"""Random resized crops that report where they came from.

Patch matching needs each view's crop box in source pixels and whether it was
mirrored. torchvision's ``RandomResizedCrop`` samples the box but never returns
it; the transforms here sample the same distribution and return the box.

Box convention: ``(x0, y0, x1, y1)`` in source-image pixels with ``x1 > x0`` and
``y1 > y0``; the crop covers columns ``x0 <= x < x1`` and rows ``y0 <= y < y1``.
Sampled boxes are integer-valued (as torchvision's), stored as float.

With torchvision, :class:`RandomResizedCropWithBox` is a ``torchvision.transforms.v2``
transform whose output carries a :class:`CropBox` tv_tensor (box in source pixels, flip flag,
current view size) and a :class:`CropFlip` flag; kernels registered for both keep them right
through later v2 flips, resizes and crops, and make transforms they cannot describe raise.
"""

from __future__ import annotations

import functools
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
    "CropBox",
    "CropFlip",
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


def _check_generator(generator: object, device: torch.device | str | None = None) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if generator is not None and device is not None and generator.device.type != torch.device(device).type:
        raise ValueError(f"generator is on {generator.device} but the images are on {device}; "
                         "give a generator on the images' device")


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
    _check_generator(generator, device)
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


def _check_mode(mode: object) -> None:
    if mode not in ("bilinear", "nearest", "bicubic"):
        raise ValueError(f"mode must be 'bilinear', 'nearest' or 'bicubic', got {mode!r}")


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
        ``(B, 4)`` boxes ``(x0, y0, x1, y1)`` in source pixels: finite, ``x1 > x0``,
        ``y1 > y0``, overlapping the image (a part outside repeats the border pixels).
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
    _check_mode(mode)
    b, _, height, width = images.shape
    if not isinstance(boxes, torch.Tensor) or boxes.shape != (b, 4):
        raise ValueError(f"boxes must be a ({b}, 4) tensor, got {getattr(boxes, 'shape', boxes)!r}")
    if flips is not None and (not isinstance(flips, torch.Tensor) or flips.dtype != torch.bool
                              or flips.shape != (b,)):
        raise TypeError(f"flips must be a ({b},) bool tensor, got {flips!r}")
    _check_boxes_in_image(boxes, height, width)
    return _resized_crop(images, boxes, (out_h, out_w), flips, mode)


def _check_boxes_in_image(boxes: torch.Tensor, height: int, width: int) -> None:
    """Finite, non-empty boxes that overlap the image (one host sync, on the boxes only)."""
    if boxes.is_floating_point() or boxes.is_complex():
        bad = ~torch.isfinite(boxes).all(dim=1)
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise ValueError(f"boxes must be finite, box {i} is {boxes[i].tolist()}")
    bx = boxes.double()
    empty = (bx[:, 2] <= bx[:, 0]) | (bx[:, 3] <= bx[:, 1])
    if bool(empty.any()):
        i = int(empty.nonzero()[0])
        raise ValueError(f"boxes must have x1 > x0 and y1 > y0 (flips mirror, not reversed boxes), "
                         f"box {i} is {boxes[i].tolist()}")
    outside = (bx[:, 0] >= width) | (bx[:, 2] <= 0) | (bx[:, 1] >= height) | (bx[:, 3] <= 0)
    if bool(outside.any()):
        i = int(outside.nonzero()[0])
        raise ValueError(f"boxes must overlap the {height} x {width} image, box {i} is "
                         f"{boxes[i].tolist()}")


def _resized_crop(images: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int],
                  flips: torch.Tensor | None, mode: str) -> torch.Tensor:
    """:func:`resized_crop_boxes` on checked arguments (boxes drawn here need no check)."""
    b, _, height, width = images.shape
    out_h, out_w = size
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
    size = _check_size(size)
    _check_mode(mode)
    _check_generator(generator, images.device)
    b, _, height, width = images.shape
    n = 1 if shared else b
    boxes = sample_crop_boxes(n, height, width, scale, ratio, generator=generator, device=images.device)
    flips = torch.rand(n, generator=generator, device=images.device) < flip_p
    if shared:
        boxes, flips = boxes.expand(b, 4).contiguous(), flips.expand(b).contiguous()
    crops = _resized_crop(images, boxes, size, flips, mode)
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
        if not isinstance(shared, bool):
            raise TypeError(f"shared must be a bool, got {type(shared).__name__}")
        _check_mode(mode)
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


# --------------------------------------------------------------------------- torchvision v2
#
# torchvision is optional for patchaug: without it the v2 classes below still exist (so the
# package imports), but constructing them raises ImportError.
try:
    import PIL.Image
    from torch.utils._pytree import tree_flatten, tree_unflatten
    from torchvision import tv_tensors as _tv_tensors
    from torchvision.transforms import v2 as _tv2
    from torchvision.transforms.v2 import functional as _F2
    from torchvision.transforms.v2.functional._geometry import _compute_resized_output_size
except ImportError:  # pragma: no cover - exercised only without torchvision
    _tv2 = None
    _TVTensorBase: type = torch.Tensor
    _TransformBase: type = nn.Module
else:
    _TVTensorBase = _tv_tensors.TVTensor
    _TransformBase = _tv2.Transform


def _v2():
    if _tv2 is None:
        raise ImportError("this part of patchaug.crops needs torchvision (pip install torchvision)")
    return _tv2


def _check_canvas(canvas_size: object) -> tuple[int, int]:
    return _check_size(canvas_size, "canvas_size")


class CropBox(_TVTensorBase):
    """Where a view came from: its box in SOURCE pixels, its mirroring and its canvas size.

    A ``(4,)`` float tensor ``(x0, y0, x1, y1)`` in the pixels of the source image the view
    was cut from, with two pieces of metadata:

    ``flip`` (bool)
        The view is mirrored: its left edge shows source column ``x1``.
    ``canvas_size`` ((int, int))
        ``(height, width)`` of the view as it is now (after later resizes and crops).

    Mapping: view point ``(u, v)`` (continuous pixel coordinates of the view, pixel ``(r, c)``
    has its centre at ``(c + 0.5, r + 0.5)``) shows source point
    ``x = x0 + u * (x1 - x0) / W`` (``x = x1 - u * (x1 - x0) / W`` when ``flip``),
    ``y = y0 + v * (y1 - y0) / H`` with ``(H, W) = canvas_size``; see :meth:`to_source`.

    :class:`RandomResizedCropWithBox` creates it; kernels registered with torchvision keep it
    right through later v2 transforms: ``horizontal_flip`` toggles ``flip``; ``resize`` keeps the
    box and updates ``canvas_size``; ``crop`` / ``center_crop`` / ``resized_crop`` shrink the box
    to the source region of the sub-crop (mirrored interval when ``flip``); photometric ops,
    ``to_dtype`` and ``normalize`` pass it through; transforms it cannot describe
    (``vertical_flip``, ``rotate``, ``affine``, ``perspective``, ``elastic``, ``pad``, ``five_crop``,
    ``ten_crop``, and crops reaching outside the view, which pad) raise ``TypeError`` /
    ``ValueError`` naming the transform rather than leave a stale box.

    Torch ops on it return plain tensors (torchvision's tv_tensor rule), so it goes straight
    into :func:`patchaug.match_patches` as the box; :meth:`to_match` gives ``(box, flip)``.

    Parameters
    ----------
    data : array-like
        ``(4,)`` box ``(x0, y0, x1, y1)`` with ``x1 > x0`` and ``y1 > y0``.
    canvas_size : (int, int)
        ``(height, width)`` of the view.
    flip : bool
        Whether the view is mirrored.
    dtype : torch.dtype, optional
        Floating dtype (default: ``data``'s if floating, else float32).
    device : torch.device or str, optional
        Device.

    Examples
    --------
    >>> box = CropBox([10, 20, 50, 40], canvas_size=(10, 20), flip=True)
    >>> box.to_source(torch.tensor([[0.0, 0.0], [20.0, 10.0]])).tolist()
    [[50.0, 20.0], [10.0, 40.0]]
    >>> from torchvision.transforms.v2 import functional as F2
    >>> F2.crop(box, top=0, left=0, height=5, width=10)  # left half of a mirrored view
    CropBox([30., 20., 50., 30.], flip=True, canvas_size=(5, 10))
    """

    flip: bool
    canvas_size: tuple[int, int]

    @classmethod
    def _wrap(cls, tensor: torch.Tensor, *, flip: bool, canvas_size: tuple[int, int]) -> CropBox:
        out = tensor.as_subclass(cls)
        out.flip = bool(flip)
        out.canvas_size = (int(canvas_size[0]), int(canvas_size[1]))
        return out

    def __new__(
        cls,
        data: object,
        *,
        canvas_size: tuple[int, int],
        flip: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> CropBox:
        _v2()
        tensor = torch.as_tensor(data, dtype=dtype, device=device)
        if not tensor.is_floating_point():
            if dtype is not None:
                raise TypeError(f"dtype must be a floating point dtype, got {dtype}")
            tensor = tensor.to(torch.float32)
        if tensor.shape != (4,):
            raise ValueError(f"data must be a (4,) box (x0, y0, x1, y1), got shape {tuple(tensor.shape)}")
        x0, y0, x1, y1 = tensor.tolist()
        if not all(math.isfinite(v) for v in (x0, y0, x1, y1)) or x1 <= x0 or y1 <= y0:
            raise ValueError(f"data must be a finite box with x1 > x0 and y1 > y0, got {tensor.tolist()}")
        if not isinstance(flip, (bool, torch.Tensor)):
            raise TypeError(f"flip must be a bool, got {flip!r}")
        return cls._wrap(tensor, flip=bool(flip), canvas_size=_check_canvas(canvas_size))

    @classmethod
    def wrap(cls, tensor: torch.Tensor, like: CropBox, **kwargs: object) -> CropBox:
        """``tensor`` as a CropBox with ``like``'s metadata (overridden by ``kwargs``)."""
        return cls._wrap(tensor, flip=kwargs.get("flip", like.flip),
                         canvas_size=kwargs.get("canvas_size", like.canvas_size))

    @classmethod
    def _wrap_output(cls, output, args=(), kwargs=None):
        # clone / to / detach keep the type: restore the metadata from the first CropBox argument
        flat, _ = tree_flatten(tuple(args) + (tuple(kwargs.values()) if kwargs else ()))
        like = next((x for x in flat if isinstance(x, CropBox)), None)
        if like is None:  # no metadata to copy: a plain tensor is the honest result
            return output
        if isinstance(output, torch.Tensor):
            return cls.wrap(output, like)
        if isinstance(output, (tuple, list)):
            return type(output)(cls.wrap(part, like) for part in output)
        return output

    def __repr__(self, *, tensor_contents: object = None) -> str:  # type: ignore[override]
        return self._make_repr(flip=self.flip, canvas_size=self.canvas_size)

    def to_match(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``(box, flip)`` pair :func:`patchaug.match_patches` takes.

        Returns
        -------
        box : torch.Tensor
            ``(4,)`` plain tensor ``(x0, y0, x1, y1)`` in source pixels.
        flip : torch.Tensor
            ``()`` bool tensor.
        """
        plain = self.as_subclass(torch.Tensor)
        return plain.clone(), torch.tensor(self.flip, device=plain.device)

    def to_source(self, points: torch.Tensor) -> torch.Tensor:
        """Map view coordinates to source coordinates.

        Parameters
        ----------
        points : torch.Tensor
            ``(..., 2)`` points ``(u, v)`` in view pixels (column, row; pixel centres at ``+0.5``).

        Returns
        -------
        torch.Tensor
            ``(..., 2)`` float64 points ``(x, y)`` in source pixels.
        """
        if not isinstance(points, torch.Tensor) or points.shape[-1:] != (2,):
            raise ValueError(f"points must be a (..., 2) tensor, got {getattr(points, 'shape', points)!r}")
        x0, y0, x1, y1 = self.as_subclass(torch.Tensor).double().tolist()
        h, w = self.canvas_size
        p = points.as_subclass(torch.Tensor).double()
        u, v = p[..., 0], p[..., 1]
        x = x1 - u * (x1 - x0) / w if self.flip else x0 + u * (x1 - x0) / w
        y = y0 + v * (y1 - y0) / h
        return torch.stack([x, y], -1)


class CropFlip(_TVTensorBase):
    """``()`` bool tensor: the flip flag of a view, kept right by the same kernels as :class:`CropBox`.

    It is the third item of :class:`RandomResizedCropWithBox`'s ``(crop, box, flip)`` output, so
    that code written for the old ``(crop, box, bool)`` return keeps working and sees later
    ``v2.RandomHorizontalFlip`` s; ``bool(flip)`` gives the Python value. It always equals
    ``box.flip`` of the same sample.
    """

    def __new__(cls, data: object, *, device: torch.device | str | None = None) -> CropFlip:
        _v2()
        tensor = torch.as_tensor(data, device=device)
        if tensor.shape != () or tensor.dtype != torch.bool:
            raise TypeError(f"data must be a 0-d bool (a flip flag), got {data!r}")
        return tensor.as_subclass(cls)

    def __format__(self, format_spec: str) -> str:
        # print / f-strings show it as the bool it replaces ("True", not "CropFlip(True)")
        return format(bool(self), format_spec)


# ----- kernels ----------------------------------------------------------------------------

#: Geometric functionals a CropBox cannot describe: name -> an example v2 transform that calls it.
_UNSUPPORTED = {
    "vertical_flip": "v2.RandomVerticalFlip",
    "rotate": "v2.RandomRotation",
    "affine": "v2.RandomAffine",
    "perspective": "v2.RandomPerspective",
    "elastic": "v2.ElasticTransform",
    "pad": "v2.Pad / v2.RandomCrop(padding=...) / v2.RandomZoomOut",
    "five_crop": "v2.FiveCrop",
    "ten_crop": "v2.TenCrop",
}

#: Functionals that leave the geometry alone (photometric, dtype, normalisation).
_PASSTHROUGH = (
    "to_dtype", "normalize", "adjust_brightness", "adjust_contrast", "adjust_saturation",
    "adjust_hue", "adjust_gamma", "adjust_sharpness", "rgb_to_grayscale", "grayscale_to_rgb",
    "autocontrast", "equalize", "invert", "posterize", "solarize", "permute_channels",
    "gaussian_blur", "gaussian_noise", "jpeg", "erase",
)


def _unsupported_kernel(name: str, example: str):
    def kernel(inpt, *args, **kwargs):
        raise TypeError(
            f"{name} (e.g. {example}) cannot be applied after RandomResizedCropWithBox: a "
            f"{type(inpt).__name__} only describes axis-aligned crops, resizes and horizontal "
            f"flips, so the box would go stale. Apply {name} before the crop, or drop the box."
        )

    kernel.__name__ = f"_cropbox_{name}_unsupported"
    return kernel


def _passthrough_kernel(inpt, *args, **kwargs):
    return inpt


def _flip_kernel(inpt):
    if isinstance(inpt, CropBox):
        return CropBox.wrap(inpt.as_subclass(torch.Tensor).clone(), inpt, flip=not inpt.flip)
    return torch.logical_not(inpt.as_subclass(torch.Tensor)).as_subclass(CropFlip)


def _crop_box(box: CropBox, top: int, left: int, height: int, width: int, name: str = "crop") -> CropBox:
    """The sub-view rows ``[top, top + height)``, columns ``[left, left + width)`` of ``box``."""
    h, w = box.canvas_size
    top, left, height, width = (int(v) for v in (top, left, height, width))
    if height <= 0 or width <= 0:
        raise ValueError(f"{name}: height and width must be positive, got {(height, width)}")
    if top < 0 or left < 0 or top + height > h or left + width > w:
        # torchvision pads the part outside the view with fill: no source box describes that
        raise ValueError(
            f"{name}: the crop rows [{top}, {top + height}) x columns [{left}, {left + width}) reach "
            f"outside the {h}x{w} view, which pads it; a CropBox cannot describe padding"
        )
    b = box.as_subclass(torch.Tensor)
    x0, y0, x1, y1 = b.double().tolist()
    sx, sy = (x1 - x0) / w, (y1 - y0) / h
    if box.flip:  # view column u shows source x1 - u * sx: the columns map to a mirrored interval
        nx0, nx1 = x1 - (left + width) * sx, x1 - left * sx
    else:
        nx0, nx1 = x0 + left * sx, x0 + (left + width) * sx
    ny0, ny1 = y0 + top * sy, y0 + (top + height) * sy
    new = torch.tensor([nx0, ny0, nx1, ny1], dtype=torch.float64, device=b.device).to(b.dtype)
    return CropBox.wrap(new, box, canvas_size=(height, width))


def _crop_kernel(inpt, top: int, left: int, height: int, width: int):
    if isinstance(inpt, CropFlip):
        return inpt
    return _crop_box(inpt, top, left, height, width)


def _resize_kernel(inpt, size, interpolation=None, max_size=None, antialias=True):
    if isinstance(inpt, CropFlip):
        return inpt
    new = _compute_resized_output_size(inpt.canvas_size, size=size, max_size=max_size)
    return CropBox.wrap(inpt.as_subclass(torch.Tensor).clone(), inpt, canvas_size=tuple(new))


def _center_crop_kernel(inpt, output_size):
    if isinstance(inpt, CropFlip):
        return inpt
    if isinstance(output_size, numbers.Number):
        output_size = [int(output_size)] * 2
    elif isinstance(output_size, (tuple, list)) and len(output_size) == 1:
        output_size = [output_size[0]] * 2
    ch, cw = (int(v) for v in output_size)
    h, w = inpt.canvas_size
    # torchvision's anchor (_center_crop_compute_crop_anchor)
    top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
    return _crop_box(inpt, top, left, ch, cw, "center_crop")


def _resized_crop_kernel(inpt, top, left, height, width, size, interpolation=None, antialias=True):
    if isinstance(inpt, CropFlip):
        return inpt
    box = _crop_box(inpt, top, left, height, width, "resized_crop")
    return _resize_kernel(box, size)


def _register_kernels() -> None:
    for cls in (CropBox, CropFlip):
        reg = functools.partial(_F2.register_kernel, tv_tensor_cls=cls)
        reg(_F2.horizontal_flip)(_flip_kernel)
        reg(_F2.crop)(_crop_kernel)
        reg(_F2.resize)(_resize_kernel)
        reg(_F2.center_crop)(_center_crop_kernel)
        reg(_F2.resized_crop)(_resized_crop_kernel)
        for name, example in _UNSUPPORTED.items():
            if hasattr(_F2, name):  # older torchvision may lack some
                reg(getattr(_F2, name))(_unsupported_kernel(name, example))
        for name in _PASSTHROUGH:
            if hasattr(_F2, name):
                reg(getattr(_F2, name))(_passthrough_kernel)


if _tv2 is not None:
    _register_kernels()


# ----- the transform ----------------------------------------------------------------------


class RandomResizedCropWithBox(_TransformBase):
    """torchvision v2 random resized crop + horizontal flip that also outputs where the crop came from.

    Samples the box like torchvision's ``RandomResizedCrop`` (see :func:`sample_crop_boxes`),
    crops and resizes every image-like input of the sample with ``F.resized_crop`` (masks and
    bounding boxes too), then mirrors with probability ``flip_p``. Accepts PIL images, plain
    ``(..., C, H, W)`` tensors and tv_tensors, alone or in samples, inside ``v2.Compose``.

    Output convention (box = :class:`CropBox`, flip = :class:`CropFlip`, both tv_tensors that
    later v2 transforms keep right, see :class:`CropBox`):

    - a single image ``img`` gives ``(crop, box, flip)`` (unchanged from the old return; ``box``
      and ``flip`` work directly as :func:`patchaug.match_patches` arguments, and a DataLoader
      collates them into plain ``(B, 4)`` boxes and ``(B,)`` bool flips);
    - a tuple or list sample ``(img, *rest)``, e.g. ``(img, label)``, gives
      ``(crop, box, flip, *rest)`` (the image must come first);
    - a dict sample gets two new keys, ``"box"`` and ``"flip"``;
    - a sample that already holds a :class:`CropBox` (a second crop in the pipeline) keeps its
      structure: its box and flip are updated, no new ones are added;
    - any other container ``s`` gives ``(s_transformed, box, flip)``.

    ``box.flip`` and ``bool(flip)`` always agree. ``v2.ToPureTensor`` turns both into plain
    tensors (values kept, metadata dropped).

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
    antialias : bool
        Antialiased downscaling (bilinear / bicubic), as torchvision's ``antialias``.

    Examples
    --------
    >>> from torchvision.transforms import v2
    >>> t = v2.Compose([RandomResizedCropWithBox(96, scale=(0.05, 0.4), flip_p=0.0),
    ...                 v2.RandomHorizontalFlip(p=1.0), v2.ToDtype(torch.float32)])
    >>> crop, box, flip = t(torch.rand(3, 224, 224, dtype=torch.float64))
    >>> crop.shape, crop.dtype, bool(flip), box.flip, box.canvas_size
    (torch.Size([3, 96, 96]), torch.float32, True, True, (96, 96))
    >>> crop, box, flip, label = t(torch.rand(3, 224, 224), 7)
    >>> label
    7
    """

    def __init__(
        self,
        size: int | tuple[int, int],
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        interpolation: object = "bilinear",
        flip_p: float = 0.5,
        generator: torch.Generator | None = None,
        *,
        antialias: bool = True,
    ) -> None:
        v2 = _v2()
        super().__init__()
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
        if not isinstance(antialias, bool):
            raise TypeError(f"antialias must be a bool, got {antialias!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        self.interpolation = interpolation
        self.antialias = antialias
        self.generator = generator

    def make_params(self, flat_inputs: list) -> dict:
        """Sample the box (in the input's pixels) and the flip."""
        height, width = _tv2.query_size(flat_inputs)
        # same draws, in the same order, as before this class was a v2.Transform
        box = sample_crop_boxes(1, height, width, self.scale, self.ratio, generator=self.generator)[0]
        flip = bool(torch.rand((), generator=self.generator) < self.flip_p)
        return {"box": box, "flip": flip}

    def transform(self, inpt: object, params: dict) -> object:
        """Crop, resize and maybe mirror one input (image, mask, boxes, CropBox, ...)."""
        x0, y0, x1, y1 = (int(v) for v in params["box"].tolist())
        out = self._call_kernel(
            _F2.resized_crop, inpt, top=y0, left=x0, height=y1 - y0, width=x1 - x0,
            size=list(self.size), interpolation=self.interpolation, antialias=self.antialias,
        )
        if params["flip"]:
            out = self._call_kernel(_F2.horizontal_flip, out)
        return out

    def forward(self, *inputs: object) -> object:
        """Apply to a sample; see the class docstring for the output convention."""
        sample = inputs if len(inputs) > 1 else inputs[0]
        flat, spec = tree_flatten(sample)
        self.check_inputs(flat)
        needs = self._needs_transform_list(flat)
        todo = [x for x, n in zip(flat, needs) if n]
        boxes = [x for x in todo if isinstance(x, CropBox)]
        if boxes:  # a box that does not describe this image would be updated into nonsense
            size = _tv2.query_size(todo)
            stale = [b.canvas_size for b in boxes if b.canvas_size != size]
            if stale:
                raise ValueError(f"the sample's CropBox canvas_size {stale[0]} differs from its image size {size}")
        params = self.make_params(todo)
        out = tree_unflatten([self.transform(x, params) if n else x for x, n in zip(flat, needs)], spec)
        if boxes:
            return out  # already boxed: the registered kernels updated box and flip
        box = CropBox(params["box"], canvas_size=self.size, flip=params["flip"])
        flip = CropFlip(torch.tensor(params["flip"]))
        if isinstance(out, dict):
            clash = {"box", "flip"} & set(out)
            if clash:
                raise ValueError(f"the dict sample already has key(s) {sorted(clash)}, which the crop adds")
            return {**out, "box": box, "flip": flip}
        if type(out) in (tuple, list):
            if not out or not isinstance(out[0], (torch.Tensor, PIL.Image.Image)):
                raise TypeError(
                    "a tuple or list sample must start with the image, e.g. (image, label); "
                    f"got first item {type(out[0]).__name__ if out else None}"
                )
            return type(out)([out[0], box, flip, *out[1:]])
        return out, box, flip

    def extra_repr(self) -> str:
        return (f"size={self.size}, scale={self.scale}, ratio={self.ratio}, "
                f"interpolation={self.interpolation.value}, flip_p={self.flip_p}, antialias={self.antialias}")

