"""Fused Triton kernel for :class:`patchaug.PatchJitter`: a patch's whole operator chain at once.

One Triton program per ViT patch reads the patch once (each channel a ``BLOCK x BLOCK`` tile in
registers, ``BLOCK`` the next power of two ``>= max(p, 16)``, masked to ``p x p``), applies the
patch's gated operators in the patch's own order in float32, and writes the result once, in the
input dtype. The operators are exactly those of :mod:`patchaug.patch_ops` (the tests compare
within ``1e-5``); each has a small Triton helper below whose body is its formula. Blur and
sharpness are matrix products of the tile (``tl.dot`` in IEEE float32), so no neighbouring
pixel is ever loaded.

The active operators are compile-time constants (an operator that is not in ``op_codes``
costs nothing); the gates, parameters and per-patch order are loaded at run time.

Triton is optional: this module imports without it, and :func:`triton_available` then says
``False``. With ``TRITON_INTERPRET=1`` the kernel runs in Triton's interpreter on any device
(slow; for tests on machines without a GPU). Triton reads that variable once, when
``triton.language`` is first imported (by this module, or earlier by anything that imports
triton, e.g. ``torch._dynamo``), and its own library functions (``tl.sum``, ...) are built in
that mode; so the variable must be set before then. The kernel here is built in the mode
triton.language was built in, whatever the variable says later.
"""

from __future__ import annotations  # annotations stay strings: no triton needed to import

import contextlib
import operator
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction
except ImportError:  # optional dependency
    triton = tl = InterpretedFunction = JITFunction = None

__all__ = ["OP_CODES", "triton_available", "apply_patch_chain"]

OP_CODES: dict[str, int] = {"brightness": 0, "contrast": 1, "saturation": 2, "hue": 3,
                            "grayscale": 4, "posterize": 5, "solarize": 6, "sharpness": 7,
                            "blur": 8, "noise": 9}
_SHARPNESS = OP_CODES["sharpness"]
_NOISE = OP_CODES["noise"]
_CODE_BITS = 4  # op codes of the columns are packed into one compile-time int, 4 bits each
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _interpreting() -> bool:
    """Whether triton.language was built for the interpreter (``TRITON_INTERPRET=1`` when it
    was first imported)."""
    return isinstance(tl.sum, InterpretedFunction)


def _jit(fn: Callable) -> Callable:
    """``triton.jit`` in the mode triton.language was built in (a kernel built the other way
    could not call its functions); ``fn`` itself without triton."""
    if triton is None:
        return fn
    return InterpretedFunction(fn) if _interpreting() else JITFunction(fn)


def triton_available(device: torch.device | str) -> bool:
    """Whether :func:`apply_patch_chain` can run on tensors of ``device``.

    Parameters
    ----------
    device : torch.device or str
        Device of the images.

    Returns
    -------
    bool
        True for CUDA when triton is importable and CUDA is available, and for any device when
        triton runs in its interpreter (``TRITON_INTERPRET=1`` set before triton was first
        imported; see the module docstring); False when triton is missing.
    """
    if triton is None:
        return False
    if _interpreting():
        return True
    return torch.device(device).type == "cuda" and torch.cuda.is_available()


# --------------------------------------------------------------------------------------------
# operators: each works on float32 (BLOCK, BLOCK) tiles, one per channel, values in [0, 1]
# --------------------------------------------------------------------------------------------
@_jit
def _clamp01(x):
    return tl.minimum(tl.maximum(x, 0.0), 1.0)


@_jit
def _div_rn(x, y):
    """IEEE ``x / y`` (Triton's ``/`` is approximate on GPUs); ``y`` a scalar."""
    return tl.math.div_rn(x, tl.zeros_like(x) + y)


@_jit
def _luma(x0, x1, x2, C: tl.constexpr):
    """``0.299 r + 0.587 g + 0.114 b`` (kornia's rgb_to_grayscale); the channel for C = 1."""
    if C == 3:
        gray = 0.299 * x0 + 0.587 * x1 + 0.114 * x2
    else:
        gray = x0
    return gray


@_jit
def _brightness(x, factor):
    return _clamp01(x * factor)


@_jit
def _contrast(x, mean, factor):
    return _clamp01(x * factor + mean * (1.0 - factor))


@_jit
def _saturation(x, gray, factor):
    """``clamp(lerp(x, gray, 1 - factor), 0, 1)``, with ``torch.lerp``'s two formulas."""
    w = 1.0 - factor
    return _clamp01(tl.where(w < 0.5, x + w * (gray - x), gray - (gray - x) * (1.0 - w)))


