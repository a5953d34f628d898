"""Property tests for :func:`patchaug.match_patches`, one rule of the paper per test."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from patchaug import match_patches, patch_centres
from patchaug.matching import covered_patches, match_patches_reference

SRC = 64  # source image side used by the strategies


@st.composite
def int_boxes(draw, src=SRC):
    x0 = draw(st.integers(0, src - 1))
    y0 = draw(st.integers(0, src - 1))
    x1 = draw(st.integers(x0 + 1, src))
    y1 = draw(st.integers(y0 + 1, src))
    return (x0, y0, x1, y1)


grids = st.tuples(st.integers(1, 14), st.integers(1, 14))


@st.composite
def views(draw):
    return draw(int_boxes()), draw(grids), draw(st.booleans())


# --------------------------------------------------------------------------- references


# the rules written out (the specification, in patchaug.matching); "official" is also
# checked against an independent implementation of the authors' arithmetic below
covered = covered_patches
reference_half = functools.partial(match_patches_reference, rule="half")
reference_centre = functools.partial(match_patches_reference, rule="centre")


def reference_official(box_a, box_b, grid_a, grid_b, flip_a, flip_b):
    """The authors' arithmetic (NOTES.md section 2), with numpy slicing, square or not.

    Written from the description: per axis ``start = int(round(P * ((I0 - C0) / (C1 - C0))))``
    and ``length = round(P * ((I1 - I0) / (C1 - C0)))`` in Python floats, flipped
    columns taken as ``[P - end, P - start)`` of the token grid then reversed, and
    ``floor(linspace(0, N_big - 1, N_small))`` subsampling. The negative-slice quirk
    is read as a clamp (the one accepted difference).
    """
    i0x, i1x = max(box_a[0], box_b[0]), min(box_a[2], box_b[2])
    i0y, i1y = max(box_a[1], box_b[1]), min(box_a[3], box_b[3])
    if i0y >= i1y or i0x >= i1x:
        return [(0, 0)]

    def view_patches(box, grid, flip):
        rows, cols = grid
        ids = np.arange(1, rows * cols + 1).reshape(rows, cols)
        w_ratio = (i1x - i0x) / (box[2] - box[0])
        h_ratio = (i1y - i0y) / (box[3] - box[1])
        w_len, h_len = round(cols * w_ratio), round(rows * h_ratio)
        s_w = int(round(cols * ((i0x - box[0]) / (box[2] - box[0]))))
        s_h = int(round(rows * ((i0y - box[1]) / (box[3] - box[1]))))
        e_w, e_h = min(s_w + w_len, cols), min(s_h + h_len, rows)  # the clamp
        if flip:
            s_w, e_w = cols - e_w, cols - s_w
        view = ids[s_h:e_h, s_w:e_w]
        return np.fliplr(view) if flip else view

    pa = view_patches(box_a, grid_a, flip_a)
    pb = view_patches(box_b, grid_b, flip_b)

    def take(n_big, n_small):
        return [int(np.floor(v)) for v in np.linspace(0, n_big - 1, n_small)]

    (ra, ca), (rb, cb) = pa.shape, pb.shape
    nr, nc = min(ra, rb), min(ca, cb)
    pa = pa[take(ra, nr), :][:, take(ca, nc)]
    pb = pb[take(rb, nr), :][:, take(cb, nc)]
    return [(0, 0)] + list(zip(pa.flatten().tolist(), pb.flatten().tolist()))


# --------------------------------------------------------------------------- paper examples


def test_fig2_example_global_local():
    """Fig. 2: local rows 3-5 x cols 2-5 (patches 21..36) vs global rows 0-3 x cols 0-5 (1..48).

    Rows 1, 2, 4 and columns 1, 2, 4, 6 of the global intersection are selected.
    """
    glob = (100, 100, 324, 324)  # 224 px, 16 px patches, 14 x 14
    local = (52, 36, 196, 164)  # 6 x 6 grid whose bottom-right 3 x 4 patches overlap
    m = match_patches(glob, local, (14, 14), (6, 6))
    got = m.pairs()
    local_tokens = [b for _, b in got[1:]]
    assert local_tokens == list(range(21, 25)) + list(range(27, 31)) + list(range(33, 37))
    global_rows = sorted({(a - 1) // 14 for a, _ in got[1:]})
    global_cols = sorted({(a - 1) % 14 for a, _ in got[1:]})
    assert global_rows == [0, 1, 3]  # 1st, 2nd and 4th rows
    assert global_cols == [0, 1, 3, 5]  # 1st, 2nd, 4th and 6th columns
    assert got[0] == (0, 0) and len(got) == 13


def test_eq6_flip_of_fig2_mirrors_columns():
    glob, local = (100, 100, 324, 324), (52, 36, 196, 164)
    plain = match_patches(glob, local, 14, 6)
    flipped = match_patches(glob, local, 14, 6, flip_a=True)
    for (a, b), (fa, fb) in zip(plain.pairs()[1:], flipped.pairs()[1:]):
        assert fb == b
        assert (fa - 1) // 14 == (a - 1) // 14 and (fa - 1) % 14 == 13 - (a - 1) % 14


# --------------------------------------------------------------------------- properties


@given(views(), views())
def test_equals_straightforward_loop_of_the_paper_rule(va, vb):
    (ba, ga, fa), (bb, gb, fb) = va, vb
    m = match_patches(ba, bb, ga, gb, fa, fb)
    assert m.pairs() == reference_half(ba, bb, ga, gb, fa, fb)


@given(views(), views(), st.sampled_from(["half", "official", "centre"]), st.booleans())
def test_indices_in_range_and_padding_is_zero(va, vb, rule, cls):
    (ba, ga, fa), (bb, gb, fb) = va, vb
    m = match_patches(ba, bb, ga, gb, fa, fb, rule=rule, cls=cls)
    n_a, n_b = ga[0] * ga[1] + cls, gb[0] * gb[1] + cls
    assert m.idx_a.dtype == torch.int64 and m.valid.dtype == torch.bool
    assert int(m.idx_a.min()) >= 0 and int(m.idx_a.max()) < n_a
    assert int(m.idx_b.min()) >= 0 and int(m.idx_b.max()) < n_b
    assert (m.idx_a[~m.valid] == 0).all() and (m.idx_b[~m.valid] == 0).all()
    # valid slots first
    k = int(m.num_valid)
    assert m.valid[:k].all() and not m.valid[k:].any()


@given(views(), views(), st.sampled_from(["half", "official", "centre"]))
def test_pair_count_is_product_of_per_axis_minima(va, vb, rule):
    (ba, ga, fa), (bb, gb, fb) = va, vb
    m = match_patches(ba, bb, ga, gb, fa, fb, rule=rule)
    assert m.valid.shape[-1] == 1 + min(ga[0], gb[0]) * min(ga[1], gb[1])
    pairs = m.pairs()[1:]
    rows_a = {(a - 1) // ga[1] for a, _ in pairs}
    cols_b = {(b - 1) % gb[1] for _, b in pairs}
    if rule != "centre":
        rows_b = {(b - 1) // gb[1] for _, b in pairs}
        cols_a = {(a - 1) % ga[1] for a, _ in pairs}
        assert len(pairs) == min(len(rows_a), len(rows_b)) * min(len(cols_a), len(cols_b))
        assert len(set(pairs)) == len(pairs)
    else:
        assert len(pairs) <= max(1, len(rows_a)) * max(1, len(cols_b)) * max(ga[1], gb[1]) ** 2


@given(views(), views(), st.sampled_from(["half", "official"]))
def test_symmetry_swapping_views_swaps_outputs(va, vb, rule):
    (ba, ga, fa), (bb, gb, fb) = va, vb
    m = match_patches(ba, bb, ga, gb, fa, fb, rule=rule)
    s = match_patches(bb, ba, gb, ga, fb, fa, rule=rule)
    assert torch.equal(m.idx_a, s.idx_b) and torch.equal(m.idx_b, s.idx_a)
    assert torch.equal(m.valid, s.valid)


@given(views(), views(), st.sampled_from(["half", "official", "centre"]))
def test_flip_mirrors_exactly_the_column_indices_of_that_view(va, vb, rule):
    (ba, ga, _), (bb, gb, fb) = va, vb
    plain = match_patches(ba, bb, ga, gb, False, fb, rule=rule)
    flipped = match_patches(ba, bb, ga, gb, True, fb, rule=rule)
    assert torch.equal(plain.valid, flipped.valid)
    assert torch.equal(plain.idx_b, flipped.idx_b)
    keep = plain.valid.clone()
    keep[0] = False
    cols = ga[1]
    row_p, col_p = divmod_t(plain.idx_a[keep] - 1, cols)
    row_f, col_f = divmod_t(flipped.idx_a[keep] - 1, cols)
    assert torch.equal(row_p, row_f)
    assert torch.equal(col_f, cols - 1 - col_p)


def divmod_t(x, d):
    return torch.div(x, d, rounding_mode="floor"), x % d


@given(int_boxes(), grids, st.booleans(), st.sampled_from(["half", "official", "centre"]))
def test_identical_views_give_identity(box, grid, flip, rule):
    m = match_patches(box, box, grid, grid, flip, flip, rule=rule)
    n = grid[0] * grid[1]
    assert m.pairs() == [(0, 0)] + [(t, t) for t in sorted_tokens(grid, flip)]
    assert int(m.num_valid) == n + 1


def sorted_tokens(grid, flip):
    rows, cols = grid
    return [1 + r * cols + (cols - 1 - c if flip else c) for r in range(rows) for c in range(cols)]


@given(int_boxes(src=30), grids, grids, st.sampled_from(["half", "official", "centre"]))
def test_disjoint_boxes_give_only_cls(box, ga, gb, rule):
    shifted = (box[2] + 1, box[1], box[2] + 5, box[3])  # right of box, touching is not overlapping
    touching = (box[2], box[1], box[2] + 5, box[3])
    for other in (shifted, touching):
        m = match_patches(box, other, ga, gb, rule=rule)
        assert m.pairs() == [(0, 0)]
        assert match_patches(box, other, ga, gb, rule=rule, cls=False).pairs() == []


@given(views(), views())
def test_matched_patches_satisfy_coverage_and_covered_patches_are_selected(va, vb):
    """A matched patch is more than half covered (width and height) by the intersection,
    and every row/column of such patches appears in the view's matched rows/columns on
    the axis where that view has fewer (or equally many) covered patches."""
    (ba, ga, fa), (bb, gb, fb) = va, vb
    pairs = match_patches(ba, bb, ga, gb, fa, fb).pairs()[1:]
    i0x, i1x = max(ba[0], bb[0]), min(ba[2], bb[2])
    i0y, i1y = max(ba[1], bb[1]), min(ba[3], bb[3])
    for box, (rows, cols), flip, side in ((ba, ga, fa, 0), (bb, gb, fb, 1)):
        toks = [p[side] - 1 for p in pairs]
        r_sel = {t // cols for t in toks}
        c_sel = {(cols - 1 - t % cols) if flip else t % cols for t in toks}
        if i1x <= i0x or i1y <= i0y:
            assert not toks
            continue
        r_cov = set(covered(box[1], box[3], rows, i0y, i1y))
        c_cov = set(covered(box[0], box[2], cols, i0x, i1x))
        assert r_sel <= r_cov and c_sel <= c_cov
        other = (gb, bb) if side == 0 else (ga, ba)
        o_r = len(covered(other[1][1], other[1][3], other[0][0], i0y, i1y))
        o_c = len(covered(other[1][0], other[1][2], other[0][1], i0x, i1x))
        if pairs:
            if len(r_cov) <= o_r:
                assert r_sel == r_cov
            if len(c_cov) <= o_c:
                assert c_sel == c_cov


@given(views(), views(), st.sampled_from(["half", "official"]))
@example(((0, 0, 1, 2), (1, 1), False), ((0, 0, 1, 2), (1, 2), False), "half")
def test_order_is_monotone_per_axis_with_first_and_last_matched(va, vb, rule):
    (ba, ga, fa), (bb, gb, fb) = va, vb
    pairs = match_patches(ba, bb, ga, gb, fa, fb, rule=rule).pairs()[1:]
    if not pairs:
        return
    for side, (_rows, cols), flip in ((0, ga, fa), (1, gb, fb)):
        rc = [((p[side] - 1) // cols, (p[side] - 1) % cols) for p in pairs]
        src_cols = [cols - 1 - c if flip else c for _, c in rc]
        rows_seq = [r for r, _ in rc]
        assert rows_seq == sorted(rows_seq)
        n_c = len(set(src_cols))
        for start in range(0, len(rc), n_c):  # each row of pairs: strictly increasing columns
            seg = src_cols[start:start + n_c]
            assert seg == sorted(seg) and len(set(seg)) == len(seg)
    # first and last rows/cols of each view's selection are matched together
    if rule == "half":
        i0x, i1x = max(ba[0], bb[0]), min(ba[2], bb[2])
        for box, (_rows, cols), flip, side in ((ba, ga, fa, 0), (bb, gb, fb, 1)):
            c_cov = covered(box[0], box[2], cols, i0x, i1x)
            first = pairs[0][side] - 1
            last = pairs[-1][side] - 1
            src = [cols - 1 - t % cols if flip else t % cols for t in (first, last)]
            n_matched = len({(p[side] - 1) % cols for p in pairs})
            # with a single matched column the paper takes index 0 of the larger selection
            assert src == ([c_cov[0], c_cov[-1]] if n_matched > 1 else [c_cov[0], c_cov[0]])


@given(views(), views(), st.integers(-50, 50), st.integers(-50, 50), st.integers(1, 4),
       st.sampled_from(["half", "official", "centre"]))
def test_invariant_to_translating_and_scaling_all_boxes(va, vb, dx, dy, k, rule):
    (ba, ga, fa), (bb, gb, fb) = va, vb
    ref = match_patches(ba, bb, ga, gb, fa, fb, rule=rule)

    def move(b):
        return (k * b[0] + dx, k * b[1] + dy, k * b[2] + dx, k * b[3] + dy)

    got = match_patches(move(ba), move(bb), ga, gb, fa, fb, rule=rule)
    assert got.pairs() == ref.pairs()


@given(st.lists(st.tuples(views(), views()), min_size=1, max_size=6),
       st.sampled_from(["half", "official", "centre"]))
def test_batched_equals_looped(cases, rule):
    ga, gb = (7, 5), (3, 4)  # static grids for a batch
    box_a = torch.tensor([c[0][0] for c in cases], dtype=torch.float32)
    box_b = torch.tensor([c[1][0] for c in cases], dtype=torch.float32)
    flip_a = torch.tensor([c[0][2] for c in cases])
    flip_b = torch.tensor([c[1][2] for c in cases])
    m = match_patches(box_a, box_b, ga, gb, flip_a, flip_b, rule=rule)
    assert m.idx_a.shape == (len(cases), 1 + 3 * 4)
    for i, ((ba, _, fa), (bb, _, fb)) in enumerate(cases):
        one = match_patches(ba, bb, ga, gb, fa, fb, rule=rule)
        assert torch.equal(m.idx_a[i], one.idx_a)
        assert torch.equal(m.idx_b[i], one.idx_b)
        assert torch.equal(m.valid[i], one.valid)


def test_broadcasting_one_teacher_box_against_many_student_boxes():
    g = torch.Generator().manual_seed(0)
    teacher = torch.tensor([0.0, 0.0, 32.0, 32.0])
    students = torch.rand(2, 5, 4, generator=g) * 16
    students[..., 2:] += 16
    flips = torch.rand(2, 5, generator=g) > 0.5
    m = match_patches(teacher, students, (8, 8), (4, 4), False, flips)
    assert m.idx_a.shape == (2, 5, 17)
    one = match_patches(teacher, students[1, 3], (8, 8), (4, 4), False, bool(flips[1, 3]))
    assert torch.equal(m.idx_b[1, 3], one.idx_b)


@st.composite
def small_views(draw):
    """Small frames and grids: exact half-coverage ties are frequent."""
    return draw(int_boxes(src=12)), draw(st.tuples(st.integers(1, 6), st.integers(1, 6))), draw(
        st.booleans())


@settings(max_examples=300)
@given(small_views(), small_views())
def test_equals_the_loop_on_small_frames_where_ties_are_frequent(va, vb):
    (ba, ga, fa), (bb, gb, fb) = va, vb
    assert match_patches(ba, bb, ga, gb, fa, fb).pairs() == reference_half(ba, bb, ga, gb, fa, fb)


@st.composite
def large_views(draw):
    """Grids up to 32 x 32 (224 px / 8 px patches is 28): numpy's float linspace differs
    from the exact integer subsampling for some counts (e.g. 31 -> 23)."""
    return draw(int_boxes(src=256)), draw(st.tuples(st.integers(20, 32), st.integers(20, 32))), \
        draw(st.booleans())


@settings(max_examples=300)
@given(large_views(), large_views())
def test_official_equals_the_authors_arithmetic_on_large_grids(va, vb):
    (ba, ga, fa), (bb, gb, fb) = va, vb
    assert match_patches(ba, bb, ga, gb, fa, fb, rule="official").pairs() == reference_official(
        ba, bb, ga, gb, fa, fb)


def test_official_subsampling_is_numpy_linspace_floor_for_all_counts_up_to_64():
    from patchaug.matching import _subsample

    for n_big in range(1, 65):
        for n_small in range(1, n_big + 1):
            i = torch.arange(n_small)
            got = _subsample(i, torch.tensor(n_big), torch.tensor(n_small), official=True)
            want = np.floor(np.linspace(0, n_big - 1, n_small)).astype(np.int64)
            assert got.tolist() == want.tolist(), (n_big, n_small)


@given(views(), views())
def test_official_equals_the_authors_arithmetic(va, vb):
    (ba, ga, fa), (bb, gb, fb) = va, vb
    m = match_patches(ba, bb, ga, gb, fa, fb, rule="official")
    assert m.pairs() == reference_official(ba, bb, ga, gb, fa, fb)


def test_official_equals_the_authors_arithmetic_on_their_crop_statistics():
    """Many random DINO-style crop pairs on 32 px CIFAR frames: 14x14 and 6x6 grids."""
    from patchaug import sample_crop_boxes

    g = torch.Generator().manual_seed(1)
    n = 400
    glob = sample_crop_boxes(n, 32, 32, (0.4, 1.0), generator=g)
    local = sample_crop_boxes(n, 32, 32, (0.05, 0.4), generator=g)
    fg = torch.rand(n, generator=g) < 0.5
    fl = torch.rand(n, generator=g) < 0.5
    m = match_patches(glob, local, 14, 6, fg, fl, rule="official")
    for i in range(n):
        ref = reference_official(tuple(glob[i].int().tolist()), tuple(local[i].int().tolist()),
                                 (14, 14), (6, 6), bool(fg[i]), bool(fl[i]))
        keep = m.valid[i]
        assert list(zip(m.idx_a[i][keep].tolist(), m.idx_b[i][keep].tolist())) == ref


@given(views(), views())
def test_centre_rule_pairs_each_query_patch_with_the_patch_containing_its_centre(va, vb):
    (ba, ga, fa), (bb, gb, fb) = va, vb
    half = match_patches(ba, bb, ga, gb, fa, fb)
    m = match_patches(ba, bb, ga, gb, fa, fb, rule="centre")
    assert torch.equal(half.valid, m.valid)
    ca = patch_centres(ba, ga, fa)
    cb = patch_centres(bb, gb, fb)
    keep = m.valid.clone()
    keep[0] = False
    pa, pb = m.idx_a[keep] - 1, m.idx_b[keep] - 1
    if pa.numel() == 0:
        return
    # centre distance never worse than the paper's rule on average
    d_centre = (ca[pa] - cb[pb]).norm(dim=-1).mean()
    hp = half.valid.clone()
    hp[0] = False
    d_half = (ca[half.idx_a[hp] - 1] - cb[half.idx_b[hp] - 1]).norm(dim=-1).mean()
    assert d_centre <= d_half + 1e-9
    # per axis, the centre of one side's patch lies inside the other side's patch
    wa = ((ba[2] - ba[0]) / ga[1], (ba[3] - ba[1]) / ga[0])
    wb = ((bb[2] - bb[0]) / gb[1], (bb[3] - bb[1]) / gb[0])
    for axis in (0, 1):
        gap = (ca[pa][:, axis] - cb[pb][:, axis]).abs()
        assert bool((gap <= max(wa[axis], wb[axis]) / 2 + 1e-9).all())


@given(views(), views())
def test_centre_rule_on_integer_boxes_equals_exact_arithmetic(va, vb):
    (ba, ga, fa), (bb, gb, fb) = va, vb
    m = match_patches(ba, bb, ga, gb, fa, fb, rule="centre")
    assert m.pairs() == reference_centre(ba, bb, ga, gb, fa, fb)


def test_a_centre_on_a_patch_border_goes_to_the_patch_after_it():
    # a: patches [0, 1), [1, 2), [2, 3) with centres 0.5, 1.5, 2.5, exactly on borders of b's
    # half-width patches; a has fewer selected patches, so it is the query
    m = match_patches((0, 0, 3, 1), (0, 0, 3, 1), (1, 3), (1, 6), rule="centre", cls=False)
    assert m.pairs() == [(0, 1), (1, 3), (2, 5)]
    m = match_patches((0, 0, 3, 1), (0, 0, 3, 1), (1, 3), (1, 6), False, True, rule="centre",
                      cls=False)
    assert m.pairs() == [(0, 4), (1, 2), (2, 0)]  # b mirrored: column j is shown at 5 - j


def test_float_boxes_follow_the_half_rule_with_a_tie_excluded():
    # view b: 4 patches of width 1 on [0, 4); intersection [0, 2.5) covers patch 2 by exactly half
    m = match_patches((0.0, 0.0, 2.5, 1.0), (0.0, 0.0, 4.0, 1.0), (1, 8), (1, 4), cls=False)
    # a has 8 covered cols, b only 2 (0, 1): the tie patch 2 is excluded
    assert m.pairs() == [(0, 0), (7, 1)]
    m = match_patches((0.0, 0.0, 2.51, 1.0), (0.0, 0.0, 4.0, 1.0), (1, 2), (1, 4), cls=False)
    assert m.pairs() == [(0, 0), (1, 2)]


def test_follows_device_of_boxes_and_accepts_tuples():
    m = match_patches(torch.tensor([0, 0, 8, 8]), (0, 0, 8, 8), 2, 2)
    assert m.idx_a.device == torch.device("cpu") and m.idx_a.dtype == torch.int64
    assert m.pairs() == [(0, 0), (1, 1), (2, 2), (3, 3), (4, 4)]


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "exc", "word"),
    [
        ({"box_a": (1, 0, 1, 4)}, ValueError, "box_a"),
        ({"box_b": (0, 5, 4, 4)}, ValueError, "box_b"),
        ({"box_a": (0, 0, math.nan, 4)}, ValueError, "box_a"),
        ({"box_b": (0, 0, math.inf, 4)}, ValueError, "box_b"),
        ({"box_a": (0, 0, 4)}, ValueError, "box_a"),
        ({"box_a": "abcd"}, TypeError, "box_a"),
        ({"grid_a": (0, 3)}, ValueError, "grid_a"),
        ({"grid_b": (-1, 3)}, ValueError, "grid_b"),
        ({"grid_b": (2.0, 3)}, TypeError, "grid_b"),
        ({"grid_a": (1, 2, 3)}, TypeError, "grid_a"),
        ({"rule": "nearest"}, ValueError, "rule"),
        ({"flip_a": 1}, TypeError, "flip_a"),
        ({"flip_b": torch.tensor([0, 1])}, TypeError, "flip_b"),
        ({"box_a": torch.zeros(3, 4) + torch.tensor([0, 0, 1, 1]),
          "box_b": torch.zeros(2, 4) + torch.tensor([0, 0, 1, 1])}, ValueError, "broadcastable"),
        ({"cls": 1}, TypeError, "cls"),
    ],
)
def test_bad_input_names_the_argument(kwargs, exc, word):
    args = {"box_a": (0, 0, 4, 4), "box_b": (0, 0, 4, 4), "grid_a": (2, 2), "grid_b": (2, 2)}
    args.update(kwargs)
    rest = {k: args.pop(k) for k in ("rule", "cls") if k in args}
    with pytest.raises(exc, match=word):
        match_patches(**args, **rest)
