"""Frozen-backbone features for the evaluations (k-NN, linear probe, copy detection, retrieval).

Each feature function runs the backbone under ``torch.no_grad()``; the caller
sets eval mode (:func:`extract_features` does, and restores the previous mode).
One function per feature DINO uses:

* :func:`cls_features`: the CLS token of the last block after the final norm (k-NN);
* :func:`last_blocks_features`: the CLS tokens of the last ``n`` blocks (each after
  the final norm, as DINO's ``get_intermediate_layers``), concatenated, optionally
  followed by the average of the last block's patch tokens (linear probe);
* :func:`gem_features`: CLS concatenated with the generalised mean (GeM, power ``p``)
  of the clamped (``>= 1e-6``) patch tokens of the last block (copy detection);
* :func:`multiscale_features`: CLS averaged over the image at scales 1, 1/sqrt(2),
  1/2, then L2-normalised (retrieval).

:func:`extract_features` runs one of them over a whole loader.

Inputs whose height or width is not a multiple of the patch size are cropped at
the bottom/right to the largest multiple, which is what a stride-``p``
patch-embedding convolution does in DINO's own ViT.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pwself_reference.augment import (  # one definition for train and eval
    IMAGENET_MEAN,
    IMAGENET_STD,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "to_normalized_tensor",
    "eval_transform",
    "crop_to_patch_multiple",
    "FeatureFn",
    "cls_features",
    "last_blocks_features",
    "gem_features",
    "multiscale_features",
    "extract_features",
]

MULTISCALE = (1.0, 1.0 / math.sqrt(2.0), 0.5)

#: A feature function: ``(backbone, images (B, 3, H, W)) -> features (B, D')``.
FeatureFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def to_normalized_tensor(img: Any) -> torch.Tensor:
    """PIL image -> ``(3, H, W)`` float tensor normalised with the ImageNet mean/std."""
    from torchvision.transforms import functional as TF

    t = TF.to_tensor(img.convert("RGB") if hasattr(img, "convert") else img)
    return TF.normalize(t, IMAGENET_MEAN, IMAGENET_STD)


def eval_transform(img_size: int, resize_ratio: float = 256 / 224) -> Any:
    """DINO's evaluation transform: resize the short side, centre crop, normalise.

    Parameters
    ----------
    img_size : int
        Side of the centre crop (224 for ImageNet; the training ``global_crop_size``).
    resize_ratio : float
        Short side before cropping is ``round(img_size * resize_ratio)``; DINO
        uses 256/224. ``1.0`` keeps the whole (square) image.

    Examples
    --------
    >>> from PIL import Image
    >>> eval_transform(32)(Image.new("RGB", (40, 50))).shape
    torch.Size([3, 32, 32])
    """
    from torchvision import transforms as T

    if not isinstance(img_size, int) or img_size <= 0:
        raise ValueError(f"img_size must be a positive int, got {img_size!r}")
    if not resize_ratio >= 1.0:
        raise ValueError(f"resize_ratio must be >= 1, got {resize_ratio!r}")
    return T.Compose(
        [
            T.Lambda(lambda im: im.convert("RGB")),
            T.Resize(int(round(img_size * resize_ratio)), interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(img_size),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def _patch_hw(backbone: nn.Module) -> tuple[int, int]:
    pe = getattr(backbone, "patch_embed", None)
    ps = getattr(pe, "patch_size", None)
    if ps is None:
        return (1, 1)
    if isinstance(ps, int):
        return (ps, ps)
    return (int(ps[0]), int(ps[1]))


def crop_to_patch_multiple(images: torch.Tensor, patch: int | Sequence[int]) -> torch.Tensor:
    """Drop bottom rows / right columns so ``H`` and ``W`` are multiples of ``patch``.

    Examples
    --------
    >>> crop_to_patch_multiple(torch.zeros(1, 3, 35, 50), 16).shape
    torch.Size([1, 3, 32, 48])
    """
    ph, pw = (patch, patch) if isinstance(patch, int) else patch
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (ph, pw)):
        raise ValueError(f"patch must be a positive int or (height, width) pair, got {patch!r}")
    h, w = images.shape[-2] // ph * ph, images.shape[-1] // pw * pw
    if h == 0 or w == 0:
        raise ValueError(
            f"images of size {tuple(images.shape[-2:])} are smaller than one patch {(ph, pw)}"
        )
    return images[..., :h, :w]


def _tokens(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    from pwself_reference.models import backbone_tokens

    return backbone_tokens(backbone, crop_to_patch_multiple(images, _patch_hw(backbone)))


def _check_images(images: Any) -> None:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")


def cls_features(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The CLS token of the last block, after the final norm (k-NN, train.py's monitor).

    Parameters
    ----------
    backbone : nn.Module
        A timm ViT (see :func:`pwself_reference.models.build_backbone`).
    images : Tensor, shape ``(B, 3, H, W)``

    Returns
    -------
    Tensor, shape ``(B, D)``

    Examples
    --------
    >>> from pwself_reference.models import build_backbone
    >>> net = build_backbone("vit_tiny", patch_size=8, img_size=32).eval()
    >>> cls_features(net, torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 192])
    """
    _check_images(images)
    with torch.no_grad():
        return _tokens(backbone, images)[:, 0]


