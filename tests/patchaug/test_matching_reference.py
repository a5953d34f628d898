"""Both batched engines of :func:`patchaug.match_patches` against the specification.

``matching.match_patches_reference`` writes the rules out for one pair of views, one
function per stage, in exact rational arithmetic. The numpy engine (CPU boxes) and the
torch engine (every other device, run here on CPU) must give exactly its pairs, sample by
sample, for integer and fractional boxes, square and rectangular grids, flips and every
rule.
"""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from patchaug import RULES, match_patches
from patchaug import matching as M
from patchaug.matching import (
    centre_partners,
    covered_patches,
    intersect,
    match_patches_reference,
    mirror,
    official_patches,
    subsample,
    subsample_official,
)

ENGINES = {"numpy": M._match_numpy, "torch": M._match_torch}


@st.composite
def cases(draw):
    """A batch of box pairs on one source frame with grids, flips, a rule and ``cls``.

    Fractional boxes are on a grid of ``1 / denominator`` pixels (quarter pixels make exact
    half-coverage ties and centres on patch borders frequent); their values, and every
    product the engines form, are exact in float64.
    """
    size = draw(st.integers(1, 5))
    src = draw(st.sampled_from([8, 24, 64, 256]))
    den = draw(st.sampled_from([1, 1, 2, 4, 8]))

    def box():
        x0, y0 = (draw(st.integers(0, den * src - 1)) for _ in range(2))
        x1, y1 = draw(st.integers(x0 + 1, den * src)), draw(st.integers(y0 + 1, den * src))
        return [v / den if den > 1 else v for v in (x0, y0, x1, y1)]

    if den == 1:
        dtype = draw(st.sampled_from([torch.int64, torch.int32, torch.float32, torch.float64]))
    else:
        dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    side = st.integers(1, 16)
    square = draw(st.booleans())
    grids = []
    for _ in range(2):
        rows = draw(side)
        grids.append((rows, rows) if square else (rows, draw(side)))
    box_a = torch.tensor([box() for _ in range(size)], dtype=dtype)
    box_b = torch.tensor([box() for _ in range(size)], dtype=dtype)
    flips = st.lists(st.booleans(), min_size=size, max_size=size)
    flip_a, flip_b = torch.tensor(draw(flips)), torch.tensor(draw(flips))
    rule = draw(st.sampled_from(RULES))
    return box_a, box_b, grids[0], grids[1], flip_a, flip_b, rule, draw(st.booleans())


def reference_pairs(box_a, box_b, grid_a, grid_b, flip_a, flip_b, rule, cls):
    return [match_patches_reference(box_a[i], box_b[i], grid_a, grid_b, bool(flip_a[i]),
                                    bool(flip_b[i]), rule, cls) for i in range(box_a.shape[0])]


def batched_pairs(m):
    return [list(zip(m.idx_a[i][m.valid[i]].tolist(), m.idx_b[i][m.valid[i]].tolist()))
            for i in range(m.valid.shape[0])]


@settings(max_examples=300, deadline=None)
@given(cases())
@example((torch.tensor([[0.0, 0.0, 2.5, 1.0]]), torch.tensor([[0.0, 0.0, 4.0, 1.0]]), (1, 8),
          (1, 4), torch.tensor([False]), torch.tensor([False]), "half", False))  # a tie
@example((torch.tensor([[0, 0, 3, 1]]), torch.tensor([[0, 0, 3, 1]]), (1, 3), (1, 6),
          torch.tensor([False]), torch.tensor([True]), "centre", True))  # centres on borders
def test_both_engines_give_the_pairs_of_the_specification(case):
    box_a, box_b, grid_a, grid_b, flip_a, flip_b, rule, cls = case
    want = reference_pairs(*case)
    for name, engine in ENGINES.items():
        m = engine(box_a, box_b, grid_a, grid_b, flip_a, flip_b, rule=rule, cls=cls)
        assert batched_pairs(m) == want, name
        # padding: invalid slots hold index 0 and come last
        assert not bool(m.idx_a[~m.valid].any()) and not bool(m.idx_b[~m.valid].any())
    assert batched_pairs(match_patches(box_a, box_b, grid_a, grid_b, flip_a, flip_b, rule=rule,
                                       cls=cls)) == want


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from(RULES), st.sampled_from(list(ENGINES)))
def test_equals_the_specification_on_training_crops(seed, rule, engine):
    """DINO crop statistics with integer boxes, 224/16 global against 96/16 local views."""
    from patchaug import sample_crop_boxes

    g = torch.Generator().manual_seed(seed)
    glob = sample_crop_boxes(8, 256, 256, (0.4, 1.0), generator=g)
    local = sample_crop_boxes(8, 256, 256, (0.05, 0.4), generator=g)
    fg, fl = torch.rand(8, generator=g) < 0.5, torch.rand(8, generator=g) < 0.5
    m = ENGINES[engine](glob, local, (14, 14), (6, 6), fg, fl, rule=rule)
    assert batched_pairs(m) == reference_pairs(glob, local, (14, 14), (6, 6), fg, fl, rule, True)


