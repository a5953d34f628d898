"""The photometric operators of :class:`patchaug.PatchJitter`, one class each.

An operator knows four things, all in its own class:

* its parameter range and probability (constructor arguments, checked there);
* how a per-patch parameter is drawn from a uniform draw (:meth:`PatchOp.sample`);
* its identity parameter, if it has one that leaves a patch bit for bit (:attr:`PatchOp.identity`);
* its functional op on a batch of patches (:meth:`PatchOp.apply`, from :mod:`patchaug.patch_ops`)
  and the Kornia functional op it must equal within ``1e-5`` (:meth:`PatchOp.reference`).

Adding an operator is one subclass: the engines and the tests iterate over :data:`OPERATORS`.
An operator that the fused Triton kernel does not know (no :attr:`PatchOp.triton_code`) runs on
the torch engine.

Examples
--------
>>> import torch
>>> from patchaug.operators import Brightness
>>> op = Brightness(0.4, p=0.8)
>>> op.low, op.high
(0.6, 1.4)
>>> patches = torch.rand(5, 3, 16, 16)
>>> values = op.sample(torch.rand(5))
>>> torch.allclose(op.apply(patches, values), op.reference(patches, values), atol=1e-5)
True
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import kornia
import torch
from torch import Tensor

from . import blocked_ops as fast
from . import patch_ops as ops

__all__ = [
    "PatchOp",
    "Brightness",
    "Contrast",
    "Saturation",
    "Hue",
    "Grayscale",
    "Posterize",
    "Solarize",
    "Sharpness",
    "GaussianBlur",
    "GaussianNoise",
    "OPERATORS",
]


# ---------------------------------------------------------------------------------------------
# argument checking
# ---------------------------------------------------------------------------------------------
def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_prob(name: str, value: Any) -> float:
    """``value`` as a probability; TypeError/ValueError naming ``name`` otherwise."""
    if not _is_number(value):
        raise TypeError(f"{name}: expected a probability (float in [0, 1]), got {value!r}")
    value = float(value)
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise ValueError(f"{name}: expected a probability in [0, 1], got {value}")
    return value


def _pair(name: str, value: Any) -> tuple[float, float]:
    if not isinstance(value, (tuple, list)) or len(value) != 2 or not all(map(_is_number, value)):
        raise TypeError(f"{name}: expected a number or a (min, max) pair of numbers, got {value!r}")
    lo, hi = float(value[0]), float(value[1])
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
        raise ValueError(f"{name}: expected finite min <= max, got ({lo}, {hi})")
    return lo, hi


def _factor_range(name: str, value: Any) -> tuple[float, float]:
    """torchvision's convention: ``v`` means ``[max(0, 1 - v), 1 + v]``; pairs are taken as is."""
    if _is_number(value):
        v = float(value)
        if not (math.isfinite(v) and v >= 0):
            raise ValueError(f"{name}: expected a non-negative number, got {value}")
        return max(0.0, 1.0 - v), 1.0 + v
    lo, hi = _pair(name, value)
    if lo < 0:
        raise ValueError(f"{name}: factors must be non-negative, got ({lo}, {hi})")
    return lo, hi


def _fixed_or_range(name: str, value: Any, low: float, high: float) -> tuple[float, float]:
    """A number means that fixed value; a pair is a range; both must lie in ``[low, high]``."""
    lo, hi = _pair(name, (value, value) if _is_number(value) else value)
    if lo < low or hi > high:
        raise ValueError(f"{name}: expected values in [{low}, {high}], got ({lo}, {hi})")
    return lo, hi


def _int_pair(name: str, value: Any) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        raise TypeError(f"{name}: expected an int or an (min, max) pair of ints, got {value!r}")
    return int(value[0]), int(value[1])


