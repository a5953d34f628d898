"""Geometric patch matching between two crops of the same image (PW-Self, Sec. 3.4).

Two views of one source image are described by their crop boxes (in source
pixels), their patch grids and whether they were mirrored. From that alone,
:func:`match_patches` finds the pairs of tokens that show the same part of the
source image. It runs on any batch shape at once, on the device of the boxes.

Rules
-----
``"half"`` (default, the paper)
    A patch belongs to the intersection of the two boxes iff the intersection
    covers strictly more than half of its width and strictly more than half of
    its height. Per axis, the view with more selected rows (columns) is
    subsampled to the other's count with ``floor(i * (N_big - 1) / (N_small - 1))``
    (index 0 when ``N_small == 1``), so first and last are matched together.
``"official"``
    The authors' code: per axis, ``start = round(P * (I0 - C0) / (C1 - C0))`` and
    ``length = round(P * (I1 - I0) / (C1 - C0))`` in float64, rounding half to
    even, subsampled with ``floor(linspace(0, N_big - 1, N_small))``. The only
    deliberate difference: a range running past the grid is clamped to it (their
    flipped-axis negative slice drops every match instead).
``"centre"``
    Same selection and pair count as ``"half"``, but per axis each selected patch
    of the view with fewer selected patches is paired with the patch of the other
    view that contains its centre, so matched patches are as close as the grids
    allow. On a tie in counts the view with the finer patches is the query.

Token numbering: with ``cls=True`` token 0 is CLS and patch ``(r, c)`` is token
``1 + r * cols + c``, row-major in the orientation the network sees (after the
flip). Pairs are listed row by row, left to right in the source image.
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["PatchMatch", "match_patches", "patch_centres", "RULES"]

RULES = ("half", "official", "centre")

BoxLike = torch.Tensor | Sequence[float]
FlipLike = torch.Tensor | bool


@dataclass(frozen=True)
class PatchMatch:
    """Result of :func:`match_patches`.

    Attributes
    ----------
    idx_a, idx_b : torch.Tensor
        ``(..., M)`` int64 token indices into view a and view b. Slots that hold
        no pair contain 0, so they are safe to use with :func:`torch.gather`.
    valid : torch.Tensor
        ``(..., M)`` bool, True for the slots that hold a pair. Valid slots come
        first.
    """

    idx_a: torch.Tensor
    idx_b: torch.Tensor
    valid: torch.Tensor

    @property
    def num_valid(self) -> torch.Tensor:
        """``(...)`` int64 number of pairs per sample (CLS included when present)."""
        return self.valid.sum(-1)

    def pairs(self) -> list[tuple[int, int]]:
        """The valid pairs of an unbatched result as a list of ``(idx_a, idx_b)``."""
        if self.valid.dim() != 1:
            raise ValueError(
                f"pairs() needs an unbatched result (valid of shape (M,)), got {tuple(self.valid.shape)}"
            )
        keep = self.valid
        return list(zip(self.idx_a[keep].tolist(), self.idx_b[keep].tolist()))


# --------------------------------------------------------------------------- validation


def _as_grid(grid: object, name: str) -> tuple[int, int]:
    if isinstance(grid, torch.Tensor):
        grid = grid.tolist()
    if isinstance(grid, numbers.Integral) and not isinstance(grid, bool):
        grid = (grid, grid)
    if (
        not isinstance(grid, Sequence)
        or len(grid) != 2
        or not all(isinstance(g, numbers.Integral) and not isinstance(g, bool) for g in grid)
    ):
        raise TypeError(f"{name} must be a (rows, cols) pair of ints, got {grid!r}")
    rows, cols = int(grid[0]), int(grid[1])
    if rows <= 0 or cols <= 0:
        raise ValueError(f"{name} must have positive rows and cols, got {(rows, cols)}")
    return rows, cols


def _work_dtype(device: torch.device) -> torch.dtype:
    # float64 keeps the coverage test exact for integer boxes; MPS has no float64.
    return torch.float32 if device.type == "mps" else torch.float64


def _as_boxes(box: object, name: str, device: torch.device | None) -> torch.Tensor:
    if isinstance(box, torch.Tensor):
        if box.dtype == torch.bool or box.is_complex():
            raise TypeError(f"{name} must hold real numbers, got dtype {box.dtype}")
        t = box
    else:
        try:
            t = torch.as_tensor(box)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"{name} must be a tensor or sequence of 4 numbers, got {box!r}") from err
        if t.dtype == torch.bool or not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"{name} must hold real numbers, got {box!r}")
    if device is not None:
        t = t.to(device)
    if t.dim() == 0 or t.shape[-1] != 4:
        raise ValueError(f"{name} must have shape (..., 4) as (x0, y0, x1, y1), got {tuple(t.shape)}")
    t = t.to(_work_dtype(t.device))
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must be finite, got NaN or inf")
    if not bool(((t[..., 2] > t[..., 0]) & (t[..., 3] > t[..., 1])).all()):
        raise ValueError(f"{name} must satisfy x1 > x0 and y1 > y0 for every box")
    return t


def _as_flip(flip: object, name: str, device: torch.device) -> torch.Tensor:
    if isinstance(flip, torch.Tensor):
        if flip.dtype != torch.bool:
            raise TypeError(f"{name} must be a bool tensor, got dtype {flip.dtype}")
        return flip.to(device)
    if isinstance(flip, bool):
        return torch.tensor(flip, device=device)
    try:
        import numpy as np

        if isinstance(flip, np.bool_):
            return torch.tensor(bool(flip), device=device)
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass
    raise TypeError(f"{name} must be a bool or a bool tensor, got {type(flip).__name__}")


# --------------------------------------------------------------------------- selection
#
# The core works on "lines": (view, axis) with views (a, b) and axes (cols = x,
# rows = y), stacked as (..., 2, 2) so that every step is one tensor op for all
# four lines. ``lo``/``hi`` are the crop's extent on that axis, ``n`` its number
# of patches, ``i0``/``i1`` the intersection's extent (shared by both views).


def _select_half(lo, hi, i0, i1, n):
    """Contiguous range ``[start, start + count)`` of patches more than half covered.

    Patch ``k`` spans ``[lo + k w, lo + (k + 1) w)`` with ``w = L / n``. It is more than
    half covered by ``[i0, i1)`` iff its centre lies strictly inside and ``i1 - i0 > w / 2``.
    Scaled by ``2 n`` the centre test reads ``a0 < (2k + 1) L < a1`` with
    ``a = 2 n (i - lo)``: integers for integer boxes, so the closed form below is exact
    (an exact tie, ``(2k + 1) L == a``, is excluded).
    """
    length = hi - lo
    a0 = 2 * n * (i0 - lo) / length
    a1 = 2 * n * (i1 - lo) / length
    first = (torch.floor((a0 - 1) / 2) + 1).clamp(min=0)
    stop = torch.minimum(torch.ceil((a1 - 1) / 2), n)
    wide = 2 * n * (i1 - i0) > length
    count = torch.where(wide, (stop - first).clamp(min=0), torch.zeros_like(first))
    return first.to(torch.int64), count.to(torch.int64)


def _select_official(lo, hi, i0, i1, n):
    """The authors' rounded start and length, in their float order, clamped to ``[0, n]``."""
    span = hi - lo
    start = torch.round(n * ((i0 - lo) / span))
    length = torch.round(n * ((i1 - i0) / span))
    end = torch.minimum(start + length, n)
    start = torch.minimum(start, n)
    return start.to(torch.int64), (end - start).clamp(min=0).to(torch.int64)


