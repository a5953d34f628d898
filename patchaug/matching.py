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
    allow. On a tie in counts the view with the finer patches is the query. Patches
    are half-open, so a centre on a patch border goes to the patch after it; computed
    in integer-valued float64, this is exact for integer boxes.

Token numbering: with ``cls=True`` token 0 is CLS and patch ``(r, c)`` is token
``1 + r * cols + c``, row-major in the orientation the network sees (after the
flip). Pairs are listed row by row, left to right in the source image.

Specification
-------------
:func:`match_patches_reference` is the rules for one pair of views written out stage by
stage (:func:`intersect`, :func:`covered_patches` / :func:`official_patches`,
:func:`subsample` / :func:`subsample_official` or :func:`centre_partners`,
:func:`mirror`), in exact rational arithmetic. It is slow and is the specification:
the tests check that :func:`match_patches` gives exactly its pairs.

Engines
-------
:func:`match_patches` computes every sample at once with one of three engines, chosen
per call by its ``engine`` argument (``"auto"`` by default; there is no global switch).
``"numpy"`` and ``"torch"`` are the same batched algorithm on two array libraries:
numpy arrays (``"auto"`` for boxes on the CPU or not tensors: far less dispatch overhead)
and torch tensors (any device). ``"triton"`` (``"auto"`` on CUDA when Triton is
installed) is a fused kernel, :mod:`patchaug.matching_triton`, that does the same float64
steps in one launch; :func:`match_view_pairs` runs it for all pairs of views of a
multi-crop step at once. All give bit-identical results.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["PatchMatch", "match_patches", "match_view_pairs", "patch_centres", "RULES"]

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


# --------------------------------------------------------------------------- reference
#
# The rules for ONE pair of views, one short function per stage, in plain Python on exact
# rationals (Fraction): the specification that the batched engines below are tested
# against (tests/patchaug/test_matching_reference.py). Readable, not fast. On one axis a
# view of ``n`` patches spans ``[lo, hi)``: patch ``k`` is ``[lo + k w, lo + (k + 1) w)``
# with ``w = (hi - lo) / n``; indices count in the source image's orientation.

ExactBox = tuple[Fraction, Fraction, Fraction, Fraction]


def intersect(box_a: ExactBox, box_b: ExactBox) -> ExactBox | None:
    """Eq. 1: the intersection ``(x0, y0, x1, y1)`` of two boxes, ``None`` when they do not
    overlap (boxes that only touch do not)."""
    x0, y0 = max(box_a[0], box_b[0]), max(box_a[1], box_b[1])
    x1, y1 = min(box_a[2], box_b[2]), min(box_a[3], box_b[3])
    if x1 <= x0 or y1 <= y0:
        return None
    return x0, y0, x1, y1


def covered_patches(lo, hi, n: int, i0, i1) -> list[int]:
    """Rule ``"half"`` (Sec. 3.4): the patches of one axis that ``[i0, i1)`` covers over
    strictly more than half their width (an exact tie is out)."""
    w = Fraction(hi - lo) / n
    return [k for k in range(n) if min(lo + (k + 1) * w, i1) - max(lo + k * w, i0) > w / 2]


def official_patches(lo, hi, n: int, i0, i1) -> list[int]:
    """Rule ``"official"``: the authors' ``start = round(n (i0 - lo) / L)`` and ``length =
    round(n (i1 - i0) / L)`` in float64 (their order of operations, half to even), the
    range clamped to the grid."""
    lo, hi, i0, i1 = float(lo), float(hi), float(i0), float(i1)
    start = round(n * ((i0 - lo) / (hi - lo)))
    length = round(n * ((i1 - i0) / (hi - lo)))
    return list(range(min(start, n), min(start + length, n)))


