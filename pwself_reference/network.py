"""Student / teacher network: a ViT backbone and the DINO head over multi-crop views."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pwself_reference.models import backbone_tokens

__all__ = ["MultiCropNetwork"]


class MultiCropNetwork(nn.Module):
    """Backbone + head applied to a list of views of different resolutions.

    Consecutive views of the same size are concatenated and go through the
    backbone together (DINO's ``MultiCropWrapper``). The head then runs once
    on the kept tokens of every view: the CLS token only (DINO) or every token
    (PW-Self, where matched patch tokens enter the loss).

    Parameters
    ----------
    backbone : nn.Module
        A timm ViT from :func:`pwself_reference.models.build_backbone`.
    head : nn.Module
        Maps ``(..., D)`` to ``(..., K)``, e.g. :class:`~pwself_reference.models.DINOHead`.

    Examples
    --------
    >>> from pwself_reference.models import build_backbone, DINOHead
    >>> net = MultiCropNetwork(build_backbone("vit_tiny", 4, 16, depth=1), DINOHead(192, 10))
    >>> outs = net([torch.zeros(2, 3, 16, 16), torch.zeros(2, 3, 8, 8)], all_tokens=True)
    >>> [tuple(o.shape) for o in outs]
    [(2, 17, 10), (2, 5, 10)]
    """

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, views: Sequence[torch.Tensor], all_tokens: bool = False) -> list[torch.Tensor]:
        """Head outputs per view.

        Parameters
        ----------
        views : sequence of torch.Tensor
            ``(B, C, H_v, W_v)`` per view, all with the same ``B``.
        all_tokens : bool
            Keep every token (``(B, 1 + N_v, K)`` per view) instead of CLS only
            (``(B, 1, K)``).

        Returns
        -------
        list of torch.Tensor
            One output per view, in order.
        """
        if isinstance(views, torch.Tensor):
            views = [views]
        if not views:
            raise ValueError("views must hold at least one (B, C, H, W) tensor")
        batch = views[0].shape[0]
        groups: list[list[torch.Tensor]] = []
        for v in views:
            if v.dim() != 4 or v.shape[0] != batch:
                raise ValueError(f"every view must be (B={batch}, C, H, W), got {tuple(v.shape)}")
            if groups and groups[-1][0].shape[-2:] == v.shape[-2:]:
                groups[-1].append(v)
            else:
                groups.append([v])
        flat: list[torch.Tensor] = []
        shapes: list[tuple[int, int]] = []  # (views in group, tokens kept)
        for g in groups:
            tokens = backbone_tokens(self.backbone, torch.cat(g, dim=0))  # (nB, T, D)
            if not all_tokens:
                tokens = tokens[:, :1]
            shapes.append((len(g), tokens.shape[1]))
            flat.append(tokens.reshape(-1, tokens.shape[-1]))
        out = self.head(torch.cat(flat, dim=0))  # (sum nB*T, K)
        results: list[torch.Tensor] = []
        start = 0
        for n_views, n_tokens in shapes:
            size = n_views * batch * n_tokens
            chunk = out[start : start + size].view(n_views, batch, n_tokens, -1)
            results.extend(chunk.unbind(0))
            start += size
        return results