def _subsample(i, n_big, n_small, official: bool):
    """Index into a selection of ``n_big`` for slot ``i`` of ``n_small`` (first and last matched)."""
    if official:
        # numpy's floor(linspace(0, n_big - 1, n_small)): i * step in float64, last = stop
        step = (n_big - 1).to(torch.float64) / (n_small - 1).clamp(min=1).to(torch.float64)
        value = torch.floor(i.to(torch.float64) * step).to(torch.int64)
        return torch.where((i == n_small - 1) & (n_small > 1), n_big - 1, value)
    # floor of a quotient of small integers: exact in float64 (a non-integer quotient is at
    # least 1 / (n_small - 1) away from the next integer), and cheaper than integer division
    num = (i * (n_big - 1)).to(torch.float64)
    return torch.floor(num / (n_small - 1).clamp(min=1)).to(torch.int64)


def _centre_index(src_lo, src_hi, n_src, dst_lo, dst_hi, n_dst, k):
    """Patch of the dst line whose extent contains the centre of patch ``k`` of the src line."""
    centre = src_lo + (k.to(src_lo.dtype) + 0.5) * (src_hi - src_lo) / n_src
    idx = torch.floor((centre - dst_lo) * n_dst / (dst_hi - dst_lo)).to(torch.int64)
    return torch.minimum(idx, n_dst.to(torch.int64) - 1).clamp(min=0)


