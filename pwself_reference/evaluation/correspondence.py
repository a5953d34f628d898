"""Geometric correspondence of patch tokens: does a token find its own patch in another view?

PW-Self trains patch tokens, yet k-NN and linear probes read only the CLS token.
This evaluation reads the patch tokens. For every test image it draws views as
pretraining does (random resized crops with box and flip), lets
:func:`patchaug.match_patches` say which tokens of two views show the same source
pixels (the ground truth), and asks the backbone: for a token ``a`` of view A, is
the token of view B with the highest cosine similarity its geometric match ``b``?

Per view pair of each image::

    view 1, view 2   global crops (size ``global_size``, scale ``global_scale``)
    view L           a local crop (size ``local_size``, scale ``local_scale``)

    non_flipped      view 1 -> view 2, both mirrored the same way
    flipped          view 1 -> view 2, exactly one of them mirrored
    global_local     view L -> view 1 (a local token looks for itself in a global view,
                     the pairs PW-Self's student-local / teacher-global loss uses)

For a query token ``a`` (view A) with match ``b`` (view B, ``R x C`` patch grid),
``pred = argmax_j cos(t_a, t_j)`` over the ``N = R C`` patch tokens ``j`` of view B
(CLS excluded) and

* ``recall_at_1``: fraction of query tokens with ``pred == b``;
* ``recall_within_1``: fraction with ``max(|row(pred) - row(b)|, |col(pred) - col(b)|) <= 1``
  (Chebyshev distance on B's grid, as the network sees it);
* ``chance_at_1 = 1 / N``, and ``chance_within_1``: the mean over the same query tokens of
  ``|{j : cheb(j, b) <= 1}| / N`` (4 to 9 cells, fewer at the borders): what a token
  picked uniformly at random scores.

``rule="centre"`` (default) pairs each patch with the one containing its centre, so
a match is within half a patch of its partner on each axis; ``"half"`` is the
paper's pairing (up to about one patch apart). Foreground (optional): a query
token counts when the pixels of its patch in view A, exactly as fed to the
network, have a standard deviation (per channel, averaged over channels) above
``foreground_std``; on the bundled Fashion-MNIST the black background has 0.

Baselines for reading a figure: the chance levels above, and
:class:`PositionOnly`, a "network" whose tokens are the backbone's position
embeddings (interpolated to the view's grid as the backbone does): it scores
what the crop geometry alone gives, e.g. every match on two same-size, same-box,
unmirrored views, and little on mirrored ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PositionOnly", "GROUPS", "token_match_hits", "correspondence_recall"]

#: The view-pair groups reported by :func:`correspondence_recall`.
GROUPS = ("non_flipped", "flipped", "global_local")

TokenFn = Callable[[torch.Tensor], torch.Tensor]


class PositionOnly(nn.Module):
    """The position embeddings of a timm ViT as its only output: a content-blind baseline.

    ``forward(images)`` returns ``(B, 1 + rows * cols, D)`` tokens, CLS first (the
    class token), whose patch tokens are the backbone's absolute position
    embeddings resampled to the image's patch grid with timm's
    ``resample_abs_pos_embed``, as a ``dynamic_img_size`` ViT resamples them. The
    pixel values are ignored.

    Parameters
    ----------
    backbone : nn.Module
        A timm ``VisionTransformer`` with ``pos_embed`` and ``patch_embed``.

    Examples
    --------
    >>> from pwself_reference.models import build_backbone
    >>> pos = PositionOnly(build_backbone("vit_tiny", patch_size=4, img_size=28))
    >>> pos(torch.zeros(2, 3, 12, 12)).shape
    torch.Size([2, 10, 192])
    """

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        pos = getattr(backbone, "pos_embed", None)
        grid = getattr(getattr(backbone, "patch_embed", None), "grid_size", None)
        if not isinstance(pos, torch.Tensor) or grid is None:
            raise TypeError("backbone must be a timm ViT with pos_embed and patch_embed.grid_size")
        self.pos_embed = nn.Parameter(pos.detach().clone(), requires_grad=False)
        cls = getattr(backbone, "cls_token", None)
        self.cls_token = nn.Parameter(
            (cls if cls is not None else torch.zeros(1, 1, pos.shape[-1])).detach().clone(),
            requires_grad=False)
        self.grid_size = tuple(int(g) for g in grid)
        self.patch_size = _patch_size_of(backbone)
        # prefix tokens that carry a position embedding (timm: none when no_embed_class)
        self.embedded_prefix = 0 if getattr(backbone, "no_embed_class", False) else int(
            getattr(backbone, "num_prefix_tokens", 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        from timm.layers import resample_abs_pos_embed

        if images.ndim != 4:
            raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
        rows, cols = images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size
        pos = resample_abs_pos_embed(self.pos_embed, new_size=(rows, cols),
                                     old_size=self.grid_size,
                                     num_prefix_tokens=self.embedded_prefix)
        patches = pos[:, pos.shape[1] - rows * cols:]
        tokens = torch.cat([self.cls_token, patches], dim=1)
        return tokens.expand(images.shape[0], -1, -1).to(images.dtype)


def _patch_size_of(model: Any) -> int | None:
    ps = getattr(model, "patch_size", None)
    if ps is None:
        ps = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if ps is None:
        return None
    if isinstance(ps, (tuple, list)):
        if len(set(ps)) != 1:
            raise ValueError(f"correspondence needs square patches, got {tuple(ps)}")
        ps = ps[0]
    return int(ps)


def _token_fn(model: nn.Module | TokenFn, patch: int) -> TokenFn:
    """``images -> (B, 1 + N, D)`` tokens, CLS first: timm ViTs through ``backbone_tokens``."""
    if hasattr(model, "forward_features"):
        from pwself_reference.evaluation.features import crop_to_patch_multiple
        from pwself_reference.models import backbone_tokens

        return lambda x: backbone_tokens(model, crop_to_patch_multiple(x, patch))
    if not callable(model):
        raise TypeError(f"model must be a timm ViT or a callable, got {type(model).__name__}")
    return model


# ----------------------------------------------------------------------------- scoring
def token_match_hits(
    tokens_a: torch.Tensor,
    tokens_b: torch.Tensor,
    idx_a: torch.Tensor,
    idx_b: torch.Tensor,
    valid: torch.Tensor,
    grid_b: tuple[int, int],
) -> dict[str, torch.Tensor]:
    """Score the nearest-token retrieval of every matched pair of one batch of view pairs.

    Parameters
    ----------
    tokens_a, tokens_b : Tensor, shapes ``(B, N_a, D)`` and ``(B, N_b, D)``
        Patch tokens (no CLS) of views A and B, row-major on their grids.
    idx_a, idx_b, valid : Tensor, shape ``(B, M)``
        Matched pairs as :func:`patchaug.match_patches` gives them with ``cls=False``.
    grid_b : (int, int)
        ``(rows, cols)`` of view B, ``rows * cols == N_b``.

    Returns
    -------
    dict of Tensor, each ``(B, M)``
        ``hit`` (bool: the nearest B token by cosine is the match), ``within`` (bool:
        it is at Chebyshev distance <= 1 from the match on B's grid), ``chance_within``
        (float: share of B's tokens within distance 1 of the match) and ``valid``.

    Examples
    --------
    >>> t = torch.eye(4).unsqueeze(0)                      # 4 orthogonal tokens, 2 x 2 grid
    >>> pairs = torch.tensor([[0, 1, 2, 3]])
    >>> out = token_match_hits(t, t, pairs, pairs.flip(-1), torch.ones(1, 4, dtype=torch.bool), (2, 2))
    >>> out["hit"].tolist(), out["within"].tolist()
    ([[False, False, False, False]], [[True, True, True, True]])
    """
    rows, cols = grid_b
    if tokens_a.ndim != 3 or tokens_b.ndim != 3 or tokens_b.shape[1] != rows * cols:
        raise ValueError(f"tokens must be (B, N, D) with N_b = {rows} x {cols}, got "
                         f"{tuple(tokens_a.shape)} and {tuple(tokens_b.shape)}")
    a = F.normalize(tokens_a.float(), dim=-1)
    b = F.normalize(tokens_b.float(), dim=-1)
    query = a.gather(1, idx_a.unsqueeze(-1).expand(-1, -1, a.shape[-1]))  # (B, M, D)
    pred = torch.einsum("bmd,bnd->bmn", query, b).argmax(-1)  # (B, M)
    dr = (pred // cols - idx_b // cols).abs()
    dc = (pred % cols - idx_b % cols).abs()
    r, c = idx_b // cols, idx_b % cols
    near_rows = (torch.clamp(r + 1, max=rows - 1) - torch.clamp(r - 1, min=0) + 1)
    near_cols = (torch.clamp(c + 1, max=cols - 1) - torch.clamp(c - 1, min=0) + 1)
    return {"hit": (pred == idx_b) & valid, "within": (torch.maximum(dr, dc) <= 1) & valid,
            "chance_within": (near_rows * near_cols).float() / (rows * cols), "valid": valid}


def _patch_std(view: torch.Tensor, patch: int) -> torch.Tensor:
    """``(B, N)`` per-channel standard deviation of each patch's pixels, averaged over
    channels (per channel, so that a blank patch scores 0 after per-channel normalisation)."""
    b, ch, h, w = view.shape
    p = view.reshape(b, ch, h // patch, patch, w // patch, patch).permute(0, 2, 4, 1, 3, 5)
    p = p.reshape(b, (h // patch) * (w // patch), ch, patch * patch).float()
    return p.std(-1, unbiased=False).mean(-1)


class _Tally:
    """Running sums for one group: view pairs, query tokens, hits, chance."""

    def __init__(self, candidates: int) -> None:
        self.candidates = candidates
        self.view_pairs = self.tokens = self.hits = self.within = 0
        self.chance_within = 0.0

    def add(self, s: dict[str, torch.Tensor], rows: torch.Tensor, keep: torch.Tensor) -> None:
        keep = keep & s["valid"] & rows.unsqueeze(-1)
        self.view_pairs += int(keep.any(-1).sum())
        self.tokens += int(keep.sum())
        self.hits += int((s["hit"] & keep).sum())
        self.within += int((s["within"] & keep).sum())
        self.chance_within += float((s["chance_within"] * keep).sum())

    def result(self) -> dict[str, Any]:
        n = self.tokens

        def pct(x: float) -> float | None:
            return round(100.0 * x / n, 3) if n else None

        return {"view_pairs": self.view_pairs, "tokens": n, "candidates": self.candidates,
                "recall_at_1": pct(self.hits), "recall_within_1": pct(self.within),
                "chance_at_1": round(100.0 / self.candidates, 3) if n else None,
                "chance_within_1": pct(self.chance_within)}


# ----------------------------------------------------------------------------- protocol
def _batches(images: torch.Tensor | Iterable[Any], batch_size: int) -> Iterable[torch.Tensor]:
    if isinstance(images, torch.Tensor):
        if images.ndim != 4:
            raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
        yield from images.split(batch_size)
        return
    for item in images:
        x = item[0] if isinstance(item, (tuple, list)) else item
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            raise ValueError("images must be a (N, C, H, W) tensor or yield (B, C, H, W) batches "
                             "(alone or first in a tuple)")
        yield x


def _check_size(value: object, name: str, patch: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0 or value % patch:
        raise ValueError(f"{name} must be a positive multiple of the patch size {patch}, "
                         f"got {value!r}")
    return value


def _check_scale(value: object, name: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be two numbers (lo, hi), got {value!r}") from None
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"{name} must satisfy 0 < lo <= hi <= 1, got {value!r}")
    return lo, hi


def _draw_boxes(specs: list[tuple[int, tuple[float, float]]], first: int, n: int, height: int,
                width: int, flip_p: float, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Boxes and flips of every view of images ``first .. first + n - 1``.

    Image ``i`` draws its views from its own CPU generator seeded by ``(seed, i)``, so its
    views do not depend on the batching, the device or the model.
    """
    from patchaug.crops import sample_crop_boxes

    per_view: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = [([], []) for _ in specs]
    for i in range(first, first + n):
        gen = torch.Generator().manual_seed((seed << 32) + i)
        for (_, scale), (boxes, flips) in zip(specs, per_view):
            boxes.append(sample_crop_boxes(1, height, width, scale, generator=gen))
            flips.append(torch.rand(1, generator=gen) < flip_p)
    return [(torch.cat(b), torch.cat(f)) for b, f in per_view]


class _View(NamedTuple):
    """One view of a batch: the crop the network saw, its geometry and its patch tokens."""

    crop: torch.Tensor    # (B, C, size, size)
    boxes: torch.Tensor   # (B, 4) source-pixel boxes, CPU
    flips: torch.Tensor   # (B,) bool, CPU
    tokens: torch.Tensor  # (B, rows * cols, D) patch tokens, CLS dropped
    grid: tuple[int, int]


def _cut_views(x: torch.Tensor, specs: list[tuple[int, tuple[float, float]]], tokens_of: TokenFn,
               patch: int, first: int, flip_p: float, seed: int) -> list[_View]:
    """Crop, resize and mirror every view of a batch of source images and run the model."""
    from patchaug.crops import resized_crop_boxes

    b, _, height, width = x.shape
    views = []
    for (size, _), (boxes, flips) in zip(specs, _draw_boxes(specs, first, b, height, width,
                                                            flip_p, seed)):
        crop = resized_crop_boxes(x, boxes.to(x.device), size, flips.to(x.device))
        tokens = tokens_of(crop)
        grid = (size // patch, size // patch)
        if tokens.ndim != 3 or tokens.shape[:2] != (b, 1 + grid[0] * grid[1]):
            raise ValueError(f"model returned tokens of shape {tuple(tokens.shape)} for {b} views "
                             f"of {size} px; expected (B, 1 + {grid[0] * grid[1]}, D)")
        views.append(_View(crop, boxes, flips, tokens[:, 1:], grid))
    return views


def correspondence_recall(
    model: nn.Module | TokenFn,
    images: torch.Tensor | Iterable[Any],
    *,
    global_size: int,
    local_size: int | None = None,
    global_scale: tuple[float, float] = (0.4, 1.0),
    local_scale: tuple[float, float] = (0.1, 0.4),
    flip_p: float = 0.5,
    rule: str = "centre",
    foreground_std: float | None = None,
    patch_size: int | None = None,
    seed: int = 0,
    batch_size: int = 256,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Recall of geometric matches among a backbone's patch tokens (see the module docstring).

    Parameters
    ----------
    model : nn.Module or callable
        A timm ViT (tokens through :func:`pwself_reference.models.backbone_tokens`), or
        any callable ``images (B, C, h, w) -> tokens (B, 1 + rows * cols, D)``, CLS
        first then the patch tokens row-major (e.g. :class:`PositionOnly`).
    images : Tensor ``(N, C, H, W)`` or iterable of batches
        Source images, normalised as the network expects; an iterable yields
        ``(B, C, H, W)`` tensors or tuples whose first item is one (a ``DataLoader`` of
        ``(image, label)``; labels are ignored). All images share one size.
    global_size, local_size : int
        Side of the global / local views in pixels, multiples of the patch size;
        ``local_size=None`` skips the ``global_local`` group.
    global_scale, local_scale : (float, float)
        Area fraction ranges of the crops (``RandomResizedCrop``, ratio 3/4-4/3).
    flip_p : float
        Probability that a view is mirrored.
    rule : {"centre", "half", "official"}
        Matching rule of :func:`patchaug.match_patches`.
    foreground_std : float or None
        If given, also report the groups on foreground query tokens only (patch pixel
        standard deviation per channel, averaged over channels, above this value).
    patch_size : int, optional
        Patch size; by default the model's ``patch_embed.patch_size`` / ``patch_size``.
    seed : int
        Seed of the crops and flips: image ``i`` draws its views from a CPU
        ``torch.Generator`` seeded by ``(seed, i)``, so the same seed gives the same
        views for every model, batching and device, and models are compared on equal
        terms.
    batch_size : int
        Images per forward pass when ``images`` is a tensor.
    device : str or torch.device, optional
        Where the model runs (default: its parameters' device, else CPU).

    Returns
    -------
    dict
        ``{"all": {group: stats}, "foreground": {group: stats} (if asked), "images": N,
        "settings": {...}}`` with ``stats`` holding ``view_pairs``, ``tokens`` (query
        tokens scored), ``candidates`` (tokens of view B), ``recall_at_1``,
        ``recall_within_1``, ``chance_at_1`` and ``chance_within_1`` in percent (``None``
        when no token was scored).

    Examples
    --------
    >>> from pwself_reference.models import build_backbone
    >>> net = build_backbone("vit_tiny", patch_size=4, img_size=28, depth=1)
    >>> out = correspondence_recall(net, torch.randn(8, 3, 28, 28), global_size=28, local_size=12)
    >>> sorted(out["all"]), out["all"]["global_local"]["candidates"]
    (['flipped', 'global_local', 'non_flipped'], 49)
    """
    from patchaug import match_patches

    patch = patch_size if patch_size is not None else _patch_size_of(model)
    if not isinstance(patch, int) or isinstance(patch, bool) or patch <= 0:
        raise ValueError(f"patch_size: give a positive int (the model has none), got {patch!r}")
    global_size = _check_size(global_size, "global_size", patch)
    if local_size is not None:
        local_size = _check_size(local_size, "local_size", patch)
    global_scale = _check_scale(global_scale, "global_scale")
    local_scale = _check_scale(local_scale, "local_scale")
    if not isinstance(flip_p, (int, float)) or not 0 <= flip_p <= 1:
        raise ValueError(f"flip_p must be in [0, 1], got {flip_p!r}")
    if foreground_std is not None and not (isinstance(foreground_std, (int, float))
                                           and foreground_std >= 0):
        raise ValueError(f"foreground_std must be a non-negative number or None, "
                         f"got {foreground_std!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**31:
        raise ValueError(f"seed must be an int in [0, 2**31), got {seed!r}")
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if device is None:
        params = list(model.parameters()) if isinstance(model, nn.Module) else []
        device = params[0].device if params else torch.device("cpu")
    device = torch.device(device)
    tokens_of = _token_fn(model, patch)
    g_grid = (global_size // patch,) * 2
    l_grid = (local_size // patch,) * 2 if local_size else None
    n_global = g_grid[0] * g_grid[1]
    tallies = {sel: {grp: _Tally(n_global) for grp in GROUPS if grp != "global_local" or l_grid}
               for sel in (("all", "foreground") if foreground_std is not None else ("all",))}
    n_images = 0
    was_training = model.training if isinstance(model, nn.Module) else None
    if isinstance(model, nn.Module):
        model.to(device).eval()
    specs = [(global_size, global_scale), (global_size, global_scale)]
    if local_size is not None:
        specs.append((local_size, local_scale))
    try:
        with torch.no_grad():
            for x in _batches(images, batch_size):
                views = _cut_views(x.to(device), specs, tokens_of, patch, n_images, flip_p, seed)
                n_images += x.shape[0]
                relative_flip = views[0].flips != views[1].flips
                scored = [(views[0], views[1], {"non_flipped": ~relative_flip,
                                                "flipped": relative_flip})]
                if l_grid:
                    scored.append((views[2], views[0],
                                   {"global_local": torch.ones_like(relative_flip)}))
                for a, b, groups in scored:
                    m = match_patches(a.boxes, b.boxes, a.grid, b.grid, a.flips, b.flips,
                                      rule=rule, cls=False)
                    idx_a, idx_b, valid = (t.to(device) for t in (m.idx_a, m.idx_b, m.valid))
                    hits = token_match_hits(a.tokens, b.tokens, idx_a, idx_b, valid, b.grid)
                    keep = {"all": torch.ones_like(valid)}
                    if foreground_std is not None:
                        keep["foreground"] = (_patch_std(a.crop, patch).gather(1, idx_a)
                                              > foreground_std)
                    for grp, rows in groups.items():
                        for sel, mask in keep.items():
                            tallies[sel][grp].add(hits, rows.to(device), mask)
    finally:
        if was_training is not None:
            model.train(was_training)
    if n_images == 0:
        raise ValueError("images: no image to evaluate")
    out: dict[str, Any] = {sel: {grp: t.result() for grp, t in groups_.items()}
                           for sel, groups_ in tallies.items()}
    out["images"] = n_images
    out["settings"] = {"global_size": global_size, "local_size": local_size,
                       "global_scale": list(global_scale), "local_scale": list(local_scale),
                       "flip_p": flip_p, "rule": rule, "foreground_std": foreground_std,
                       "patch_size": patch, "seed": int(seed)}
    return out
