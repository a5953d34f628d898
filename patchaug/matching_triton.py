"""Fused Triton engine of :func:`patchaug.match_patches`: every pair of views of a step in one launch.

On a GPU the batched torch engine of :mod:`patchaug.matching` is some forty small
elementwise kernels per call, and a multi-crop training step makes one call per teacher
view and student grid: launch-bound. Here one Triton program handles one (view pair,
sample): it loads the two boxes and flips, works out per axis which patches each view
selects and how they pair (the rules of :mod:`patchaug.matching`), and writes the
sample's ``M`` output slots, ``BLOCK_M`` at a time in registers. All pairs of all views
of a step are one launch, whatever their grids.

Exactness. The kernel runs the float64 operations of the torch engine (``_select_half``,
``_select_official``, ``_subsample`` and the ``"centre"`` offsets of ``_lines``) in the
same order, and is launched with ``enable_fp_fusion=False`` so that no multiply-add is
contracted into an FMA: results equal the other engines bit for bit, and the tests check
it against them and against :func:`patchaug.matching.match_patches_reference`.

Shapes are the only compile-time inputs besides the rule, ``cls`` and ``BLOCK_M`` (the
next power of two of the longest output), so a training loop with a fixed batch size
compiles the kernel once. Triton is optional; see :mod:`patchaug.triton_engine` for
``TRITON_INTERPRET=1`` (the kernel runs in Triton's interpreter on CPU tensors in tests).
"""

from __future__ import annotations  # annotations stay strings: no triton needed to import

import functools
from collections.abc import Sequence

import torch

from .triton_engine import _interpreting, _jit, tl, triton, triton_available

__all__ = ["match_pairs_triton", "triton_available"]

_RULE_CODES = {"half": 0, "official": 1, "centre": 2}


# --------------------------------------------------------------------------------------------
# one axis of one pair of views, float64 scalars; mirrors the torch engine's line stages
# --------------------------------------------------------------------------------------------
@_jit
def _rint(x):
    """Round half to even (``torch.round``), exact in float64."""
    down = tl.floor(x)
    frac = x - down
    odd = (down - 2.0 * tl.floor(down * 0.5)) != 0.0
    up = (frac > 0.5) | ((frac == 0.5) & odd)
    return tl.where(up, down + 1.0, down)


@_jit
def _select(lo, length, n, i0, i1, RULE: tl.constexpr):
    """``(start, count)`` of the patches of one view's axis that the rule selects from the
    intersection ``[i0, i1)`` (``_select_half`` / ``_select_official``, same float order)."""
    if RULE == 1:  # official: the authors' rounded start and length, clamped to [0, n]
        start = _rint(n * ((i0 - lo) / length))
        size = _rint(n * ((i1 - i0) / length))
        end = tl.minimum(start + size, n)
        start = tl.minimum(start, n)
        count = tl.maximum(end - start, 0.0)
    else:  # half: patch k more than half covered <=> a0 < (2k + 1) L < a1, a = 2 n (i - lo)
        n2 = 2.0 * n
        first = tl.floor((((i0 - lo) * n2) / length - 1.0) / 2.0) + 1.0
        stop = tl.minimum(tl.ceil((((i1 - lo) * n2) / length - 1.0) / 2.0), n)
        count = tl.maximum(stop - first, 0.0)
        count = tl.where(n2 * (i1 - i0) > length, count, 0.0)
        start = tl.minimum(first, n)
    return start, count


@_jit
def _subsample(k, n_big, n_small, RULE: tl.constexpr):
    """Index into a selection of ``n_big`` for slot ``k`` of ``n_small`` (``_subsample``)."""
    if RULE == 1:
        step = (n_big - 1.0) / tl.maximum(n_small - 1.0, 1.0)
        value = tl.floor(k * step)
        last = tl.where(n_small > 1.0, n_small - 1.0, -1.0)  # the last slot takes the last item
        return tl.where(k == last, n_big - 1.0, value)
    return tl.floor((k * (n_big - 1.0)) / tl.maximum(n_small - 1.0, 1.0))