# ---------------------------------------------------------------------------------------------
# the base class
# ---------------------------------------------------------------------------------------------
class PatchOp:
    """One photometric operator applied to patches, each with its own parameter.

    Subclasses set :attr:`name`, the range ``(low, high)`` and the probability ``p`` in their
    constructor, and implement :meth:`apply` and :meth:`reference`.

    Attributes
    ----------
    name : str
        Key of the operator in :class:`~patchaug.PatchJitterParams` (unique in a PatchJitter).
    low, high : float
        Range the per-patch parameter is drawn from, uniformly.
    p : float
        Probability that the operator runs on a patch.
    identity : float or None
        Parameter value that returns a patch bit for bit, if one exists (engines use it to
        update a whole batch instead of a gathered subset).
    draws_noise : bool
        Whether :meth:`apply` also takes one standard normal ``(C, p, p)`` sample per patch.
    triton_code : int or None
        The operator's code in the fused Triton kernel (:mod:`patchaug.triton_engine`).
    """

    name: ClassVar[str]
    identity: ClassVar[float | None] = None
    draws_noise: ClassVar[bool] = False
    has_parameter: ClassVar[bool] = True
    triton_code: ClassVar[int | None] = None

    low: float
    high: float
    p: float

    def sample(self, u: Tensor) -> Tensor:
        """Per-patch parameters from uniform draws ``u`` in ``[0, 1)``: uniform in ``[low, high]``."""
        return u.mul(self.high - self.low).add_(self.low).clamp_(self.low, self.high)

    def check_patch_size(self, patch_size: int) -> None:
        """Raise ValueError if the operator cannot run on patches of ``patch_size`` pixels."""

    def apply(self, patches: Tensor, values: Tensor, noise: Tensor | None = None) -> Tensor:
        """The operator on ``(K, C, p, p)`` patches with ``(K,)`` parameters: a new tensor."""
        raise NotImplementedError

    def reference(self, patches: Tensor, values: Tensor, noise: Tensor | None = None) -> Tensor:
        """The Kornia functional op that :meth:`apply` equals, per patch (for tests)."""
        raise NotImplementedError

    # fast path for the torch engine: the same result, in place where it can be
    def prepare(
        self, values: Tensor, patch_size: int, noise: Tensor | None = None
    ) -> tuple[Tensor | None, ...]:
        """Pixel-independent work, once per call, as tensors with one row per patch."""
        return (values,) if noise is None else (values, noise)

    def run(self, patches: Tensor, *prepared: Tensor | None, work: Tensor) -> Tensor:
        """:meth:`apply` from :meth:`prepare`'s rows; may overwrite ``patches`` and use the
        flat scratch ``work`` (at least ``2 * patches.numel()`` elements)."""
        return self.apply(patches, *prepared)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        rng = f"({self.low}, {self.high}), " if self.has_parameter else ""
        return f"{type(self).__name__}({rng}p={self.p})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and vars(other) == vars(self)

    def __hash__(self) -> int:
        return hash((type(self), tuple(sorted(vars(self).items()))))


class _Factor(PatchOp):
    """A non-negative factor drawn from torchvision's ``[max(0, 1 - v), 1 + v]`` or a pair."""

    identity = 1.0

    def __init__(self, factor: float | tuple[float, float], p: float = 1.0) -> None:
        self.low, self.high = _factor_range(self.name, factor)
        self.p = check_prob(f"{self.name}.p", p)


# ---------------------------------------------------------------------------------------------
# colour
# ---------------------------------------------------------------------------------------------
class Brightness(_Factor):
    """``clamp(x * f, 0, 1)`` (Kornia's ``adjust_brightness_accumulative``, torchvision's)."""

    name = "brightness"
    triton_code = 0

    def apply(self, patches: Tensor, values: Tensor, noise: Tensor | None = None) -> Tensor:
        return ops.brightness(patches, values)

    def reference(self, patches: Tensor, values: Tensor, noise: Tensor | None = None) -> Tensor:
        return kornia.enhance.adjust_brightness_accumulative(patches, values)

    def run(self, patches: Tensor, values: Tensor, *, work: Tensor) -> Tensor:  # type: ignore[override]
        return fast.brightness_(patches, values)


class Contrast(_Factor):
    """Blend with the patch's mean luma (Kornia's ``adjust_contrast_with_mean_subtraction``)."""

    name = "contrast"
    triton_code = 1

    def apply(self, patches: Tensor, values: Tensor, noise: Tensor | None = None) -> Tensor:
        return ops.contrast(patches, values)

    def reference(self, patches: Tensor, values: Tensor, noise: Tensor | None = None) -> Tensor:
        return kornia.enhance.adjust_contrast_with_mean_subtraction(patches, values)

    def run(self, patches: Tensor, values: Tensor, *, work: Tensor) -> Tensor:  # type: ignore[override]
        return fast.contrast_(patches, values)