def _line_pairs(lo, hi, n, k_max: int, rule: str):
    """Pairs on each axis. ``lo``, ``hi``: ``(..., view, axis)``; ``n``: ``(2, 2)`` patch counts.

    Returns ``n_small`` ``(..., 2)`` (pairs per axis) and ``p`` ``(..., 2, 2, k_max)``:
    the source-orientation patch index of each view and axis for slot ``i``.
    """
    # intersection per axis, (..., 1, 2); elementwise ops beat reductions over a dim of 2
    i0 = torch.maximum(lo[..., :1, :], lo[..., 1:, :])
    i1 = torch.minimum(hi[..., :1, :], hi[..., 1:, :])
    inter = i1 > i0
    overlaps = (inter[..., :1] & inter[..., 1:])  # (..., 1, 1): empty on one axis = empty
    select = _select_official if rule == "official" else _select_half
    start, count = select(lo, hi, i0, i1, n)
    count = torch.where(overlaps, count, torch.zeros_like(count))
    n_small = torch.minimum(count[..., 0, :], count[..., 1, :])  # (..., 2)
    i = torch.arange(k_max, device=lo.device)
    if rule == "centre":
        # query = line with fewer selected patches; on a tie, the finer patches, then view a
        c_o = count.flip(-2)
        width = (hi - lo) / n
        w_o = width.flip(-2)
        first = torch.tensor([[True], [False]], device=lo.device)
        query = (count < c_o) | ((count == c_o) & ((width < w_o) | ((width == w_o) & first)))
        q = start.unsqueeze(-1) + i
        lo_, hi_ = lo.unsqueeze(-1), hi.unsqueeze(-1)
        n_ = n.unsqueeze(-1)
        to_other = _centre_index(lo_, hi_, n_, lo_.flip(-3), hi_.flip(-3), n_.flip(-3), q)
        return n_small, torch.where(query.unsqueeze(-1), q, to_other.flip(-3))
    p = start.unsqueeze(-1) + _subsample(i, count.unsqueeze(-1), n_small.unsqueeze(-2).unsqueeze(-1),
                                        rule == "official")
    return n_small, p


@functools.lru_cache(maxsize=64)
def _grid_tensors(cols_a: int, rows_a: int, cols_b: int, rows_b: int, device: torch.device,
                  dtype: torch.dtype):
    """Patch counts ``(view, axis)`` as ``dtype`` and column counts ``(view, 1)`` as int64."""
    n = torch.tensor([[cols_a, rows_a], [cols_b, rows_b]], device=device, dtype=dtype)
    return n, torch.tensor([[cols_a], [cols_b]], device=device)