@_jit
def _hue(r, g, b, turns):
    """Rotate the hue by ``turns``: closed form of the HSV round trip (see patch_ops.hue).

    Each pixel keeps its maximum ``v`` and chroma ``d``; with ``h6`` = ``d`` times its hue in
    sextants and ``o_c`` the shift of channel ``c`` (patch_ops.hue_offsets), channel ``c`` is
    ``min(v, v - 2 d + max(||h6 + d o_c| - 3 d|, d))``.
    """
    s = turns - tl.floor(turns + 0.5)  # in [-0.5, 0.5)
    s_r = s - (s > 1.0 / 6.0).to(tl.float32)
    s_b = s + (s < -1.0 / 6.0).to(tl.float32)
    v = tl.maximum(tl.maximum(r, g), b)
    d = v - tl.minimum(tl.minimum(r, g), b)
    h6 = tl.where(r == v, g - b, tl.where(g == v, b - r + 2.0 * d, r - g + 4.0 * d))
    base = v - 2.0 * d
    out_r = tl.minimum(v, base + tl.maximum(tl.abs(tl.abs(h6 + d * (6.0 * s_r)) - 3.0 * d), d))
    out_g = tl.minimum(v, base + tl.maximum(tl.abs(tl.abs(h6 + d * (6.0 * s - 2.0)) - 3.0 * d), d))
    out_b = tl.minimum(v, base + tl.maximum(tl.abs(tl.abs(h6 + d * (6.0 * s_b - 4.0)) - 3.0 * d), d))
    return out_r, out_g, out_b


@_jit
def _posterize(x, bits):
    """Kornia's float posterize: ``q = trunc(255 x)``, ``q' = trunc(q / 2^s / 255 * 255)``,
    ``q' 2^s / 255`` with ``s = 8 - bits``; 0 bits give zeros, 8 bits keep ``x``."""
    n = bits.to(tl.int32)
    scale = (1 << (8 - n)).to(tl.float32)
    q = (x * 255.0).to(tl.int32).to(tl.float32)  # x >= 0: the cast truncates
    q = (_div_rn(_div_rn(q, scale), 255.0) * 255.0).to(tl.int32).to(tl.float32)
    out = tl.where(n >= 8, x, _div_rn(q * scale, 255.0))
    return tl.where(n <= 0, 0.0, out)


@_jit
def _solarize(x, threshold):
    return tl.where(x >= threshold, 1.0 - x, x)


@_jit
def _sharpness(x, factor, P: tl.constexpr, BLOCK: tl.constexpr):
    """Blend with the 3 x 3 smoothing ``(box + 4 x) / 13`` on the interior; border kept.

    The 3 x 3 box sum is ``T @ x @ T``, ``T`` the tridiagonal all-ones ``p x p`` matrix.
    """
    i = tl.arange(0, BLOCK)[:, None]
    j = tl.arange(0, BLOCK)[None, :]
    tri = tl.where((tl.abs(i - j) <= 1) & (i < P) & (j < P), 1.0, 0.0)
    box = tl.dot(tl.dot(tri, x, input_precision="ieee"), tri, input_precision="ieee")
    degenerate = _clamp01((box + 4.0 * x) / 13.0)
    interior = (i >= 1) & (i < P - 1) & (j >= 1) & (j < P - 1)
    return _clamp01(tl.where(interior, degenerate + (x - degenerate) * factor, x))


@_jit
def _gaussian_tap(d, sigma, total, RADIUS: tl.constexpr):
    """Normalised Gaussian tap at integer offsets ``d`` (0 beyond the radius or below 1e-20)."""
    df = d.to(tl.float32)
    tap = tl.exp(-(df * df) / (2.0 * sigma * sigma)) / total
    return tl.where((tl.abs(d) <= RADIUS) & (tap >= 1e-20), tap, 0.0)