@_jit
def _centre_index(k, start, count, lo, length, n, start_o, count_o, lo_o, length_o, n_o,
                  is_a):
    """Rule ``"centre"``, slot ``k`` of this view's line: the query view (fewer selected
    patches; on a tie the finer patches, then view a) keeps ``start + k``; the other view
    takes the patch under the centre of the query's patch ``start_o + k``, clamped to the
    grid (``_lines`` and ``_slot_tokens``, same float order)."""
    scaled = length * n_o
    s_o = length_o * n
    query = (count < count_o) | ((count == count_o) & ((scaled < s_o) | ((scaled == s_o) & is_a)))
    offset = ((lo_o - lo) * (2.0 * n_o) + (start_o * 2.0 + 1.0) * length_o) * n
    x_other = (k * (length_o * (2.0 * n)) + offset) / (scaled * 2.0)
    x_other = tl.minimum(tl.maximum(x_other, 0.0), n - 1.0)
    return tl.where(query, k + start, x_other)


@_jit
def _axis_index(k, lo_a, hi_a, n_a, lo_b, hi_b, n_b, RULE: tl.constexpr):
    """Patch index of views a and b at slot ``k`` of one axis, and that axis's pair count."""
    len_a = hi_a - lo_a
    len_b = hi_b - lo_b
    i0 = tl.maximum(lo_a, lo_b)
    i1 = tl.minimum(hi_a, hi_b)
    start_a, count_a = _select(lo_a, len_a, n_a, i0, i1, RULE)
    start_b, count_b = _select(lo_b, len_b, n_b, i0, i1, RULE)
    n_small = tl.minimum(count_a, count_b)
    if RULE == 2:
        idx_a = _centre_index(k, start_a, count_a, lo_a, len_a, n_a,
                              start_b, count_b, lo_b, len_b, n_b, True)
        idx_b = _centre_index(k, start_b, count_b, lo_b, len_b, n_b,
                              start_a, count_a, lo_a, len_a, n_a, False)
    else:
        idx_a = start_a + _subsample(k, count_a, n_small, RULE)
        idx_b = start_b + _subsample(k, count_b, n_small, RULE)
    return idx_a.to(tl.int64), idx_b.to(tl.int64), n_small.to(tl.int64)


