"""In-place operators on reused scratch memory: the fast path of the blocked torch engine.

Each function here computes the same thing as its readable counterpart in
:mod:`patchaug.patch_ops` (the tests check them against each other), written for
:mod:`patchaug.blocked_engine`, which runs every operator on cache-sized blocks of patches:

* the ``*_`` functions overwrite their input and take a flat ``work`` buffer for temporaries,
  so that a block is updated without allocating;
* hue is computed without the HSV image and without a division (:func:`hue_offsets`,
  :func:`hue_with_offsets`), on chunks of patches with five scratch planes;
* blur is two batched ``p x p`` matrix products with per-patch matrices built once per call
  (:func:`blur_matrices`, :func:`blur_with_matrices`), laid out for MKL;
* the luma is one batched ``(1 x 3) @ (3 x p p)`` product.

Examples
--------
>>> import torch
>>> from patchaug import patch_ops, blocked_ops
>>> x, f = torch.rand(4, 3, 8, 8), torch.rand(4) - 0.5
>>> torch.allclose(blocked_ops.hue_with_offsets(x.clone(), blocked_ops.hue_offsets(f, x)),
...                patch_ops.hue(x, f), atol=1e-6)
True
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor

from .patch_ops import GRAY_WEIGHTS, check_kernel, gaussian_kernel1d, square_patches

__all__ = [
    "cpu_block_patches",
    "brightness_",
    "contrast_",
    "saturation_",
    "solarize_",
    "sharpness_",
    "grayscale_",
    "posterize_",
    "gaussian_noise_",
    "hue_offsets",
    "hue_with_offsets",
    "blur_matrices",
    "blur_with_matrices",
]

# On one CPU thread, multi-pass operators run in blocks of this many pixels per plane
# (128 KiB of float32), which keeps their temporaries in cache.
_CPU_BLOCK_PIXELS = 1 << 15
# On several threads, blocks of at most this many pixels per plane (512 KiB of float32).
_CPU_LARGE_BLOCK_PIXELS = 1 << 17


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
    return torch.tensor(GRAY_WEIGHTS, dtype=dtype, device=device)


def _gray(x: Tensor, work: Tensor | None = None) -> Tensor:
    """``(K, 1, p, p)`` luma ``0.299 r + 0.587 g + 0.114 b`` (kornia.color.rgb_to_grayscale)."""
    k, _, h, w = x.shape
    out = _scratch(work, (k, 1, h * w), x)
    # one batched (1 x 3) @ (3 x p p) product reads the three planes once (three
    # elementwise passes cost about 1.5 times as much)
    weights = _gray_weights(x.dtype, x.device).view(1, 1, 3).expand(k, 1, 3)
    return torch.bmm(weights, x.reshape(k, 3, h * w), out=out).view(k, 1, h, w)


# --------------------------------------------------------------------------------------------
# elementwise operators, in place
# --------------------------------------------------------------------------------------------
def brightness_(x: Tensor, factor: Tensor) -> Tensor:
    """:func:`patchaug.patch_ops.brightness` written into ``x``."""
    return x.mul_(_col(factor, x)).clamp_(0.0, 1.0)


def contrast_(x: Tensor, factor: Tensor) -> Tensor:
    """:func:`patchaug.patch_ops.contrast` written into ``x``."""
    f = _col(factor, x)
    # the mean luma is the luma of the channel means: no luma image needed
    if x.shape[1] == 3:
        mean = torch.mv(x.mean(dim=(-2, -1)), _gray_weights(x.dtype, x.device))  # (K,)
    else:
        mean = x.mean(dim=(-3, -2, -1))
    shift = mean.view(-1, 1, 1, 1) * (1 - f)
    # multiply, then add: torch.addcmul with a broadcast first operand is several times slower
    return x.mul_(f).add_(shift).clamp_(0.0, 1.0)


def saturation_(x: Tensor, factor: Tensor, work: Tensor | None = None) -> Tensor:
    """:func:`patchaug.patch_ops.saturation` written into ``x``; ``work``: at least
    ``K * p * p`` elements for the luma."""
    if x.shape[1] != 3:
        return x
    # x + (1 - f) (gray - x) in one pass (torch.lerp; exact for f = 1)
    return x.lerp_(_gray(x, work), 1 - _col(factor, x)).clamp_(0.0, 1.0)


def solarize_(x: Tensor, threshold: Tensor, work: Tensor | None = None) -> Tensor:
    """:func:`patchaug.patch_ops.solarize` written into ``x``; ``work``: at least
    ``x.numel()`` elements for the mask."""
    # x - 2 x f + f is exactly 1 - x where f = 1 and x where f = 0, and avoids torch.where
    flip = torch.ge(x, _col(threshold, x), out=_scratch(work, tuple(x.shape), x))
    return x.addcmul_(x, flip, value=-2.0).add_(flip)


def sharpness_(x: Tensor, factor: Tensor) -> Tensor:
    """:func:`patchaug.patch_ops.sharpness` written into ``x`` (three passes for the box sum)."""
    rows = torch.add(x[..., :, :-2], x[..., :, 1:-1]).add_(x[..., :, 2:])
    box = torch.add(rows[..., :-2, :], rows[..., 1:-1, :]).add_(rows[..., 2:, :])
    inner = x[..., 1:-1, 1:-1]
    degenerate = box.add_(inner, alpha=4.0).div_(13.0).clamp_(0.0, 1.0)
    blended = torch.sub(inner, degenerate, out=rows[..., :-2, :])  # reuse the row buffer
    blended.mul_(_col(factor, x)).add_(degenerate).clamp_(0.0, 1.0)
    x[..., 1:-1, 1:-1] = blended
    return x.clamp_(0.0, 1.0)


def grayscale_(x: Tensor, work: Tensor | None = None) -> Tensor:
    """:func:`patchaug.patch_ops.grayscale` written into ``x``; ``work``: at least
    ``K * p * p`` elements for the luma."""
    if x.shape[1] != 3:
        return x
    return x.copy_(_gray(x, work).expand_as(x))


def posterize_(x: Tensor, bits: Tensor, work: Tensor | None = None) -> Tensor:
    """:func:`patchaug.patch_ops.posterize` written into ``x`` (Kornia's float arithmetic);
    ``work``: at least ``x.numel()`` elements."""
    b = bits.to(device=x.device).reshape(-1)
    scale = (2 ** (8 - b)).to(x.dtype).reshape(-1, 1, 1, 1)
    q = torch.mul(x, 255.0, out=_scratch(work, tuple(x.shape), x)).trunc_()
    q.div_(scale).div_(255.0).mul_(255.0).trunc_().mul_(scale).div_(255.0)
    q.masked_fill_((b == 0).reshape(-1, 1, 1, 1), 0.0)
    change = (b != 8).nonzero().squeeze(1)  # 8 bits keep the input bit for bit
    if change.numel() == x.shape[0]:
        return x.copy_(q)
    return x.index_copy_(0, change, q.index_select(0, change))


def gaussian_noise_(x: Tensor, std: Tensor, noise: Tensor) -> Tensor:
    """:func:`patchaug.patch_ops.gaussian_noise` written into ``x``."""
    return x.addcmul_(noise.to(x.dtype), _col(std, x)).clamp_(0.0, 1.0)


# --------------------------------------------------------------------------------------------
# hue without the HSV image
# --------------------------------------------------------------------------------------------
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
    """:func:`patchaug.patch_ops.hue` in place on RGB patches, offsets from :func:`hue_offsets`.

    The same closed form as the readable op, multiplied through by the chroma ``d`` so that
    no division is needed (and grey pixels need no special case), with the wrap-around
    removed by the per-patch offsets instead of a ``mod``.

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
    >>> from patchaug.patch_ops import hue
    >>> torch.allclose(hue_with_offsets(x.clone(), hue_offsets(f, x)), hue(x, f), atol=1e-6)
    True
    """
    p = square_patches(x)
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


# --------------------------------------------------------------------------------------------
# blur as per-patch matrices
# --------------------------------------------------------------------------------------------
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


def blur_matrices(
    sigma: Tensor, kernel_size: tuple[int, int], patch_size: int, *, work: Tensor | None = None
) -> tuple[Tensor | None, Tensor | None]:
    """Per-patch blur matrices ``(A_h, A_w)`` of :func:`patchaug.patch_ops.gaussian_blur`.

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
    check_kernel(kernel_size, patch_size)
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
    >>> from patchaug.patch_ops import gaussian_blur
    >>> torch.allclose(blur_with_matrices(x, *mats), gaussian_blur(x, sigma, (5, 5)), atol=1e-6)
    True
    """
    p = square_patches(x)
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
