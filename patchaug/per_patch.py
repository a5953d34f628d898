"""Any Kornia intensity augmentation, applied to every ViT patch with its own parameters.

:class:`PerPatch` cuts each image into its grid of ``p x p`` patches, stacks them into one
``(B * N, C, p, p)`` batch (:func:`patchaug.patch_ops.patchify`, patches row-major), runs the
wrapped Kornia augmentations on that batch and folds the patches back. Kornia draws parameters
per sample, and every patch is a sample of that batch: every patch gets its own draw, with no
Python loop over patches.

Examples
--------
>>> import torch
>>> import kornia.augmentation as K
>>> from patchaug.per_patch import PerPatch
>>> aug = PerPatch(K.ColorJiggle(0.4, 0.4, 0.2, 0.1, p=0.8), patch_size=16)
>>> images = torch.rand(2, 3, 32, 48)
>>> out = aug(images)
>>> out.shape, aug._params["0.brightness_factor"].shape  # 2 images x 6 patches
(torch.Size([2, 3, 32, 48]), torch.Size([12]))
>>> torch.equal(aug(images, params=aug._params), out)
True
"""

from __future__ import annotations

from typing import Any

from kornia.augmentation import IntensityAugmentationBase2D
from torch import Tensor, nn

from .patch_ops import patchify, unpatchify

__all__ = ["PerPatch"]


