"""Per-patch photometric augmentation (PW-Self Sec. 3.3), a Kornia augmentation.

:class:`PatchJitter` cuts every image into its ViT patch grid and gives each patch its own,
independently drawn photometric augmentation: a list of operators from
:mod:`patchaug.operators`, each with its own probability and range. Parameters are drawn per
patch (:meth:`PatchJitter.generate_parameters`), recorded in a small
:class:`PatchJitterParams`, and applied (:meth:`PatchJitter.apply_transform`) by one of three
engines that compute the same thing:

* ``"reference"``: :func:`apply_reference`, the specification: the patches as one batch, the
  operators one after the other, each on the patches it is gated on;
* ``"torch"``: :class:`patchaug.blocked_engine.BlockedEngine`, the same on cache-sized blocks
  of patches (about twice as fast on the CPU);
* ``"triton"``: :func:`patchaug.triton_engine.apply_patch_chain`, one fused kernel that reads
  each patch once, runs its whole chain, and writes it once (CUDA).

``backend="auto"`` takes Triton on CUDA when it is available and knows every operator, the
torch engine otherwise.

Examples
--------
>>> import torch
>>> from patchaug.patch_jitter import PatchJitter
>>> jitter = PatchJitter.paper(patch_size=16)
>>> images = torch.rand(2, 3, 64, 64)
>>> out, params = jitter(images, return_params=True)
>>> torch.equal(jitter(images, params=params), out)
True
>>> torch.equal(PatchJitter.paper(16, p=0.0)(images), images)
True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from kornia.augmentation import IntensityAugmentationBase2D
from torch import Tensor

from . import patch_ops as ops
from .blocked_engine import BlockedEngine
from .operators import (
    Brightness,
    Contrast,
    GaussianBlur,
    GaussianNoise,
    Hue,
    PatchOp,
    Posterize,
    Saturation,
    Sharpness,
    Solarize,
    check_prob,
)

__all__ = [
    "PatchJitter",
    "PatchJitterParams",
    "apply_reference",
    "paper_operators",
    "authors_operators",
    "BACKENDS",
]

#: The engines :class:`PatchJitter` can run on.
BACKENDS = ("auto", "torch", "triton", "reference")


# ---------------------------------------------------------------------------------------------
# presets
# ---------------------------------------------------------------------------------------------
def paper_operators() -> list[PatchOp]:
    """The operators PW-Self Sec. 3.3 names, with DINO's ranges where DINO has them.

    Colour jitter: brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1 (DINO's
    ColorJitter), each with probability 0.8, drawn independently per patch (DINO gates the
    four together per image; independent gates give more varied patches at the same marginal
    rate). Solarization at threshold 0.5 with probability 0.2 (DINO's rate on its second
    view). Gaussian blur with sigma in ``[0.1, 2]`` (DINO's range), kernel
    ``2 ceil(3 sigma_max) + 1 = 13`` capped at ``2 p - 1``, probability 0.5 (DINO's rate on
    local crops). Gaussian noise, which DINO lacks: std in ``[0, 0.1]`` with probability 0.2,
    strong enough to be seen on a 16-pixel patch without drowning it.
    """
    return [
        Brightness(0.4, p=0.8),
        Contrast(0.4, p=0.8),
        Saturation(0.2, p=0.8),
        Hue(0.1, p=0.8),
        Solarize(0.5, p=0.2),
        GaussianBlur((0.1, 2.0), p=0.5),
        GaussianNoise((0.0, 0.1), p=0.2),
    ]


def authors_operators() -> list[PatchOp]:
    """The authors' patch-level branch (their DINO fork, PIL per 16 x 16 patch).

    ``RandomOrder([ColorJitter(brightness=0.1, hue=0.1), GaussianBlur((1, 5), (0.1, 2)),
    RandomAdjustSharpness(2, p=0.5), RandomPosterize(3, p=0.5)])``: brightness in
    ``[0.9, 1.1]`` and hue in ``[-0.1, 0.1]`` turns, always applied (torchvision's ColorJitter
    has no probability); a vertical blur (torchvision's kernel ``(1, 5)`` is width 1, height 5,
    i.e. ``(kH, kW) = (5, 1)``) with sigma in ``[0.1, 2]``, always applied; sharpness 2 and
    posterize to 3 bits, each with probability 0.5. Run in random order per patch. One
    difference: torchvision runs brightness and hue inside ColorJitter back to back, here the
    five operators are shuffled freely.
    """
    return [
        Brightness(0.1, p=1.0),
        Hue(0.1, p=1.0),
        Posterize(3, p=0.5),
        Sharpness(2.0, p=0.5),
        GaussianBlur((0.1, 2.0), kernel_size=(5, 1), p=1.0),
    ]


# ---------------------------------------------------------------------------------------------
# parameters
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PatchJitterParams:
    """Everything drawn for one call of :class:`PatchJitter`, per image and patch.

    Patches are numbered row-major over the ``(rows, cols)`` grid (ViT token order without the
    CLS token), ``N = rows * cols``. The structure holds per-patch gates and values, never a
    copy of the image; Gaussian noise is recorded as a seed.

    Attributes
    ----------
    patch_size : int
        Patch side in pixels.
    grid : tuple of int
        ``(rows, cols)`` of the patch grid.
    ops : tuple of str
        Names of the operators, in the module's order.
    applied : Tensor
        ``(B, N)`` bool: the patch is augmented at all (image gate ``p`` and patch gate
        ``p_patch``).
    gates : dict of str to Tensor
        Per operator, ``(B, N)`` bool: the operator runs on the patch (``applied`` and the
        operator's own probability).
    values : dict of str to Tensor
        Per operator with a parameter, ``(B, N)`` float32, drawn for every patch, used where
        gated (posterize bits are whole numbers).
    order : Tensor or None
        ``(B, N, len(ops))`` uint8, per patch the indices into ``ops`` in the order they run
        (``random_order=True``); ``None`` for the fixed order.
    noise_seed : int or None
        Seed of the generator that draws the Gaussian noise (see :meth:`noise`).
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

    def __repr__(self) -> str:
        order = "random" if self.order is not None else "fixed"
        return (
            f"PatchJitterParams(B={self.batch_size}, grid={self.grid}, "
            f"patch_size={self.patch_size}, ops={self.ops}, order={order}, "
            f"noise_seed={self.noise_seed}, device={self.applied.device})"
        )

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

    def as_dict(self) -> dict[str, Tensor]:
        """The flat ``{name: tensor}`` form Kornia keeps in ``aug._params``."""
        d = {"applied": self.applied, "batch_prob": self.applied.any(dim=1).float()}
        d.update({f"gate_{k}": v for k, v in self.gates.items()})
        d.update({f"value_{k}": v for k, v in self.values.items()})
        if self.order is not None:
            d["order"] = self.order
        if self.noise_seed is not None:
            d["noise_seed"] = torch.tensor([self.noise_seed], dtype=torch.int64)
        return d

    @classmethod
    def from_dict(
        cls, params: dict[str, Tensor], patch_size: int, grid: tuple[int, int], ops: Sequence[str]
    ) -> PatchJitterParams:
        """Inverse of :meth:`as_dict`; ValueError naming ``params`` if a key is missing."""
        missing = [f"gate_{k}" for k in ops if f"gate_{k}" not in params]
        if "applied" not in params or missing:
            raise ValueError(
                f"params: not drawn by this PatchJitter (operators {tuple(ops)}); missing "
                f"{(['applied'] if 'applied' not in params else []) + missing}"
            )
        seed = params.get("noise_seed")
        return cls(
            patch_size=patch_size,
            grid=grid,
            ops=tuple(ops),
            applied=params["applied"],
            gates={k: params[f"gate_{k}"] for k in ops},
            values={k: params[f"value_{k}"] for k in ops if f"value_{k}" in params},
            order=params.get("order"),
            noise_seed=None if seed is None else int(seed.reshape(-1)[0]),
        )

    @torch.compiler.disable  # a new seed each call would make torch.compile recompile
    def noise(
        self, channels: int, dtype: torch.dtype = torch.float32, *, out: Tensor | None = None
    ) -> Tensor:
        """Regenerate the standard normal noise of the ``"noise"`` operator.

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
            (``gates["noise"].flatten().nonzero()``), from
            ``torch.Generator(device).manual_seed(noise_seed)``; ``K = 0`` without noise.
        """
        device = self.applied.device
        p = self.patch_size
        if "noise" not in self.gates or self.noise_seed is None:
            return torch.empty((0, channels, p, p), device=device, dtype=dtype)
        shape = (int(self.gates["noise"].sum()), channels, p, p)
        gen = torch.Generator(device=device).manual_seed(self.noise_seed)
        if out is None:
            return torch.randn(shape, generator=gen, device=device, dtype=dtype)
        if not isinstance(out, Tensor):
            raise TypeError(f"out: expected a tensor or None, got {type(out).__name__}")
        numel = math.prod(shape)
        if out.dtype != dtype or out.device != device or out.ndim != 1 or out.numel() < numel:
            raise ValueError(
                f"out: expected a flat {dtype} tensor on {device} with at least {numel} "
                f"elements, got {tuple(out.shape)} {out.dtype} on {out.device}"
            )
        return torch.randn(shape, generator=gen, out=out[:numel].view(shape))


# ---------------------------------------------------------------------------------------------
# the reference engine
# ---------------------------------------------------------------------------------------------
def apply_reference(
    images: Tensor, operators: Sequence[PatchOp], params: PatchJitterParams
) -> Tensor:
    """The specification of :class:`PatchJitter`: every operator on its gated patches, in order.

    Parameters
    ----------
    images : Tensor
        ``(B, C, H, W)`` in ``[0, 1]``.
    operators : sequence of PatchOp
        The operators ``params`` was drawn for.
    params : PatchJitterParams
        On the images' device.

    Returns
    -------
    Tensor
        ``(B, C, H, W)``, a new tensor of the images' dtype (half precision is computed in
        float32 and rounded once).
    """
    b, c, h, w = images.shape
    work = torch.float32 if images.dtype in (torch.float16, torch.bfloat16) else images.dtype
    patches = ops.patchify(images, params.patch_size, dtype=work)  # (B * N, C, p, p)
    k = len(operators)
    order = (
        torch.arange(k, device=images.device).expand(patches.shape[0], k)
        if params.order is None
        else params.order.reshape(-1, k).long()
    )
    noise = params.noise(c, work)
    for stage in range(k):  # at stage s every patch runs its s-th operator, if gated
        for index, op in enumerate(operators):
            gate = params.gates[op.name].reshape(-1) & (order[:, stage] == index)
            rows = gate.nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            values = params.values.get(op.name, torch.zeros(patches.shape[0], device=rows.device))
            values = values.reshape(-1)[rows].to(work)
            patch_noise = None
            if op.draws_noise:  # the noise rows are in the order of the gated patches
                patch_noise = noise[params.gates[op.name].reshape(-1).cumsum(0)[rows] - 1]
            patches[rows] = op.apply(patches[rows], values, patch_noise)
    return ops.unpatchify(patches, b, h, w, dtype=images.dtype)


# ---------------------------------------------------------------------------------------------
# the module
# ---------------------------------------------------------------------------------------------
class PatchJitter(IntensityAugmentationBase2D):
    """Independent photometric augmentation of every ViT patch, a Kornia augmentation.

    Each image is cut into its grid of ``patch_size x patch_size`` patches. An image is
    augmented with probability ``p`` (Kornia's per-sample gate), a patch of it with
    probability ``p_patch``; then each operator runs on the patch with its own probability and
    its own parameter, drawn uniformly from its range, independently per patch. The operators
    run in the given order, or with ``random_order=True`` in a random order drawn per patch.
    A patch's output depends only on that patch's input and its parameters (blur and sharpness
    pad inside the patch). Each operator equals a Kornia functional op on the patch alone.

    As a Kornia augmentation it works inside
    :class:`kornia.augmentation.AugmentationSequential` (boxes, masks and keypoints pass
    through) and replays with ``aug(x, params=aug._params)``; it also takes its own
    :class:`PatchJitterParams` (``return_params=True``, ``params=``) and a ``generator``.

    **Input range.** Images are floats in ``[0, 1]``. With ``clamp_input=True`` (default, as
    Kornia's range-dependent augmentations do) values slightly outside, such as bicubic
    resampling's overshoot in DINO's crops, are clamped first; with ``False`` they raise.
    NaN and infinite values always raise.

    **Not differentiable.** The engines work in place without autograd: an input that
    requires grad (with grad mode on) raises ValueError instead of being silently detached.

    Parameters
    ----------
    patch_size : int
        Patch side ``p`` in pixels; image height and width must be multiples of it.
    operators : sequence of PatchOp, optional
        The operators, in their fixed order (default: :func:`paper_operators`); names unique.
    p_patch : float
        Probability that a patch is augmented at all.
    random_order : bool
        Draw an independent order of the operators per patch.
    p : float
        Probability that an image is augmented at all (Kornia's ``p``).
    clamp_input : bool
        Clamp values outside ``[0, 1]`` instead of raising.
    backend : {"auto", "torch", "triton", "reference"}
        Engine (see the module docstring).
    generator : torch.Generator, optional
        Default source of randomness (else torch's global generator).
    keepdim : bool
        Return ``(C, H, W)`` for a ``(C, H, W)`` input (Kornia's default is ``False``: a batch
        of one); ``True`` as a torchvision transform would.

    Examples
    --------
    >>> import torch
    >>> from patchaug.operators import Brightness, GaussianBlur
    >>> jitter = PatchJitter(16, [Brightness(0.4, p=0.8), GaussianBlur((0.1, 2.0), p=0.5)])
    >>> jitter(torch.rand(4, 3, 32, 32)).shape
    torch.Size([4, 3, 32, 32])
    """

    def __init__(
        self,
        patch_size: int,
        operators: Sequence[PatchOp] | None = None,
        *,
        p_patch: float = 1.0,
        random_order: bool = False,
        p: float = 1.0,
        clamp_input: bool = True,
        backend: str = "auto",
        generator: torch.Generator | None = None,
        keepdim: bool = True,
    ) -> None:
        if not isinstance(patch_size, int) or isinstance(patch_size, bool):
            raise TypeError(f"patch_size: expected a positive int, got {patch_size!r}")
        if patch_size < 1:
            raise ValueError(f"patch_size: expected a positive int, got {patch_size}")
        for name, flag in (("random_order", random_order), ("clamp_input", clamp_input),
                           ("keepdim", keepdim)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name}: expected a bool, got {flag!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator: expected a torch.Generator or None, got {generator!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
        super().__init__(p=check_prob("p", p), p_batch=1.0, same_on_batch=False, keepdim=keepdim)
        operators = paper_operators() if operators is None else list(operators)
        for op in operators:
            if not isinstance(op, PatchOp):
                raise TypeError(
                    f"operators: expected patchaug.operators.PatchOp instances, got {op!r}"
                )
            op.check_patch_size(patch_size)
        names = [op.name for op in operators]
        if len(set(names)) != len(names):
            raise ValueError(f"operators: names must be unique, got {names}")
        self.patch_size = patch_size
        self.operators: tuple[PatchOp, ...] = tuple(op for op in operators if op.p > 0)
        self.p_patch = check_prob("p_patch", p_patch)
        self.random_order = random_order
        self.clamp_input = clamp_input
        self.backend = backend
        self.generator = generator
        self._blocked = BlockedEngine()  # keeps CPU scratch between calls (not state)

    @property
    def ops(self) -> tuple[str, ...]:
        """Names of the active operators (probability above 0), in order."""
        return tuple(op.name for op in self.operators)

    @classmethod
    def paper(cls, patch_size: int, **kwargs: Any) -> PatchJitter:
        """:func:`paper_operators` in fixed order; ``kwargs`` go to the constructor.

        Examples
        --------
        >>> PatchJitter.paper(16).ops
        ('brightness', 'contrast', 'saturation', 'hue', 'solarize', 'blur', 'noise')
        """
        return cls(patch_size, paper_operators(), **kwargs)

    @classmethod
    def authors(cls, patch_size: int, **kwargs: Any) -> PatchJitter:
        """:func:`authors_operators` in random order per patch; ``kwargs`` go to the constructor.

        Examples
        --------
        >>> PatchJitter.authors(16).operators[-1].kernel_for(16)
        (5, 1)
        """
        kwargs.setdefault("random_order", True)
        return cls(patch_size, authors_operators(), **kwargs)

    def __repr__(self) -> str:
        return (
            f"PatchJitter(patch_size={self.patch_size}, operators={list(self.operators)}, "
            f"p_patch={self.p_patch}, random_order={self.random_order}, p={self.p}, "
            f"clamp_input={self.clamp_input}, backend={self.backend!r})"
        )

    # -------------------------------------------------------------------------- parameters
    @torch.compiler.disable  # host-side draws and a new seed each call: nothing to compile
    def sample_params(
        self,
        batch_size: int,
        height: int,
        width: int,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> PatchJitterParams:
        """Draw the per-patch parameters of one call without touching any image.

        Parameters
        ----------
        batch_size, height, width : int
            ``B``, ``H`` and ``W`` of the images the parameters are for.
        device : torch.device or str, optional
            Where to draw (default: the generator's device, else the module's).
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
            device = generator.device if generator is not None else self.device
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
        # every uniform draw in one call: image gate, patch gate, then a gate and a value per
        # operator
        u = torch.rand(
            (2 + 2 * len(self.operators), *shape), generator=generator, device=device
        ).unbind(0)
        applied = (u[0][:, :1] < self.p) & (u[1] < self.p_patch)
        gates = {op.name: applied & (u[2 + 2 * i] < op.p) for i, op in enumerate(self.operators)}
        values = {
            op.name: op.sample(u[3 + 2 * i])
            for i, op in enumerate(self.operators)
            if op.has_parameter
        }
        order = None
        if self.random_order and len(self.operators) > 1:
            keys = torch.rand((*shape, len(self.operators)), generator=generator, device=device)
            order = keys.argsort(dim=-1).to(torch.uint8)
        noise_seed = None
        if any(op.draws_noise for op in self.operators):
            seed = torch.randint(0, 2**62, (1,), generator=generator, device=device)
            noise_seed = int(seed.item())
        return PatchJitterParams(p, grid, self.ops, applied, gates, values, order, noise_seed)

    def forward_parameters(  # type: ignore[override]
        self, batch_shape: tuple[int, ...], generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        """Kornia's hook: the parameters for a ``(B, C, H, W)`` batch, as a flat dict."""
        b, _, h, w = batch_shape
        params = self.sample_params(b, h, w, generator=generator).as_dict()
        params["forward_input_shape"] = torch.tensor(tuple(batch_shape), dtype=torch.long)
        return params

    # -------------------------------------------------------------------------- forward
    # Runs eagerly under torch.compile: the gated subsets change shape from call to call.
    @torch.compiler.disable
    def forward(  # type: ignore[override]
        self,
        images: Tensor,
        params: PatchJitterParams | dict[str, Tensor] | None = None,
        return_params: bool = False,
        generator: torch.Generator | None = None,
        **kwargs: Any,
    ) -> Tensor | tuple[Tensor, PatchJitterParams]:
        """Augment every patch of ``images``.

        Parameters
        ----------
        images : Tensor
            ``(B, C, H, W)`` or ``(C, H, W)``, floating point in ``[0, 1]``, ``C`` in
            ``{1, 3}``, ``H`` and ``W`` multiples of ``patch_size``. A torchvision
            ``tv_tensors.Image`` comes back as one.
        params : PatchJitterParams or dict, optional
            Replay these parameters (``return_params=True``, or Kornia's ``aug._params``).
        return_params : bool
            Also return the parameters used, as :class:`PatchJitterParams`.
        generator : torch.Generator, optional
            Source of randomness on the images' device (default: the module's, else torch's
            global generator).
        **kwargs
            Passed to Kornia's ``forward``.

        Returns
        -------
        Tensor or (Tensor, PatchJitterParams)
            Augmented images, same shape, dtype and device as ``images``; with
            ``return_params`` also the parameters.

        Examples
        --------
        >>> import torch
        >>> x = torch.rand(4, 1, 32, 32)
        >>> out, params = PatchJitter.paper(16)(x, return_params=True)
        >>> out.shape, params.gates["blur"].shape
        (torch.Size([4, 1, 32, 32]), torch.Size([4, 4]))
        """
        if not isinstance(return_params, bool):
            raise TypeError(f"return_params: expected a bool, got {return_params!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator: expected a torch.Generator or None, got {generator!r}")
        x = self._check_images(images)
        b, _, h, w = (1, *x.shape) if x.ndim == 3 else x.shape
        if isinstance(params, PatchJitterParams):
            params = params.as_dict()
        elif params is None:
            device = x.device if generator is None else generator.device
            params = self.sample_params(b, h, w, device=device, generator=generator).as_dict()
        elif not isinstance(params, dict):
            raise TypeError(
                f"params: expected PatchJitterParams or a dict, got {type(params).__name__}"
            )
        params["forward_input_shape"] = torch.tensor((b, x.shape[-3], h, w), dtype=torch.long)
        if b == 0:  # nothing to augment (Kornia's checks reject an empty batch)
            self._params = params
            out = x.clone()
        else:
            out = super().forward(x, params=params, **kwargs)
        if type(images) is not Tensor:  # e.g. torchvision.tv_tensors.Image
            out = out.as_subclass(type(images))
        if return_params:
            return out, self._to_params(self._params, (h // self.patch_size, w // self.patch_size))
        return out

    def apply_transform(  # type: ignore[override]
        self,
        input: Tensor,
        params: dict[str, Tensor],
        flags: dict[str, Any],
        transform: Tensor | None = None,
    ) -> Tensor:
        """Kornia's hook: augment ``(B, C, H, W)`` images with the drawn parameters."""
        b, _, h, w = input.shape
        grid = (h // self.patch_size, w // self.patch_size)
        jp = self._to_params(params, grid)
        if tuple(jp.applied.shape) != (b, grid[0] * grid[1]):
            raise ValueError(
                f"params: drawn for {tuple(jp.applied.shape)} (B, N), images give "
                f"{(b, grid[0] * grid[1])}"
            )
        if jp.applied.device != input.device:
            jp = jp.to(input.device)
        work = torch.float32 if input.dtype in (torch.float16, torch.bfloat16) else input.dtype
        if not self.operators:
            return input.clone()
        engine = self._engine(input)
        with torch.no_grad():
            if engine == "triton":  # one kernel whatever is gated: no host sync to ask
                return self._apply_triton(input, jp)
            gated = [g.any() for g in jp.gates.values()]
            if not gated or not bool(torch.stack(gated).any()):
                return input.clone()  # nothing gated: one host sync, no work
            if engine == "reference":
                return apply_reference(input, self.operators, jp)
            return self._blocked(input, self.operators, jp, work)

    # -------------------------------------------------------------------------- internals
    def _engine(self, x: Tensor) -> str:
        """The engine for ``x``: the backend asked for, or what ``"auto"`` resolves to."""
        if self.backend in ("torch", "reference"):
            return self.backend
        if self.backend == "auto" and x.device.type != "cuda":
            return "torch"
        from .triton_engine import triton_available

        fits = (
            triton_available(x.device)
            and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and all(op.triton_code is not None for op in self.operators)
        )
        if self.backend == "triton":
            if not fits:
                raise ValueError(
                    "backend: 'triton' needs CUDA tensors (or TRITON_INTERPRET=1), float16, "
                    "bfloat16 or float32 images and operators the kernel knows; got "
                    f"{x.dtype} on {x.device}, operators {self.ops}"
                )
            return "triton"
        return "triton" if fits else "torch"

    def _apply_triton(self, x: Tensor, params: PatchJitterParams) -> Tensor:
        from .triton_engine import apply_patch_chain

        total = params.applied.numel()
        zeros = params.applied.new_zeros(params.applied.shape, dtype=torch.float32)
        values = torch.stack(
            [params.values.get(op.name, zeros).reshape(-1).float() for op in self.operators], 1
        )
        gates = torch.stack([params.gates[op.name].reshape(-1) for op in self.operators], 1)
        order = None if params.order is None else params.order.reshape(total, -1)
        noise = noise_row = None
        noisy = [op.name for op in self.operators if op.draws_noise]
        if noisy:
            noise = params.noise(x.shape[1], torch.float32)
            noise_row = params.gates[noisy[0]].reshape(-1).cumsum(0) - 1
        blur = next((op for op in self.operators if isinstance(op, GaussianBlur)), None)
        return apply_patch_chain(
            x,
            self.patch_size,
            [op.triton_code for op in self.operators],  # type: ignore[misc]
            values,
            gates,
            order,
            noise,
            noise_row,
            blur.kernel_for(self.patch_size) if blur is not None else (1, 1),
        )

    def _to_params(self, params: dict[str, Tensor], grid: tuple[int, int]) -> PatchJitterParams:
        jp = PatchJitterParams.from_dict(params, self.patch_size, grid, self.ops)
        if any(op.draws_noise for op in self.operators) and jp.noise_seed is None:
            raise ValueError("params: noise is active but no noise_seed was drawn")
        if self.random_order and len(self.operators) > 1 and jp.order is None:
            raise ValueError("params: random_order is on but params hold no order")
        return jp

    def _check_images(self, images: Any) -> Tensor:
        """Validate ``images`` (before any random draw); clamped if asked to."""
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
        c, h, w = x.shape[-3:]
        if c not in (1, 3):
            raise ValueError(f"images: expected 1 or 3 channels, got {c} (shape {tuple(x.shape)})")
        p = self.patch_size
        if h % p or w % p or h == 0 or w == 0:
            raise ValueError(
                f"images: height and width must be positive multiples of patch_size={p}, "
                f"got {h}x{w}"
            )
        if torch.is_grad_enabled() and x.requires_grad:
            raise ValueError(
                "images: PatchJitter is not differentiable (its engines work without "
                "autograd); pass images.detach() or call it under torch.no_grad()"
            )
        if x.numel():
            lo, hi = torch.stack(torch.aminmax(x)).float().tolist()
            if not (math.isfinite(lo) and math.isfinite(hi)):
                raise ValueError("images: contains NaN or infinite values")
            if lo < 0.0 or hi > 1.0:
                if not self.clamp_input:
                    raise ValueError(
                        f"images: expected values in [0, 1], got min {lo} and max {hi} "
                        "(clamp_input=True clamps them)"
                    )
                x = x.clamp(0.0, 1.0)
        return x