@functools.lru_cache(maxsize=64)
def _slot_tables(max_rows: int, max_cols: int, cls: bool, device: torch.device):
    """Where each output slot reads its token, for every ``(n_rows, n_cols)``.

    Returns ``where`` (int64) and ``valid`` (bool) tables of shape
    ``((max_rows + 1) * (max_cols + 1), M)``, row ``n_rows * (max_cols + 1) + n_cols``: ``where`` indexes a flattened
    ``(max_rows + 1, max_cols + 1)`` token grid whose entry ``[0, 0]`` is a sentinel
    holding token 0. The CLS slot and the empty slots read the sentinel, so a single
    gather gives the padded output with no masking pass.
    """
    m = torch.arange(max_rows * max_cols, device=device)
    n_r = torch.arange(max_rows + 1, device=device).view(-1, 1, 1)
    n_c = torch.arange(max_cols + 1, device=device).view(1, -1, 1).clamp(min=1)
    div = torch.div(m, n_c, rounding_mode="floor")
    valid = m < n_r * n_c * (torch.arange(max_cols + 1, device=device).view(1, -1, 1) > 0)
    where = torch.where(valid, (div + 1) * (max_cols + 1) + (m - div * n_c + 1), 0)
    if cls:
        where = F.pad(where, (1, 0))
        valid = F.pad(valid, (1, 0), value=True)
    # flat over (n_rows, n_cols) for a cheap index_select
    return where.flatten(0, 1), valid.flatten(0, 1)


# --------------------------------------------------------------------------- public API


