"""Per-patch photometric operators, written as their formulas.

Every operator works on a batch of patches laid out as ``(K, C, p, p)`` (one row per patch,
``C`` in ``{1, 3}``) with one parameter per patch, shape ``(K,)``, and returns a new tensor.
Each reads nothing but its own patch: blur and sharpness pad *inside* the patch. Each
equals a Kornia functional op applied to every patch on its own, and the tests check that
within ``1e-5``:

================  =========================================================================
function          reference (applied to a single ``(1, C, p, p)`` patch)
================  =========================================================================
brightness        ``kornia.enhance.adjust_brightness_accumulative`` (torchvision's multiply)
contrast          ``kornia.enhance.adjust_contrast_with_mean_subtraction`` (patch mean)
saturation        ``kornia.enhance.adjust_saturation_with_gray_subtraction``
hue               ``kornia.enhance.adjust_hue(x, 2 * pi * factor)`` (factor in turns)
grayscale         ``kornia.color.rgb_to_grayscale`` repeated to 3 channels
solarize          ``kornia.enhance.solarize(x, threshold)``
posterize         ``kornia.enhance.posterize(x, bits)``
sharpness         ``kornia.enhance.sharpness(x, factor)``
gaussian_blur     ``kornia.filters.gaussian_blur2d(x, kernel_size, (s, s), "reflect")``
gaussian_noise    ``clamp(x + std * noise, 0, 1)``
================  =========================================================================

These are the specification. The engines of :class:`patchaug.PatchJitter` compute the same
thing faster: in place on cache-sized blocks (:mod:`patchaug.blocked_ops`) or fused in one
Triton kernel (:mod:`patchaug.triton_engine`).

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

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "patchify",
    "unpatchify",
    "brightness",
    "contrast",
    "saturation",
    "hue",
    "grayscale",
    "solarize",
    "posterize",
    "sharpness",
    "gaussian_kernel1d",
    "blur_matrix",
    "gaussian_blur",
    "gaussian_noise",
]

#: ITU-R BT.601 luma weights, as kornia.color.rgb_to_grayscale and torchvision use.
GRAY_WEIGHTS = (0.299, 0.587, 0.114)


# --------------------------------------------------------------------------------------------
# layout
# --------------------------------------------------------------------------------------------
def patchify(
    images: Tensor, patch_size: int, dtype: torch.dtype | None = None, *, out: Tensor | None = None
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
        Contiguous ``(B * N, C, p, p)`` tensor to write into (its dtype wins over ``dtype``).

    Returns
    -------
    Tensor
        ``(B * N, C, p, p)``, a new contiguous tensor or ``out``; ``N = (H // p) * (W // p)``;
        patch ``n`` of image ``b`` is row ``b * N + n``, numbered row-major (ViT token order).

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
        split into patch rows and columns by ``view`` (e.g. a slice of rows of a batch).

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


def _col(values: Tensor, like: Tensor) -> Tensor:
    """Per-patch ``(K,)`` parameters as ``(K, 1, 1, 1)`` in ``like``'s dtype and device."""
    return values.to(device=like.device, dtype=like.dtype).reshape(-1, 1, 1, 1)


def _luma(x: Tensor) -> Tensor:
    """``(K, 1, p, p)``: ``0.299 r + 0.587 g + 0.114 b`` (Kornia's ``rgb_to_grayscale``)."""
    r, g, b = x.unbind(1)
    wr, wg, wb = GRAY_WEIGHTS
    return (wr * r + wg * g + wb * b).unsqueeze(1)


# --------------------------------------------------------------------------------------------
# colour
# --------------------------------------------------------------------------------------------
def brightness(x: Tensor, factor: Tensor) -> Tensor:
    """``clamp(x * f, 0, 1)`` per patch (torchvision's brightness).

    Parameters
    ----------
    x : Tensor
        ``(K, C, p, p)`` in ``[0, 1]``.
    factor : Tensor
        ``(K,)``, non-negative; ``1`` keeps the patch bit for bit.

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
    return (x * _col(factor, x)).clamp(0.0, 1.0)


def contrast(x: Tensor, factor: Tensor) -> Tensor:
    """``clamp(x * f + m * (1 - f), 0, 1)``, ``m`` the patch's mean luma (torchvision's
    contrast, per patch; for one channel the mean of the patch).

    Parameters
    ----------
    x : Tensor
        ``(K, C, p, p)``, ``C`` in ``{1, 3}``.
    factor : Tensor
        ``(K,)``, non-negative; ``1`` keeps the patch bit for bit.

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
    gray = _luma(x) if x.shape[1] == 3 else x
    mean = gray.mean(dim=(-3, -2, -1), keepdim=True)
    return (x * f + mean * (1 - f)).clamp(0.0, 1.0)