# --------------------------------------------------------------------------------------------
# the kernel: one program per (view pair, sample)
# --------------------------------------------------------------------------------------------
@_jit
def _match_kernel(boxes_ptr, flips_ptr, pairs_ptr, idx_a_ptr, idx_b_ptr, valid_ptr, B, M,
                  RULE: tl.constexpr, CLS: tl.constexpr, BLOCK_M: tl.constexpr):
    pid = tl.program_id(0)
    p = pid // B
    s = pid - p * B
    # the pair's views and grids: (view a, view b, rows a, cols a, rows b, cols b)
    va = tl.load(pairs_ptr + p * 6 + 0).to(tl.int64)
    vb = tl.load(pairs_ptr + p * 6 + 1).to(tl.int64)
    rows_a = tl.load(pairs_ptr + p * 6 + 2).to(tl.int64)
    cols_a = tl.load(pairs_ptr + p * 6 + 3).to(tl.int64)
    rows_b = tl.load(pairs_ptr + p * 6 + 4).to(tl.int64)
    cols_b = tl.load(pairs_ptr + p * 6 + 5).to(tl.int64)
    box_a = boxes_ptr + (va * B + s) * 4
    box_b = boxes_ptr + (vb * B + s) * 4
    xa0 = tl.load(box_a + 0)
    ya0 = tl.load(box_a + 1)
    xa1 = tl.load(box_a + 2)
    ya1 = tl.load(box_a + 3)
    xb0 = tl.load(box_b + 0)
    yb0 = tl.load(box_b + 1)
    xb1 = tl.load(box_b + 2)
    yb1 = tl.load(box_b + 3)
    flip_a = tl.load(flips_ptr + va * B + s) != 0
    flip_b = tl.load(flips_ptr + vb * B + s) != 0

    # slot m holds pair q = m - CLS: matched row slot q // n_cols, column slot q % n_cols
    m = tl.arange(0, BLOCK_M).to(tl.int64)
    q = m - CLS
    # the pair counts per axis do not depend on the slot: computed at slot 0
    zero = tl.zeros((BLOCK_M,), dtype=tl.float64)
    _, _, n_rows = _axis_index(zero, ya0, ya1, rows_a.to(tl.float64), yb0, yb1,
                               rows_b.to(tl.float64), RULE)
    _, _, n_cols = _axis_index(zero, xa0, xa1, cols_a.to(tl.float64), xb0, xb1,
                               cols_b.to(tl.float64), RULE)
    ok = (q >= 0) & (q < n_rows * n_cols)
    r = tl.where(ok, q // tl.maximum(n_cols, 1), 0)
    c = tl.where(ok, q - r * n_cols, 0)
    row_a, row_b, _ = _axis_index(r.to(tl.float64), ya0, ya1, rows_a.to(tl.float64),
                                  yb0, yb1, rows_b.to(tl.float64), RULE)
    col_a, col_b, _ = _axis_index(c.to(tl.float64), xa0, xa1, cols_a.to(tl.float64),
                                  xb0, xb1, cols_b.to(tl.float64), RULE)
    # token of source patch (row, col) as the network sees the view: columns mirrored
    col_a = tl.where(flip_a, cols_a - 1 - col_a, col_a)
    col_b = tl.where(flip_b, cols_b - 1 - col_b, col_b)
    tok_a = tl.where(ok, CLS + row_a * cols_a + col_a, 0)
    tok_b = tl.where(ok, CLS + row_b * cols_b + col_b, 0)
    valid = ok | (m < CLS)
    out = pid.to(tl.int64) * M + m
    live = m < M
    tl.store(idx_a_ptr + out, tok_a, mask=live)
    tl.store(idx_b_ptr + out, tok_b, mask=live)
    tl.store(valid_ptr + out, valid.to(tl.int8), mask=live)


@functools.lru_cache(maxsize=64)
def _pair_table(pairs: tuple[tuple[int, int], ...], grids: tuple[tuple[int, int], ...],
                device: torch.device) -> torch.Tensor:
    """``(P, 6)`` int32 ``(view a, view b, rows a, cols a, rows b, cols b)``, kept on the
    device so that a training step copies nothing to it."""
    rows = [(i, j, *grids[i], *grids[j]) for i, j in pairs]
    return torch.tensor(rows, dtype=torch.int32, device=device).reshape(len(pairs), 6)


def match_pairs_triton(boxes: torch.Tensor, flips: torch.Tensor,
                       grids: Sequence[tuple[int, int]], pairs: Sequence[tuple[int, int]],
                       rule: str = "half", cls: bool = True
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Matches of several pairs of views of a batch, in one kernel launch.

    Inputs are not validated here: :func:`patchaug.match_view_pairs` validates them.

    Parameters
    ----------
    boxes : torch.Tensor
        ``(V, B, 4)`` crop boxes of ``V`` views of ``B`` images, any real dtype.
    flips : torch.Tensor
        ``(V, B)`` bool.
    grids : sequence of (int, int)
        ``(rows, cols)`` of each view.
    pairs : sequence of (int, int)
        ``(i, j)`` view indices of the ``P`` pairs to match (view ``i`` is side a).
    rule, cls
        As :func:`patchaug.match_patches`.

    Returns
    -------
    tuple of torch.Tensor
        ``idx_a``, ``idx_b`` (int64) and ``valid`` (bool), ``(P, B, M)`` with ``M`` the
        longest output of the pairs; pair ``p``'s first ``cls + min rows * min cols``
        slots equal :func:`patchaug.match_patches` for it, the rest are empty.
    """
    batch = boxes.shape[1]
    pairs = tuple((int(i), int(j)) for i, j in pairs)
    grids = tuple((int(r), int(c)) for r, c in grids)
    m_len = max((cls + min(grids[i][0], grids[j][0]) * min(grids[i][1], grids[j][1])
                 for i, j in pairs), default=int(cls))
    device = boxes.device
    shape = (len(pairs), batch, m_len)
    idx_a = torch.empty(shape, dtype=torch.int64, device=device)
    idx_b = torch.empty(shape, dtype=torch.int64, device=device)
    valid = torch.empty(shape, dtype=torch.int8, device=device)
    if idx_a.numel():
        table = _pair_table(pairs, grids, device)
        box64 = boxes.detach().to(torch.float64).contiguous()
        flip8 = flips.detach().contiguous().view(torch.uint8)
        block = triton.next_power_of_2(max(m_len, 16))
        _match_kernel[(len(pairs) * batch,)](
            box64, flip8, table, idx_a, idx_b, valid, batch, m_len,
            RULE=_RULE_CODES[rule], CLS=int(cls), BLOCK_M=block,
            **({} if _interpreting() else {"enable_fp_fusion": False}),
        )
    return idx_a, idx_b, valid.view(torch.bool)