def match_patches(
    box_a: BoxLike,
    box_b: BoxLike,
    grid_a: tuple[int, int] | int,
    grid_b: tuple[int, int] | int,
    flip_a: FlipLike = False,
    flip_b: FlipLike = False,
    *,
    rule: str = "half",
    cls: bool = True,
) -> PatchMatch:
    """Pairs of tokens of two views that show the same part of the source image.

    Parameters
    ----------
    box_a, box_b : torch.Tensor or sequence of 4 numbers
        Crop boxes ``(x0, y0, x1, y1)`` in source-image pixels, shape ``(..., 4)``;
        leading shapes broadcast. Floats allowed; ``x1 > x0`` and ``y1 > y0``.
    grid_a, grid_b : (int, int) or int
        ``(rows, cols)`` of each view's patch grid after resizing, e.g. ``(14, 14)``
        for 224 px with 16 px patches. An int means a square grid.
    flip_a, flip_b : bool or torch.Tensor
        Whether the view was mirrored horizontally after cropping; bool tensors of
        shape ``(...)`` broadcast with the boxes.
    rule : {"half", "official", "centre"}
        Coverage and pairing rule, see the module docstring.
    cls : bool
        Prepend the (CLS, CLS) pair and number patches from 1.

    Returns
    -------
    PatchMatch
        ``idx_a``, ``idx_b`` (int64) and ``valid`` (bool) of shape ``(..., M)`` with
        ``M = cls + min(rows_a, rows_b) * min(cols_a, cols_b)``, on the boxes' device.
        Computed without loops over samples and without host-device syncs beyond
        input validation.

    Examples
    --------
    >>> m = match_patches((0, 0, 224, 224), (0, 0, 112, 112), (14, 14), (7, 7))
    >>> m.pairs()[:3]
    [(0, 0), (1, 1), (2, 2)]
    >>> int(m.num_valid)
    50
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    if not isinstance(cls, bool):
        raise TypeError(f"cls must be a bool, got {type(cls).__name__}")
    rows_a, cols_a = _as_grid(grid_a, "grid_a")
    rows_b, cols_b = _as_grid(grid_b, "grid_b")

    device = next((t.device for t in (box_a, box_b) if isinstance(t, torch.Tensor)), None)
    ba = _as_boxes(box_a, "box_a", device)
    bb = _as_boxes(box_b, "box_b", ba.device)
    fa = _as_flip(flip_a, "flip_a", ba.device)
    fb = _as_flip(flip_b, "flip_b", ba.device)
    try:
        batch = torch.broadcast_shapes(ba.shape[:-1], bb.shape[:-1], fa.shape, fb.shape)
    except RuntimeError as err:
        raise ValueError(
            "box_a (..., 4), box_b (..., 4), flip_a (...) and flip_b (...) must have "
            f"broadcastable leading shapes, got {tuple(ba.shape)}, {tuple(bb.shape)}, "
            f"{tuple(fa.shape)}, {tuple(fb.shape)}"
        ) from err
    dev = ba.device
    boxes = torch.stack([ba.expand(*batch, 4), bb.expand(*batch, 4)], -2)  # (..., 2, 4)
    flips = torch.stack([fa.expand(batch), fb.expand(batch)], -1)  # (..., 2)
    lo = boxes[..., :2]  # (..., view, axis) with axis 0 = cols (x), 1 = rows (y)
    hi = boxes[..., 2:]
    n, cols = _grid_tensors(cols_a, rows_a, cols_b, rows_b, dev, boxes.dtype)

    max_rows, max_cols = min(rows_a, rows_b), min(cols_a, cols_b)
    n_small, p = _line_pairs(lo, hi, n, max(max_rows, max_cols), rule)
    offset = 1 if cls else 0
    row_tok = p[..., 1, :max_rows] * cols + offset  # (..., view, max_rows)
    col_src = p[..., 0, :max_cols]
    # flipped view: source column c is seen at token column cols - 1 - c
    col_tok = torch.where(flips.unsqueeze(-1), cols - 1 - col_src, col_src)
    # token grid (..., view, 1 + max_rows, 1 + max_cols) with a token-0 sentinel row and
    # column; slot m reads pair (m // n_cols, m % n_cols) of it through a static table
    row_tok = F.pad(row_tok, (1, 0))
    col_tok = F.pad(col_tok, (1, 0))
    grid = (row_tok.unsqueeze(-1) + col_tok.unsqueeze(-2)).flatten(-2)  # [0, 0] holds 0
    tab_where, tab_valid = _slot_tables(max_rows, max_cols, cls, dev)
    key = (n_small[..., 1] * (max_cols + 1) + n_small[..., 0]).flatten()  # n_rows, n_cols
    at = tab_where.index_select(0, key).view(*batch, -1)
    valid = tab_valid.index_select(0, key).view(*batch, -1)
    idx = grid.gather(-1, at.unsqueeze(-2).expand(*batch, 2, at.shape[-1]))
    return PatchMatch(idx_a=idx[..., 0, :], idx_b=idx[..., 1, :], valid=valid)


def patch_centres(box: BoxLike, grid: tuple[int, int] | int, flip: FlipLike = False) -> torch.Tensor:
    """Source-image centres of every patch token of a view.

    Parameters
    ----------
    box : torch.Tensor or sequence of 4 numbers
        ``(..., 4)`` crop box ``(x0, y0, x1, y1)``.
    grid : (int, int) or int
        ``(rows, cols)`` patch grid of the view.
    flip : bool or torch.Tensor
        Whether the view is mirrored.

    Returns
    -------
    torch.Tensor
        ``(..., rows * cols, 2)`` ``(x, y)`` centre of the patch at token ``r * cols + c``
        (no CLS), in source pixels.

    Examples
    --------
    >>> patch_centres((0, 0, 4, 2), (1, 2))
    tensor([[1., 1.],
            [3., 1.]], dtype=torch.float64)
    """
    rows, cols = _as_grid(grid, "grid")
    device = box.device if isinstance(box, torch.Tensor) else None
    b = _as_boxes(box, "box", device)
    f = _as_flip(flip, "flip", b.device)
    batch = torch.broadcast_shapes(b.shape[:-1], f.shape)
    b = b.expand(*batch, 4)
    f = f.expand(batch)
    r = torch.arange(rows, device=b.device, dtype=b.dtype).repeat_interleave(cols)
    c = torch.arange(cols, device=b.device, dtype=b.dtype).repeat(rows)
    c = torch.where(f.unsqueeze(-1), cols - 1 - c, c)
    x = b[..., 0:1] + (c + 0.5) * (b[..., 2:3] - b[..., 0:1]) / cols
    y = b[..., 1:2] + (r + 0.5) * (b[..., 3:4] - b[..., 1:2]) / rows
    return torch.stack([x, y], -1)