def last_blocks_features(
    backbone: nn.Module,
    images: torch.Tensor,
    n_last_blocks: int = 4,
    avgpool_patchtokens: bool = False,
) -> torch.Tensor:
    """DINO's linear-evaluation features: the CLS of the last ``n`` blocks, concatenated.

    Each block's output goes through the final norm (DINO's
    ``get_intermediate_layers``); with ``avgpool_patchtokens`` the mean of the
    last block's patch tokens is appended. DINO uses ``n_last_blocks=4`` for
    ViT-S and ``1`` with ``avgpool_patchtokens=True`` for ViT-B.

    Parameters
    ----------
    backbone : nn.Module
        A timm ViT; ``n_last_blocks > 1`` needs its ``forward_intermediates``.
    images : Tensor, shape ``(B, 3, H, W)``
    n_last_blocks : int
        How many last blocks give their CLS token, ``1 <= n_last_blocks <= depth``.
    avgpool_patchtokens : bool
        Append the mean of the last block's patch tokens.

    Returns
    -------
    Tensor, shape ``(B, D * (n_last_blocks + avgpool_patchtokens))``
        Blocks in depth order, then the patch-token mean.

    Examples
    --------
    >>> from pwself_reference.models import build_backbone
    >>> net = build_backbone("vit_tiny", patch_size=8, img_size=32).eval()
    >>> last_blocks_features(net, torch.zeros(2, 3, 32, 32), n_last_blocks=4).shape
    torch.Size([2, 768])
    """
    _check_images(images)
    if isinstance(n_last_blocks, bool) or not isinstance(n_last_blocks, int) or n_last_blocks < 1:
        raise ValueError(f"n_last_blocks must be a positive int, got {n_last_blocks!r}")
    with torch.no_grad():
        if n_last_blocks == 1:
            tokens = _tokens(backbone, images)
            parts = [tokens[:, 0]]
            if avgpool_patchtokens:
                parts.append(tokens[:, 1:].mean(dim=1))
            return torch.cat(parts, dim=1)
        if not hasattr(backbone, "forward_intermediates"):
            raise TypeError("n_last_blocks > 1 needs a timm ViT with forward_intermediates")
        depth = len(backbone.blocks)
        if n_last_blocks > depth:
            raise ValueError(f"n_last_blocks={n_last_blocks} exceeds the backbone depth {depth}")
        outs = backbone.forward_intermediates(
            crop_to_patch_multiple(images, _patch_hw(backbone)),
            indices=n_last_blocks,
            return_prefix_tokens=True,
            norm=True,
            output_fmt="NLC",
            intermediates_only=True,
        )
        parts = [prefix[:, 0] for _, prefix in outs]
        if avgpool_patchtokens:
            parts.append(outs[-1][0].mean(dim=1))
        return torch.cat(parts, dim=1)


def gem_features(backbone: nn.Module, images: torch.Tensor, p: float = 4.0) -> torch.Tensor:
    """CLS concatenated with the generalised mean of the patch tokens (copy detection).

    ``GeM_p(x) = (mean_i max(x_i, 1e-6) ** p) ** (1 / p)`` per channel over the
    last block's patch tokens; ``p = 1`` is the mean, ``p -> inf`` the max.

    Parameters
    ----------
    backbone : nn.Module
        A timm ViT.
    images : Tensor, shape ``(B, 3, H, W)``
    p : float
        GeM power, positive (DINO's copy detection: 4).

    Returns
    -------
    Tensor, shape ``(B, 2 D)``
        ``[CLS, GeM_p(patch tokens)]``.

    Examples
    --------
    >>> from pwself_reference.models import build_backbone
    >>> net = build_backbone("vit_tiny", patch_size=8, img_size=32).eval()
    >>> gem_features(net, torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 384])
    """
    _check_images(images)
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not p > 0:
        raise ValueError(f"p (the GeM power) must be a positive number, got {p!r}")
    with torch.no_grad():
        tokens = _tokens(backbone, images)
        patches = tokens[:, 1:].clamp(min=1e-6).pow(p).mean(dim=1).pow(1.0 / p)
        return torch.cat([tokens[:, 0], patches], dim=1)