def saturation(x: Tensor, factor: Tensor) -> Tensor:
    """``clamp(x + (1 - f) (gray - x), 0, 1)`` per RGB patch; one channel is unchanged.

    Parameters
    ----------
    x : Tensor
        ``(K, C, p, p)``.
    factor : Tensor
        ``(K,)``, non-negative; ``0`` gives gray, ``1`` keeps the patch bit for bit.

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
        return x.clone()
    return torch.lerp(x, _luma(x), 1 - _col(factor, x)).clamp(0.0, 1.0)


def hue(x: Tensor, factor: Tensor) -> Tensor:
    """Rotate the hue of each RGB patch by ``factor`` turns; one channel is unchanged.

    A hue rotation keeps each pixel's maximum ``v`` and chroma ``d = max - min`` and moves
    its hue ``h`` (in sextants, from the maximal channel as in Kornia's ``rgb_to_hsv``) by
    ``6 * factor``. Back in RGB (the HSV to RGB map in closed form), channel ``c`` is
    ``v - d * clamp(D_c - 1, 0, 1)`` with ``D_c`` the circular distance from the new hue to
    the channel's centre (0, 2, 4 sextants for R, G, B). Kornia's chroma is ``v * s`` with
    ``s = d / (v + 1e-8)``, which differs from ``d`` by less than ``1e-8``.

    Parameters
    ----------
    x : Tensor
        ``(K, C, p, p)`` in ``[0, 1]``.
    factor : Tensor
        ``(K,)`` hue shift in turns, torchvision's convention (``[-0.5, 0.5]``; any value
        works, modulo 1).

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
    if x.shape[1] != 3:
        return x.clone()
    r, g, b = x.unbind(1)
    v, vmin = x.amax(dim=1), x.amin(dim=1)
    d = v - vmin
    safe = torch.where(d > 0, d, 1.0)
    h = torch.where(
        r == v, (g - b) / safe, torch.where(g == v, 2 + (b - r) / safe, 4 + (r - g) / safe)
    )
    h = h + 6 * factor.to(x.dtype).reshape(-1, 1, 1)
    centres = torch.tensor([0.0, 2.0, 4.0], dtype=x.dtype, device=x.device).reshape(1, 3, 1, 1)
    dist = (h.unsqueeze(1) - centres).remainder(6.0)
    dist = torch.minimum(dist, 6.0 - dist)
    return v.unsqueeze(1) - d.unsqueeze(1) * (dist - 1).clamp(0.0, 1.0)


def grayscale(x: Tensor) -> Tensor:
    """Each RGB patch replaced by its luma on the three channels; one channel is unchanged.

    Parameters
    ----------
    x : Tensor
        ``(K, C, p, p)``.

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
    return _luma(x).expand_as(x).contiguous()


def solarize(x: Tensor, threshold: Tensor) -> Tensor:
    """``where(x >= t, 1 - x, x)`` per patch.

    Parameters
    ----------
    x : Tensor
        ``(K, C, p, p)`` in ``[0, 1]``.
    threshold : Tensor
        ``(K,)``; a threshold above ``1`` keeps the patch bit for bit.

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
    return torch.where(x >= _col(threshold, x), 1.0 - x, x)


