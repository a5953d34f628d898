"""Student / teacher network: a ViT backbone and the DINO head over multi-crop views.

:class:`MultiCropNetwork` returns a :class:`HeadOutput`: the head outputs of the
kept tokens of every view stacked in one ``(R, K)`` tensor, with the layout the
loss needs to find token ``t`` of sample ``b`` of view ``v`` in it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from pwself_reference.models import backbone_tokens

__all__ = ["HEAD_TOKENS", "HeadOutput", "MultiCropNetwork", "static_rows"]

#: Which tokens go through the head: ``cls`` (DINO), ``all``, or ``matched`` (CLS and the
#: patch tokens of at least one matched pair, given as per-view masks).
HEAD_TOKENS = ("cls", "all", "matched")

#: The head's input buffer under ``matched`` holds a multiple of this many rows.
ROW_MULTIPLE = 256


def static_rows(n: int, total: int, multiple: int | None = None) -> int:
    """Rows of the head's input buffer for ``n`` kept tokens out of ``total``.

    ``n`` rounded up to a multiple of ``multiple`` (default :data:`ROW_MULTIPLE`;
    at most ``total``): the buffer
    takes a few sizes only, so that the caching allocator of a GPU reuses its
    blocks from step to step (DINOv2 pads its masked-token buffer the same way).

    Examples
    --------
    >>> static_rows(300, 1000), static_rows(990, 1000), static_rows(0, 1000)
    (512, 1000, 0)
    """
    multiple = ROW_MULTIPLE if multiple is None else multiple
    if n < 0 or total < n or multiple < 1:
        raise ValueError(f"need 0 <= n <= total and multiple >= 1, got {n}, {total}, {multiple}")
    return min(total, -(-n // multiple) * multiple)


@dataclass
class HeadOutput:
    """Head outputs of the kept tokens of every view, stacked in one tensor.

    Token ``t`` of sample ``b`` of view ``v`` has the *flat position*
    ``offsets[v] + b * tokens[v] + t``, with ``offsets[v] = sum_{u < v} batch * tokens[u]``.

    Attributes
    ----------
    rows : torch.Tensor
        ``(R_buf, K)`` head outputs. Row ``r < n_rows`` holds the token at flat
        position ``kept[r]``; rows past ``n_rows`` are padding of a static-size
        buffer and belong to no token.
    batch : int
        Samples ``B`` per view.
    tokens : tuple of int
        Tokens per sample of each view (``1 + rows * cols``, or 1 for CLS only).
    kept : torch.Tensor or None
        ``(n_rows,)`` int64 increasing flat positions of the rows; ``None`` when
        every token is kept, in order (row ``r`` is flat position ``r``).
    last_layer : torch.Tensor or None
        ``(K, D)`` weight of the head's last layer when ``rows`` are the head's
        ``(R_buf, D)`` bottleneck features rather than its outputs (``rows @
        last_layer.T``), for the fused loss (:mod:`pwself_reference.fused_loss`).

    Examples
    --------
    >>> out = HeadOutput(torch.zeros(2 * 3 + 2 * 1, 5), batch=2, tokens=(3, 1))
    >>> out.offsets, out.n_rows, [tuple(v.shape) for v in out]
    ([0, 6, 8], 8, [(2, 3, 5), (2, 1, 5)])
    """

    rows: torch.Tensor
    batch: int
    tokens: tuple[int, ...]
    kept: torch.Tensor | None = None
    last_layer: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.tokens = tuple(int(t) for t in self.tokens)
        if self.rows.dim() != 2:
            raise ValueError(f"rows must be (R, K), got {tuple(self.rows.shape)}")
        if self.batch < 1 or not self.tokens or min(self.tokens) < 1:
            raise ValueError(f"need batch >= 1 and tokens >= 1 per view, got {self.batch}, "
                             f"{self.tokens}")
        if self.kept is None and self.rows.shape[0] != self.total:
            raise ValueError(f"rows must hold the {self.total} tokens of the views, got "
                             f"{self.rows.shape[0]}")
        if self.kept is not None and self.kept.shape[0] > self.rows.shape[0]:
            raise ValueError(f"{self.kept.shape[0]} kept tokens do not fit in "
                             f"{self.rows.shape[0]} rows")

    @classmethod
    def from_views(cls, views: Sequence[torch.Tensor]) -> HeadOutput:
        """Stack ``(B, T_v, K)`` per-view outputs (a copy; the gradient reaches the views)."""
        views = list(views)
        if not views:
            raise ValueError("need at least one view")
        for v, x in enumerate(views):
            if x.dim() != 3 or x.shape[0] != views[0].shape[0] or x.shape[-1] != views[0].shape[-1]:
                raise ValueError(f"view {v} must be (B={views[0].shape[0]}, T, "
                                 f"K={views[0].shape[-1]}) like view 0, got {tuple(x.shape)}")
        k = views[0].shape[-1]
        return cls(torch.cat([x.reshape(-1, k) for x in views]), views[0].shape[0],
                   tuple(x.shape[1] for x in views))

    @property
    def n_views(self) -> int:
        return len(self.tokens)

    @property
    def offsets(self) -> list[int]:
        """Flat position of the first token of every view, and the total (``n_views + 1``)."""
        out = [0]
        for t in self.tokens:
            out.append(out[-1] + self.batch * t)
        return out

    @property
    def total(self) -> int:
        """Number of tokens of all views (kept or not)."""
        return self.batch * sum(self.tokens)

    @property
    def n_rows(self) -> int:
        """Rows that hold a token (the rest of ``rows`` is padding)."""
        return self.total if self.kept is None else int(self.kept.shape[0])

    @property
    def complete(self) -> bool:
        """Whether every token of every view has a row."""
        return self.kept is None

    def row_of(self, flat: torch.Tensor) -> torch.Tensor:
        """Rows of the tokens at flat positions ``flat`` (-1 for a token without a row)."""
        if self.kept is None:
            return flat
        index = torch.full((self.total,), -1, dtype=torch.int64, device=self.kept.device)
        index[self.kept] = torch.arange(self.kept.shape[0], device=self.kept.device)
        return index[flat]

    def token_of_rows(self) -> torch.Tensor:
        """``(n_rows,)`` token index ``t`` (0 = CLS) of every row."""
        device = self.rows.device
        flat = (torch.arange(self.total, device=device) if self.kept is None
                else self.kept.to(device))
        offsets = torch.tensor(self.offsets, device=device)
        view = torch.searchsorted(offsets, flat, right=True) - 1
        tokens = torch.tensor(self.tokens, device=device)
        return (flat - offsets[view]) % tokens[view]

    def view(self, v: int) -> torch.Tensor:
        """``(B, T_v, K)`` outputs of view ``v`` (a view of ``rows``; complete outputs only)."""
        if not self.complete:
            raise ValueError("only an output that holds every token splits into views")
        start, stop = self.offsets[v], self.offsets[v + 1]
        return self.rows[start:stop].view(self.batch, self.tokens[v], -1)

    def __len__(self) -> int:
        return self.n_views

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (self.view(v) for v in range(self.n_views))

    def __getitem__(self, v: int) -> torch.Tensor:
        return self.view(v)


class MultiCropNetwork(nn.Module):
    """Backbone + head applied to a list of views of different resolutions.

    Consecutive views of the same size are concatenated and go through the
    backbone together (DINO's ``MultiCropWrapper``). The head then runs once on
    the kept tokens of every view: the CLS token only (DINO), every token, or the
    tokens of given masks (PW-Self's ``--head-tokens matched``: CLS and every
    patch token of a matched pair, gathered into a buffer of
    :func:`static_rows` rows).

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
    >>> out = net([torch.zeros(2, 3, 16, 16), torch.zeros(2, 3, 8, 8)], all_tokens=True)
    >>> tuple(out.rows.shape), out.tokens, [tuple(o.shape) for o in out]
    ((44, 10), (17, 5), [(2, 17, 10), (2, 5, 10)])
    """

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, views: Sequence[torch.Tensor], all_tokens: bool = False,
                keep: Sequence[torch.Tensor] | None = None,
                features: bool = False) -> HeadOutput:
        """Head outputs of the kept tokens of every view.

        Parameters
        ----------
        views : sequence of torch.Tensor
            ``(B, C, H_v, W_v)`` per view, all with the same ``B``.
        all_tokens : bool
            Keep every token instead of CLS only.
        keep : sequence of torch.Tensor, optional
            Per view a ``(B, T_v)`` bool mask of the tokens to run the head on
            (``T_v = 1 + rows * cols``); overrides ``all_tokens``.
        features : bool
            Stop before the head's last layer: the rows are the bottleneck features
            and ``last_layer`` its weight (the head's ``bottleneck`` and
            ``last_layer_weight``, computed here so that a distributed wrapper sees
            every parameter used in the forward pass), for the fused loss.

        Returns
        -------
        HeadOutput
            With ``kept`` set when ``keep`` is given.
        """
        if isinstance(views, torch.Tensor):
            views = [views]
        if not views:
            raise ValueError("views must hold at least one (B, C, H, W) tensor")
        if keep is not None and len(keep) != len(views):
            raise ValueError(f"keep must hold one mask per view ({len(views)}), got {len(keep)}")
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
        tokens: list[int] = []
        for g in groups:
            x = backbone_tokens(self.backbone, torch.cat(g, dim=0))  # (n_g B, T, D)
            if keep is None and not all_tokens:
                x = x[:, :1]
            tokens += [x.shape[1]] * len(g)
            flat.append(x.reshape(-1, x.shape[-1]))
        x = torch.cat(flat, dim=0)  # (sum_v B T_v, D)
        head = self.head.bottleneck if features else self.head
        last_layer = self.head.last_layer_weight() if features else None
        if keep is None:
            return HeadOutput(head(x), batch, tuple(tokens), last_layer=last_layer)
        for v, (mask, t) in enumerate(zip(keep, tokens)):
            if mask.shape != (batch, t) or mask.dtype != torch.bool:
                raise ValueError(f"keep[{v}] must be a ({batch}, {t}) bool mask, got "
                                 f"{tuple(mask.shape)} {mask.dtype}")
        kept = torch.cat([m.reshape(-1) for m in keep]).to(x.device).nonzero().squeeze(1)
        n = kept.shape[0]
        buffer = torch.cat([x.index_select(0, kept),
                            x.new_zeros(static_rows(n, x.shape[0]) - n, x.shape[1])])
        return HeadOutput(head(buffer), batch, tuple(tokens), kept, last_layer)
