"""Batched per-patch photometric operators (the functional core of :class:`PatchJitter`).

Every operator here works on a batch of patches laid out as ``(K, C, p, p)`` (one row per
patch, ``C`` in ``{1, 3}``) with one parameter per patch, shape ``(K,)``. Parameters are
drawn elsewhere (:class:`patchaug.PatchJitter`); the functions only apply them. Each
operator reads nothing but its own patch: blur and sharpness pad *inside* the patch, so a
patch's output depends only on that patch and its own parameter.

Each function reproduces a reference functional op applied to every patch on its own, and
the tests check that within ``1e-5``:

================  =========================================================================
function          reference (applied to a single ``(1, C, p, p)`` patch)
================  =========================================================================
brightness        ``kornia.enhance.adjust_brightness_accumulative`` (torchvision's multiply)
contrast          ``kornia.enhance.adjust_contrast_with_mean_subtraction`` (patch mean)
saturation        ``kornia.enhance.adjust_saturation_with_gray_subtraction``
hue               ``kornia.enhance.adjust_hue(x, 2 * pi * factor)`` (factor in turns)
grayscale         ``kornia.color.rgb_to_grayscale`` repeated to 3 channels
solarize          ``kornia.enhance.solarize(x, threshold)``
gaussian_blur     ``kornia.filters.gaussian_blur2d(x, kernel_size, (s, s), "reflect")``
gaussian_noise    ``clamp(x + std * noise, 0, 1)``
posterize         ``kornia.enhance.posterize(x, bits)``
sharpness         ``kornia.enhance.sharpness(x, factor)``
================  =========================================================================

The functions here are not calls to Kornia: each is written to work in place (so that a
gated subset can be updated without extra copies) or to avoid a slow path of Kornia's op on
many tiny images: hue skips the HSV round trip, blur is two batched ``p x p`` matrix products
with per-patch matrices, sharpness and posterize avoid per-call convolutions and integer
casts. ``benchmarks/results/patch_jitter.md`` times each one against Kornia's.

Examples
--------
>>> import torch
>>> from patchaug.patch_ops import patchify, unpatchify, hue
>>> images = torch.rand(2, 3, 32, 32)
>>> patches = patchify(images, 16)                       # (8, 3, 16, 16)
>>> shifted = hue(patches, torch.full((8,), 0.25))
>>> unpatchify(shifted, 2, 32, 32).shape
torch.Size([2, 3, 32, 32])
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor

__all__ = [
    "patchify",
    "unpatchify",
    "brightness",
    "contrast",
    "saturation",
    "hue",
    "hue_offsets",
    "hue_with_offsets",
    "grayscale",
    "solarize",
    "gaussian_blur",
    "blur_matrices",
    "blur_with_matrices",
    "gaussian_kernel1d",
    "gaussian_noise",
    "posterize",
    "sharpness",
]

# ITU-R BT.601 luma weights, as kornia.color.rgb_to_grayscale and torchvision use.
_GRAY_WEIGHTS = (0.299, 0.587, 0.114)
# On one CPU thread, multi-pass operators run in blocks of this many pixels per plane
# (128 KiB of float32), which keeps their temporaries in cache.
_CPU_BLOCK_PIXELS = 1 << 15
# On several threads, blocks of at most this many pixels per plane (512 KiB of float32).
_CPU_LARGE_BLOCK_PIXELS = 1 << 17


# --------------------------------------------------------------------------------------------
# layout
# --------------------------------------------------------------------------------------------
def patchify(
    images: Tensor,
    patch_size: int,
    dtype: torch.dtype | None = None,
    *,
    out: Tensor | None = None,
) -> Tensor:
    """Cut images into non-overlapping square patches, one row per patch.

    Parameters
    ----------
    images : Tensor
        ``(B, C, H, W)`` with ``H`` and ``W`` multiples of ``patch_size``.
    patch_size : int
        Side ``p`` of a patch in pixels.
    dtype : torch.dtype, optional
        dtype of the copy (default: that of ``images``, or of ``out``).
    out : Tensor, optional
        Contiguous ``(B * N, C, p, p)`` tensor to write into (its dtype wins over ``dtype``),
        e.g. a buffer reused for successive blocks of images.

    Returns
    -------
    Tensor
        ``(B * N, C, p, p)`` new contiguous tensor (never a view of ``images``), or ``out``;
        ``N = (H // p) * (W // p)``; patch ``n`` of image ``b`` is row ``b * N + n`` and
        patches are numbered row-major (ViT token order).

    Examples
    --------
    >>> import torch
    >>> patchify(torch.rand(2, 3, 32, 48), 16).shape
    torch.Size([12, 3, 16, 16])
    """
    b, c, h, w = images.shape
    if h % patch_size or w % patch_size:
        raise ValueError(
            f"images: height and width must be multiples of patch_size={patch_size}, got {h}x{w}"
        )
    gh, gw = h // patch_size, w // patch_size
    shape = (b * gh * gw, c, patch_size, patch_size)
    if out is None:
        out = images.new_empty(shape, dtype=dtype)
    elif tuple(out.shape) != shape or not out.is_contiguous():
        raise ValueError(
            f"out: expected a contiguous tensor of shape {shape}, got {tuple(out.shape)}"
        )
    src = images.reshape(b, c, gh, patch_size, gw, patch_size).permute(0, 2, 4, 1, 3, 5)
    out.view(b, gh, gw, c, patch_size, patch_size).copy_(src)
    return out


def unpatchify(
    patches: Tensor,
    batch: int,
    height: int,
    width: int,
    dtype: torch.dtype | None = None,
    *,
    out: Tensor | None = None,
) -> Tensor:
    """Inverse of :func:`patchify`.

    Parameters
    ----------
    patches : Tensor
        ``(B * N, C, p, p)``.
    batch, height, width : int
        ``B``, ``H`` and ``W`` of the image batch to rebuild.
    dtype : torch.dtype, optional
        dtype of the result (default: that of ``patches``, or of ``out``).
    out : Tensor, optional
        ``(B, C, H, W)`` tensor to write into; any layout whose last two dimensions can be
        split into patch rows and columns by ``view``, e.g. a slice of rows of a contiguous
        batch.

    Returns
    -------
    Tensor
        ``(B, C, H, W)``, a new contiguous tensor, or ``out``.

    Examples
    --------
    >>> import torch
    >>> x = torch.rand(2, 1, 32, 16)
    >>> torch.equal(unpatchify(patchify(x, 16), 2, 32, 16), x)
    True
    """
    _, c, p, _ = patches.shape
    gh, gw = height // p, width // p
    if out is None:
        out = patches.new_empty((batch, c, height, width), dtype=dtype)
    elif tuple(out.shape) != (batch, c, height, width):
        raise ValueError(
            f"out: expected shape {(batch, c, height, width)}, got {tuple(out.shape)}"
        )
    src = patches.reshape(batch, gh, gw, c, p, p).permute(0, 3, 1, 4, 2, 5)
    out.view(batch, c, gh, p, gw, p).copy_(src)
    return out


def cpu_block_patches(x: Tensor) -> int:
    """Patches per block for multi-pass operators.

    On one CPU thread, blocks whose planes stay in cache (``_CPU_BLOCK_PIXELS`` pixels per
    plane). On several CPU threads every op is a parallel region whose synchronisation costs
    more than the cache saves (much more when other processes compete for the cores), so the
    blocks are only capped (``_CPU_LARGE_BLOCK_PIXELS``) to keep scratch buffers small enough
    for the C allocator to reuse them instead of mapping fresh pages on every call. On a GPU,
    all patches at once.
    """
    if x.device.type != "cpu":
        return max(1, x.shape[0])
    pixels = _CPU_BLOCK_PIXELS if torch.get_num_threads() == 1 else _CPU_LARGE_BLOCK_PIXELS
    return max(1, pixels // (x.shape[-2] * x.shape[-1]))


def _scratch(work: Tensor | None, shape: tuple[int, ...], like: Tensor, skip: int = 0) -> Tensor:
    """A tensor of ``shape`` for temporaries, in ``like``'s dtype and device.

    A view of the flat ``work`` buffer from element ``skip`` on, when one is given (callers
    that run many blocks reuse one buffer instead of allocating every time); else new.
    """
    numel = 1
    for size in shape:
        numel *= size
    if work is None:
        return like.new_empty(shape)
    if not isinstance(work, Tensor):
        raise TypeError(f"work: expected a tensor or None, got {type(work).__name__}")
    if work.dtype != like.dtype or work.device != like.device or not work.is_contiguous():
        raise ValueError(
            f"work: expected a contiguous {like.dtype} tensor on {like.device}, got "
            f"{work.dtype} on {work.device}"
        )
    if work.numel() < skip + numel:
        raise ValueError(f"work: expected at least {skip + numel} elements, got {work.numel()}")
    return work.view(-1)[skip : skip + numel].view(shape)


def _col(values: Tensor, like: Tensor) -> Tensor:
    """Per-patch ``(K,)`` parameters as ``(K, 1, 1, 1)`` in ``like``'s dtype and device."""
    if values.dtype != like.dtype or values.device != like.device:
        values = values.to(device=like.device, dtype=like.dtype)
    return values.view(-1, 1, 1, 1) if values.is_contiguous() else values.reshape(-1, 1, 1, 1)


@lru_cache(maxsize=16)
def _gray_weights(dtype: torch.dtype, device: torch.device) -> Tensor:
    """``(3,)`` luma weights."""
    return torch.tensor(_GRAY_WEIGHTS, dtype=dtype, device=device)


def _gray(x: Tensor, work: Tensor | None = None) -> Tensor:
    """``(K, 1, p, p)`` luma ``0.299 r + 0.587 g + 0.114 b`` (kornia.color.rgb_to_grayscale)."""
    k, _, h, w = x.shape
    out = _scratch(work, (k, 1, h * w), x)
    # one batched (1 x 3) @ (3 x p p) product reads the three planes once (three
    # elementwise passes cost about 1.5 times as much)
    weights = _gray_weights(x.dtype, x.device).view(1, 1, 3).expand(k, 1, 3)
    return torch.bmm(weights, x.reshape(k, 3, h * w), out=out).view(k, 1, h, w)


# --------------------------------------------------------------------------------------------
# colour
# --------------------------------------------------------------------------------------------
def brightness(x: Tensor, factor: Tensor, inplace: bool = False) -> Tensor:
    """Multiply each patch by its factor and clamp to ``[0, 1]`` (torchvision's brightness).

    Parameters
    ----------
    x : Tensor
        ``(K, C, p, p)`` in ``[0, 1]``.
    factor : Tensor
        ``(K,)``, non-negative; ``1`` keeps the patch bit for bit.
    inplace : bool
        Write into ``x`` instead of a new tensor.

    Returns
    -------
    Tensor
        ``(K, C, p, p)``.

    Examples
    --------
    >>> import torch
    >>> brightness(torch.full((1, 3, 2, 2), 0.5), torch.tensor([1.5]))[0, 0, 0, 0]
    tensor(0.7500)
    """
    f = _col(factor, x)
    out = x.mul_(f) if inplace else torch.mul(x, f)
    return out.clamp_(0.0, 1.0)


def contrast(x: Tensor, factor: Tensor, inplace: bool = False) -> Tensor:
    """Blend each patch with its own mean luma (torchvision's contrast, per patch).

    ``out = clamp(x * f + mean * (1 - f), 0, 1)`` where ``mean`` is the mean luma of the patch
    (the mean over all values for one channel).

    Parameters
    ----------
    x : Tensor
        ``(K, C, p, p)``, ``C`` in ``{1, 3}``.
    factor : Tensor
        ``(K,)``, non-negative; ``1`` keeps the patch bit for bit.
    inplace : bool
        Write into ``x``.

    Returns
    -------
    Tensor
        ``(K, C, p, p)``.

    Examples
    --------
    >>> import torch
    >>> x = torch.tensor([0.0, 1.0]).repeat(8).reshape(1, 1, 4, 4)
    >>> contrast(x, torch.tensor([0.0])).unique()
    tensor([0.5000])
    """
    f = _col(factor, x)
    # the mean luma is the luma of the channel means: no luma image needed
    if x.shape[1] == 3:
        mean = torch.mv(x.mean(dim=(-2, -1)), _gray_weights(x.dtype, x.device))  # (K,)
    else:
        mean = x.mean(dim=(-3, -2, -1))
    shift = mean.view(-1, 1, 1, 1) * (1 - f)
    # multiply, then add: torch.addcmul with a broadcast first operand is several times slower
    out = x.mul_(f) if inplace else torch.mul(x, f)
    return out.add_(shift).clamp_(0.0, 1.0)


def saturation(
    x: Tensor, factor: Tensor, inplace: bool = False, *, work: Tensor | None = None
) -> Tensor:
    """Blend each RGB patch with its luma: ``clamp((1 - f) * gray + f * x, 0, 1)``.

    One-channel patches come back unchanged, as in torchvision and Kornia.

    Parameters
    ----------
    x : Tensor
        ``(K, C, p, p)``.
    factor : Tensor
        ``(K,)``, non-negative; ``0`` gives gray, ``1`` keeps the patch bit for bit.
    inplace : bool
        Write into ``x``.
    work : Tensor, optional
        Flat scratch of ``x``'s dtype with at least ``K * p * p`` elements, for the luma
        (default: allocated).

    Returns
    -------
    Tensor
        ``(K, C, p, p)``.

    Examples
    --------
    >>> import torch
    >>> x = torch.tensor([1.0, 0.0, 0.0]).reshape(1, 3, 1, 1)
    >>> saturation(x, torch.tensor([0.0])).flatten()
    tensor([0.2990, 0.2990, 0.2990])
    """
    if x.shape[1] != 3:
        return x if inplace else x.clone()
    # x + (1 - f) (gray - x) in one pass (torch.lerp; exact for f = 1)
    gray = _gray(x, work)
    out = x if inplace else x.clone()
    return out.lerp_(gray, 1 - _col(factor, x)).clamp_(0.0, 1.0)


def hue(x: Tensor, factor: Tensor, inplace: bool = False) -> Tensor:
    """Rotate the hue of each RGB patch by ``factor`` turns (``factor * 360`` degrees).

    Equal (to float rounding) to ``kornia.enhance.adjust_hue(x, 2 * pi * factor)``, the HSV
    round trip, but computed without building the HSV image: a hue rotation keeps each pixel's
    maximum ``v`` and chroma ``d = max - min`` and only moves the pixel along the colour
    hexagon, so each output channel is ``v - d * clamp(D - 1, 0, 1)`` where ``D`` is the
    circular distance (in sextants) from the shifted hue to the channel's centre (0, 2, 4 for
    R, G, B), a closed form of the HSV to RGB map; it is evaluated multiplied through by
    ``d``, without any division (see :func:`hue_offsets`). Kornia's chroma is ``v * s`` with
    ``s = d / (v + 1e-8)``, which differs from ``d`` by less than ``1e-8``. Every output
    value lies in ``[0, v]`` (``v`` the pixel's maximum) and is at least the pixel's minimum
    up to rounding. One-channel patches come back unchanged.

    Parameters
    ----------
    x : Tensor
        ``(K, C, p, p)`` in ``[0, 1]``.
    factor : Tensor
        ``(K,)`` hue shift in turns, torchvision's convention (``[-0.5, 0.5]``; any value
        works, modulo 1).
    inplace : bool
        Write into ``x``.

    Returns
    -------
    Tensor
        ``(K, C, p, p)``.

    Examples
    --------
    >>> import torch
    >>> red = torch.tensor([1.0, 0.0, 0.0]).reshape(1, 3, 1, 1)
    >>> hue(red, torch.tensor([1 / 3])).flatten()  # red -> green
    tensor([0., 1., 0.])
    """
    out = x if inplace else x.clone()
    if x.shape[1] != 3 or x.shape[0] == 0:
        return out
    hue_with_offsets(out, hue_offsets(factor, out))
    return out


def hue_offsets(factor: Tensor, like: Tensor) -> Tensor:
    """Per-patch, per-channel offsets (in sextants) used by :func:`hue_with_offsets`.

    With the pixel's hue ``h`` in sextants in ``[-1, 5]`` (Kornia's case formula before its
    ``mod 6``), the offset of channel ``c`` is ``o_c = 6 s_c - 2 c`` where ``s_c`` is the shift
    ``s`` (in turns) moved by a whole turn if needed so that ``u = h + o_c`` lies in
    ``[-6, 6]``; then the circular distance from the shifted hue to the channel's centre is
    ``3 - ||u| - 3|``, with no ``mod``.

    Parameters
    ----------
    factor : Tensor
        ``(K,)`` shifts in turns.
    like : Tensor
        Tensor whose dtype and device the offsets take.

    Returns
    -------
    Tensor
        ``(3, K, 1, 1)``.

    Examples
    --------
    >>> import torch
    >>> hue_offsets(torch.tensor([0.0, 0.5]), torch.empty(0)).flatten(1)
    tensor([[ 0., -3.],
            [-2.,  1.],
            [-4., -1.]])
    """
    if not isinstance(factor, Tensor) or factor.ndim != 1:
        raise ValueError(f"factor: expected a (K,) tensor of hue shifts, got "
                         f"{tuple(getattr(factor, 'shape', ()))} {type(factor).__name__}")
    work = torch.float64 if like.dtype == torch.float64 else torch.float32
    s = factor.to(device=like.device, dtype=work)
    s = s - torch.round(s)  # in [-0.5, 0.5]
    s_r = torch.where(s > 1 / 6, s - 1, s)  # [-5/6, 1/6]: h + 6 s_r in [-6, 6]
    s_b = torch.where(s < -1 / 6, s + 1, s)  # [-1/6, 5/6]: h + 6 s_b - 4 in [-6, 6]
    offsets = torch.stack((6 * s_r, 6 * s - 2, 6 * s_b - 4))
    return offsets.to(like.dtype).view(3, -1, 1, 1)


def hue_with_offsets(x: Tensor, offsets: Tensor, work: Tensor | None = None) -> Tensor:
    """:func:`hue` in place on RGB patches, with offsets from :func:`hue_offsets`.

    Parameters
    ----------
    x : Tensor
        ``(K, 3, p, p)``, contiguous, in ``[0, 1]``; overwritten.
    offsets : Tensor
        ``(3, K, 1, 1)`` (a slice of a larger one is fine).
    work : Tensor, optional
        Scratch ``(5, M, p, p)`` of ``x``'s dtype, any ``M >= 1``; the patches run in blocks
        of at most ``M`` (default: :func:`cpu_block_patches`).

    Returns
    -------
    Tensor
        ``x``.

    Examples
    --------
    >>> import torch
    >>> x = torch.rand(4, 3, 8, 8)
    >>> f = torch.rand(4) - 0.5
    >>> torch.equal(hue_with_offsets(x.clone(), hue_offsets(f, x)), hue(x, f))
    True
    """
    p = _square_patches(x)
    n = x.shape[0]
    if x.shape[1] != 3:
        raise ValueError(f"x: expected RGB patches (K, 3, p, p), got {tuple(x.shape)}")
    if tuple(offsets.shape) != (3, n, 1, 1):
        raise ValueError(f"offsets: expected shape {(3, n, 1, 1)} (from hue_offsets), got "
                         f"{tuple(offsets.shape)}")
    if work is not None and (work.ndim != 4 or work.shape[0] != 5 or work.shape[1] < 1
                             or tuple(work.shape[2:]) != (p, p)):
        raise ValueError(f"work: expected a (5, M, {p}, {p}) scratch tensor, got "
                         f"{tuple(work.shape)}")
    if n == 0:
        return x
    if work is None:
        work = x.new_empty((5, min(n, cpu_block_patches(x)), *x.shape[2:]))
    block = work.shape[1]
    # About 36 elementwise passes over (K, p, p) planes: on the CPU, run them on blocks of
    # patches that stay in cache, the temporaries in the reused workspace.
    for start in range(0, n, block):
        stop = min(n, start + block)
        _hue_block(x[start:stop], offsets[:, start:stop], work[:, : stop - start])
    return x


def _hue_block(x: Tensor, offsets: Tensor, work: Tensor) -> None:
    """:func:`hue_with_offsets` on one block; ``work`` is ``(5, K, p, p)`` scratch."""
    vmax, delta = work[:2].unbind(0)
    y = work[2:5]  # (3, K, p, p); first d * hue and two temporaries
    h6, t1, t2 = y.unbind(0)
    r, g, b = x.unbind(1)
    torch.maximum(torch.maximum(r, g, out=vmax), b, out=vmax)
    torch.minimum(torch.minimum(r, g, out=t1), b, out=t1)
    torch.sub(vmax, t1, out=delta)
    # d times the hue in sextants, in [-d, 5 d]: g - b on the red sextant, b - r + 2 d on
    # green, r - g + 4 d on blue, the first maximal channel winning ties as Kornia's does;
    # lerp with 0/1 weights selects exactly and is much cheaper than torch.where on CPU.
    # Working with d * hue avoids the division (and its 0 / 0 on grey pixels).
    torch.sub(r, g, out=h6).add_(delta, alpha=4.0)
    torch.sub(b, r, out=t1).add_(delta, alpha=2.0)
    h6.lerp_(t1, torch.eq(g, vmax, out=t2))
    torch.sub(g, b, out=t1)
    h6.lerp_(t1, torch.eq(r, vmax, out=t2))
    # y_c = d (h + o_c) in [-6 d, 6 d]; E = ||y_c| - 3 d| = 3 d - D_c (D_c the circular
    # distance, times d), and channel c is v - d clamp(D_c / d - 1, 0, 1)
    # = min(v, v - 2 d + max(E, d)): between v - d (the minimum, up to rounding, and never
    # negative: v - 2 d is exact whenever it is negative) and v.
    torch.addcmul(h6, delta, offsets[1], out=t1)
    torch.addcmul(h6, delta, offsets[2], out=t2)
    h6.addcmul_(delta, offsets[0])
    y.abs_().sub_(delta, alpha=3.0).abs_()
    torch.maximum(y, delta, out=y)
    y.add_(torch.sub(vmax, delta, alpha=2.0, out=delta))
    # r, g, b are not read any more: write into x
    torch.minimum(y, vmax, out=x.transpose(0, 1))


def grayscale(x: Tensor) -> Tensor:
    """Replace each RGB patch by its luma, repeated on the three channels.

    Parameters
    ----------
    x : Tensor
        ``(K, C, p, p)``; one-channel patches come back unchanged.

    Returns
    -------
    Tensor
        ``(K, C, p, p)``, a new tensor.

    Examples
    --------
    >>> import torch
    >>> grayscale(torch.rand(4, 3, 8, 8)).std(dim=1).max() < 1e-6
    tensor(True)
    """
    if x.shape[1] != 3:
        return x.clone()
    return _gray(x).expand_as(x).contiguous()


def solarize(
    x: Tensor, threshold: Tensor, inplace: bool = False, *, work: Tensor | None = None
) -> Tensor:
    """Invert the values at or above each patch's threshold: ``where(x < t, x, 1 - x)``.

    Parameters
    ----------
    x : Tensor
        ``(K, C, p, p)`` in ``[0, 1]``.
    threshold : Tensor
        ``(K,)``; a threshold above ``1`` keeps the patch bit for bit.
    inplace : bool
        Write into ``x``.
    work : Tensor, optional
        Flat scratch of ``x``'s dtype with at least ``x.numel()`` elements (default:
        allocated).

    Returns
    -------
    Tensor
        ``(K, C, p, p)``.

    Examples
    --------
    >>> import torch
    >>> solarize(torch.tensor([0.2, 0.7]).reshape(1, 1, 1, 2), torch.tensor([0.5])).flatten()
    tensor([0.2000, 0.3000])
    """
    # x - 2 x f + f is exactly 1 - x where f = 1 and x where f = 0, and avoids torch.where
    flip = torch.ge(x, _col(threshold, x), out=_scratch(work, tuple(x.shape), x))
    out = x.addcmul_(x, flip, value=-2.0) if inplace else torch.addcmul(x, x, flip, value=-2.0)
    return out.add_(flip)


# --------------------------------------------------------------------------------------------
# filters
# --------------------------------------------------------------------------------------------
def gaussian_kernel1d(size: int, sigma: Tensor) -> Tensor:
    """Normalised 1-D Gaussian taps, one kernel per row (Kornia's ``get_gaussian_kernel1d``).

    Parameters
    ----------
    size : int
        Odd number of taps.
    sigma : Tensor
        ``(K,)`` positive standard deviations.

    Returns
    -------
    Tensor
        ``(K, size)``, rows summing to 1.

    Examples
    --------
    >>> import torch
    >>> gaussian_kernel1d(3, torch.tensor([2.5]))
    tensor([[0.3243, 0.3513, 0.3243]])
    """
    offsets = torch.arange(size, device=sigma.device, dtype=sigma.dtype) - size // 2
    taps = torch.exp(-offsets.square() / (2.0 * sigma.reshape(-1, 1).square()))
    taps = taps / taps.sum(dim=-1, keepdim=True)
    # Flush negligible taps to zero: below 1e-20 they change no result by more than 1e-19,
    # but their products with pixel values can be subnormal, which slows CPU arithmetic
    # several times.
    return taps.masked_fill_(taps < 1e-20, 0.0)


@lru_cache(maxsize=32)
def _reflect_taps(patch: int, size: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``(size, p * p)`` 0/1 matrix: entry ``(t, j * p + i)`` is 1 iff tap ``t`` of output ``j``
    reads input ``i``.

    Reflect padding (``torch.nn.functional.pad(mode="reflect")``, edge not repeated) inside a
    patch of ``patch`` pixels, for a kernel of ``size`` taps.
    """
    radius = size // 2
    j = torch.arange(patch).reshape(1, -1)
    t = torch.arange(size).reshape(-1, 1)
    q = j + t - radius
    q = torch.where(q < 0, -q, q)
    q = torch.where(q > patch - 1, 2 * (patch - 1) - q, q)
    taps = torch.zeros(size, patch * patch, dtype=torch.float64)
    taps.scatter_(1, j * patch + q, 1.0)  # (t, j) pairs hit distinct columns
    return taps.to(device=device, dtype=dtype)


def _blur_matrix(sigma: Tensor, size: int, patch: int, out: Tensor) -> Tensor:
    """``(K, p, p)`` matrices ``A`` with ``A @ v`` = 1-D reflect-padded Gaussian blur of ``v``,
    written into ``out`` (``(K, p * p)``)."""
    kernel = gaussian_kernel1d(size, sigma)
    taps = _reflect_taps(patch, size, sigma.device, sigma.dtype)
    return torch.mm(kernel, taps, out=out).view(-1, patch, patch)


def gaussian_blur(x: Tensor, sigma: Tensor, kernel_size: tuple[int, int]) -> Tensor:
    """Gaussian-blur each patch with its own sigma, reflect padding inside the patch.

    Equal (to float rounding) to ``kornia.filters.gaussian_blur2d(x, kernel_size,
    sigma=(s, s), border_type="reflect")`` on each patch alone. Because the blur along one
    axis of a ``p``-pixel patch is a fixed linear map, it runs as two batched ``p x p`` matrix
    products with per-patch matrices, ``A_y @ x @ A_x^T``, instead of a per-patch convolution.
    Half-precision inputs are blurred in float32 and rounded once, as Kornia does.

    Parameters
    ----------
    x : Tensor
        ``(K, C, p, p)``.
    sigma : Tensor
        ``(K,)`` positive, the same on both axes (torchvision's ``GaussianBlur``).
    kernel_size : tuple of int
        ``(kH, kW)``, odd, each at most ``2 p - 1`` (reflect padding must stay inside the
        patch). ``(5, 1)`` blurs vertically only.

    Returns
    -------
    Tensor
        ``(K, C, p, p)``, a new tensor.

    Examples
    --------
    >>> import torch
    >>> x = torch.rand(5, 3, 16, 16)
    >>> y = gaussian_blur(x, torch.full((5,), 1.0), (9, 9))
    >>> bool((y.mean() - x.mean()).abs() < 1e-2)
    True
    """
    kh, kw = kernel_size
    p = _square_patches(x)
    _check_kernel(kernel_size, p)
    if x.shape[0] == 0 or (kh == 1 and kw == 1):
        return x.clone()
    work_dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    mats = blur_matrices(sigma.to(device=x.device, dtype=work_dtype), (kh, kw), p)
    return blur_with_matrices(x, *mats)


def _square_patches(x: Tensor) -> int:
    """``p`` of a ``(K, C, p, p)`` patch batch; ValueError naming ``x`` otherwise."""
    if x.ndim != 4 or x.shape[-2] != x.shape[-1]:
        raise ValueError(f"x: expected square patches (K, C, p, p), got {tuple(x.shape)}")
    return x.shape[-1]


def _check_kernel(kernel_size: tuple[int, int], p: int) -> None:
    for name, k in (("kernel_size[0]", kernel_size[0]), ("kernel_size[1]", kernel_size[1])):
        if k < 1 or k % 2 == 0 or k // 2 > p - 1:
            raise ValueError(f"{name}: expected an odd size in [1, {2 * p - 1}], got {k}")


def blur_matrices(
    sigma: Tensor, kernel_size: tuple[int, int], patch_size: int, *, work: Tensor | None = None
) -> tuple[Tensor | None, Tensor | None]:
    """Per-patch blur matrices ``(A_h, A_w)`` of :func:`gaussian_blur`, for reuse.

    Parameters
    ----------
    sigma : Tensor
        ``(K,)`` positive, floating; the matrices get its dtype and device.
    kernel_size : tuple of int
        ``(kH, kW)``, odd, each at most ``2 p - 1``.
    patch_size : int
        ``p``.
    work : Tensor, optional
        Flat buffer of ``sigma``'s dtype to hold the matrices (default: allocated): at least
        ``K * p * p`` elements, twice that when both axes blur with different sizes.

    Returns
    -------
    tuple of Tensor or None
        ``(K, p, p)`` matrices for the vertical and horizontal passes; ``None`` for an axis
        whose kernel has one tap (no blur along it).

    Examples
    --------
    >>> import torch
    >>> a_h, a_w = blur_matrices(torch.tensor([1.0, 2.0]), (5, 1), 8)
    >>> a_h.shape, a_w
    (torch.Size([2, 8, 8]), None)
    """
    if sigma.ndim != 1 or not sigma.is_floating_point():
        raise ValueError(f"sigma: expected a (K,) floating tensor, got {tuple(sigma.shape)} "
                         f"{sigma.dtype}")
    _check_kernel(kernel_size, patch_size)
    kh, kw = kernel_size
    shape = (sigma.shape[0], patch_size * patch_size)
    mat_w = mat_h = None
    used = 0  # elements of work taken
    if kw > 1:
        mat_w = _blur_matrix(sigma, kw, patch_size, _scratch(work, shape, sigma))
        used = shape[0] * shape[1]
    if kh == kw:
        mat_h = mat_w
    elif kh > 1:
        mat_h = _blur_matrix(sigma, kh, patch_size, _scratch(work, shape, sigma, used))
    return mat_h, mat_w


def blur_with_matrices(
    x: Tensor, mat_h: Tensor | None, mat_w: Tensor | None, *, work: Tensor | None = None
) -> Tensor:
    """Apply per-patch blur matrices from :func:`blur_matrices`: ``A_h @ x @ A_w^T``.

    Parameters
    ----------
    x : Tensor
        ``(K, C, p, p)``; half precision is blurred in float32 (the matrices' dtype) and
        rounded once.
    mat_h, mat_w : Tensor or None
        ``(K, p, p)`` each, or ``None`` to skip that axis.
    work : Tensor, optional
        Flat buffer of the matrices' dtype with at least ``2 * x.numel()`` elements for the
        two products (default: allocated); the result is then a view into it.

    Returns
    -------
    Tensor
        ``(K, C, p, p)``, a new tensor (possibly a permuted view of one).

    Examples
    --------
    >>> import torch
    >>> x = torch.rand(2, 3, 8, 8)
    >>> sigma = torch.tensor([0.5, 1.5])
    >>> mats = blur_matrices(sigma, (5, 5), 8)
    >>> torch.equal(blur_with_matrices(x, *mats), gaussian_blur(x, sigma, (5, 5)))
    True
    """
    p = _square_patches(x)
    n, c = x.shape[:2]
    for name, m in (("mat_h", mat_h), ("mat_w", mat_w)):
        if m is not None and tuple(m.shape) != (n, p, p):
            raise ValueError(f"{name}: expected shape {(n, p, p)} for x of shape "
                             f"{tuple(x.shape)}, got {tuple(m.shape)}")
    mat = mat_w if mat_w is not None else mat_h
    if mat is None:
        return x.clone()
    src = x.to(mat.dtype)
    # Batched p x p products. MKL is fast for A @ B with B transposed in memory, so both passes
    # are written that way, each one leaving the layout the next one needs; the result is a
    # permuted view (the caller's copy into place does the transposition).
    if mat_w is not None:
        # rows: t[k, j, (c, i)] = sum_j' A_w[j, j'] x[k, c, i, j']
        t = torch.bmm(
            mat_w, src.reshape(n, c * p, p).transpose(1, 2), out=_scratch(work, (n, p, c * p), mat)
        )  # (K, j, C * i)
        if mat_h is None:
            return t.view(n, p, c, p).permute(0, 2, 3, 1).to(x.dtype)
        # columns: u[k, i, (j, c)] = sum_i' A_h[i, i'] t[k, j, c, i']
        u = torch.bmm(
            mat_h,
            t.view(n, p * c, p).transpose(1, 2),
            out=_scratch(work, (n, p, p * c), mat, t.numel()),
        )  # (K, i, j * C)
        return u.view(n, p, p, c).permute(0, 3, 1, 2).to(x.dtype)
    out = _scratch(work, tuple(src.shape), mat)
    return torch.matmul(mat_h.unsqueeze(1), src, out=out).to(x.dtype)


def sharpness(x: Tensor, factor: Tensor, inplace: bool = False) -> Tensor:
    """PIL/torchvision sharpness per patch (Kornia's ``sharpness``), border pixels kept.

    The degenerate image is the 3 x 3 smoothing ``[[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13`` of
    the patch's interior, clamped to ``[0, 1]``; the one-pixel border keeps the input, so no
    pixel outside the patch is read. ``out = clamp(deg + (x - deg) * f, 0, 1)``.

    Parameters
    ----------
    x : Tensor
        ``(K, C, p, p)`` with ``p >= 3``.
    factor : Tensor
        ``(K,)``; ``0`` smooths, ``1`` keeps the patch, ``2`` sharpens.
    inplace : bool
        Write into ``x``.

    Returns
    -------
    Tensor
        ``(K, C, p, p)``.

    Examples
    --------
    >>> import torch
    >>> x = torch.rand(2, 3, 8, 8)
    >>> y = sharpness(x, torch.tensor([1.0, 2.0]))
    >>> bool(torch.allclose(y[0], x[0])), bool(torch.equal(y[1, :, 0], x[1, :, 0]))
    (True, True)
    """
    rows = torch.add(x[..., :, :-2], x[..., :, 1:-1]).add_(x[..., :, 2:])
    box = torch.add(rows[..., :-2, :], rows[..., 1:-1, :]).add_(rows[..., 2:, :])
    inner = x[..., 1:-1, 1:-1]
    degenerate = box.add_(inner, alpha=4.0).div_(13.0).clamp_(0.0, 1.0)
    blended = torch.sub(inner, degenerate, out=rows[..., :-2, :])  # reuse the row buffer
    blended.mul_(_col(factor, x)).add_(degenerate).clamp_(0.0, 1.0)
    out = x if inplace else x.clone()
    out[..., 1:-1, 1:-1] = blended
    # Kornia clamps the border too (a no-op on values already in [0, 1]).
    return out.clamp_(0.0, 1.0)


# --------------------------------------------------------------------------------------------
# pixel values
# --------------------------------------------------------------------------------------------
def gaussian_noise(x: Tensor, std: Tensor, noise: Tensor, inplace: bool = False) -> Tensor:
    """Add ``std * noise`` to each patch and clamp: ``clamp(x + std * noise, 0, 1)``.

    Parameters
    ----------
    x : Tensor
        ``(K, C, p, p)``.
    std : Tensor
        ``(K,)`` per-patch standard deviation.
    noise : Tensor
        ``(K, C, p, p)`` standard normal samples.
    inplace : bool
        Write into ``x``.

    Returns
    -------
    Tensor
        ``(K, C, p, p)``.

    Examples
    --------
    >>> import torch
    >>> x = torch.full((1, 1, 2, 2), 0.5)
    >>> gaussian_noise(x, torch.tensor([0.1]), torch.ones(1, 1, 2, 2))[0, 0, 0, 0]
    tensor(0.6000)
    """
    out = x if inplace else x.clone()
    return out.addcmul_(noise.to(x.dtype), _col(std, x)).clamp_(0.0, 1.0)


def posterize(x: Tensor, bits: Tensor) -> Tensor:
    """Keep the ``bits`` high bits of each 8-bit level (Kornia's ``posterize``, per patch).

    The arithmetic is Kornia's, in floating point: ``q = trunc(255 x)``,
    ``q' = trunc(q / 2^s / 255 * 255)``, ``out = q' * 2^s / 255`` with ``s = 8 - bits``;
    ``bits = 0`` gives zeros and ``bits = 8`` returns the input bit for bit.

    Parameters
    ----------
    x : Tensor
        ``(K, C, p, p)`` in ``[0, 1]``.
    bits : Tensor
        ``(K,)`` integers in ``[0, 8]``.

    Returns
    -------
    Tensor
        ``(K, C, p, p)``, a new tensor.

    Examples
    --------
    >>> import torch
    >>> posterize(torch.tensor([0.6, 0.4]).reshape(1, 1, 1, 2), torch.tensor([1])).flatten()
    tensor([0.5020, 0.0000])
    """
    b = bits.to(device=x.device).reshape(-1)
    scale = (2 ** (8 - b)).to(x.dtype).reshape(-1, 1, 1, 1)
    out = torch.mul(x, 255.0).trunc_()
    out.div_(scale).div_(255.0).mul_(255.0).trunc_().mul_(scale).div_(255.0)
    out.masked_fill_((b == 0).reshape(-1, 1, 1, 1), 0.0)
    keep = (b == 8).nonzero().squeeze(1)
    if keep.numel():
        out.index_copy_(0, keep, x.index_select(0, keep))
    return out
