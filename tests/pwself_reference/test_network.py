"""MultiCropNetwork's HeadOutput, and ``--head-tokens matched`` against ``all``."""

from __future__ import annotations

import pytest
import torch

from pwself_reference.augment import CropSpec, batched_multicrop, match_views, view_grids
from pwself_reference.losses import PWSelfLoss, matched_token_masks
from pwself_reference.models import DINOHead, build_backbone
from pwself_reference.network import MultiCropNetwork, static_rows


def _setup(seed=0, batch=3, loss="mean", center="global", rule="half"):
    torch.manual_seed(seed)
    net = MultiCropNetwork(build_backbone("vit_tiny", 4, 16, depth=1, embed_dim=24, num_heads=2),
                           DINOHead(24, 20, hidden_dim=16, bottleneck_dim=8))
    spec = CropSpec(16, 8, n_global=2, n_local=3, local_scale=(0.05, 0.3))
    mb = batched_multicrop(torch.rand(batch, 3, 20, 24), spec)
    views = [(v - 0.5) / 0.25 for v in mb.views]
    matches = match_views(mb.boxes, mb.flips, view_grids(views, 4), 2, rule)
    crit = PWSelfLoss(20, n_teacher_tokens=17, loss=loss, center=center, teacher_temps=[0.05])
    crit.center.normal_()
    return net, views, matches, crit


def _tokens(views):
    return [1 + r * c for r, c in view_grids(views, 4)]


@pytest.mark.parametrize("loss, center", [("mean", "global"), ("lambda", "per-token"),
                                          ("sum", "per-token")])
def test_matched_head_tokens_give_the_loss_and_gradient_of_all(loss, center, monkeypatch):
    import pwself_reference.network as network

    monkeypatch.setattr(network, "ROW_MULTIPLE", 8)  # a padded buffer smaller than all tokens
    net, views, matches, crit = _setup(loss=loss, center=center)
    tokens = _tokens(views)
    keep_t, keep_s = matched_token_masks(matches, tokens[:2], tokens, views[0].shape[0])
    assert not all(bool(m.all()) for m in keep_s)  # some tokens are left out

    results = {}
    for mode in ("all", "matched"):
        net.zero_grad()
        with torch.no_grad():
            teacher = net(views[:2], all_tokens=True,
                          keep=keep_t if mode == "matched" else None)
        student = net(views, all_tokens=True, keep=keep_s if mode == "matched" else None)
        value = crit(student, teacher, matches, epoch=0, update_center=False)
        value.backward()
        grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.requires_grad}
        results[mode] = (value.detach(), grads, student)
    (v_all, g_all, s_all), (v_m, g_m, s_m) = results["all"], results["matched"]
    assert s_m.n_rows < s_all.n_rows and s_m.rows.shape[0] == static_rows(s_m.n_rows,
                                                                           s_all.n_rows, 8)
    torch.testing.assert_close(v_m, v_all, rtol=1e-6, atol=1e-6)
    for name, g in g_all.items():
        torch.testing.assert_close(g_m[name], g, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("center", ["global", "per-token"])
def test_centre_under_matched_is_the_mean_of_the_kept_teacher_tokens(center):
    net, views, matches, crit = _setup(center=center)
    tokens = _tokens(views)
    keep_t, _ = matched_token_masks(matches, tokens[:2], tokens, views[0].shape[0])
    with torch.no_grad():
        teacher = net(views[:2], keep=keep_t)
        full = net(views[:2], all_tokens=True)
    before = crit.center.clone()
    crit.update_center(teacher)
    rows = torch.cat([v.reshape(-1, 20) for v in full])   # (2 B T, K)
    kept = torch.cat([m.reshape(-1) for m in keep_t])
    m = crit.center_momentum
    if center == "global":
        want = m * before + (1 - m) * rows[kept].mean(0)
    else:
        per_pos = torch.stack(list(full)).flatten(0, 1)   # (2 B, T, K)
        mask = torch.stack(keep_t).flatten(0, 1)         # (2 B, T)
        mean = (per_pos * mask[..., None]).sum(0) / mask.sum(0).clamp(min=1)[:, None]
        want = torch.where(mask.any(0)[None, :, None], m * before + (1 - m) * mean, before)
    torch.testing.assert_close(crit.center, want, rtol=1e-5, atol=1e-6)


def test_keep_masks_cover_cls_and_every_matched_token():
    _, views, matches, _ = _setup(rule="centre")
    tokens = _tokens(views)
    keep_t, keep_s = matched_token_masks(matches, tokens[:2], tokens, 3)
    for (i, j), m in matches.items():
        b = torch.arange(3).unsqueeze(1).expand_as(m.idx_a)
        assert keep_t[i][b[m.valid], m.idx_a[m.valid]].all()
        assert keep_s[j][b[m.valid], m.idx_b[m.valid]].all()
    assert all(k[:, 0].all() for k in keep_t + keep_s)


def test_a_pair_outside_the_kept_tokens_is_an_error():
    net, views, matches, crit = _setup()
    tokens = _tokens(views)
    keep_t, keep_s = matched_token_masks(matches, tokens[:2], tokens, 3)
    keep_s = [k.clone() for k in keep_s]
    keep_s[2][:] = False
    keep_s[2][:, 0] = True
    with torch.no_grad():
        teacher, student = net(views[:2], keep=keep_t), net(views, keep=keep_s)
        with pytest.raises(ValueError, match="did not run on"):
            crit(student, teacher, matches, epoch=0)
    with pytest.raises(ValueError, match=r"keep\[0\] must be a \(3, 17\) bool mask"):
        net(views[:2], keep=[k[:, :5] for k in keep_t])