def multiscale_features(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The CLS averaged over the image at scales 1, 1/sqrt(2), 1/2, L2-normalised (retrieval).

    Each rescaled image (bilinear) is cropped to whole patches before the backbone.

    Parameters
    ----------
    backbone : nn.Module
        A timm ViT built with ``dynamic_img_size`` (the scales change the token grid).
    images : Tensor, shape ``(B, 3, H, W)``

    Returns
    -------
    Tensor, shape ``(B, D)``
        Unit rows.

    Examples
    --------
    >>> from pwself_reference.models import build_backbone
    >>> net = build_backbone("vit_tiny", patch_size=8, img_size=32).eval()
    >>> f = multiscale_features(net, torch.rand(2, 3, 32, 32))
    >>> f.shape, torch.allclose(f.norm(dim=1), torch.ones(2))
    (torch.Size([2, 192]), True)
    """
    _check_images(images)
    with torch.no_grad():
        total = None
        for s in MULTISCALE:
            x = images if s == 1.0 else F.interpolate(
                images, scale_factor=s, mode="bilinear", align_corners=False
            )
            cls = _tokens(backbone, x)[:, 0]
            total = cls if total is None else total + cls
        return F.normalize(total / len(MULTISCALE), dim=1)


def _to_label_tensor(labels: Any, n: int) -> torch.Tensor:
    t = labels if isinstance(labels, torch.Tensor) else torch.as_tensor(labels)
    t = t.reshape(-1)
    if t.numel() != n:
        raise ValueError(f"a batch holds {n} images but {t.numel()} labels")
    return t.cpu()


def extract_features(
    backbone: nn.Module,
    loader: Iterable[tuple[torch.Tensor, Any]],
    device: str | torch.device | None = None,
    *,
    features: FeatureFn = cls_features,
    storage_device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and labels of every image of a loader, in loader order.

    The backbone runs batch by batch, without gradients and in eval mode (its
    previous ``training`` flag is restored on return).

    Parameters
    ----------
    backbone : nn.Module
        A timm ViT.
    loader : iterable of ``(images, labels)``
        ``images`` is ``(B, 3, H, W)``; ``labels`` anything convertible to a
        ``(B,)`` tensor (class ids, or indices for retrieval).
    device : str, torch.device or None
        Where the backbone runs (it is moved there); ``None`` uses the device
        of its parameters.
    features : callable ``(backbone, images (B, 3, H, W)) -> (B, D')``
        Which feature: :func:`cls_features` (default), :func:`last_blocks_features`,
        :func:`gem_features` or :func:`multiscale_features`; settings through
        :func:`functools.partial`, e.g. ``partial(gem_features, p=4.0)``.
    storage_device : str or torch.device
        Where the returned tensors live.

    Returns
    -------
    features : Tensor, shape ``(N, D')``, float32
    labels : Tensor, shape ``(N,)``

    Examples
    --------
    >>> from pwself_reference.models import build_backbone
    >>> net = build_backbone("vit_tiny", patch_size=8, img_size=32)
    >>> batches = [(torch.rand(4, 3, 32, 32), torch.arange(4))] * 2
    >>> feats, labels = extract_features(net, batches)
    >>> feats.shape, labels.tolist()
    (torch.Size([8, 192]), [0, 1, 2, 3, 0, 1, 2, 3])
    >>> from functools import partial
    >>> extract_features(net, batches, features=partial(last_blocks_features, n_last_blocks=2))[0].shape
    torch.Size([8, 384])
    """
    if not isinstance(backbone, nn.Module):
        raise TypeError(f"backbone must be an nn.Module, got {type(backbone).__name__}")
    if not callable(features):
        raise TypeError(f"features must be a callable (backbone, images) -> tensor, "
                        f"got {type(features).__name__}")
    if device is None:
        try:
            device = next(backbone.parameters()).device
        except StopIteration:
            device = torch.device("cpu")
    device = torch.device(device)
    backbone.to(device)
    was_training = backbone.training
    backbone.eval()
    feats: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    try:
        for batch in loader:
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise ValueError("loader must yield (images, labels) pairs")
            images, target = batch[0], batch[1]
            if not isinstance(images, torch.Tensor):
                raise TypeError(f"loader images must be tensors, got {type(images).__name__}")
            out = features(backbone, images.to(device, non_blocking=True))
            feats.append(out.float().to(storage_device))
            labels.append(_to_label_tensor(target, images.shape[0]).to(storage_device))
    finally:
        backbone.train(was_training)
    if not feats:
        raise ValueError("the loader yielded no images")
    return torch.cat(feats), torch.cat(labels)
