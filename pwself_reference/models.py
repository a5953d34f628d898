"""Backbones (timm ViTs) and the DINO projection head.

The backbone returns every token (CLS first, then the patch tokens in row-major
order), which is what both DINO (CLS only) and PW-Self (CLS + matched patches)
need.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ARCH_ALIASES", "build_backbone", "DINOHead", "backbone_tokens"]

#: Short names accepted by :func:`build_backbone`, mapped to timm model names.
ARCH_ALIASES = {
    "vit_tiny": "vit_tiny_patch16_224",
    "vit_small": "vit_small_patch16_224",
    "vit_base": "vit_base_patch16_224",
}


def build_backbone(
    arch: str,
    patch_size: int = 16,
    img_size: int = 224,
    drop_path_rate: float = 0.0,
    *,
    depth: int | None = None,
    embed_dim: int | None = None,
    num_heads: int | None = None,
) -> nn.Module:
    """Build a randomly initialised timm ViT that accepts any input size.

    Parameters
    ----------
    arch : str
        ``vit_tiny``, ``vit_small``, ``vit_base`` or any timm ViT model name.
    patch_size : int
        Patch size in pixels (e.g. 16, 8 or 4 for 28-32 px images).
    img_size : int
        Size the position embedding is created for; other sizes (multiple of
        ``patch_size``) are handled by interpolating it.
    drop_path_rate : float
        Stochastic depth rate.
    depth, embed_dim, num_heads : int, optional
        Overrides of the named architecture (number of blocks, token width,
        attention heads); ``None`` keeps timm's value. ``embed_dim`` must be a
        multiple of the number of heads.

    Returns
    -------
    nn.Module
        A timm ``VisionTransformer`` without classifier; ``embed_dim`` gives the
        token width. Use :func:`backbone_tokens` to get ``(B, 1 + N, D)`` tokens.

    Examples
    --------
    >>> net = build_backbone("vit_tiny", patch_size=4, img_size=32)
    >>> backbone_tokens(net, torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 65, 192])
    """
    import timm

    if not isinstance(arch, str) or not arch:
        raise TypeError(f"arch must be a non-empty string, got {arch!r}")
    if not isinstance(patch_size, int) or patch_size <= 0:
        raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
    if not isinstance(img_size, int) or img_size <= 0 or img_size % patch_size:
        raise ValueError(
            f"img_size must be a positive multiple of patch_size={patch_size}, got {img_size!r}"
        )
    name = ARCH_ALIASES.get(arch, arch)
    if not timm.is_model(name) or not name.startswith(("vit_", "deit_")):
        raise ValueError(
            f"arch must be one of {sorted(ARCH_ALIASES)} or a timm ViT model name, got {arch!r}"
        )
    overrides = {}
    for key, value in [("depth", depth), ("embed_dim", embed_dim), ("num_heads", num_heads)]:
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{key} must be a positive int or None, got {value!r}")
        overrides[key] = value
    if "embed_dim" in overrides or "num_heads" in overrides:
        heads = overrides.get("num_heads")
        width = overrides.get("embed_dim")
        if heads is not None and width is not None and width % heads:
            raise ValueError(
                f"embed_dim={width} must be a multiple of num_heads={heads}"
            )
    return timm.create_model(
        name,
        pretrained=False,
        num_classes=0,
        img_size=img_size,
        patch_size=patch_size,
        drop_path_rate=drop_path_rate,
        dynamic_img_size=True,
        **overrides,
    )


def backbone_tokens(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """All output tokens of a timm ViT, ``(B, 1 + rows * cols, D)``, CLS first.

    Register tokens (if the model has any) are dropped so that token ``1 + r *
    cols + c`` is patch ``(r, c)``, the numbering of :func:`patchaug.match_patches`.
    """
    tokens = backbone.forward_features(images)
    extra = getattr(backbone, "num_prefix_tokens", 1) - 1
    if extra > 0:
        tokens = torch.cat([tokens[:, :1], tokens[:, 1 + extra :]], dim=1)
    return tokens


class DINOHead(nn.Module):
    """DINO's projection head: MLP, L2 normalisation, weight-normalised linear.

    ``in_dim -> hidden_dim -> hidden_dim -> bottleneck_dim`` with GELU, then
    ``x / ||x||`` and a weight-normalised linear layer to ``out_dim``. With
    ``norm_last_layer=True`` the weight-norm gain is fixed to 1 (DINO's default).

    Parameters
    ----------
    in_dim, out_dim : int
        Input token width and number of prototypes ``K``.
    hidden_dim, bottleneck_dim : int
        MLP widths (DINO: 2048 and 256).
    nlayers : int
        Number of linear layers of the MLP (DINO: 3).
    norm_last_layer : bool
        Fix the gain of the last layer to 1.

    Examples
    --------
    >>> head = DINOHead(192, 1000)
    >>> head(torch.zeros(4, 7, 192)).shape
    torch.Size([4, 7, 1000])
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        for name, value in [("in_dim", in_dim), ("out_dim", out_dim), ("hidden_dim", hidden_dim),
                            ("bottleneck_dim", bottleneck_dim), ("nlayers", nlayers)]:
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i in range(nlayers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < nlayers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        # Weight normalisation written out (w = g * v / ||v||) rather than via a
        # parametrization, so the state dict holds two plain tensors.
        self.last_v = nn.Parameter(torch.empty(out_dim, bottleneck_dim))
        nn.init.trunc_normal_(self.last_v, std=0.02)
        self.last_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not norm_last_layer)
        self.norm_last_layer = norm_last_layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bottleneck(x) @ self.last_layer_weight().t()

    def bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        """The head up to its last layer: ``x / ||x||`` of the MLP output, ``(..., D)``."""
        return F.normalize(self.mlp(x), dim=-1, eps=1e-6)

    def last_layer_weight(self) -> torch.Tensor:
        """The weight-normalised last layer ``g * v / ||v||``, ``(out_dim, bottleneck_dim)``."""
        return self.last_g * F.normalize(self.last_v, dim=-1)

    def last_layer_parameters(self) -> list[nn.Parameter]:
        """Parameters DINO freezes during the first epoch(s)."""
        return [self.last_v, self.last_g]