@pytest.mark.parametrize("engine", list(ENGINES))
@pytest.mark.parametrize("rule", RULES)
def test_equals_the_specification_on_large_grids(engine, rule):
    """Grids past the cached subsample tables' usual sizes and counts above 22."""
    g = torch.Generator().manual_seed(11)
    box_a = (torch.rand(6, 4, generator=g, dtype=torch.float64) * 8).round() + torch.tensor(
        [0.0, 0.0, 300.0, 280.0])
    box_b = (torch.rand(6, 4, generator=g, dtype=torch.float64) * 8).round() + torch.tensor(
        [20.0, 10.0, 240.0, 260.0])
    flips = torch.tensor([False, True, False, True, True, False])
    args = (box_a, box_b, (40, 31), (23, 37), flips, flips.flip(0))
    m = ENGINES[engine](*args, rule=rule)
    assert batched_pairs(m) == reference_pairs(*args, rule, True)
    assert int(m.num_valid.min()) > 400


# --------------------------------------------------------------------------- the stages


def test_intersect_is_eq_1_and_touching_boxes_do_not_overlap():
    assert intersect((0, 0, 10, 8), (4, 2, 12, 6)) == (4, 2, 10, 6)
    assert intersect((0, 0, 10, 8), (10, 0, 20, 8)) is None
    assert intersect((0, 0, 10, 8), (0, 8, 10, 9)) is None


def test_covered_patches_need_strictly_more_than_half():
    # 4 patches of width 1 on [0, 4): [0, 2.5) covers patch 2 by exactly half
    assert covered_patches(0, 4, 4, 0, Fraction(5, 2)) == [0, 1]
    assert covered_patches(0, 4, 4, 0, Fraction(251, 100)) == [0, 1, 2]
    assert covered_patches(0, 4, 4, Fraction(1, 4), Fraction(3, 4)) == []  # half a patch wide
    assert covered_patches(0, 4, 4, Fraction(1, 4), Fraction(4, 5)) == [0]


def test_subsample_reproduces_fig_2():
    # Fig. 2: rows 1, 2, 4 of 4 against 3; columns 1, 2, 4, 6 of 6 against 4 (from 1)
    assert subsample([0, 1, 2, 3], 3) == [0, 1, 3]
    assert subsample([0, 1, 2, 3, 4, 5], 4) == [0, 1, 3, 5]
    assert subsample([7, 8, 9], 1) == [7] and subsample([], 0) == []
    # the authors' linspace differs from the exact formula for 31 against 23
    assert subsample(list(range(31)), 23) != subsample_official(list(range(31)), 23)


def test_official_patches_round_half_to_even_and_clamp():
    assert official_patches(0, 8, 4, 1, 8) == [0, 1, 2, 3]  # start round(0.5) = 0
    assert official_patches(0, 8, 4, 3, 8) == [2, 3]  # start round(1.5) = 2, clamped end


def test_centre_partners_take_the_patch_after_a_border():
    # centres 0.5, 1.5, 2.5 of 3 patches on [0, 3), against 6 patches of width 0.5
    assert centre_partners([0, 1, 2], 0, 3, 3, 0, 3, 6) == [1, 3, 5]


def test_mirror_reverses_columns():
    assert [mirror(c, 5, True) for c in range(5)] == [4, 3, 2, 1, 0]
    assert [mirror(c, 5, False) for c in range(5)] == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"rule": "nearest"}, ValueError, "rule must be one of"),
        ({"box_a": (4, 0, 4, 4)}, ValueError, "box_a must satisfy"),
        ({"box_b": (0, 0, float("nan"), 4)}, ValueError, "box_b must be 4 finite numbers"),
        ({"grid_a": (0, 2)}, ValueError, "grid_a must have positive"),
    ],
)
def test_the_reference_rejects_bad_input(kwargs, exc, match):
    args = {"box_a": (0, 0, 4, 4), "box_b": (0, 0, 4, 4), "grid_a": (2, 2), "grid_b": (2, 2)}
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        match_patches_reference(**args)