class PerPatch(IntensityAugmentationBase2D):
    r"""Apply Kornia intensity augmentations to every patch on its own, as one batch of patches.

    The images are cut into non-overlapping ``patch_size x patch_size`` patches, numbered
    row-major (ViT token order); the wrapped augmentations run one after the other on the
    ``(B * N, C, p, p)`` patch batch, and the patches are folded back. The result equals
    running each augmentation on that patch batch with the same parameters: each patch gets
    its own draw (and its own ``p`` gate) of every augmentation, and an operator that reads
    neighbours (a blur) pads inside the patch and never sees the next one. What an
    augmentation draws once per call (``ColorJiggle``'s order, ``RandomMotionBlur``'s kernel
    size) is shared by all patches; ``same_on_batch=True`` on an augmentation shares its draw
    across all patches of all images.

    Input: ``(B, C, H, W)``, ``(C, H, W)`` or ``(H, W)``, floating point. Output: the input's
    shape (``keepdim=True``) or ``(B, C, H, W)``.

    Parameters
    ----------
    *augs : kornia.augmentation.IntensityAugmentationBase2D
        One or more Kornia intensity augmentations, applied in this order.
    patch_size : int
        Side ``p`` of a patch in pixels; ``H`` and ``W`` must be multiples of it.
    p : float
        Probability that an image is augmented at all (default ``1``; each augmentation also
        gates every patch with its own ``p``).
    keepdim : bool
        Return a ``(C, H, W)`` input as ``(C, H, W)`` (default), not ``(1, C, H, W)``.

    Notes
    -----
    ``_params`` holds one flat dict: each augmentation's parameters for the patch batch under
    ``"<index>.<name>"`` (e.g. ``"0.brightness_factor"``, ``"1.sigma"``, ``"1.batch_prob"``,
    one row per patch), beside this augmentation's own per-image ``batch_prob`` and
    ``forward_input_shape``. Passing it back as ``params=`` replays the call exactly, also
    inside ``AugmentationSequential``. Masks, boxes and keypoints pass through unchanged
    (``RandomErasing`` inside erases image patches, not masks). A tensor subclass such as
    torchvision's ``tv_tensors.Image`` comes back as that subclass.

    Examples
    --------
    >>> import torch
    >>> import kornia.augmentation as K
    >>> aug = PerPatch(K.RandomPlanckianJitter(p=1.0), patch_size=8)
    >>> image = torch.rand(3, 16, 16)
    >>> aug(image).shape, aug._params["0.idx"].shape  # one temperature per patch
    (torch.Size([3, 16, 16]), torch.Size([4]))
    """

    # The wrapped transforms may reject skipped images' values or have unbounded derivatives
    # (RandomGamma, RandomEqualize): run them on 0.5 for the images the per-image gate skips.
    SUBSTITUTE_SKIPPED_SAMPLES = True

    def __init__(
        self,
        *augs: IntensityAugmentationBase2D,
        patch_size: int,
        p: float = 1.0,
        keepdim: bool = True,
    ) -> None:
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
            raise ValueError(f"p: expected a probability in [0, 1], got {p!r}")
        super().__init__(p=p, p_batch=1.0, same_on_batch=False, keepdim=keepdim)
        if not augs:
            raise TypeError("augs: expected at least one Kornia intensity augmentation")
        for i, aug in enumerate(augs):
            # a geometric augmentation would move pixels across patch borders and its boxes,
            # masks and matrix would no longer describe the image
            if not isinstance(aug, IntensityAugmentationBase2D):
                raise TypeError(
                    f"augs[{i}]: expected a Kornia intensity augmentation "
                    f"(kornia.augmentation.IntensityAugmentationBase2D), got {type(aug).__name__}"
                )
        if not isinstance(patch_size, int) or isinstance(patch_size, bool):
            raise TypeError(f"patch_size: expected a positive int, got {patch_size!r}")
        if patch_size < 1:
            raise ValueError(f"patch_size: expected a positive int, got {patch_size}")
        self.augs = nn.ModuleList(augs)
        self.flags = {"patch_size": patch_size}

    def __repr__(self) -> str:
        augs = ", ".join(repr(aug) for aug in self.augs)
        return f"{type(self).__name__}({augs}, patch_size={self.flags['patch_size']}, p={self.p})"

    def _num_patches(self, height: int, width: int) -> int:
        p = self.flags["patch_size"]
        if height % p or width % p:
            raise ValueError(
                f"input: height and width must be multiples of patch_size={p}, got {height}x{width}"
            )
        return (height // p) * (width // p)

    def forward(
        self, input: Tensor, params: dict[str, Tensor] | None = None, **kwargs: Any
    ) -> Tensor:
        """Augment every patch of ``input``; a new draw unless ``params`` is given.

        Parameters
        ----------
        input : Tensor
            ``(B, C, H, W)``, ``(C, H, W)`` or ``(H, W)`` floats, ``H`` and ``W`` multiples of
            ``patch_size``.
        params : dict of str to Tensor, optional
            A previous call's ``_params``, to replay it exactly.
        **kwargs
            Passed on to Kornia's ``forward`` (parameter and flag overrides).

        Returns
        -------
        Tensor
            The input's shape (``(B, C, H, W)`` if ``keepdim=False``) and type.
        """
        if not isinstance(input, Tensor):
            raise TypeError(f"input: expected a torch.Tensor, got {type(input).__name__}")
        out = super().forward(input.as_subclass(Tensor), params, **kwargs)
        # Kornia's ops return plain tensors; a torchvision tv_tensors.Image in a v2 pipeline
        # must come back as one
        return out if type(input) is Tensor else out.as_subclass(type(input))

    def generate_parameters(self, batch_shape: tuple[int, ...]) -> dict[str, Tensor]:
        b, c, h, w = batch_shape
        p = self.flags["patch_size"]
        patches = (b * self._num_patches(h, w), c, p, p)
        # one flat dict, as Kornia's containers require: the wrapped augmentations' own
        # parameters for the patch batch (with their per-patch gates), keyed by their index
        params: dict[str, Tensor] = {}
        for i, aug in enumerate(self.augs):
            params.update({f"{i}.{k}": v for k, v in aug.forward_parameters(patches).items()})
        return params

    def apply_transform(
        self,
        input: Tensor,
        params: dict[str, Tensor],
        flags: dict[str, Any],
        transform: Tensor | None = None,
    ) -> Tensor:
        b, _, h, w = input.shape
        self._num_patches(h, w)  # a replay on images of the wrong size fails here, named
        x = patchify(input, self.flags["patch_size"])
        for i, aug in enumerate(self.augs):
            prefix = f"{i}."
            own = {k[len(prefix) :]: v for k, v in params.items() if k.startswith(prefix)}
            x = aug(x, params=own)
        return unpatchify(x, b, h, w)