def posterize(x: Tensor, bits: Tensor) -> Tensor:
    """Keep the ``bits`` high bits of each 8-bit level (Kornia's ``posterize``, per patch).

    Kornia's arithmetic in floating point: ``q = trunc(255 x)``,
    ``q' = trunc(q / 2^s / 255 * 255)``, ``out = q' 2^s / 255`` with ``s = 8 - bits``;
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
    b = bits.to(device=x.device).reshape(-1, 1, 1, 1)
    scale = (2 ** (8 - b)).to(x.dtype)
    q = torch.trunc(x * 255.0)
    out = torch.trunc(q / scale / 255.0 * 255.0) * scale / 255.0
    return torch.where(b == 8, x, torch.where(b == 0, 0.0, out))


# --------------------------------------------------------------------------------------------
# filters
# --------------------------------------------------------------------------------------------
def sharpness(x: Tensor, factor: Tensor) -> Tensor:
    """PIL/torchvision sharpness per patch (Kornia's ``sharpness``), border pixels kept.

    The degenerate image is the 3 x 3 smoothing ``[[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13`` of
    the patch's interior, clamped to ``[0, 1]``; the one-pixel border keeps the input, so no
    pixel outside the patch is read. ``out = clamp(deg + (x - deg) f, 0, 1)``.

    Parameters
    ----------
    x : Tensor
        ``(K, C, p, p)`` with ``p >= 3``.
    factor : Tensor
        ``(K,)``; ``0`` smooths, ``1`` keeps the patch, ``2`` sharpens.

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
    k, c, p, _ = x.shape
    kernel = torch.ones(1, 1, 3, 3, dtype=x.dtype, device=x.device)
    kernel[0, 0, 1, 1] = 5.0
    smooth = F.conv2d(x.reshape(k * c, 1, p, p), kernel / 13.0).reshape(k, c, p - 2, p - 2)
    degenerate = smooth.clamp(0.0, 1.0)
    out = x.clone()
    inner = x[..., 1:-1, 1:-1]
    out[..., 1:-1, 1:-1] = degenerate + (inner - degenerate) * _col(factor, x)
    return out.clamp(0.0, 1.0)


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
    # but their products with pixel values can be subnormal, which slows CPU arithmetic.
    return taps.masked_fill(taps < 1e-20, 0.0)


def blur_matrix(sigma: Tensor, size: int, patch_size: int) -> Tensor:
    """``(K, p, p)`` matrices ``A`` with ``A @ v`` the 1-D Gaussian blur of ``v``, reflect
    padded inside ``p`` pixels (``torch.nn.functional.pad(mode="reflect")``).

    ``A[i, j]`` is the sum of the taps ``g_t`` whose input ``i + t - size // 2``, reflected
    into ``[0, p - 1]``, is pixel ``j``.

    Examples
    --------
    >>> import torch
    >>> blur_matrix(torch.tensor([1.0]), 3, 4).sum(dim=-1)  # rows keep the mean
    tensor([[1., 1., 1., 1.]])
    """
    p, radius = patch_size, size // 2
    taps = gaussian_kernel1d(size, sigma)  # (K, size)
    steps = torch.arange(size, device=sigma.device)
    source = torch.arange(p, device=sigma.device).reshape(-1, 1) + steps - radius
    source = source.abs()  # reflect at 0
    source = torch.where(source > p - 1, 2 * (p - 1) - source, source)  # reflect at p - 1
    onehot = F.one_hot(source, p).to(sigma.dtype)  # (p out, size, p in)
    return torch.einsum("kt,itj->kij", taps, onehot)


def gaussian_blur(x: Tensor, sigma: Tensor, kernel_size: tuple[int, int]) -> Tensor:
    """Gaussian-blur each patch with its own sigma, reflect padding inside the patch.

    Along one axis a reflect-padded blur of ``p`` pixels is a ``p x p`` matrix
    (:func:`blur_matrix`), so the 2-D blur is ``A_h @ x @ A_w^T`` per patch and channel;
    equal to ``kornia.filters.gaussian_blur2d(x, kernel_size, (s, s), "reflect")`` on each
    patch. Half precision is blurred in float32 and rounded once, as Kornia does.

    Parameters
    ----------
    x : Tensor
        ``(K, C, p, p)``.
    sigma : Tensor
        ``(K,)`` positive, the same on both axes (torchvision's ``GaussianBlur``).
    kernel_size : tuple of int
        ``(kH, kW)``, odd, each at most ``2 p - 1`` (the reflection must stay inside the
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
    p = square_patches(x)
    check_kernel(kernel_size, p)
    work = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    s = sigma.to(device=x.device, dtype=work)
    out = x.to(work)
    if kernel_size[0] > 1:
        out = blur_matrix(s, kernel_size[0], p).unsqueeze(1) @ out
    if kernel_size[1] > 1:
        out = out @ blur_matrix(s, kernel_size[1], p).unsqueeze(1).transpose(-1, -2)
    return out.to(x.dtype) if out is not x else x.clone()


def gaussian_noise(x: Tensor, std: Tensor, noise: Tensor) -> Tensor:
    """``clamp(x + std * noise, 0, 1)`` per patch.

    Parameters
    ----------
    x : Tensor
        ``(K, C, p, p)``.
    std : Tensor
        ``(K,)`` per-patch standard deviation.
    noise : Tensor
        ``(K, C, p, p)`` standard normal samples.

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
    return (x + _col(std, x) * noise.to(x.dtype)).clamp(0.0, 1.0)


# --------------------------------------------------------------------------------------------
# argument checks shared with the fast path
# --------------------------------------------------------------------------------------------
def square_patches(x: Tensor) -> int:
    """``p`` of a ``(K, C, p, p)`` patch batch; ValueError naming ``x`` otherwise."""
    if x.ndim != 4 or x.shape[-2] != x.shape[-1]:
        raise ValueError(f"x: expected square patches (K, C, p, p), got {tuple(x.shape)}")
    return x.shape[-1]


def check_kernel(kernel_size: tuple[int, int], p: int) -> None:
    """ValueError naming the entry of ``kernel_size`` that is even or wider than ``2 p - 1``."""
    for name, k in (("kernel_size[0]", kernel_size[0]), ("kernel_size[1]", kernel_size[1])):
        if k < 1 or k % 2 == 0 or k // 2 > p - 1:
            raise ValueError(f"{name}: expected an odd size in [1, {2 * p - 1}], got {k}")