@_jit
def _blur_matrix(sigma, TAPS: tl.constexpr, P: tl.constexpr, BLOCK: tl.constexpr):
    """``A`` with ``A @ x`` the 1-D Gaussian blur of the columns of ``x``, reflect padding
    inside the patch: ``A[i, j] = G(j - i) + [j > 0] G(-j - i) + [j < p - 1] G(2 (p - 1) - j - i)``.
    """
    t = tl.arange(0, 2 * BLOCK) - TAPS // 2
    tf = t.to(tl.float32)
    taps = tl.where(tl.abs(t) <= TAPS // 2, tl.exp(-(tf * tf) / (2.0 * sigma * sigma)), 0.0)
    total = tl.sum(taps, axis=0)
    i = tl.arange(0, BLOCK)[:, None]
    j = tl.arange(0, BLOCK)[None, :]
    a = _gaussian_tap(j - i, sigma, total, TAPS // 2)
    a += tl.where(j > 0, _gaussian_tap(-j - i, sigma, total, TAPS // 2), 0.0)
    a += tl.where(j < P - 1, _gaussian_tap(2 * (P - 1) - j - i, sigma, total, TAPS // 2), 0.0)
    return tl.where((i < P) & (j < P), a, 0.0)


@_jit
def _blur(x, a_h, a_w, KH: tl.constexpr, KW: tl.constexpr):
    """``A_h @ x @ A_w^T``; an axis with one tap is not blurred."""
    if KH > 1:
        x = tl.dot(a_h, x, input_precision="ieee")
    if KW > 1:
        x = tl.dot(x, tl.trans(a_w), input_precision="ieee")
    return x


@_jit
def _noise(x, std, eps):
    return _clamp01(x + std * eps)


# --------------------------------------------------------------------------------------------
# kernel
# --------------------------------------------------------------------------------------------
@_jit
def _apply(code: tl.constexpr, x0, x1, x2, v, row, noise_ptr, noise_row_ptr,
           C: tl.constexpr, P: tl.constexpr, BLOCK: tl.constexpr,
           KH: tl.constexpr, KW: tl.constexpr):
    """Operator ``code`` (compile-time) with parameter ``v`` on the channel tiles."""
    if code == 0:
        x0 = _brightness(x0, v)
        if C == 3:
            x1 = _brightness(x1, v)
            x2 = _brightness(x2, v)
    elif code == 1:
        i = tl.arange(0, BLOCK)[:, None]
        j = tl.arange(0, BLOCK)[None, :]
        gray = tl.where((i < P) & (j < P), _luma(x0, x1, x2, C), 0.0)
        mean = tl.sum(tl.sum(gray, axis=1), axis=0) / (P * P)
        x0 = _contrast(x0, mean, v)
        if C == 3:
            x1 = _contrast(x1, mean, v)
            x2 = _contrast(x2, mean, v)
    elif code == 2:
        if C == 3:
            gray = _luma(x0, x1, x2, C)
            x0 = _saturation(x0, gray, v)
            x1 = _saturation(x1, gray, v)
            x2 = _saturation(x2, gray, v)
    elif code == 3:
        if C == 3:
            x0, x1, x2 = _hue(x0, x1, x2, v)
    elif code == 4:
        if C == 3:
            x0 = _luma(x0, x1, x2, C)
            x1 = x0
            x2 = x0
    elif code == 5:
        x0 = _posterize(x0, v)
        if C == 3:
            x1 = _posterize(x1, v)
            x2 = _posterize(x2, v)
    elif code == 6:
        x0 = _solarize(x0, v)
        if C == 3:
            x1 = _solarize(x1, v)
            x2 = _solarize(x2, v)
    elif code == 7:
        x0 = _sharpness(x0, v, P, BLOCK)
        if C == 3:
            x1 = _sharpness(x1, v, P, BLOCK)
            x2 = _sharpness(x2, v, P, BLOCK)
    elif code == 8:
        a_h = _blur_matrix(v, KH, P, BLOCK)
        if KW == KH:  # a square kernel (the paper's preset): one matrix serves both axes
            a_w = a_h
        else:
            a_w = _blur_matrix(v, KW, P, BLOCK)
        x0 = _blur(x0, a_h, a_w, KH, KW)
        if C == 3:
            x1 = _blur(x1, a_h, a_w, KH, KW)
            x2 = _blur(x2, a_h, a_w, KH, KW)
    elif code == 9:
        i = tl.arange(0, BLOCK)[:, None]
        j = tl.arange(0, BLOCK)[None, :]
        valid = (i < P) & (j < P)
        eps = noise_ptr + tl.load(noise_row_ptr + row) * (C * P * P) + i * P + j
        x0 = _noise(x0, v, tl.load(eps, mask=valid, other=0.0))
        if C == 3:
            x1 = _noise(x1, v, tl.load(eps + P * P, mask=valid, other=0.0))
            x2 = _noise(x2, v, tl.load(eps + 2 * P * P, mask=valid, other=0.0))
    return x0, x1, x2


@_jit
def _patch_chain_kernel(
    in_ptr, out_ptr, values_ptr, gates_ptr, order_ptr, noise_ptr, noise_row_ptr,
    patches_per_image, patches_per_row,
    in_sb, in_sc, in_sh, in_sw, out_sb, out_sc, out_sh, out_sw,
    C: tl.constexpr, P: tl.constexpr, BLOCK: tl.constexpr, K: tl.constexpr,
    CODES: tl.constexpr, HAS_ORDER: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
):
    """Program ``row`` = patch ``row``: load, run the ``K`` stages, store.

    Column ``k`` of values/gates/order is operator ``(CODES >> 4 k) & 15``. At stage ``s`` the
    patch runs column ``order[row, s]`` (``s`` without an order) if its gate is set.
    """
    row = tl.program_id(0)
    image = row // patches_per_image
    n = row % patches_per_image
    top = ((n // patches_per_row) * P).to(tl.int64)
    left = ((n % patches_per_row) * P).to(tl.int64)
    i = tl.arange(0, BLOCK)[:, None]
    j = tl.arange(0, BLOCK)[None, :]
    valid = (i < P) & (j < P)

    src = in_ptr + image.to(tl.int64) * in_sb + top * in_sh + left * in_sw + i * in_sh + j * in_sw
    x0 = tl.load(src, mask=valid, other=0.0).to(tl.float32)
    x1 = x0
    x2 = x0
    if C == 3:
        x1 = tl.load(src + in_sc, mask=valid, other=0.0).to(tl.float32)
        x2 = tl.load(src + 2 * in_sc, mask=valid, other=0.0).to(tl.float32)

    for s in range(K):
        if HAS_ORDER:
            col = tl.load(order_ptr + row * K + s).to(tl.int32)
        else:
            col = s
        for k in tl.static_range(K):
            if col == k:
                if tl.load(gates_ptr + row * K + k) != 0:
                    v = tl.load(values_ptr + row * K + k)
                    x0, x1, x2 = _apply((CODES >> (4 * k)) & 15, x0, x1, x2, v, row,
                                        noise_ptr, noise_row_ptr, C, P, BLOCK, KH, KW)

    dst = out_ptr + image.to(tl.int64) * out_sb + top * out_sh + left * out_sw
    dst += i * out_sh + j * out_sw
    tl.store(dst, x0.to(out_ptr.dtype.element_ty), mask=valid)
    if C == 3:
        tl.store(dst + out_sc, x1.to(out_ptr.dtype.element_ty), mask=valid)
        tl.store(dst + 2 * out_sc, x2.to(out_ptr.dtype.element_ty), mask=valid)


# --------------------------------------------------------------------------------------------
# Python wrapper
# --------------------------------------------------------------------------------------------
def _check_table(name: str, t: object, shape: tuple[int, ...], dtype: torch.dtype,
                 device: torch.device) -> Tensor:
    """``t`` as a contiguous tensor of ``shape`` and ``dtype`` on ``device``, or an error."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype}, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (the images' device), got "
                         f"{t.device}")
    return t.contiguous()


def _check_kernel_size(kernel_size: object, p: int) -> tuple[int, int]:
    if (not isinstance(kernel_size, (tuple, list)) or len(kernel_size) != 2
            or not all(isinstance(k, int) and not isinstance(k, bool) for k in kernel_size)):
        raise TypeError(f"blur_kernel_size: expected a (kH, kW) pair of ints, got "
                        f"{kernel_size!r}")
    kh, kw = kernel_size
    for k in (kh, kw):
        if k < 1 or k % 2 == 0 or k > 2 * p - 1:
            raise ValueError(f"blur_kernel_size: expected odd sizes in [1, {2 * p - 1}] for "
                             f"patch_size={p}, got {tuple(kernel_size)}")
    return kh, kw


def apply_patch_chain(
    images: Tensor,
    patch_size: int,
    op_codes: Sequence[int],
    values: Tensor,
    gates: Tensor,
    order: Tensor | None,
    noise: Tensor | None = None,
    noise_row: Tensor | None = None,
    blur_kernel_size: tuple[int, int] = (1, 1),
) -> Tensor:
    """Apply each patch's chain of photometric operators in one fused Triton kernel.

    Patch ``n`` of image ``b`` (row-major, ``N = (H / p) (W / p)`` per image) is row
    ``r = b N + n`` of the tables. At stage ``s = 0 .. K-1`` the patch runs column
    ``k = order[r, s]`` (``k = s`` without an order) if ``gates[r, k]``: operator
    ``op_codes[k]`` (see :data:`OP_CODES`) with parameter ``values[r, k]``, with the semantics
    of the :mod:`patchaug.patch_ops` function of the same name. Computed in float32, rounded
    once to the images' dtype.

    Parameters
    ----------
    images : Tensor
        ``(B, C, H, W)``, ``C`` in ``{1, 3}``, float16, bfloat16 or float32, values in
        ``[0, 1]``, any strides.
    patch_size : int
        ``p``; ``H`` and ``W`` multiples of it (``p >= 3`` for sharpness).
    op_codes : sequence of int
        The operator of each column, codes from :data:`OP_CODES`.
    values : Tensor
        ``(B N, K)`` float32 parameters: factors, hue shift in turns, posterize bits (an
        integer in ``[0, 8]``), solarize threshold, blur sigma, noise std; ignored for
        grayscale.
    gates : Tensor
        ``(B N, K)`` bool: whether column ``k`` runs on the patch.
    order : Tensor or None
        ``(B N, K)`` uint8 per-patch order of the columns (a permutation of ``0 .. K-1``; a
        stage with an out-of-range entry runs nothing), or None for ``0 .. K-1``.
    noise : Tensor, optional
        ``(M, C, p, p)`` float32 standard normal samples; required with the noise operator.
    noise_row : Tensor, optional
        ``(B N,)`` int64 row of ``noise`` for each noise-gated patch (any value elsewhere);
        required with the noise operator.
    blur_kernel_size : tuple of int
        ``(kH, kW)``, odd, each at most ``2 p - 1``; an axis with 1 tap is not blurred.

    Returns
    -------
    Tensor
        A new contiguous ``(B, C, H, W)`` tensor of ``images``' dtype and device.

    Raises
    ------
    TypeError, ValueError
        For a bad argument (the message names it).
    RuntimeError
        When Triton cannot run on the images' device (:func:`triton_available`).
    """
    if not isinstance(images, Tensor):
        raise TypeError(f"images: expected a tensor, got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images: expected (B, C, H, W) with C in {{1, 3}}, got "
                         f"{tuple(images.shape)}")
    if images.dtype not in _DTYPES:
        raise TypeError(f"images: expected float16, bfloat16 or float32, got {images.dtype}")
    if not isinstance(patch_size, int) or isinstance(patch_size, bool) or patch_size < 1:
        raise ValueError(f"patch_size: expected a positive int, got {patch_size!r}")
    b, c, h, w = images.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"patch_size: image height and width must be multiples of "
                         f"patch_size={p}, got {h}x{w}")
    try:
        codes = [operator.index(code) for code in op_codes]
    except TypeError:
        raise TypeError(f"op_codes: expected a sequence of ints, got {op_codes!r}") from None
    if not all(code in OP_CODES.values() for code in codes):
        raise ValueError(f"op_codes: expected codes from OP_CODES (0 to 9), got {codes!r}")
    k = len(codes)
    rows = b * (h // p) * (w // p)
    device = images.device
    values = _check_table("values", values, (rows, k), torch.float32, device)
    gates = _check_table("gates", gates, (rows, k), torch.bool, device)
    if order is not None:
        order = _check_table("order", order, (rows, k), torch.uint8, device)
    kh, kw = _check_kernel_size(blur_kernel_size, p)
    if _SHARPNESS in codes and p < 3:
        raise ValueError(f"patch_size: sharpness needs patch_size >= 3, got {p}")
    if _NOISE in codes:
        if not isinstance(noise, Tensor) or noise.ndim != 4:
            raise ValueError(f"noise: expected an (M, {c}, {p}, {p}) tensor with the noise "
                             f"operator, got {getattr(noise, 'shape', noise)!r}")
        noise = _check_table("noise", noise, (noise.shape[0], c, p, p), torch.float32, device)
        if noise_row is None:
            raise ValueError("noise_row: expected a (B*N,) int64 tensor with the noise operator")
        noise_row = _check_table("noise_row", noise_row, (rows,), torch.int64, device)
    if not triton_available(device):
        raise RuntimeError(f"images: the Triton engine cannot run on {device} (needs CUDA and "
                           "triton, or TRITON_INTERPRET=1)")

    out = torch.empty((b, c, h, w), dtype=images.dtype, device=device)
    if rows == 0 or k == 0:
        return out.copy_(images)
    block = max(16, triton.next_power_of_2(p))
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        _patch_chain_kernel[(rows,)](
            images, out, values, gates.view(torch.uint8),
            values if order is None else order,  # placeholders: never read
            noise if _NOISE in codes else values,
            noise_row if _NOISE in codes else values,
            (h // p) * (w // p), w // p,
            *images.stride(), *out.stride(),
            C=c, P=p, BLOCK=block, K=k,
            CODES=sum(code << (_CODE_BITS * col) for col, code in enumerate(codes)),
            HAS_ORDER=order is not None, KH=kh, KW=kw,
            num_warps=min(16, max(4, block * block // 128)),  # 4 warps for p <= 16
        )
    return out