def subsample(selected: list[int], n_small: int) -> list[int]:
    """Eq. 2 as Fig. 2 applies it: ``n_small`` of the selected patches, item
    ``floor(i (N_big - 1) / (N_small - 1))`` for slot ``i``, so first and last are kept
    (the first alone when ``n_small == 1``)."""
    if n_small == 1:
        return selected[:1]
    return [selected[i * (len(selected) - 1) // (n_small - 1)] for i in range(n_small)]


def subsample_official(selected: list[int], n_small: int) -> list[int]:
    """The authors' subsampling, ``floor(numpy.linspace(0, N_big - 1, n_small))``: slot ``i``
    takes item ``floor(i * step)`` in float64, the last slot the last item."""
    if n_small == 1:
        return selected[:1]
    step = (len(selected) - 1) / (n_small - 1)
    last = n_small - 1
    return [selected[math.floor(i * step) if i < last else -1] for i in range(n_small)]


def centre_partners(query: list[int], lo_q, hi_q, n_q: int, lo_o, hi_o, n_o: int) -> list[int]:
    """Rule ``"centre"``: for each patch of the query view, the patch of the other view whose
    half-open interval holds its centre (a centre on a border goes to the patch after it).
    The centre of a selected patch lies inside the intersection, so inside the other grid."""
    w_q, w_o = Fraction(hi_q - lo_q) / n_q, Fraction(hi_o - lo_o) / n_o
    return [math.floor((lo_q + (k + Fraction(1, 2)) * w_q - lo_o) / w_o) for k in query]


def match_axis(lo_a, hi_a, n_a: int, lo_b, hi_b, n_b: int, i0, i1,
               rule: str) -> tuple[list[int], list[int]]:
    """Matched patch indices of views a and b on one axis, in source order (equal lengths)."""
    select = official_patches if rule == "official" else covered_patches
    sel_a, sel_b = select(lo_a, hi_a, n_a, i0, i1), select(lo_b, hi_b, n_b, i0, i1)
    if rule == "centre":
        # query: the view with fewer selected patches; on a tie the finer patches, then a
        if (len(sel_a), Fraction(hi_a - lo_a) / n_a) <= (len(sel_b), Fraction(hi_b - lo_b) / n_b):
            return sel_a, centre_partners(sel_a, lo_a, hi_a, n_a, lo_b, hi_b, n_b)
        return centre_partners(sel_b, lo_b, hi_b, n_b, lo_a, hi_a, n_a), sel_b
    pick = subsample_official if rule == "official" else subsample
    n_small = min(len(sel_a), len(sel_b))
    return pick(sel_a, n_small), pick(sel_b, n_small)


def mirror(col: int, cols: int, flip: bool) -> int:
    """Eq. 6: the column at which a view of ``cols`` columns shows source column ``col``."""
    return cols - 1 - col if flip else col


def token(row: int, col: int, cols: int, flip: bool, cls: bool) -> int:
    """Token index of source patch ``(row, col)``: row-major as the network sees the view."""
    return cls + row * cols + mirror(col, cols, flip)


def _exact_box(box: object, name: str) -> ExactBox:
    values = box.tolist() if isinstance(box, torch.Tensor) else list(box)
    if len(values) != 4 or not all(isinstance(v, numbers.Real) and math.isfinite(v)
                                   for v in values):
        raise ValueError(f"{name} must be 4 finite numbers (x0, y0, x1, y1), got {box!r}")
    x0, y0, x1, y1 = (Fraction(v) for v in values)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"{name} must satisfy x1 > x0 and y1 > y0, got {box!r}")
    return x0, y0, x1, y1


def match_patches_reference(box_a: BoxLike, box_b: BoxLike, grid_a: tuple[int, int] | int,
                            grid_b: tuple[int, int] | int, flip_a: bool = False,
                            flip_b: bool = False, rule: str = "half",
                            cls: bool = True) -> list[tuple[int, int]]:
    """The specification of :func:`match_patches` for one pair of views: its valid pairs.

    Same arguments as :func:`match_patches`, unbatched (boxes: 4 numbers or a ``(4,)``
    tensor; flips: bools). Computed stage by stage in exact rational arithmetic: the
    boxes' intersection (:func:`intersect`), then per axis the patches each view selects,
    the pairing of the two selections (:func:`match_axis`), and the tokens of every pair
    of matched rows and columns, row by row (:func:`token`, which mirrors the columns of
    a flipped view).

    Examples
    --------
    >>> match_patches_reference((0, 0, 224, 224), (0, 0, 112, 112), 14, 7)[:3]
    [(0, 0), (1, 1), (2, 2)]
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    (rows_a, cols_a), (rows_b, cols_b) = _as_grid(grid_a, "grid_a"), _as_grid(grid_b, "grid_b")
    box_a, box_b = _exact_box(box_a, "box_a"), _exact_box(box_b, "box_b")
    flip_a, flip_b, cls = bool(flip_a), bool(flip_b), bool(cls)
    pairs = [(0, 0)] if cls else []
    inter = intersect(box_a, box_b)
    if inter is None:
        return pairs
    x0, y0, x1, y1 = inter
    rows = match_axis(box_a[1], box_a[3], rows_a, box_b[1], box_b[3], rows_b, y0, y1, rule)
    cols = match_axis(box_a[0], box_a[2], cols_a, box_b[0], box_b[2], cols_b, x0, x1, rule)
    for row_a, row_b in zip(*rows):
        for col_a, col_b in zip(*cols):
            pairs.append((token(row_a, col_a, cols_a, flip_a, cls),
                          token(row_b, col_b, cols_b, flip_b, cls)))
    return pairs


# --------------------------------------------------------------------------- backends
#
# The batched algorithm is written once against a tiny array shim and run by one of two
# engines, :func:`_match_numpy` and :func:`_match_torch` (see "Engines" in the module
# docstring; :func:`match_patches` picks one per call). On CPU the per-line and
# per-slot stages run on numpy arrays (zero-copy views of the input tensors): an
# elementwise op on a few thousand numbers costs ~1 us there against ~3-8 us of torch
# dispatch, and those stages are ~50 such ops. Other devices run the very same code on
# torch tensors. Both give bit-identical results: every step is an IEEE float64 op
# (+, -, *, /, floor, ceil, round half to even), a comparison, a table read or exact
# int64 arithmetic, in the same order. The last stage (one outer sum and one gather
# into the padded output, memory-bound) always runs in torch, whose kernels are faster
# than numpy's there.

class _NumpyOps:
    """Array ops of the CPU path, on numpy arrays."""

    floor = staticmethod(np.floor)
    ceil = staticmethod(np.ceil)
    rint = staticmethod(np.rint)  # half to even, like torch.round
    minimum = staticmethod(np.minimum)
    maximum = staticmethod(np.maximum)
    where = staticmethod(np.where)
    isfinite = staticmethod(np.isfinite)

    @staticmethod
    def clamp_min(x, v, out=None):
        return np.maximum(x, v, out=out)

    @staticmethod
    def to_int(x, like=None):
        """``x`` as int64, or as the integer dtype of ``like``."""
        return x.astype(np.int64 if like is None else like.dtype)

    @staticmethod
    def as_float(x):
        return x if x.dtype.kind == "f" else x.astype(np.float64)

    @staticmethod
    def flip_views(x):
        """``x`` with its first axis (views a, b) swapped, as a view."""
        return x[::-1]

    @staticmethod
    def stack(a, b, shape: tuple[int, ...]):
        """``(2, *shape)``: ``a`` and ``b`` broadcast to ``shape``."""
        out = np.empty((2, *shape), dtype=np.result_type(a, b))
        out[0] = a
        out[1] = b
        return out

    @staticmethod
    def intersect(lo, hi):
        """``(2, 1, axis, N)``: start and end of the two views' intersection per axis."""
        out = np.empty((2, *lo.shape[1:]), dtype=lo.dtype)
        np.maximum(lo[0], lo[1], out=out[0])
        np.minimum(hi[0], hi[1], out=out[1])
        return out[:, None]

    @staticmethod
    def moveaxis_last_first(x):
        return x.transpose(-1, *range(x.ndim - 1))

    @staticmethod
    def permute(x, axes: tuple[int, ...]):
        return x.transpose(axes)

    @staticmethod
    def take_columns(table, index):
        """``table[:, index]``: ``(rows, *index.shape)``."""
        return np.take(table, index, axis=1)

    @staticmethod
    def to_torch(x) -> torch.Tensor:
        return torch.from_numpy(x)


class _TorchOps:
    """The same ops on torch tensors, for every other device."""

    floor = staticmethod(torch.floor)
    ceil = staticmethod(torch.ceil)
    rint = staticmethod(torch.round)  # half to even
    minimum = staticmethod(torch.minimum)
    maximum = staticmethod(torch.maximum)
    where = staticmethod(torch.where)
    isfinite = staticmethod(torch.isfinite)

    @staticmethod
    def clamp_min(x, v, out=None):
        return torch.clamp(x, min=v, out=out)

    @staticmethod
    def to_int(x, like=None):
        return x.to(torch.int64 if like is None else like.dtype)

    @staticmethod
    def as_float(x):
        return x if x.is_floating_point() else x.to(torch.float64)

    @staticmethod
    def flip_views(x):
        return x.flip(0)

    @staticmethod
    def stack(a, b, shape: tuple[int, ...]):
        return torch.stack([a.expand(shape), b.expand(shape)])

    @staticmethod
    def intersect(lo, hi):
        return torch.stack([torch.maximum(lo[0], lo[1]), torch.minimum(hi[0], hi[1])])[:, None]

    @staticmethod
    def moveaxis_last_first(x):
        return x.movedim(-1, 0)

    @staticmethod
    def permute(x, axes: tuple[int, ...]):
        return x.permute(axes)

    @staticmethod
    def take_columns(table, index):
        return table.index_select(1, index.reshape(-1)).view(table.shape[0], *index.shape)

    @staticmethod
    def to_torch(x) -> torch.Tensor:
        return x


def _ops(x):
    return _NumpyOps if isinstance(x, np.ndarray) else _TorchOps


# --------------------------------------------------------------------------- validation


def _as_grid(grid: object, name: str) -> tuple[int, int]:
    if type(grid) is tuple and len(grid) == 2 and type(grid[0]) is int and type(grid[1]) is int:
        if grid[0] > 0 and grid[1] > 0:  # the common case, without the ABC checks below
            return grid
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


def _broadcast_shapes(*shapes: tuple[int, ...]) -> tuple[int, ...]:
    """``np.broadcast_shapes`` for a few short shapes, without building arrays."""
    out = list(max(shapes, key=len))
    for shape in shapes:
        for i, d in enumerate(shape, len(out) - len(shape)):
            if d != out[i]:
                if out[i] == 1:
                    out[i] = d
                elif d != 1:
                    raise ValueError(f"shapes {shapes} do not broadcast")
    return tuple(out)


def _work_dtype(device: torch.device) -> torch.dtype:
    # float64 keeps the coverage test exact for integer boxes; MPS has no float64.
    return torch.float32 if device.type == "mps" else torch.float64


def _as_boxes(box: object, name: str, device: torch.device | None, xp=_TorchOps,
              check: bool = True):
    """``(..., 4)`` boxes in the work dtype: a tensor on ``device`` (default: its own) or,
    for ``xp=_NumpyOps``, a float64 numpy array; with ``check``, finite and ordered."""
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
    if t.dim() == 0 or t.shape[-1] != 4:
        raise ValueError(f"{name} must have shape (..., 4) as (x0, y0, x1, y1), got {tuple(t.shape)}")
    if xp is _NumpyOps:
        t = t.detach().cpu()
        if t.dtype not in _NUMPY_DTYPES:
            t = t.to(torch.float64)
        t = t.numpy().astype(np.float64, copy=False)
    else:
        if device is not None:
            t = t.to(device)
        t = t.to(_work_dtype(t.device))
    if check:
        _check_box_values(xp, t, name)
    return t


def _check_box_values(xp, t, name: str) -> None:
    if not bool(xp.isfinite(t).all()):
        raise ValueError(f"{name} must be finite, got NaN or inf")
    if not bool((t[..., 2:] > t[..., :2]).all()):
        raise ValueError(f"{name} must satisfy x1 > x0 and y1 > y0 for every box")


def _widths_ok(length) -> bool:
    """Whether every width is positive and finite: then every box is finite and ordered
    (an infinite or NaN corner gives an infinite or NaN width). ``False`` for no boxes."""
    if length.shape[-1] == 0:
        return False
    return bool(length.min() > 0) and bool(length.max() < math.inf)


_NUMPY_DTYPES = (torch.float64, torch.float32, torch.float16, torch.int64, torch.int32, torch.int16,
                 torch.int8, torch.uint8)


def _as_flip(flip: object, name: str, device: torch.device | None, xp=_TorchOps):
    if isinstance(flip, torch.Tensor):
        if flip.dtype != torch.bool:
            raise TypeError(f"{name} must be a bool tensor, got dtype {flip.dtype}")
        return flip.detach().cpu().numpy() if xp is _NumpyOps else flip.to(device)
    if isinstance(flip, bool | np.bool_):
        return np.asarray(bool(flip)) if xp is _NumpyOps else torch.tensor(bool(flip), device=device)
    raise TypeError(f"{name} must be a bool or a bool tensor, got {type(flip).__name__}")


# --------------------------------------------------------------------------- selection
#
# The core works on "lines": (view, axis) with views (a, b) and axes (cols = x,
# rows = y), stacked as (view, axis, N) with the flattened batch N last, so that every
# step is one array op for all lines with long contiguous inner loops. ``lo``/``hi``
# are the crop's extent on that axis, ``n`` its number of patches, ``i0``/``i1`` the
# intersection's extent (shared by both views). Patch indices stay float64 (exact
# small integers) until the token parts. Entries that no output slot reads (lines with
# nothing selected, slots past the selection) may hold any value.


def _select_half(xp, lo, length, ends, n, n2):
    """Contiguous range ``[start, start + count)`` of patches more than half covered.

    Patch ``k`` spans ``[lo + k w, lo + (k + 1) w)`` with ``w = L / n``. It is more than
    half covered by ``[i0, i1)`` iff its centre lies strictly inside and ``i1 - i0 > w / 2``.
    Scaled by ``2 n`` (``n2``) the centre test reads ``a0 < (2k + 1) L < a1`` with
    ``a = 2 n (i - lo)``: integers for integer boxes, so the closed form below is exact
    (an exact tie, ``(2k + 1) L == a``, is excluded). ``ends``: ``(2, 1, axis, N)``, the
    intersection's ``i0`` and ``i1``. An axis without intersection selects nothing.
    """
    # both ends at once, in place, in the order of first = floor((a0 - 1) / 2) + 1 and
    # stop = ceil((a1 - 1) / 2)
    a = ends - lo  # (2, view, axis, N)
    a *= n2
    a /= length
    a -= 1
    a /= 2
    first, stop = a[0], a[1]
    xp.floor(first, out=first)
    first += 1  # >= 0 as i0 >= lo
    xp.ceil(stop, out=stop)
    xp.minimum(stop, n, out=stop)
    stop -= first
    count = xp.clamp_min(stop, 0, out=stop)
    count *= n2 * (ends[1] - ends[0]) > length  # the intersection is over half a patch wide
    # a line whose intersection starts past its end has nothing selected: bound its start
    return xp.minimum(first, n, out=first), count


def _select_official(xp, lo, length, ends, n):
    """The authors' rounded start and length, in their float order, clamped to ``[0, n]``."""
    start = xp.rint(n * ((ends[0] - lo) / length))
    size = xp.rint(n * ((ends[1] - ends[0]) / length))  # negative without intersection
    end = xp.minimum(start + size, n)
    start = xp.minimum(start, n)
    return start, xp.clamp_min(end - start, 0)


def _subsample(i, n_big, n_small, official: bool):
    """Index into a selection of ``n_big`` for slot ``i`` of ``n_small`` (first and last matched).

    Float64 (exact integers) for integer or float64 inputs, numpy arrays or tensors.
    """
    xp = _ops(i)
    i, n_big, n_small = xp.as_float(i), xp.as_float(n_big), xp.as_float(n_small)
    if official:
        # numpy's floor(linspace(0, n_big - 1, n_small)): i * step in float64, last = stop
        step = (n_big - 1) / xp.clamp_min(n_small - 1, 1)
        value = i * step
        xp.floor(value, out=value)
        return xp.where((i == n_small - 1) & (n_small > 1), n_big - 1, value)
    # floor of a quotient of small integers: exact in float64 (a non-integer quotient is at
    # least 1 / (n_small - 1) away from the next integer), and cheaper than integer division
    value = i * (n_big - 1)  # in place from here: these are the big arrays
    value /= xp.clamp_min(n_small - 1, 1)
    return xp.floor(value, out=value)


class _Lines(NamedTuple):
    """Output of :func:`_lines`, numpy arrays or tensors; the last four for ``"centre"`` only."""

    start: Any
    count: Any
    n_small: Any
    query: Any = None
    step: Any = None
    offset: Any = None
    den: Any = None


def _lines(xp, lo, hi, length, consts: _GridConsts, rule: str) -> _Lines:
    """What each line selects. ``lo``, ``hi``, ``length = hi - lo``: ``(view, axis, N)``,
    on numpy or torch.

    Returns ``start``, ``count`` ``(view, axis, N)`` and ``n_small`` ``(axis, N)`` (pairs
    per axis), float64. A sample has pairs iff ``n_small`` is positive on both axes (an
    axis without intersection selects nothing on either view; the other axis may still
    select). For ``"centre"`` also ``query`` ``(view, axis, N)`` (the view whose selection
    is kept, exactly one per axis) and ``step``, ``offset``, ``den``: slot ``k`` of a line
    holds patch ``floor((k * step + offset) / den)`` (``start + k`` on the query line).
    """
    n = consts.n
    ends = xp.intersect(lo, hi)
    if rule == "official":
        start, count = _select_official(xp, lo, length, ends, n)
    else:
        start, count = _select_half(xp, lo, length, ends, n, consts.n2)
    n_small = xp.minimum(count[0], count[1])
    if rule != "centre":
        return _Lines(start, count, n_small)
    # query = line with fewer selected patches; on a tie the finer patches (L / n < L_o / n_o,
    # compared as L n_o < L_o n), then view a
    c_o = xp.flip_views(count)
    scaled = length * consts.n_other
    s_o = xp.flip_views(scaled)
    query = (count < c_o) | ((count == c_o) & ((scaled < s_o) | ((scaled == s_o) & consts.first)))
    # slot k of the other line: the patch under the centre of the query's patch start_o + k,
    # floor((lo_o + (start_o + k + 0.5) L_o / n_o - lo) n / L), multiplied through by
    # 2 n_o L: integers for integer boxes, so a centre on a patch border goes exactly to
    # the patch after it (patches are half-open)
    l_o = xp.flip_views(length)
    offset = xp.flip_views(lo) - lo
    offset *= consts.n2_other
    centre = xp.flip_views(start) * 2
    centre += 1
    centre *= l_o
    offset += centre
    offset *= n
    scaled *= 2
    return _Lines(start, count, n_small, query=query, step=xp.where(query, 1.0, l_o * consts.n2),
                  offset=xp.where(query, start, offset), den=xp.where(query, 1.0, scaled))


def _slot_tokens(xp, lines: _Lines, consts: _GridConsts, flips, rule: str, cls: bool):
    """Token parts ``(slot, view, axis, N)`` of each line at slot ``i < k_max``, in the
    integer dtype of ``consts.mult`` (int64 on torch, the smallest that holds every token
    on numpy; slots that no output reads may wrap around).

    A matched pair of row slot ``r`` and column slot ``c`` of a view is token
    ``parts[r, view, 1] + parts[c, view, 0]``: ``cls + row * cols`` on the row axis and
    the column as the network sees it (``cols - 1 - col`` when flipped) on the column
    axis. ``lines`` is the output of :func:`_lines`, ``flips`` ``(view, 1, N)`` bool.
    The slot axis comes first: numpy broadcasts fastest along whole contiguous blocks.
    Slots run to ``k_max`` inclusive; the caller turns the one past each axis's last slot
    into the sentinel 0.
    """
    # token part = index * mult + add, per line (int64)
    mult = consts.mult + consts.mult_flip * flips  # (view, axis, N)
    add = consts.add_flip * flips
    if cls:
        add += consts.add_cls
    slots = consts.slots  # (k_max + 1, 1, 1, 1)
    if rule != "centre":
        # subsample(slot, count, n_small) of every line, read from its cached table
        table = consts.sub_half if rule == "half" else consts.sub_official
        if table is None:
            x = xp.to_int(_subsample(slots, lines.count, lines.n_small, rule == "official"), mult)
        else:
            key = xp.to_int(lines.count * slots.shape[0] + lines.n_small)  # (view, axis, N)
            x = xp.take_columns(table, key)
        x *= mult
        x += xp.to_int(lines.start, mult) * mult + add  # index = start + subsample
        return x
    # the query line keeps its patches; the other line takes the patch under the centre of
    # each, clamped to the grid: (slot, view, axis, N)
    x = slots * lines.step
    x += lines.offset
    x /= lines.den
    x = xp.clamp_min(x, 0, out=x)
    xp.minimum(x, consts.last, out=x)
    x = xp.to_int(x, mult)  # truncation is the floor here
    x *= mult
    x += add
    return x


class _GridConsts(NamedTuple):
    """Per-grid constants of :func:`_grid_consts`: tensors or read-only numpy arrays, shaped
    ``(view, axis, 1)`` unless noted (axis 0 = cols, 1 = rows)."""

    n: Any  # patch counts
    n2: Any  # 2 * n
    last: Any  # n - 1
    n_other: Any  # n of the other view
    n2_other: Any
    first: Any  # (view, 1, 1) bool: view a
    slots: Any  # (k_max + 1, 1, 1, 1) slot numbers
    # token part of index k on each line: k * (mult + mult_flip * flip) + add_flip * flip
    # + add_cls * cls
    mult: Any
    mult_flip: Any
    add_flip: Any
    add_cls: Any
    # subsample(slot, count, n_small) of each rule, (slot, count * (k_max + 1) + n_small),
    # or None for very large grids
    sub_half: Any = None
    sub_official: Any = None


@functools.lru_cache(maxsize=64)
def _grid_consts(cols_a: int, rows_a: int, cols_b: int, rows_b: int, device: torch.device,
                 dtype: torch.dtype, as_numpy: bool) -> _GridConsts:
    """Per-grid constants, as tensors on ``device`` or numpy arrays."""
    n = torch.tensor([[cols_a, rows_a], [cols_b, rows_b]], device=device, dtype=dtype)[..., None]
    k_max = max(min(rows_a, rows_b), min(cols_a, cols_b))
    out = {
        "n": n,  # (view, axis, 1) patch counts
        "n2": 2 * n,
        "last": n - 1,
        "n_other": n.flip(0),
        "n2_other": 2 * n.flip(0),
        "first": torch.tensor([True, False], device=device)[:, None, None],  # view a
        "slots": torch.arange(k_max + 1, device=device, dtype=dtype)[:, None, None, None],
        # token part of index k on each line: k * (mult + mult_flip * flip)
        # + add_flip * flip + add_cls * cls, (view, axis, 1)
        "mult": torch.tensor([[1, cols_a], [1, cols_b]], device=device)[..., None],
        "mult_flip": torch.tensor([[-2, 0], [-2, 0]], device=device)[..., None],
        "add_flip": torch.tensor([[cols_a - 1, 0], [cols_b - 1, 0]], device=device)[..., None],
        "add_cls": torch.tensor([[0, 1], [0, 1]], device=device)[..., None],
    }
    # subsample(slot, count, n_small) for every count <= the largest side and n_small <= k_max,
    # (slot, count * (k_max + 1) + n_small): per line one table read instead of arithmetic
    # (very large grids skip the tables and compute it)
    max_side = max(rows_a, cols_a, rows_b, cols_b)
    if (k_max + 1) ** 2 * (max_side + 1) <= _MAX_TABLE_ENTRIES:
        i, count, n_small = torch.broadcast_tensors(
            torch.arange(k_max + 1, device=device, dtype=dtype)[:, None, None],
            torch.arange(max_side + 1, device=device, dtype=dtype)[:, None],
            torch.arange(k_max + 1, device=device, dtype=dtype))
        for rule in ("half", "official"):
            sub = _subsample(i, count, n_small, rule == "official")
            out[f"sub_{rule}"] = sub.reshape(k_max + 1, -1).to(torch.int64)
    if as_numpy:
        # token parts in the smallest integer dtype that holds every token and intermediate
        # (|value| <= rows * cols + 1): int16 for usual grids, a quarter of int64's memory traffic
        tok = _token_dtype(max(rows_a * cols_a, rows_b * cols_b) + 1)
        out = {k: v.numpy() for k, v in out.items()}
        for k in ("mult", "mult_flip", "add_flip", "add_cls", "sub_half", "sub_official"):
            if k in out:
                out[k] = out[k].astype(tok)
        for v in out.values():
            v.flags.writeable = False  # shared by every call
    return _GridConsts(**out)


#: Largest subsample table (entries) kept per grid pair; larger grids compute the subsample.
_MAX_TABLE_ENTRIES = 1 << 20


def _token_dtype(bound: int) -> np.dtype:
    """The smallest of int16, int32, int64 that holds ``[-bound, bound]``."""
    for dt in (np.int16, np.int32):
        if bound <= np.iinfo(dt).max:
            return np.dtype(dt)
    return np.dtype(np.int64)


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
    engine: str = "auto",
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
    engine : {"auto", "numpy", "torch", "triton"}
        Which engine computes it (see "Engines" in the module docstring); all give the
        same result. ``"auto"``: numpy for CPU boxes (or no tensors), the fused Triton
        kernel for CUDA boxes when Triton is installed, torch otherwise.

    Returns
    -------
    PatchMatch
        ``idx_a``, ``idx_b`` (int64) and ``valid`` (bool) of shape ``(..., M)`` with
        ``M = cls + min(rows_a, rows_b) * min(cols_a, cols_b)``, on the boxes' device
        (on the CPU for the numpy engine). Computed without loops over samples and
        without host-device syncs beyond input validation. The pairs are exactly those
        of :func:`match_patches_reference`.

    Examples
    --------
    >>> m = match_patches((0, 0, 224, 224), (0, 0, 112, 112), (14, 14), (7, 7))
    >>> m.pairs()[:3]
    [(0, 0), (1, 1), (2, 2)]
    >>> int(m.num_valid)
    50
    """
    run = _ENGINES.get(_pick_engine(engine, box_a, box_b)) if isinstance(engine, str) else None
    if run is None:
        raise ValueError(f"engine must be one of {tuple(['auto', *_ENGINES])}, got {engine!r}")
    return run(box_a, box_b, grid_a, grid_b, flip_a, flip_b, rule=rule, cls=cls)


def match_view_pairs(
    boxes: torch.Tensor,
    flips: torch.Tensor,
    grids: Sequence[tuple[int, int] | int],
    pairs: Sequence[tuple[int, int]],
    *,
    rule: str = "half",
    cls: bool = True,
    engine: str = "auto",
) -> dict[tuple[int, int], PatchMatch]:
    """:func:`match_patches` for several pairs of views of one batch at once.

    A multi-crop step matches every teacher view with every other view; this computes
    them together: on CUDA in one launch of the fused Triton kernel, elsewhere in one
    batched call per pair of grids.

    Parameters
    ----------
    boxes : torch.Tensor
        ``(V, B, 4)`` crop boxes ``(x0, y0, x1, y1)`` of ``V`` views of ``B`` images.
    flips : torch.Tensor
        ``(V, B)`` bool, whether each view was mirrored.
    grids : sequence of (int, int) or int
        ``(rows, cols)`` patch grid of each of the ``V`` views.
    pairs : sequence of (int, int)
        ``(i, j)`` views to match, ``i`` as side a.
    rule, cls, engine
        As :func:`match_patches`.

    Returns
    -------
    dict
        ``{(i, j): PatchMatch}`` in the order of ``pairs``, with ``(B, M)`` tensors, each
        equal to ``match_patches(boxes[i], boxes[j], grids[i], grids[j], flips[i], flips[j])``.

    Examples
    --------
    >>> boxes = torch.tensor([[[0., 0, 224, 224]], [[0, 0, 112, 112]], [[112, 112, 224, 224]]])
    >>> m = match_view_pairs(boxes, torch.zeros(3, 1, dtype=torch.bool), [14, 7, 7],
    ...                      [(0, 1), (0, 2)])
    >>> sorted(m), int(m[(0, 1)].num_valid[0]), m[(0, 2)].idx_a[0, 1:3].tolist()
    ([(0, 1), (0, 2)], 50, [106, 107])
    """
    if not isinstance(boxes, torch.Tensor) or boxes.dim() != 3 or boxes.shape[-1] != 4:
        raise ValueError("boxes must be a (V, B, 4) tensor, got "
                         f"{tuple(boxes.shape) if isinstance(boxes, torch.Tensor) else type(boxes).__name__}")
    n_views, batch = boxes.shape[0], boxes.shape[1]
    if not isinstance(flips, torch.Tensor) or flips.dtype != torch.bool:
        raise TypeError(f"flips must be a bool tensor, got {getattr(flips, 'dtype', type(flips).__name__)}")
    if tuple(flips.shape) != (n_views, batch):
        raise ValueError(f"flips must have shape (V, B) = {(n_views, batch)}, got {tuple(flips.shape)}")
    if isinstance(grids, str | bytes) or not isinstance(grids, Sequence) or len(grids) != n_views:
        raise ValueError(f"grids must hold one (rows, cols) per view ({n_views}), got {grids!r}")
    grid = tuple(_as_grid(g, f"grids[{v}]") for v, g in enumerate(grids))
    checked = []
    for pair in pairs:
        if (not isinstance(pair, Sequence) or len(pair) != 2
                or not all(isinstance(v, numbers.Integral) and 0 <= v < n_views for v in pair)):
            raise ValueError(f"pairs must hold (i, j) view indices in [0, {n_views}), got {pair!r}")
        checked.append((int(pair[0]), int(pair[1])))
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    if not isinstance(cls, bool):
        raise TypeError(f"cls must be a bool, got {type(cls).__name__}")
    chosen = _pick_engine(engine, boxes, None)
    if chosen not in _ENGINES:
        raise ValueError(f"engine must be one of {tuple(['auto', *_ENGINES])}, got {engine!r}")
    if chosen == "triton":
        return _view_pairs_triton(boxes, flips, grid, checked, rule, cls)
    # one batched call per pair of grids: the pairs' boxes stacked, (pairs, B, 4)
    out: dict[tuple[int, int], PatchMatch] = {}
    groups: dict[tuple[tuple[int, int], tuple[int, int]], list[tuple[int, int]]] = {}
    for i, j in checked:
        groups.setdefault((grid[i], grid[j]), []).append((i, j))
    for (grid_a, grid_b), group in groups.items():
        side_a = torch.tensor([i for i, _ in group], device=boxes.device)
        side_b = torch.tensor([j for _, j in group], device=boxes.device)
        m = match_patches(boxes[side_a], boxes[side_b], grid_a, grid_b, flips[side_a],
                          flips[side_b], rule=rule, cls=cls, engine=chosen)
        for k, key in enumerate(group):
            out[key] = PatchMatch(m.idx_a[k], m.idx_b[k], m.valid[k])
    return {key: out[key] for key in checked}


def _view_pairs_triton(boxes, flips, grid, pairs, rule: str, cls: bool):
    from .matching_triton import match_pairs_triton

    _require_triton(boxes.device)
    if boxes.dtype == torch.bool or boxes.is_complex():
        raise TypeError(f"boxes must hold real numbers, got dtype {boxes.dtype}")
    _check_box_values(_TorchOps, boxes.detach().to(_work_dtype(boxes.device)), "boxes")
    idx_a, idx_b, valid = match_pairs_triton(boxes, flips, grid, pairs, rule, cls)
    out = {}
    for p, (i, j) in enumerate(pairs):
        m_len = cls + min(grid[i][0], grid[j][0]) * min(grid[i][1], grid[j][1])
        out[(i, j)] = PatchMatch(idx_a[p, :, :m_len], idx_b[p, :, :m_len], valid[p, :, :m_len])
    return out


# --------------------------------------------------------------------------- engines


def _boxes_device(box_a: object, box_b: object) -> torch.device | None:
    """The device of ``box_a`` if it is a tensor, else of ``box_b``, else ``None``."""
    return (box_a.device if isinstance(box_a, torch.Tensor)
            else box_b.device if isinstance(box_b, torch.Tensor) else None)


def _pick_engine(engine: object, box_a: object, box_b: object) -> object:
    """The engine ``"auto"`` stands for: numpy for CPU boxes (or none), Triton on CUDA when it
    compiles there, torch on every other device."""
    if engine != "auto":
        return engine
    device = _boxes_device(box_a, box_b)
    if device is None or device.type == "cpu":
        return "numpy"
    if device.type == "cuda" and _triton_compiles(device):
        return "triton"
    return "torch"


def _triton_compiles(device: torch.device) -> bool:
    """Whether Triton compiles for ``device`` (not just interprets: the interpreter is for tests)."""
    from . import triton_engine

    return triton_engine.triton_available(device) and not triton_engine._interpreting()


def _match_numpy(box_a, box_b, grid_a, grid_b, flip_a=False, flip_b=False, *, rule="half",
                 cls=True) -> PatchMatch:
    """:func:`match_patches` on the numpy engine: CPU outputs, whatever the inputs' device."""
    return _match_batched(_NumpyOps, box_a, box_b, grid_a, grid_b, flip_a, flip_b, rule, cls)


def _match_torch(box_a, box_b, grid_a, grid_b, flip_a=False, flip_b=False, *, rule="half",
                 cls=True) -> PatchMatch:
    """:func:`match_patches` on the torch engine: outputs on the boxes' device (any device)."""
    return _match_batched(_TorchOps, box_a, box_b, grid_a, grid_b, flip_a, flip_b, rule, cls)


def _match_triton(box_a, box_b, grid_a, grid_b, flip_a=False, flip_b=False, *, rule="half",
                  cls=True) -> PatchMatch:
    """:func:`match_patches` on the fused Triton kernel (:mod:`patchaug.matching_triton`):
    one launch, outputs on the boxes' device. Validates like the other engines."""
    from .matching_triton import match_pairs_triton

    rows_a, cols_a, rows_b, cols_b, ba, bb, fa, fb, batch = _validated(
        box_a, box_b, grid_a, grid_b, flip_a, flip_b, rule, cls)
    _require_triton(ba.device)
    size = math.prod(batch)
    boxes = torch.stack([ba.expand(*batch, 4).reshape(size, 4), bb.expand(*batch, 4).reshape(size, 4)])
    flips = torch.stack([fa.expand(batch).reshape(size), fb.expand(batch).reshape(size)])
    _check_box_values(_TorchOps, ba, "box_a")
    _check_box_values(_TorchOps, bb, "box_b")
    idx_a, idx_b, valid = match_pairs_triton(boxes, flips, ((rows_a, cols_a), (rows_b, cols_b)),
                                             ((0, 1),), rule, cls)
    slots = valid.shape[-1]
    return PatchMatch(idx_a=idx_a.view(*batch, slots), idx_b=idx_b.view(*batch, slots),
                      valid=valid.view(*batch, slots))


def _require_triton(device: torch.device) -> None:
    from . import triton_engine

    if not triton_engine.triton_available(device):
        raise RuntimeError(f"engine='triton' needs triton and a CUDA device (or TRITON_INTERPRET=1), "
                           f"got boxes on {device}")


_ENGINES = {"numpy": _match_numpy, "torch": _match_torch, "triton": _match_triton}


def _validated(box_a, box_b, grid_a, grid_b, flip_a, flip_b, rule: str, cls: bool, xp=_TorchOps):
    """Arguments of :func:`match_patches` checked and converted (values not yet checked):
    grids, boxes ``(..., 4)`` in the work dtype, flips, and the broadcast batch shape."""
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    if not isinstance(cls, bool):
        raise TypeError(f"cls must be a bool, got {type(cls).__name__}")
    rows_a, cols_a = _as_grid(grid_a, "grid_a")
    rows_b, cols_b = _as_grid(grid_b, "grid_b")
    device = None if xp is _NumpyOps else _boxes_device(box_a, box_b)
    ba = _as_boxes(box_a, "box_a", device, xp, check=False)
    dev = torch.device("cpu") if xp is _NumpyOps else ba.device
    bb = _as_boxes(box_b, "box_b", dev, xp, check=False)
    if xp is _TorchOps:  # integer outputs: no graph (and in-place steps below)
        ba, bb = ba.detach(), bb.detach()
    fa = _as_flip(flip_a, "flip_a", dev, xp)
    fb = _as_flip(flip_b, "flip_b", dev, xp)
    try:
        batch = _broadcast_shapes(tuple(ba.shape[:-1]), tuple(bb.shape[:-1]), tuple(fa.shape),
                                  tuple(fb.shape))
    except ValueError as err:
        raise ValueError(
            "box_a (..., 4), box_b (..., 4), flip_a (...) and flip_b (...) must have "
            f"broadcastable leading shapes, got {tuple(ba.shape)}, {tuple(bb.shape)}, "
            f"{tuple(fa.shape)}, {tuple(fb.shape)}"
        ) from err
    return rows_a, cols_a, rows_b, cols_b, ba, bb, fa, fb, batch


def _match_batched(xp, box_a, box_b, grid_a, grid_b, flip_a, flip_b, rule: str,
                   cls: bool) -> PatchMatch:
    """The batched algorithm on the array ops ``xp`` (``_NumpyOps`` or ``_TorchOps``),
    input validation included, so both engines raise the same errors."""
    # the box values are checked below, at once for both, on their widths
    rows_a, cols_a, rows_b, cols_b, ba, bb, fa, fb, batch = _validated(
        box_a, box_b, grid_a, grid_b, flip_a, flip_b, rule, cls, xp)
    dev = ba.device if xp is _TorchOps else torch.device("cpu")
    max_rows, max_cols = min(rows_a, rows_b), min(cols_a, cols_b)
    consts = _grid_consts(cols_a, rows_a, cols_b, rows_b, dev, _work_dtype(dev), xp is _NumpyOps)
    size = math.prod(batch)
    with np.errstate(all="ignore"):  # torch never warns; absurd boxes (~1e308) overflow alike
        # batch last, flat: (view, 4, N) and (view, 1, N)
        ba, bb = (b.reshape((1,) * (len(batch) + 1 - b.ndim) + tuple(b.shape)) for b in (ba, bb))
        boxes = xp.stack(xp.moveaxis_last_first(ba), xp.moveaxis_last_first(bb), (4, *batch))
        boxes = boxes.reshape(2, 4, size)
        flips = xp.stack(fa, fb, batch).reshape(2, 1, size)
        # lo, hi: (view, axis, N) with axis 0 = cols (x), 1 = rows (y)
        lo, hi = boxes[:, :2], boxes[:, 2:]
        length = hi - lo
        if not _widths_ok(length):  # find which argument is wrong (an overflow may pass)
            _check_box_values(xp, ba, "box_a")
            _check_box_values(xp, bb, "box_b")
        lines = _lines(xp, lo, hi, length, consts, rule)
        n_small = lines.n_small
        key = xp.to_int(n_small[1] * (max_cols + 1) + n_small[0])  # n_rows, n_cols
        # (slot, view, axis, N); slot max_rows (max_cols) of the row (column) parts is the
        # sentinel 0 (also when max_rows < k_max)
        parts = _slot_tokens(xp, lines, consts, flips, rule, cls)
        del lines  # free what is no longer needed early: its memory is still in cache
        parts[max_rows, :, 1] = 0
        parts[max_cols, :, 0] = 0
        assemble = _assemble_numpy if xp is _NumpyOps else _assemble_torch
        idx_a, idx_b, valid = assemble(parts[:max_rows + 1, :, 1], parts[:max_cols + 1, :, 0], key,
                                       max_rows, max_cols, cls)
    slots = valid.shape[-1]  # M (explicit sizes: an empty batch works too)
    return PatchMatch(idx_a=idx_a.view(*batch, slots), idx_b=idx_b.view(*batch, slots),
                      valid=valid.view(*batch, slots))


# --------------------------------------------------------------------------- assembly
#
# Slot m of a sample reads the token of row slot m // n_cols and column slot m % n_cols, or
# the sentinel 0. Both backends build the token grid of every pair of row and column slots
# (its last entry is the sentinel) and gather from it; they differ in layout, for speed.
# Where slot m reads comes from a static table indexed by the sample's (n_rows, n_cols),
# or, for grids so large that the table would be, is computed per sample.

#: Largest slot table (entries) kept per grid pair.
_MAX_SLOT_TABLE_ENTRIES = 1 << 22


def _slot_index(key: torch.Tensor, max_rows: int, max_cols: int, cls: bool):
    """Where each output slot reads its token, for samples with ``key = n_rows * (max_cols + 1)
    + n_cols`` (``(K,)`` int64).

    Returns ``where`` (int64) and ``valid`` (bool) of shape ``(K, M)``: ``where`` indexes a
    flattened ``(max_rows + 1, max_cols + 1)`` token grid (pairs of row and column slots)
    whose last entry is a sentinel holding token 0. The CLS slot and the empty slots read the
    sentinel, so a single gather gives the padded output with no masking pass.
    """
    n_r = torch.div(key, max_cols + 1, rounding_mode="floor")[:, None]
    n_c = (key - n_r[:, 0] * (max_cols + 1))[:, None]
    m = torch.arange(max_rows * max_cols, device=key.device)
    div = torch.div(m, n_c.clamp(min=1), rounding_mode="floor")
    valid = m < n_r * n_c
    sentinel = (max_rows + 1) * (max_cols + 1) - 1
    where = torch.where(valid, div * (max_cols + 1) + (m - div * n_c), sentinel)
    if cls:
        where = F.pad(where, (1, 0), value=sentinel)
        valid = F.pad(valid, (1, 0), value=True)
    return where, valid


@functools.lru_cache(maxsize=64)
def _slot_tables(max_rows: int, max_cols: int, cls: bool, device: torch.device):
    """:func:`_slot_index` of every key, ``((max_rows + 1) * (max_cols + 1), M)``, or ``None``
    when that is more than ``_MAX_SLOT_TABLE_ENTRIES``."""
    keys = (max_rows + 1) * (max_cols + 1)
    if keys * (cls + max_rows * max_cols) > _MAX_SLOT_TABLE_ENTRIES:
        return None
    return _slot_index(torch.arange(keys, device=device), max_rows, max_cols, cls)


@functools.lru_cache(maxsize=16)
def _slot_tables_numpy(max_rows: int, max_cols: int, cls: bool, size: int):
    """:func:`_slot_tables` as read-only numpy arrays for ``size`` samples, or ``None``.

    Returns ``where``, ``where * 2 * size`` (a grid entry holds both views of every sample;
    ``None`` for a large table), ``valid`` and the ``(size, M)`` sample offsets ``n``
    (``None`` for a large batch). What is kept per batch size stays small.
    """
    tables = _slot_tables(max_rows, max_cols, cls, torch.device("cpu"))
    if tables is None:
        return None
    where, valid = (t.numpy() for t in tables)  # views of the cached tensors
    where.flags.writeable = False
    valid.flags.writeable = False
    scaled = sample = None
    if where.size <= _MAX_CACHED_OFFSETS:
        scaled = where * (2 * size)
        scaled.flags.writeable = False
    if size * where.shape[1] <= _MAX_CACHED_OFFSETS:  # a plain add is twice as fast as a broadcast one
        sample = np.broadcast_to(np.arange(size)[:, None], (size, where.shape[1])).copy()
        sample.flags.writeable = False
    return where, scaled, valid, sample


_MAX_CACHED_OFFSETS = 1 << 18  # 2 MiB of int64 per cached array


def _assemble_numpy(row_part, col_part, key, max_rows: int, max_cols: int, cls: bool):
    """``idx_a``, ``idx_b``, ``valid`` as ``(N, M)`` tensors from numpy parts.

    ``row_part`` ``(max_rows + 1, view, N)``, ``col_part`` ``(max_cols + 1, view, N)``,
    ``key`` ``(N,)``. The grid is ``(row slot, column slot, view, N)``, batch last, so the
    outer sum runs over long contiguous rows; a flat ``take`` then reads each view's slots.
    """
    size = key.shape[0]
    # (max_rows + 1, max_cols + 1, view, N), in the parts' small integer dtype
    grid = np.add(row_part[:, None], col_part[None])
    tables = _slot_tables_numpy(max_rows, max_cols, cls, size)
    if tables is not None:
        where, scaled, tab_valid, sample = tables
        if scaled is not None:
            at = scaled.take(key, axis=0)  # grid entry * 2 N, (N, M)
        else:
            at = where.take(key, axis=0)
            at *= 2 * size
        at += np.arange(size)[:, None] if sample is None else sample  # view a of sample n: + n
        valid = tab_valid.take(key, axis=0)
    else:
        where, valid = (t.numpy() for t in _slot_index(torch.from_numpy(key), max_rows, max_cols, cls))
        at = where * (2 * size) + np.arange(size)[:, None]
    flat = grid.reshape(-1)
    idx_a = flat.take(at).astype(np.int64)
    idx_b = flat[size:].take(at).astype(np.int64)
    return torch.from_numpy(idx_a), torch.from_numpy(idx_b), torch.from_numpy(valid)


def _assemble_torch(row_part, col_part, key, max_rows: int, max_cols: int, cls: bool):
    """:func:`_assemble_numpy` on torch tensors: grid ``(view, N, rows, cols)``, one gather."""
    size = key.shape[0]
    grid = torch.empty(2, size, max_rows + 1, max_cols + 1, dtype=torch.int64, device=key.device)
    torch.add(row_part.permute(1, 2, 0).unsqueeze(-1), col_part.permute(1, 2, 0).unsqueeze(-2),
              out=grid)
    grid = grid.view(2, size, (max_rows + 1) * (max_cols + 1))
    tables = _slot_tables(max_rows, max_cols, cls, key.device)
    if tables is None:
        at, valid = _slot_index(key, max_rows, max_cols, cls)
    else:
        at, valid = tables[0].index_select(0, key), tables[1].index_select(0, key)
    idx = grid.gather(-1, at.expand(2, size, at.shape[-1]))
    return idx[0], idx[1], valid


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
