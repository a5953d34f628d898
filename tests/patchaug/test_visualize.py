"""draw_matches: the paper's Fig. 3 for any pair of views."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import numpy as np
import pytest
import torch

from patchaug import draw_matches, match_patches


def _labels(ax):
    return [t.get_text() for t in ax.texts]


def test_every_pair_is_numbered_in_both_views_at_its_patch():
    m = match_patches((0, 0, 32, 32), (8, 8, 24, 24), 4, 2)  # b's 2x2 patches = a's middle 2x2
    fig = draw_matches(torch.rand(3, 64, 64), torch.rand(3, 32, 32), 4, 2, m)
    ax_a, ax_b = fig.axes
    assert _labels(ax_a) == _labels(ax_b) == ["1", "2", "3", "4"]
    # label k sits at the centre of its patch: a's tokens 6, 7, 10, 11 -> (r, c) (1,1) (1,2) (2,1) (2,2)
    pos_a = [t.get_position() for t in ax_a.texts]
    assert pos_a == [(24.0, 24.0), (40.0, 24.0), (24.0, 40.0), (40.0, 40.0)]
    pos_b = [t.get_position() for t in ax_b.texts]
    assert pos_b == [(8.0, 8.0), (24.0, 8.0), (8.0, 24.0), (24.0, 24.0)]


def test_flipped_view_labels_sit_on_mirrored_columns():
    m = match_patches((0, 0, 32, 32), (0, 0, 32, 32), 2, 2, False, True)
    fig = draw_matches(np.zeros((32, 32, 3), np.uint8), torch.zeros(1, 32, 32), 2, 2, m)
    xs_a = [t.get_position()[0] for t in fig.axes[0].texts]
    xs_b = [t.get_position()[0] for t in fig.axes[1].texts]
    assert xs_a == [8.0, 24.0, 8.0, 24.0] and xs_b == [24.0, 8.0, 24.0, 8.0]


def test_max_labels_limits_the_drawn_pairs():
    m = match_patches((0, 0, 224, 224), (0, 0, 224, 224), 14, 14)
    fig = draw_matches(torch.rand(3, 224, 224), torch.rand(3, 224, 224), 14, 14, m, max_labels=10)
    assert len(fig.axes[0].texts) == 10


def test_bad_input():
    m = match_patches(torch.zeros(2, 4) + torch.tensor([0, 0, 8, 8]), (0, 0, 8, 8), 2, 2)
    with pytest.raises(ValueError, match="unbatched"):
        draw_matches(torch.rand(3, 8, 8), torch.rand(3, 8, 8), 2, 2, m)
    with pytest.raises(TypeError, match="match"):
        draw_matches(torch.rand(3, 8, 8), torch.rand(3, 8, 8), 2, 2, [(0, 0)])
    with pytest.raises(ValueError, match="image_a"):
        draw_matches(torch.rand(8, 8), torch.rand(3, 8, 8), 2, 2, match_patches((0, 0, 8, 8), (0, 0, 8, 8), 2, 2))


def test_no_figure_is_left_open_and_the_figure_saves(tmp_path):
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    m = match_patches((0, 0, 32, 32), (8, 8, 24, 24), 4, 2)
    for _ in range(11):
        fig = draw_matches(torch.rand(3, 32, 32), torch.rand(3, 16, 16), 4, 2, m)
    assert plt.get_fignums() == before  # pyplot holds none of them
    fig.savefig(tmp_path / "m.png")
    assert (tmp_path / "m.png").stat().st_size > 0


def test_a_match_for_other_grids_is_refused():
    m = match_patches((0, 0, 32, 32), (8, 8, 24, 24), 4, 2)  # 1 + 2 x 2 slots
    with pytest.raises(ValueError, match="other grids"):
        draw_matches(torch.rand(3, 32, 32), torch.rand(3, 16, 16), 8, 4, m)  # 1 + 4 x 4 slots
    # same slot count (min grids 2 x 2), but view a's tokens run past a 2 x 2 grid
    with pytest.raises(ValueError, match="grid_a"):
        draw_matches(torch.rand(3, 32, 32), torch.rand(3, 16, 16), 2, 2, m)


def test_without_cls_every_slot_is_a_patch_pair():
    m = match_patches((0, 0, 32, 32), (0, 0, 32, 32), 2, 2, cls=False)  # token 0 = patch (0, 0)
    fig = draw_matches(torch.rand(3, 32, 32), torch.rand(3, 32, 32), 2, 2, m)
    assert _labels(fig.axes[0]) == ["1", "2", "3", "4"]
    assert fig.axes[0].texts[0].get_position() == (8.0, 8.0)