class Saturation(_Factor):
    """Blend with the per-pixel luma (Kornia's ``adjust_saturation_with_gray_subtraction``)."""

    name = "saturation"
    triton_code = 2

    def apply(self, patches: Tensor, values: Tensor, noise: Tensor | None = None) -> Tensor:
        return ops.saturation(patches, values)

    def reference(self, patches: Tensor, values: Tensor, noise: Tensor | None = None) -> Tensor:
        if patches.shape[1] != 3:
            return patches
        return kornia.enhance.adjust_saturation_with_gray_subtraction(patches, values)

    def run(self, patches: Tensor, values: Tensor, *, work: Tensor) -> Tensor:  # type: ignore[override]
        return fast.saturation_(patches, values, work)


class Hue(PatchOp):
    """Rotate the hue by ``shift`` turns (Kornia's ``adjust_hue(x, 2 pi shift)``).

    ``shift``: a number ``v`` means ``[-v, v]``, inside ``[-0.5, 0.5]``.
    """

    name = "hue"
    triton_code = 3

    def __init__(self, shift: float | tuple[float, float], p: float = 1.0) -> None:
        if _is_number(shift):
            if not 0.0 <= float(shift) <= 0.5:
                raise ValueError(f"hue: expected a number in [0, 0.5] (turns), got {shift}")
            shift = (-float(shift), float(shift))
        self.low, self.high = _pair("hue", shift)
        if self.low < -0.5 or self.high > 0.5:
            raise ValueError(
                f"hue: expected a range inside [-0.5, 0.5] (turns), got {(self.low, self.high)}"
            )
        self.p = check_prob("hue.p", p)

    def apply(self, patches: Tensor, values: Tensor, noise: Tensor | None = None) -> Tensor:
        return ops.hue(patches, values)

    def reference(self, patches: Tensor, values: Tensor, noise: Tensor | None = None) -> Tensor:
        if patches.shape[1] != 3:
            return patches
        return kornia.enhance.adjust_hue(patches, values * 2 * math.pi)

    def prepare(
        self, values: Tensor, patch_size: int, noise: Tensor | None = None
    ) -> tuple[Tensor | None, ...]:
        # (K, 3, 1, 1): one row per patch, so that the engine can slice the rows it runs on
        return (fast.hue_offsets(values, values).transpose(0, 1),)

    def run(self, patches: Tensor, offsets: Tensor, *, work: Tensor) -> Tensor:  # type: ignore[override]
        if patches.shape[1] != 3:
            return patches
        # five scratch planes for chunks of patches small enough to stay in cache
        k, _, p, _ = patches.shape
        m = max(1, min(k, fast.cpu_block_patches(patches), work.numel() // (5 * p * p)))
        planes = work[: 5 * m * p * p].view(5, m, p, p)
        return fast.hue_with_offsets(patches, offsets.to(patches.dtype).transpose(0, 1), planes)


class Grayscale(PatchOp):
    """Replace the patch by its luma on every channel (Kornia's ``rgb_to_grayscale``)."""

    name = "grayscale"
    has_parameter = False
    triton_code = 4

    def __init__(self, p: float = 1.0) -> None:
        self.low = self.high = 0.0
        self.p = check_prob("grayscale.p", p)

    def apply(self, patches: Tensor, values: Tensor, noise: Tensor | None = None) -> Tensor:
        return ops.grayscale(patches)

    def reference(self, patches: Tensor, values: Tensor, noise: Tensor | None = None) -> Tensor:
        if patches.shape[1] != 3:
            return patches
        return kornia.color.rgb_to_grayscale(patches).expand_as(patches)

    def run(self, patches: Tensor, values: Tensor, *, work: Tensor) -> Tensor:  # type: ignore[override]
        return fast.grayscale_(patches, work)


class Solarize(PatchOp):
    """Invert values at or above the threshold (Kornia's ``solarize``).

    ``threshold``: a number (fixed) or a ``(min, max)`` range, inside ``[0, 1]``.
    """

    name = "solarize"
    identity = 2.0  # above every value: nothing is inverted
    triton_code = 6

    def __init__(self, threshold: float | tuple[float, float] = 0.5, p: float = 1.0) -> None:
        self.low, self.high = _fixed_or_range("solarize_threshold", threshold, 0.0, 1.0)
        self.p = check_prob("solarize.p", p)

    def apply(self, patches: Tensor, values: Tensor, noise: Tensor | None = None) -> Tensor:
        return ops.solarize(patches, values)

    def reference(self, patches: Tensor, values: Tensor, noise: Tensor | None = None) -> Tensor:
        return kornia.enhance.solarize(patches, values)

    def run(self, patches: Tensor, values: Tensor, *, work: Tensor) -> Tensor:  # type: ignore[override]
        return fast.solarize_(patches, values, work)


class Posterize(PatchOp):
    """Keep the high ``bits`` of each 8-bit level (Kornia's ``posterize``).

    ``bits``: an int or a ``(min, max)`` pair in ``[0, 8]``, drawn as integers.
    """

    name = "posterize"
    triton_code = 5

    def __init__(self, bits: int | tuple[int, int] = 4, p: float = 1.0) -> None:
        self.low, self.high = _int_pair("posterize_bits", bits)
        if not 0 <= self.low <= self.high <= 8:
            raise ValueError(
                f"posterize_bits: expected 0 <= min <= max <= 8, got ({self.low}, {self.high})"
            )
        self.p = check_prob("posterize.p", p)

    def sample(self, u: Tensor) -> Tensor:
        """Integers uniform in ``[low, high]`` (stored as floats, like every parameter)."""
        lo, hi = self.low, self.high
        return u.mul(hi - lo + 1).floor_().add_(lo).clamp_(lo, hi)

    def apply(self, patches: Tensor, values: Tensor, noise: Tensor | None = None) -> Tensor:
        return ops.posterize(patches, values.round().long())

    def reference(self, patches: Tensor, values: Tensor, noise: Tensor | None = None) -> Tensor:
        return kornia.enhance.posterize(patches, values.round().long())

    def run(self, patches: Tensor, values: Tensor, *, work: Tensor) -> Tensor:  # type: ignore[override]
        return fast.posterize_(patches, values.round().long(), work)


# ---------------------------------------------------------------------------------------------
# filters and noise
# ---------------------------------------------------------------------------------------------
class Sharpness(PatchOp):
    """PIL's sharpness, border pixels kept (Kornia's ``sharpness``).

    ``factor``: a number is a fixed factor (torchvision's ``RandomAdjustSharpness``), a pair a
    range; non-negative.
    """

    name = "sharpness"
    identity = None  # factor 1 keeps values only up to rounding
    triton_code = 7

    def __init__(self, factor: float | tuple[float, float] = 2.0, p: float = 1.0) -> None:
        self.low, self.high = _factor_range(
            "sharpness", (factor, factor) if _is_number(factor) else factor
        )
        self.p = check_prob("sharpness.p", p)

    def check_patch_size(self, patch_size: int) -> None:
        if patch_size < 3:
            raise ValueError(
                f"patch_size: sharpness needs patches of at least 3 pixels, got {patch_size}"
            )

    def apply(self, patches: Tensor, values: Tensor, noise: Tensor | None = None) -> Tensor:
        return ops.sharpness(patches, values)

    def reference(self, patches: Tensor, values: Tensor, noise: Tensor | None = None) -> Tensor:
        return kornia.enhance.sharpness(patches, values)

    def run(self, patches: Tensor, values: Tensor, *, work: Tensor) -> Tensor:  # type: ignore[override]
        return fast.sharpness_(patches, values)


class GaussianBlur(PatchOp):
    """Gaussian blur with reflect padding inside the patch (Kornia's ``gaussian_blur2d``).

    Parameters
    ----------
    sigma : float or (float, float)
        Standard deviation (range), the same on both axes, positive.
    kernel_size : int or (int, int) or None
        ``(kH, kW)``, odd. ``None``: ``2 ceil(3 sigma_max) + 1`` (PIL's extent), capped at
        ``2 p - 1`` so that the reflection stays inside a ``p``-pixel patch.
    p : float
        Probability.
    """

    name = "blur"
    triton_code = 8

    def __init__(
        self,
        sigma: float | tuple[float, float] = (0.1, 2.0),
        kernel_size: int | tuple[int, int] | None = None,
        p: float = 1.0,
    ) -> None:
        self.low, self.high = _fixed_or_range("blur_sigma", sigma, 1e-6, math.inf)
        self.p = check_prob("blur.p", p)
        self.kernel_size: tuple[int, int] | None = None
        if kernel_size is not None:
            kh, kw = _int_pair("blur_kernel_size", kernel_size)
            for k in (kh, kw):
                if k < 1 or k % 2 == 0:
                    raise ValueError(f"blur_kernel_size: expected odd sizes, got {(kh, kw)}")
            self.kernel_size = (kh, kw)

    def kernel_for(self, patch_size: int) -> tuple[int, int]:
        """``(kH, kW)`` used on patches of ``patch_size`` pixels."""
        if self.kernel_size is not None:
            return self.kernel_size
        size = min(2 * max(1, math.ceil(3.0 * self.high)) + 1, 2 * patch_size - 1)
        return size, size

    def check_patch_size(self, patch_size: int) -> None:
        if any(k > 2 * patch_size - 1 for k in self.kernel_for(patch_size)):
            raise ValueError(
                f"blur_kernel_size: expected odd sizes in [1, {2 * patch_size - 1}] (the blur "
                f"pads inside the patch), got {self.kernel_size}"
            )

    def apply(self, patches: Tensor, values: Tensor, noise: Tensor | None = None) -> Tensor:
        return ops.gaussian_blur(patches, values, self.kernel_for(patches.shape[-1]))

    def reference(self, patches: Tensor, values: Tensor, noise: Tensor | None = None) -> Tensor:
        sigma = torch.stack([values, values], -1).reshape(-1, 2)
        kernel = self.kernel_for(patches.shape[-1])
        return kornia.filters.gaussian_blur2d(patches, kernel, sigma, border_type="reflect")

    def prepare(
        self, values: Tensor, patch_size: int, noise: Tensor | None = None
    ) -> tuple[Tensor | None, ...]:
        # the per-patch (p x p) blur matrices of both axes, once per call
        return fast.blur_matrices(values, self.kernel_for(patch_size), patch_size)

    def run(  # type: ignore[override]
        self, patches: Tensor, mat_h: Tensor | None, mat_w: Tensor | None, *, work: Tensor
    ) -> Tensor:
        return fast.blur_with_matrices(patches, mat_h, mat_w, work=work)


class GaussianNoise(PatchOp):
    """``clamp(x + std * n, 0, 1)``, ``n`` standard normal, one sample per patch.

    ``std``: a number (fixed) or a ``(min, max)`` range inside ``[0, 1]``.
    """

    name = "noise"
    draws_noise = True
    triton_code = 9

    def __init__(self, std: float | tuple[float, float] = (0.0, 0.1), p: float = 1.0) -> None:
        self.low, self.high = _fixed_or_range("noise_std", std, 0.0, 1.0)
        self.p = check_prob("noise.p", p)

    def apply(self, patches: Tensor, values: Tensor, noise: Tensor | None = None) -> Tensor:
        assert noise is not None
        return ops.gaussian_noise(patches, values, noise)

    def reference(self, patches: Tensor, values: Tensor, noise: Tensor | None = None) -> Tensor:
        assert noise is not None
        return (patches + values.reshape(-1, 1, 1, 1) * noise).clamp(0, 1)

    def run(  # type: ignore[override]
        self, patches: Tensor, values: Tensor, noise: Tensor, *, work: Tensor
    ) -> Tensor:
        return fast.gaussian_noise_(patches, values, noise)


#: Every built-in operator class, in the fixed order of the presets: colour first (as in
#: torchvision's ColorJitter, then grayscale), then value quantisation and inversion, then the
#: filters, and noise last so that blur does not wipe it out.
OPERATORS: tuple[type[PatchOp], ...] = (
    Brightness,
    Contrast,
    Saturation,
    Hue,
    Grayscale,
    Posterize,
    Solarize,
    Sharpness,
    GaussianBlur,
    GaussianNoise,
)
