"""Per-patch photometric augmentation (PW-Self Sec. 3.3), one batched pass on any device.

:class:`PatchJitter` cuts every image into its ViT patch grid and gives each patch its own,
independently drawn photometric augmentation. Parameters are drawn per patch on the input's
device (optionally from a :class:`torch.Generator`), recorded in a small
:class:`PatchJitterParams`, and applied by the batched operators of :mod:`patchaug.patch_ops`,
with no Python loop over single patches: each operator runs on all its gated patches at once
(on the CPU, block by block of consecutive patches small enough to stay in the cache, which
is several times cheaper than passes over the whole batch in memory).

Examples
--------
>>> import torch
>>> from patchaug.patch_jitter import PatchJitter
>>> jitter = PatchJitter(patch_size=16)
>>> images = torch.rand(2, 3, 64, 64)
>>> out, params = jitter(images, return_params=True)
>>> torch.equal(jitter(images, params=params), out)
True
>>> torch.equal(PatchJitter(patch_size=16, p=0.0)(images), images)
True
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import torch
from torch import Tensor, nn

from . import patch_ops as ops

__all__ = ["PatchJitter", "PatchJitterParams", "OPERATORS"]

#: Every operator, in the fixed order applied when ``random_order=False``: colour first (as
#: in torchvision's ColorJitter, then grayscale), then value quantisation and inversion,
#: then the filters, and noise last so that blur does not wipe it out.
OPERATORS: tuple[str, ...] = (
    "brightness",
    "contrast",
    "saturation",
    "hue",
    "grayscale",
    "posterize",
    "solarize",
    "sharpness",
    "blur",
    "noise",
)

# Operators whose parameter has an exact identity value (output == input bit for bit): for
# these the whole patch batch may be updated in place with the identity on ungated patches,
# which is cheaper than gathering and scattering a large subset.
_IDENTITY: dict[str, float] = {
    "brightness": 1.0,
    "contrast": 1.0,
    "saturation": 1.0,
    "solarize": 2.0,
}
# Gate fraction from which a blendable operator runs on the full batch instead of a subset.
_BLEND_FROM = 0.5

_Range = tuple[float, float]


@dataclass(frozen=True)
class PatchJitterParams:
    """Everything drawn for one call of :class:`PatchJitter`, per image and patch.

    Patches are numbered row-major over the ``(rows, cols)`` grid (ViT token order without the
    CLS token), ``N = rows * cols``. The structure holds per-patch gates and factors, never a
    copy of the image; Gaussian noise is recorded as a seed.

    Attributes
    ----------
    patch_size : int
        Patch side in pixels.
    grid : tuple of int
        ``(rows, cols)`` of the patch grid.
    ops : tuple of str
        Active operators in their fixed application order (a subset of :data:`OPERATORS`).
    applied : Tensor
        ``(B, N)`` bool, the draw of ``p``: whether the patch is augmented at all.
    gates : dict of str to Tensor
        Per operator, ``(B, N)`` bool: the operator runs on the patch (``applied`` and the
        operator's own draw).
    values : dict of str to Tensor
        Per operator that takes one, ``(B, N)`` parameter: brightness, contrast and saturation
        factors, hue shift in turns, solarize threshold, blur sigma, noise std, sharpness
        factor (floats) and posterize bits (int64). Drawn for every patch, used where gated.
    order : Tensor or None
        ``(B, N, len(ops))`` uint8, per patch the indices into ``ops`` in the order they run
        (``random_order=True``); ``None`` for the fixed order.
    noise_seed : int or None
        Seed of the generator that draws the standard normal noise, if ``"noise"`` is active:
        one ``(C, p, p)`` sample per noise-gated patch, in patch order, from
        ``torch.Generator(device).manual_seed(noise_seed)`` (see :meth:`noise`).
    """

    patch_size: int
    grid: tuple[int, int]
    ops: tuple[str, ...]
    applied: Tensor
    gates: dict[str, Tensor] = field(default_factory=dict)
    values: dict[str, Tensor] = field(default_factory=dict)
    order: Tensor | None = None
    noise_seed: int | None = None

    @property
    def batch_size(self) -> int:
        """Number of images ``B``."""
        return int(self.applied.shape[0])

    @property
    def num_patches(self) -> int:
        """Patches per image ``N``."""
        return int(self.applied.shape[1])

    def to(self, device: torch.device | str) -> PatchJitterParams:
        """Copy of the parameters with every tensor on ``device``."""
        return PatchJitterParams(
            patch_size=self.patch_size,
            grid=self.grid,
            ops=self.ops,
            applied=self.applied.to(device),
            gates={k: v.to(device) for k, v in self.gates.items()},
            values={k: v.to(device) for k, v in self.values.items()},
            order=None if self.order is None else self.order.to(device),
            noise_seed=self.noise_seed,
        )

    @torch.compiler.disable  # a new seed each call would make torch.compile recompile
    def noise(
        self, channels: int, dtype: torch.dtype = torch.float32, *, out: Tensor | None = None
    ) -> Tensor:
        """Regenerate the standard normal noise the ``"noise"`` operator adds.

        Parameters
        ----------
        channels : int
            ``C`` of the images.
        dtype : torch.dtype
            Working dtype (float32 for half-precision images, else the images' dtype).
        out : Tensor, optional
            Flat contiguous buffer of ``dtype`` on the parameters' device, with at least
            ``K * C * p * p`` elements, to draw into (the result is a view of it).

        Returns
        -------
        Tensor
            ``(K, C, p, p)``, one sample per noise-gated patch in patch order
            (``gates["noise"].flatten().nonzero()``); ``K = 0`` without noise.
        """
        device = self.applied.device
        p = self.patch_size
        if "noise" not in self.gates or self.noise_seed is None:
            return torch.empty((0, channels, p, p), device=device, dtype=dtype)
        count = int(self.gates["noise"].sum())
        gen = torch.Generator(device=device).manual_seed(self.noise_seed)
        shape = (count, channels, p, p)
        if out is None:
            return torch.randn(shape, generator=gen, device=device, dtype=dtype)
        if not isinstance(out, Tensor):
            raise TypeError(f"out: expected a tensor or None, got {type(out).__name__}")
        numel = count * channels * p * p
        if out.dtype != dtype or out.device != device or out.ndim != 1 or out.numel() < numel:
            raise ValueError(
                f"out: expected a flat {dtype} tensor on {device} with at least {numel} "
                f"elements, got {tuple(out.shape)} {out.dtype} on {out.device}"
            )
        return torch.randn(shape, generator=gen, out=out[:numel].view(shape))


# ---------------------------------------------------------------------------------------------
# argument checking
# ---------------------------------------------------------------------------------------------
def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_prob(name: str, value: Any) -> float:
    if not _is_number(value):
        raise TypeError(f"{name}: expected a probability (float in [0, 1]), got {value!r}")
    value = float(value)
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise ValueError(f"{name}: expected a probability in [0, 1], got {value}")
    return value


def _check_pair(name: str, value: Any) -> _Range:
    if not isinstance(value, (tuple, list)) or len(value) != 2 or not all(map(_is_number, value)):
        raise TypeError(f"{name}: expected a number or a (min, max) pair of numbers, got {value!r}")
    lo, hi = float(value[0]), float(value[1])
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
        raise ValueError(f"{name}: expected finite min <= max, got ({lo}, {hi})")
    return lo, hi


def _factor_range(name: str, value: Any) -> _Range | None:
    """torchvision's convention: ``v`` means ``[max(0, 1 - v), 1 + v]``; pairs are taken as is."""
    if value is None:
        return None
    if _is_number(value):
        v = float(value)
        if not (math.isfinite(v) and v >= 0):
            raise ValueError(f"{name}: expected a non-negative number, got {value}")
        return max(0.0, 1.0 - v), 1.0 + v
    lo, hi = _check_pair(name, value)
    if lo < 0:
        raise ValueError(f"{name}: factors must be non-negative, got ({lo}, {hi})")
    return lo, hi


def _fixed_or_range(name: str, value: Any, low: float, high: float) -> _Range | None:
    """A number means that fixed value; a pair is a range; both must lie in ``[low, high]``."""
    if value is None:
        return None
    if _is_number(value):
        value = (value, value)
    lo, hi = _check_pair(name, value)
    if lo < low or hi > high:
        raise ValueError(f"{name}: expected values in [{low}, {high}], got ({lo}, {hi})")
    return lo, hi


def _hue_range(value: Any) -> _Range | None:
    if value is None:
        return None
    if _is_number(value):
        v = float(value)
        if not 0.0 <= v <= 0.5:
            raise ValueError(f"hue: expected a number in [0, 0.5] (turns), got {value}")
        return -v, v
    lo, hi = _check_pair("hue", value)
    if lo < -0.5 or hi > 0.5:
        raise ValueError(f"hue: expected a range inside [-0.5, 0.5] (turns), got ({lo}, {hi})")
    return lo, hi


def _bits_range(value: Any) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        raise TypeError(
            f"posterize_bits: expected an int or an (min, max) pair of ints, got {value!r}"
        )
    lo, hi = value
    if not 0 <= lo <= hi <= 8:
        raise ValueError(f"posterize_bits: expected 0 <= min <= max <= 8, got ({lo}, {hi})")
    return lo, hi


def _kernel_size(value: Any, sigma_max: float, patch_size: int) -> tuple[int, int]:
    if value is None:
        # cover +-3 sigma (PIL's GaussianBlur extent) but stay inside the patch
        size = 2 * max(1, math.ceil(3.0 * sigma_max)) + 1
        size = min(size, 2 * patch_size - 1)
        return size, size
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        raise TypeError(f"blur_kernel_size: expected an int or a (kH, kW) pair, got {value!r}")
    for k in value:
        if k < 1 or k % 2 == 0 or k > 2 * patch_size - 1:
            raise ValueError(
                f"blur_kernel_size: expected odd sizes in [1, {2 * patch_size - 1}] "
                f"(the blur pads inside the patch), got {tuple(value)}"
            )
    return int(value[0]), int(value[1])


# ---------------------------------------------------------------------------------------------
# the module
# ---------------------------------------------------------------------------------------------
class PatchJitter(nn.Module):
    """Independent photometric augmentation of every ViT patch, batched.

    Each image is cut into its grid of ``patch_size x patch_size`` patches. A patch is
    augmented at all with probability ``p``; then each operator runs on it with its own
    probability ``p_<op>`` and its own parameter, drawn uniformly from the operator's range,
    independently per patch. Operators run in the fixed order of :data:`OPERATORS`, or, with
    ``random_order=True``, in an independent random order per patch. The output of a patch
    depends only on that patch's input and its parameters (blur and sharpness pad inside the
    patch). Each operator equals a Kornia functional op applied to the patch alone; see
    :mod:`patchaug.patch_ops`.

    The defaults are :meth:`paper`: the operators the PW-Self paper names (colour jitter,
    solarization, blur, Gaussian noise) with DINO's ranges where DINO has them.

    On the CPU the module keeps its scratch buffers between calls (each at most 16 MiB,
    about 10 to 25 MiB in all for the presets on 32 images of 224 x 224), which saves the
    page faults of fresh allocations; they are not part of its state (neither pickled nor
    copied), and concurrent calls from several threads each use their own. Under
    ``torch.compile`` the module runs eagerly (its subsets change shape every call).

    Parameters
    ----------
    patch_size : int
        Patch side ``p`` in pixels; image height and width must be multiples of it.
    p : float
        Probability that a patch is augmented at all.
    brightness, contrast, saturation : float or (float, float) or None
        Multiplicative factor range; a number ``v`` means ``[max(0, 1 - v), 1 + v]``
        (torchvision's ColorJitter). ``None`` disables the operator.
    hue : float or (float, float) or None
        Hue shift in turns; ``v`` means ``[-v, v]``, inside ``[-0.5, 0.5]``.
    p_brightness, p_contrast, p_saturation, p_hue : float
        Per-operator probabilities.
    p_grayscale : float
        Probability of replacing the patch by its luma.
    solarize_threshold : float or (float, float) or None
        Threshold (range) in ``[0, 1]``; values at or above it are inverted.
    p_solarize : float
        Probability of solarizing.
    blur_sigma : float or (float, float) or None
        Gaussian sigma (range) in pixels, the same on both axes.
    blur_kernel_size : int or (int, int) or None
        ``(kH, kW)``, odd, at most ``2 * patch_size - 1``; ``None`` picks ``2 ceil(3 sigma_max)
        + 1`` capped at that bound. ``(5, 1)`` is a vertical blur.
    p_blur : float
        Probability of blurring.
    noise_std : float or (float, float) or None
        Standard deviation (range) of additive Gaussian noise, in ``[0, 1]``.
    p_noise : float
        Probability of adding noise.
    posterize_bits : int or (int, int) or None
        Bits kept (range), integers in ``[0, 8]``.
    p_posterize : float
        Probability of posterizing.
    sharpness : float or (float, float) or None
        Sharpness factor (range), non-negative: ``0`` smooths, ``1`` keeps, ``2`` sharpens.
    p_sharpness : float
        Probability of the sharpness adjustment.
    random_order : bool
        Apply the operators in a random order drawn per patch.
    clamp_input : bool
        Clamp the input to ``[0, 1]`` instead of rejecting values outside it.
    generator : torch.Generator, optional
        Default source of randomness (on the images' device); ``forward(generator=...)``
        overrides it. Without one, torch's global generator is used.

    An operator is active when its range is not ``None`` and its probability is positive.

    Examples
    --------
    >>> import torch
    >>> jitter = PatchJitter.authors(16)
    >>> g = torch.Generator().manual_seed(0)
    >>> out, params = jitter(torch.rand(3, 32, 48), return_params=True, generator=g)
    >>> out.shape, params.applied.shape, params.ops
    (torch.Size([3, 32, 48]), torch.Size([1, 6]), ('brightness', 'hue', 'posterize', 'sharpness', 'blur'))
    """

    def __init__(
        self,
        patch_size: int,
        p: float = 1.0,
        *,
        brightness: float | _Range | None = 0.4,
        p_brightness: float = 0.8,
        contrast: float | _Range | None = 0.4,
        p_contrast: float = 0.8,
        saturation: float | _Range | None = 0.2,
        p_saturation: float = 0.8,
        hue: float | _Range | None = 0.1,
        p_hue: float = 0.8,
        p_grayscale: float = 0.0,
        solarize_threshold: float | _Range | None = 0.5,
        p_solarize: float = 0.2,
        blur_sigma: float | _Range | None = (0.1, 2.0),
        blur_kernel_size: int | tuple[int, int] | None = None,
        p_blur: float = 0.5,
        noise_std: float | _Range | None = (0.0, 0.1),
        p_noise: float = 0.2,
        posterize_bits: int | tuple[int, int] | None = 4,
        p_posterize: float = 0.0,
        sharpness: float | _Range | None = 2.0,
        p_sharpness: float = 0.0,
        random_order: bool = False,
        clamp_input: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(patch_size, int) or isinstance(patch_size, bool):
            raise TypeError(f"patch_size: expected a positive int, got {patch_size!r}")
        if patch_size < 1:
            raise ValueError(f"patch_size: expected a positive int, got {patch_size}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator: expected a torch.Generator or None, got {generator!r}")
        for name, flag in (("random_order", random_order), ("clamp_input", clamp_input)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name}: expected a bool, got {flag!r}")
        self.patch_size = patch_size
        self.p = _check_prob("p", p)
        self.random_order = random_order
        self.clamp_input = clamp_input
        self.generator = generator
        # scratch kept between calls on the CPU (see _Workspace); not part of the state
        self._workspaces: list[_Workspace] = []

        ranges: dict[str, Any] = {
            "brightness": _factor_range("brightness", brightness),
            "contrast": _factor_range("contrast", contrast),
            "saturation": _factor_range("saturation", saturation),
            "hue": _hue_range(hue),
            "grayscale": (),
            "posterize": _bits_range(posterize_bits),
            "solarize": _fixed_or_range("solarize_threshold", solarize_threshold, 0.0, 1.0),
            "sharpness": _factor_range(
                "sharpness", None if sharpness is None else _fixed_pair(sharpness)
            ),
            "blur": _fixed_or_range("blur_sigma", blur_sigma, 1e-6, math.inf),
            "noise": _fixed_or_range("noise_std", noise_std, 0.0, 1.0),
        }
        probs = {
            "brightness": _check_prob("p_brightness", p_brightness),
            "contrast": _check_prob("p_contrast", p_contrast),
            "saturation": _check_prob("p_saturation", p_saturation),
            "hue": _check_prob("p_hue", p_hue),
            "grayscale": _check_prob("p_grayscale", p_grayscale),
            "posterize": _check_prob("p_posterize", p_posterize),
            "solarize": _check_prob("p_solarize", p_solarize),
            "sharpness": _check_prob("p_sharpness", p_sharpness),
            "blur": _check_prob("p_blur", p_blur),
            "noise": _check_prob("p_noise", p_noise),
        }
        self.ranges: dict[str, Any] = {}
        self.probs: dict[str, float] = {}
        for name in OPERATORS:
            if ranges[name] is not None and probs[name] > 0:
                self.ranges[name] = ranges[name]
                self.probs[name] = probs[name]
        self.ops: tuple[str, ...] = tuple(self.ranges)
        self.blur_kernel_size: tuple[int, int] | None = None
        if "blur" in self.ops:
            self.blur_kernel_size = _kernel_size(
                blur_kernel_size, self.ranges["blur"][1], patch_size
            )
        elif blur_kernel_size is not None:
            _kernel_size(blur_kernel_size, 1.0, patch_size)
        if "sharpness" in self.ops and patch_size < 3:
            raise ValueError(
                f"patch_size: sharpness needs patches of at least 3 pixels, got {patch_size}"
            )

    # -------------------------------------------------------------------------- presets
    @classmethod
    def paper(cls, patch_size: int, **overrides: Any) -> PatchJitter:
        """The operators PW-Self Sec. 3.3 names, with DINO's ranges where DINO has them.

        Colour jitter: brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1 (DINO's
        ColorJitter), each with probability 0.8, drawn independently per patch (DINO gates the
        four together per image; per patch, independent gates give more varied patches with the
        same marginal rate). Solarization at threshold 0.5 with probability 0.2 (DINO's rate
        on its second view). Gaussian blur with sigma in ``[0.1, 2]`` (DINO's range), kernel
        ``2 ceil(3 sigma_max) + 1 = 13``, probability 0.5 (DINO's rate on local crops). Gaussian
        noise, which DINO lacks: std in ``[0, 0.1]`` with probability 0.2, strong enough to be
        seen on a 16-pixel patch without drowning it. ``p = 1``: each operator's own
        probability already leaves about 0.05 % of patches untouched. Fixed order.

        Parameters
        ----------
        patch_size : int
            Patch side in pixels.
        **overrides
            Any constructor argument, replacing the preset's value.

        Returns
        -------
        PatchJitter

        Examples
        --------
        >>> PatchJitter.paper(16).ops
        ('brightness', 'contrast', 'saturation', 'hue', 'solarize', 'blur', 'noise')
        """
        kwargs: dict[str, Any] = dict(
            p=1.0,
            brightness=0.4,
            p_brightness=0.8,
            contrast=0.4,
            p_contrast=0.8,
            saturation=0.2,
            p_saturation=0.8,
            hue=0.1,
            p_hue=0.8,
            p_grayscale=0.0,
            solarize_threshold=0.5,
            p_solarize=0.2,
            blur_sigma=(0.1, 2.0),
            blur_kernel_size=None,
            p_blur=0.5,
            noise_std=(0.0, 0.1),
            p_noise=0.2,
            p_posterize=0.0,
            p_sharpness=0.0,
            random_order=False,
        )
        kwargs.update(overrides)
        return cls(patch_size, **kwargs)

    @classmethod
    def authors(cls, patch_size: int, **overrides: Any) -> PatchJitter:
        """The authors' patch-level branch (their DINO fork, PIL per 16 x 16 patch).

        ``RandomOrder([ColorJitter(brightness=0.1, hue=0.1), GaussianBlur((1, 5), (0.1, 2)),
        RandomAdjustSharpness(2, p=0.5), RandomPosterize(3, p=0.5)])``: brightness factor in
        ``[0.9, 1.1]`` and hue shift in ``[-0.1, 0.1]`` turns, both always applied (torchvision's
        ColorJitter has no probability); a vertical blur (torchvision's kernel ``(1, 5)`` is
        width 1, height 5, i.e. ``(kH, kW) = (5, 1)``) with sigma in ``[0.1, 2]``, always
        applied (GaussianBlur has no probability either); sharpness factor 2 with probability
        0.5; posterize to 3 bits with probability 0.5; random order per patch. One difference:
        torchvision runs brightness and hue inside ColorJitter back to back, here the five
        operators are shuffled freely.

        Parameters
        ----------
        patch_size : int
            Patch side in pixels.
        **overrides
            Any constructor argument, replacing the preset's value.

        Returns
        -------
        PatchJitter

        Examples
        --------
        >>> PatchJitter.authors(16).blur_kernel_size
        (5, 1)
        """
        kwargs: dict[str, Any] = dict(
            p=1.0,
            brightness=0.1,
            p_brightness=1.0,
            contrast=None,
            saturation=None,
            hue=0.1,
            p_hue=1.0,
            p_grayscale=0.0,
            solarize_threshold=None,
            blur_sigma=(0.1, 2.0),
            blur_kernel_size=(5, 1),
            p_blur=1.0,
            noise_std=None,
            posterize_bits=3,
            p_posterize=0.5,
            sharpness=2.0,
            p_sharpness=0.5,
            random_order=True,
        )
        kwargs.update(overrides)
        return cls(patch_size, **kwargs)

    # -------------------------------------------------------------------------- parameters
    @torch.compiler.disable  # host-side draws and a new seed each call: nothing to compile
    def sample_params(
        self,
        batch_size: int,
        height: int,
        width: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        generator: torch.Generator | None = None,
    ) -> PatchJitterParams:
        """Draw the per-patch parameters of one call without touching any image.

        Parameters
        ----------
        batch_size, height, width : int
            ``B``, ``H`` and ``W`` of the images the parameters are for.
        device : torch.device or str, optional
            Where to draw (default: the generator's device, else CPU).
        dtype : torch.dtype
            Floating dtype of the drawn values.
        generator : torch.Generator, optional
            Source of randomness (default: the module's, else torch's global one).

        Returns
        -------
        PatchJitterParams

        Examples
        --------
        >>> params = PatchJitter.paper(16).sample_params(2, 32, 32)
        >>> params.values["hue"].shape
        torch.Size([2, 4])
        """
        generator = generator if generator is not None else self.generator
        if device is None:
            device = generator.device if generator is not None else torch.device("cpu")
        device = torch.device(device)
        if generator is not None and generator.device.type != device.type:
            raise ValueError(
                f"generator: must live on the images' device ({device}), got {generator.device}"
            )
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(
                f"height, width: expected multiples of patch_size={p}, got {height}x{width}"
            )
        grid = (height // p, width // p)
        shape = (batch_size, grid[0] * grid[1])

        # every uniform draw in one call: (1 + 2 per operator, B, N)
        draws = iter(
            torch.rand(
                (1 + 2 * len(self.ops), *shape), generator=generator, device=device, dtype=dtype
            ).unbind(0)
        )

        def uniform() -> Tensor:
            return next(draws)

        applied = uniform() < self.p
        gates: dict[str, Tensor] = {}
        values: dict[str, Tensor] = {}
        for name in self.ops:
            gates[name] = applied & (uniform() < self.probs[name])
            if name == "grayscale":
                continue
            lo, hi = self.ranges[name]
            if name == "posterize":
                draw = uniform().mul(hi - lo + 1).floor_().to(torch.int64).add_(lo).clamp_(lo, hi)
            else:
                draw = uniform().mul_(hi - lo).add_(lo).clamp_(lo, hi)  # no rounding past hi
            values[name] = draw
        order = None
        if self.random_order and len(self.ops) > 1:
            keys = torch.rand((*shape, len(self.ops)), generator=generator, device=device)
            order = keys.argsort(dim=-1).to(torch.uint8)
        noise_seed = None
        if "noise" in self.ops:
            noise_seed = int(
                torch.randint(0, 2**62, (1,), generator=generator, device=device).item()
            )
        return PatchJitterParams(
            patch_size=p,
            grid=grid,
            ops=self.ops,
            applied=applied,
            gates=gates,
            values=values,
            order=order,
            noise_seed=noise_seed,
        )

    # -------------------------------------------------------------------------- forward
    # Runs eagerly under torch.compile: the gated subsets change shape from call to call, and
    # compiled, every call recompiled (over 1 s a call on the CPU, measured).
    @torch.compiler.disable
    def forward(
        self,
        images: Tensor,
        params: PatchJitterParams | None = None,
        return_params: bool = False,
        generator: torch.Generator | None = None,
    ) -> Tensor | tuple[Tensor, PatchJitterParams]:
        """Augment every patch of ``images``.

        Parameters
        ----------
        images : Tensor
            ``(B, C, H, W)`` or ``(C, H, W)``, floating point in ``[0, 1]``, ``C`` in
            ``{1, 3}``, ``H`` and ``W`` multiples of ``patch_size``. A torchvision
            ``tv_tensors.Image`` comes back as one.
        params : PatchJitterParams, optional
            Replay these parameters (from ``return_params=True``) instead of drawing new ones.
        return_params : bool
            Also return the parameters used.
        generator : torch.Generator, optional
            Source of randomness on the images' device (default: the module's, else torch's
            global generator).

        Returns
        -------
        Tensor or (Tensor, PatchJitterParams)
            Augmented images, same shape, dtype and device as ``images``, computed without
            gradient tracking; with ``return_params`` also the parameters.

        Examples
        --------
        >>> import torch
        >>> x = torch.rand(4, 1, 32, 32)
        >>> out, params = PatchJitter(16)(x, return_params=True)
        >>> out.shape, out.dtype, params.gates["blur"].shape
        (torch.Size([4, 1, 32, 32]), torch.float32, torch.Size([4, 4]))
        """
        if not isinstance(return_params, bool):
            raise TypeError(f"return_params: expected a bool, got {return_params!r}")
        # the value range is checked up front (one more read of the images, ~2-3% of a call):
        # bad input fails before the generator is advanced or any work is done
        x, single = self._check_images(images)
        b, c, h, w = x.shape
        work_dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        if params is None:
            params = self.sample_params(
                b, h, w, device=x.device, dtype=work_dtype, generator=generator
            )
        else:
            self._check_params(params, b, h, w, x.device)
        gated = [g.any() for g in params.gates.values()]
        with torch.no_grad():  # an augmentation: not differentiated, worked on in place
            if not gated or not bool(torch.stack(gated).any()):  # one host sync
                out = x.clone()
            else:
                out = self._apply(x, params, work_dtype)
        if single:
            out = out[0]
        if type(images) is not Tensor:  # e.g. torchvision.tv_tensors.Image
            out = out.as_subclass(type(images))
        return (out, params) if return_params else out

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_workspaces"] = []  # scratch memory: neither pickled nor deep-copied
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_workspaces", [])

    def extra_repr(self) -> str:
        parts = [f"patch_size={self.patch_size}", f"p={self.p}"]
        for name in self.ops:
            rng = "" if name == "grayscale" else f"{self.ranges[name]}, "
            parts.append(f"{name}=({rng}p={self.probs[name]})")
        if self.blur_kernel_size is not None:
            parts.append(f"blur_kernel_size={self.blur_kernel_size}")
        parts.append(f"random_order={self.random_order}")
        return ", ".join(parts)

    # -------------------------------------------------------------------------- internals
    def _check_images(self, images: Any) -> tuple[Tensor, bool]:
        if not isinstance(images, Tensor):
            raise TypeError(f"images: expected a torch.Tensor, got {type(images).__name__}")
        x = images.as_subclass(Tensor)
        if not x.is_floating_point():
            raise TypeError(
                f"images: expected a floating-point tensor with values in [0, 1], got {x.dtype}; "
                "convert first, e.g. images.float() / 255"
            )
        if x.ndim not in (3, 4):
            raise ValueError(
                f"images: expected (B, C, H, W) or (C, H, W), got shape {tuple(x.shape)}"
            )
        single = x.ndim == 3
        if single:
            x = x.unsqueeze(0)
        _, c, h, w = x.shape
        if c not in (1, 3):
            raise ValueError(
                f"images: expected 1 or 3 channels, got {c} (shape {tuple(images.shape)})"
            )
        p = self.patch_size
        if h % p or w % p or h == 0 or w == 0:
            raise ValueError(
                f"images: height and width must be positive multiples of patch_size={p}, got {h}x{w}"
            )
        if x.numel():
            if not self._check_range(torch.stack(torch.aminmax(x))):
                x = x.clamp(0.0, 1.0)
        return x, single

    def _check_range(self, lo_hi: Tensor) -> bool:
        """Validate the ``(min, max)`` of the images; ``False`` if they must be clamped."""
        lo_v, hi_v = lo_hi.float().tolist()
        if not (math.isfinite(lo_v) and math.isfinite(hi_v)):
            raise ValueError("images: contains NaN or infinite values")
        if lo_v < 0.0 or hi_v > 1.0:
            if not self.clamp_input:
                raise ValueError(
                    f"images: expected values in [0, 1], got min {lo_v} and max {hi_v} "
                    "(pass clamp_input=True to clamp them)"
                )
            return False
        return True

    def _check_params(self, params: Any, b: int, h: int, w: int, device: torch.device) -> None:
        if not isinstance(params, PatchJitterParams):
            raise TypeError(f"params: expected PatchJitterParams, got {type(params).__name__}")
        p = self.patch_size
        grid = (h // p, w // p)
        if params.patch_size != p or tuple(params.grid) != grid:
            raise ValueError(
                f"params: drawn for patch_size={params.patch_size}, grid {params.grid}; these images "
                f"need patch_size={p}, grid {grid}"
            )
        if tuple(params.applied.shape) != (b, grid[0] * grid[1]):
            raise ValueError(
                f"params: drawn for {tuple(params.applied.shape)} (B, N), images give {(b, grid[0] * grid[1])}"
            )
        if tuple(params.ops) != self.ops or set(params.gates) != set(self.ops):
            raise ValueError(
                f"params: drawn for operators {params.ops}, this module runs {self.ops}"
            )
        if params.applied.device != device:
            raise ValueError(
                f"params: on {params.applied.device}, images on {device}; use params.to()"
            )
        if "noise" in self.ops and params.noise_seed is None:
            raise ValueError("params: noise is active but noise_seed is None")

    def _apply(self, x: Tensor, params: PatchJitterParams, work_dtype: torch.dtype) -> Tensor:
        """Augment ``x`` (``(B, C, H, W)``) with ``params``; a new contiguous tensor.

        The patches are processed in blocks of consecutive patches (whole images, or whole
        rows of patches of one image) small enough for the CPU caches: each block is cut into
        a reused ``(K, C, p, p)`` buffer, every operator runs on it (on the gated rows only),
        and the block is written into the output. Per-operator work that does not depend on
        pixels (gate indices, per-patch values, blur matrices, the noise) is prepared once for
        the whole batch. On other devices the whole batch is one block.
        """
        b, c, h, w = x.shape
        p = self.patch_size
        gh, gw = h // p, w // p
        out = torch.empty((b, c, h, w), dtype=x.dtype, device=x.device)
        # the random order runs one step per (stage, operator): fewer, larger blocks
        scale = 1 if params.order is None else 4
        blocks = _blocks(b, gh, gw, p, _block_patches(x.device, p, scale))
        # a workspace of our own: one that no other thread uses during this call
        ws = self._workspaces.pop() if self._workspaces else _Workspace()
        try:
            self._apply_blocks(x, params, work_dtype, out, blocks, ws)
        finally:
            if not self._workspaces:
                self._workspaces.append(ws)
        return out

    def _apply_blocks(
        self,
        x: Tensor,
        params: PatchJitterParams,
        work_dtype: torch.dtype,
        out: Tensor,
        blocks: list[tuple[int, int, slice, slice]],
        ws: _Workspace,
    ) -> None:
        """The block loop of :meth:`_apply`, writing into ``out``."""
        c, w = x.shape[1], x.shape[3]
        p = self.patch_size
        total = blocks[-1][1]
        starts = torch.tensor([blk[0] for blk in blocks] + [total], device=x.device)
        steps = self._steps(params, c, work_dtype, total, starts, ws)
        # rows gathered at once: the largest subset of one block for any step
        gathered = max(
            (hi - lo for st in steps if st.local is not None for lo, hi in pairwise(st.bounds)),
            default=0,
        )
        hue_rows = max(
            (hi - lo for st in steps if st.name == "hue" for lo, hi in pairwise(st.bounds)),
            default=0,
        )
        capacity = blocks[0][1] - blocks[0][0]
        block = _Block(capacity, gathered, hue_rows, c, p, work_dtype, ws, x.device)
        for index, (start, stop, images, rows) in enumerate(blocks):
            src = x[images, :, rows]
            block.reset(stop - start)
            ops.patchify(src, p, out=block.patches)
            for step in steps:
                step.run(block, index)
            ops.unpatchify(block.patches, src.shape[0], src.shape[2], w, out=out[images, :, rows])

    def _steps(
        self,
        params: PatchJitterParams,
        channels: int,
        work_dtype: torch.dtype,
        total: int,
        starts: Tensor,
        ws: _Workspace,
    ) -> list[_Step]:
        """The operator applications of one call, in order, each prepared for every block.

        ``starts``: first patch of each block, then ``B * N``; ``ws`` holds the noise and the
        blur matrices.
        """
        gates = {k: v.reshape(-1) for k, v in params.gates.items()}
        values = {k: v.reshape(-1) for k, v in params.values.items()}
        noise = rank = None
        if "noise" in gates:
            p = params.patch_size
            count = int(gates["noise"].sum())
            buf = ws.get("noise", count * channels * p * p, work_dtype, gates["noise"].device)
            noise = params.noise(channels, work_dtype, out=buf)
            rank = torch.cumsum(gates["noise"], 0) - 1
        if params.order is None:
            plan = [(name, gates[name], True) for name in params.ops]
        else:
            # random order: at stage k every patch applies its k-th operator
            order = params.order.reshape(total, -1)
            plan = []
            for stage in range(order.shape[1]):
                at_stage = order[:, stage]
                for index, name in enumerate(params.ops):
                    plan.append((name, gates[name] & (at_stage == index), False))
        blur_buf = None
        if "blur" in gates:
            # the blur matrices of all steps (in random order several steps blur, on disjoint
            # patches), one after the other in one buffer
            assert self.blur_kernel_size is not None
            kh, kw = self.blur_kernel_size
            per_patch = (1 if kh == kw or min(kh, kw) == 1 else 2) * self.patch_size**2
            rows = int(gates["blur"].sum())
            blur_buf = ws.get("blur", rows * per_patch, work_dtype, gates["blur"].device)
        blur_used = 0
        steps = []
        for name, mask, whole_gate in plan:
            idx = mask.nonzero().squeeze(1)
            count = idx.numel()
            if count == 0:
                continue
            vals = values.get(name)
            if name in _IDENTITY and count >= _BLEND_FROM * total:
                # cheaper than gathering rows: the identity value leaves other patches bit-exact
                assert vals is not None
                if count < total:
                    vals = torch.where(mask, vals.to(work_dtype), _IDENTITY[name])
                steps.append(_Step(name, None, starts.tolist(), vals))
                continue
            bounds = torch.searchsorted(idx, starts).tolist()
            # index of each gated patch inside its block
            local = idx - starts[torch.searchsorted(starts, idx, right=True) - 1]
            step = _Step(name, local, bounds, None if vals is None else vals.index_select(0, idx))
            if name == "blur":
                assert self.blur_kernel_size is not None and step.values is not None
                assert blur_buf is not None
                size = count * per_patch
                step.extra = ops.blur_matrices(
                    step.values.to(work_dtype),
                    self.blur_kernel_size,
                    self.patch_size,
                    work=blur_buf[blur_used : blur_used + size],
                )
                blur_used += size
            elif name == "hue":
                if channels != 3:  # hue leaves one-channel patches unchanged
                    continue
                assert step.values is not None
                like = torch.empty(0, dtype=work_dtype, device=idx.device)
                step.extra = ops.hue_offsets(step.values, like)
            elif name == "noise":
                assert noise is not None and rank is not None
                # the noise rows are drawn in patch order: in the fixed order they are ours
                step.extra = noise if whole_gate else noise.index_select(0, rank[idx])
            steps.append(step)
        return steps


@dataclass
class _Step:
    """One operator applied to a set of patches, prepared for block-wise application.

    ``local`` is ``None`` for a step applied to every patch with ``values`` of shape
    ``(B * N,)`` (identity value on ungated patches); otherwise the gated patches, in patch
    order, are ``bounds[i]:bounds[i + 1]`` in block ``i``, ``local`` holds their indices inside
    their block, and ``values`` (and ``extra``: blur matrices, hue offsets or noise rows) their
    parameters.
    """

    name: str
    local: Tensor | None
    bounds: list[int]
    values: Tensor | None
    extra: Any = None

    def run(self, block: _Block, index: int) -> None:
        """Apply the step to the patches of block ``index``, in place."""
        patches = block.patches
        size = patches.shape[0]
        lo, hi = self.bounds[index], self.bounds[index + 1]
        if self.local is None:
            assert self.values is not None
            _SUBSET[self.name](patches, self.values[lo:hi], block.tmp(patches.numel()))
            return
        count = hi - lo
        if count == 0:
            return
        hue_work = block.hue_work
        if self.name == "hue" and count < size and hue_work is not None:
            # gather, rotate and put back cache-sized chunks: the rows stay in cache throughout
            step = hue_work.shape[1]
            for first in range(lo, hi, step):
                last = min(hi, first + step)
                local = self.local[first:last]
                sub = torch.index_select(patches, 0, local, out=block.scratch(last - first))
                ops.hue_with_offsets(sub, self.extra[:, first:last], hue_work)
                patches.index_copy_(0, local, sub)
            return
        local = None
        sub = patches
        if count < size:
            local = self.local[lo:hi]
            sub = torch.index_select(patches, 0, local, out=block.scratch(count))
        v = None if self.values is None else self.values[lo:hi]
        if self.name == "blur":
            mat_h, mat_w = self.extra
            res = ops.blur_with_matrices(
                sub,
                None if mat_h is None else mat_h[lo:hi],
                None if mat_w is None else mat_w[lo:hi],
                work=block.tmp(2 * sub.numel()),
            )
        elif self.name == "hue":
            res = ops.hue_with_offsets(sub, self.extra[:, lo:hi], hue_work)
        elif self.name == "noise":
            res = ops.gaussian_noise(sub, v, self.extra[lo:hi], inplace=True)
        else:
            res = _SUBSET[self.name](sub, v, block.tmp(sub.numel()))
        if local is not None:
            patches.index_copy_(0, local, res)
        elif res.data_ptr() != patches.data_ptr():
            patches.copy_(res)


class _Workspace:
    """Flat scratch buffers kept from call to call on the CPU, handed out as views.

    Multi-MiB tensors allocated afresh on every call are often page-faulted in anew (the C
    allocator hands large blocks back to the system): up to about 10,000 faults and a tenth
    of a call on 32 images of 224 x 224, measured. On other devices (whose caching allocators
    already reuse memory) nothing is kept; nor is any buffer larger than ``_MAX_KEPT_BYTES``.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, Tensor] = {}

    def get(self, name: str, numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """A flat tensor of at least ``numel`` elements (contents undefined)."""
        buf = self._buffers.get(name)
        if buf is not None and (
            buf.numel() >= numel and buf.dtype == dtype and buf.device == device
        ):
            return buf[:numel]
        buf = torch.empty(numel, dtype=dtype, device=device)
        if device.type == "cpu" and numel * buf.element_size() <= _MAX_KEPT_BYTES:
            self._buffers[name] = buf
        return buf


# Scratch buffers up to this size are kept between calls (larger ones, e.g. the noise of a
# large batch, are allocated at each call).
_MAX_KEPT_BYTES = 16 << 20


class _Block:
    """Working memory for one block of patches, views of a :class:`_Workspace`.

    ``arena`` has ``capacity + gathered`` rows of ``(C, p, p)``: the block's patches are the
    first rows; rows gathered for an operator that runs on a subset (at most ``gathered``)
    go after row ``capacity``. ``hue_work`` holds the scratch planes of the hue rotation, for
    chunks of at most ``hue_work.shape[1]`` rows (``None`` without hue); :meth:`tmp` is flat
    scratch for the other operators.
    """

    def __init__(
        self,
        capacity: int,
        gathered: int,
        hue_rows: int,
        channels: int,
        patch: int,
        dtype: torch.dtype,
        ws: _Workspace,
        device: torch.device,
    ) -> None:
        self.capacity = capacity
        self._ws, self._dtype, self._device = ws, dtype, device
        shape = (capacity + gathered, channels, patch, patch)
        self.arena = ws.get("arena", math.prod(shape), dtype, device).view(shape)
        self.patches = self.arena[:capacity]
        self.hue_work: Tensor | None = None
        if hue_rows:
            rows = min(hue_rows, ops.cpu_block_patches(self.arena))
            hue_shape = (5, rows, patch, patch)
            self.hue_work = ws.get("hue", math.prod(hue_shape), dtype, device).view(hue_shape)

    def reset(self, size: int) -> None:
        self.patches = self.arena[:size]

    def scratch(self, count: int) -> Tensor:
        return self.arena[self.capacity : self.capacity + count]

    def tmp(self, numel: int) -> Tensor:
        return self._ws.get("tmp", numel, self._dtype, self._device)


# On one CPU thread a block holds about this many pixels per plane (512 patches of 16 x 16,
# 1.5 MiB of float32 RGB): small enough for the core's cache, large enough that the per-op
# Python and dispatch overhead (about 100 torch calls per block) stays small.
_CPU_BLOCK_PIXELS = 1 << 17
# On several CPU threads, larger blocks: every op is a parallel region, and fewer, larger
# ones synchronise less (blocks of 6 MiB still stay in the shared cache).
_CPU_LARGE_BLOCK_PIXELS = 1 << 19


def _block_patches(device: torch.device, patch_size: int, scale: int = 1) -> int | None:
    """Target number of patches per block (``scale`` times the default); ``None``: all."""
    if device.type != "cpu":
        return None
    pixels = _CPU_BLOCK_PIXELS if torch.get_num_threads() == 1 else _CPU_LARGE_BLOCK_PIXELS
    return max(1, scale * pixels // (patch_size * patch_size))


def _blocks(
    batch: int, rows: int, cols: int, patch_size: int, target: int | None
) -> list[tuple[int, int, slice, slice]]:
    """Consecutive patch ranges ``(start, stop, image slice, pixel-row slice)``.

    Whole images per block when an image has at most ``target`` patches, else runs of whole
    patch rows of one image; no block has more patches than the first one.
    """
    n = rows * cols
    everything = slice(None)
    if target is None or batch * n <= target:
        return [(0, batch * n, slice(0, batch), everything)]
    if n <= target:
        per = target // n
        return [
            (i * n, min(batch, i + per) * n, slice(i, min(batch, i + per)), everything)
            for i in range(0, batch, per)
        ]
    per = max(1, target // cols)
    out = []
    for i in range(batch):
        for r in range(0, rows, per):
            stop = min(rows, r + per)
            pixels = slice(r * patch_size, stop * patch_size)
            out.append((i * n + r * cols, i * n + stop * cols, slice(i, i + 1), pixels))
    return out


def _fixed_pair(value: Any) -> Any:
    """A number is a fixed factor (torchvision's RandomAdjustSharpness), not a +- range."""
    return (value, value) if _is_number(value) else value


# operator name -> f(patches, values, flat scratch): the operator in place where it can be
_SUBSET: dict[str, Callable[[Tensor, Any, Tensor], Tensor]] = {
    "brightness": lambda x, v, w: ops.brightness(x, v, inplace=True),
    "contrast": lambda x, v, w: ops.contrast(x, v, inplace=True),
    "saturation": lambda x, v, w: ops.saturation(x, v, inplace=True, work=w),
    "hue": lambda x, v, w: ops.hue(x, v, inplace=True),
    "grayscale": lambda x, v, w: ops.grayscale(x),
    "posterize": lambda x, v, w: ops.posterize(x, v),
    "solarize": lambda x, v, w: ops.solarize(x, v, inplace=True, work=w),
    "sharpness": lambda x, v, w: ops.sharpness(x, v, inplace=True),
}
