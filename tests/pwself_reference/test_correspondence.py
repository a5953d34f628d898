"""Correspondence evaluation: synthetic backbones whose answer is known."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pwself_reference.evaluation import PositionOnly, correspondence_recall, token_match_hits
from pwself_reference.models import build_backbone

SIZE, PATCH = 28, 4


def coordinate_images(n: int, size: int = SIZE) -> torch.Tensor:
    """Images whose channels are the source (x, y) of each pixel centre, and a constant."""
    y, x = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    img = torch.stack([x / size, y / size, torch.ones(size, size)])
    return img.expand(n, -1, -1, -1).clone()


def coordinate_tokens(views: torch.Tensor) -> torch.Tensor:
    """A "backbone" that knows where its patches come from: each token embeds the source
    centre (x, y) of its patch on a circle per axis, so the cosine similarity of two tokens
    falls as their centres move apart along either axis (within the 28 px image)."""
    xy = F.avg_pool2d(views[:, :2], PATCH).flatten(2).transpose(1, 2) * SIZE  # (B, N, 2)
    a = math.pi / (1.5 * SIZE)
    emb = torch.cat([torch.cos(a * xy), torch.sin(a * xy)], -1)
    return torch.cat([torch.zeros_like(emb[:, :1]), emb], 1)


def random_tokens(views: torch.Tensor) -> torch.Tensor:
    b, _, h, w = views.shape
    gen = torch.Generator().manual_seed(h * 1000 + int(views.sum() * 1e3) % 997)
    return torch.randn(b, 1 + (h // PATCH) * (w // PATCH), 16, generator=gen)


def test_tokens_that_encode_source_coordinates_find_their_match():
    out = correspondence_recall(coordinate_tokens, coordinate_images(64), global_size=28,
                                local_size=12, patch_size=PATCH)
    for grp in ("non_flipped", "flipped", "global_local"):
        stats = out["all"][grp]
        assert stats["tokens"] > 100
        # "centre" pairs hold the patch containing the other's centre: the nearest centre,
        # up to ties on a patch border, which still land on a neighbour
        assert stats["recall_within_1"] == 100.0
        assert stats["recall_at_1"] >= 90.0
        assert stats["recall_at_1"] > 20 * stats["chance_at_1"]


def test_whole_image_views_exact_answers_for_coordinates_and_positions():
    # scale (1, 1) on a square image: every view is the whole image, mirrored or not
    kw = dict(global_size=28, global_scale=(1.0, 1.0), patch_size=PATCH)
    coords = correspondence_recall(coordinate_tokens, coordinate_images(40), **kw)["all"]
    assert coords["non_flipped"]["recall_at_1"] == 100.0
    assert coords["flipped"]["recall_at_1"] == 100.0
    assert coords["non_flipped"]["tokens"] + coords["flipped"]["tokens"] == 40 * 49
    torch.manual_seed(0)
    pos = PositionOnly(build_backbone("vit_tiny", patch_size=PATCH, img_size=SIZE, depth=1))
    by_pos = correspondence_recall(pos, torch.randn(40, 3, 28, 28), **kw)["all"]
    # position alone: right whenever the match sits at the same grid cell ...
    assert by_pos["non_flipped"]["recall_at_1"] == 100.0
    # ... which on mirrored views is only the middle column (1 of 7); its neighbours are
    # 2 columns away or more
    assert by_pos["flipped"]["recall_at_1"] == pytest.approx(100 / 7, abs=1e-3)
    assert by_pos["flipped"]["recall_within_1"] == pytest.approx(100 / 7, abs=1e-3)


def test_random_tokens_score_about_chance():
    out = correspondence_recall(random_tokens, torch.rand(300, 3, 28, 28), global_size=28,
                                local_size=12, patch_size=PATCH, seed=3)
    for grp, stats in out["all"].items():
        n = stats["tokens"]
        assert n > 1000, grp
        assert stats["chance_at_1"] == pytest.approx(100 / 49, abs=1e-3)
        # a binomial proportion: 4 standard errors
        for hit, chance in (("recall_at_1", "chance_at_1"), ("recall_within_1", "chance_within_1")):
            p = stats[chance] / 100
            assert abs(stats[hit] - stats[chance]) < 400 * math.sqrt(p * (1 - p) / n), (grp, hit)


def test_chance_within_one_counts_grid_neighbours():
    t = torch.randn(1, 9, 4)
    idx_b = torch.tensor([[0, 1, 4]])  # corner, edge, centre of a 3 x 3 grid
    s = token_match_hits(t[:, :3], t, torch.tensor([[0, 1, 2]]), idx_b,
                         torch.ones(1, 3, dtype=torch.bool), (3, 3))
    assert s["chance_within"][0].tolist() == pytest.approx([4 / 9, 6 / 9, 9 / 9])


def test_token_match_hits_counts_nearest_and_neighbours():
    # view B: 2 x 3 grid of one-hot tokens; queries copy B's tokens 5, 0 and 2
    b = torch.eye(6).unsqueeze(0)
    a = b[:, [5, 0, 2]]
    valid = torch.tensor([[True, True, False]])
    s = token_match_hits(a, b, torch.tensor([[0, 1, 2]]), torch.tensor([[5, 1, 2]]), valid, (2, 3))
    # query 0 finds 5 (its match); query 1 finds 0, one column from its match 1; slot 2 is empty
    assert s["hit"].tolist() == [[True, False, False]]
    assert s["within"].tolist() == [[True, True, False]]


def test_foreground_keeps_only_patches_with_texture():
    x = torch.zeros(32, 3, 28, 28)
    x[:, :, 8:20, 8:20] = torch.rand(32, 3, 12, 12)  # a textured square on a blank background
    out = correspondence_recall(random_tokens, x, global_size=28, local_size=12, patch_size=PATCH,
                                foreground_std=0.05)
    for grp in out["all"]:
        assert 0 < out["foreground"][grp]["tokens"] < out["all"][grp]["tokens"]
    blank = correspondence_recall(random_tokens, torch.zeros(4, 3, 28, 28), global_size=28,
                                  patch_size=PATCH, foreground_std=0.0)
    assert blank["foreground"]["flipped"]["tokens"] == 0
    assert blank["foreground"]["flipped"]["recall_at_1"] is None


def test_same_seed_same_views_for_any_batching_and_model_mode():
    torch.manual_seed(1)
    net = build_backbone("vit_tiny", patch_size=PATCH, img_size=SIZE, depth=1, embed_dim=32,
                         num_heads=2).train()
    x = torch.randn(20, 3, 28, 28)
    one = correspondence_recall(net, x, global_size=28, local_size=12, seed=5)
    loader = [(x[:7], torch.zeros(7)), (x[7:], torch.zeros(13))]
    two = correspondence_recall(net, loader, global_size=28, local_size=12, seed=5)
    assert one["all"] == two["all"] and one["images"] == 20
    assert net.training  # mode restored
    assert correspondence_recall(net, x, global_size=28, seed=6)["all"] != one["all"]


def test_position_only_uses_the_backbones_resampled_embeddings():
    torch.manual_seed(0)
    net = build_backbone("vit_tiny", patch_size=PATCH, img_size=SIZE, depth=1)
    pos = PositionOnly(net)
    tok = pos(torch.rand(2, 3, 28, 28))
    assert torch.equal(tok[0, 1:], net.pos_embed[0, 1:])  # native grid: the embeddings as stored
    assert pos(torch.rand(3, 3, 12, 12)).shape == (3, 10, net.embed_dim)
    with pytest.raises(TypeError, match="timm ViT"):
        PositionOnly(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("kwargs, match", [
    (dict(global_size=30), "global_size"),
    (dict(global_size=28, local_size=10), "local_size"),
    (dict(global_size=28, global_scale=(0.5, 1.5)), "global_scale"),
    (dict(global_size=28, flip_p=2), "flip_p"),
    (dict(global_size=28, foreground_std=-1), "foreground_std"),
    (dict(global_size=28, seed=-1), "seed"),
])
def test_bad_arguments_name_themselves(kwargs, match):
    with pytest.raises(ValueError, match=match):
        correspondence_recall(coordinate_tokens, coordinate_images(2), patch_size=PATCH, **kwargs)


def test_bad_images_and_missing_patch_size():
    with pytest.raises(ValueError, match="images"):
        correspondence_recall(coordinate_tokens, torch.zeros(3, 28, 28), global_size=28,
                              patch_size=PATCH)
    with pytest.raises(ValueError, match="no image"):
        correspondence_recall(coordinate_tokens, [], global_size=28, patch_size=PATCH)
    with pytest.raises(ValueError, match="patch_size"):
        correspondence_recall(coordinate_tokens, coordinate_images(2), global_size=28)
