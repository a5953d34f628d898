"""The vectorised PW-Self loss against straightforward per-sample loops, and its identities."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from patchaug import PatchMatch, match_patches
from pwself_reference.losses import PWSelfLoss, reduce_tokens, token_cross_entropy
from pwself_reference.schedules import cosine_schedule, teacher_temp_schedule

K = 16


def _random_views(seed: int, batch: int = 5, n_local: int = 3):
    """Teacher/student outputs and real matches of random crops (7x7 globals, 3x3 locals)."""
    g = torch.Generator().manual_seed(seed)
    n_views = 2 + n_local
    grids = [7, 7] + [3] * n_local
    teacher = [torch.randn(batch, 1 + 49, K, generator=g) for _ in range(2)]
    student = [torch.randn(batch, 1 + grids[j] ** 2, K, generator=g, requires_grad=True)
               for j in range(n_views)]
    boxes = []
    for _ in range(n_views):
        lo = torch.randint(0, 14, (batch, 2), generator=g).float()
        size = torch.randint(6, 15, (batch, 2), generator=g).float()
        boxes.append(torch.cat([lo, lo + size], -1))
    flips = [torch.rand(batch, generator=g) < 0.5 for _ in range(n_views)]
    matches = {
        (i, j): match_patches(boxes[i], boxes[j], grids[i], grids[j], flips[i], flips[j])
        for i in range(2) for j in range(n_views) if i != j
    }
    return teacher, student, matches


def _loop_loss(teacher, student, matches, loss, lam, temp_t=0.04, temp_s=0.1, center=None):
    """The loss written as plain loops over pairs, samples and matched tokens."""
    total, n_pairs = 0.0, 0
    for i, t in enumerate(teacher):
        for j, s in enumerate(student):
            if i == j:
                continue
            per_sample = []
            for b in range(t.shape[0]):
                c = 0 if center is None else center
                pairs = [(0, 0)] if loss == "dino" else \
                    PatchMatch(matches[(i, j)].idx_a[b], matches[(i, j)].idx_b[b],
                               matches[(i, j)].valid[b]).pairs()
                ces = []
                for ta, sb in pairs:
                    c_tok = c if not torch.is_tensor(c) or c.shape[1] == 1 else c[:, ta]
                    p = F.softmax((t[b, ta] - c_tok.reshape(-1)) / temp_t, -1)
                    ls = F.log_softmax(s[b, sb] / temp_s, -1)
                    ces.append(-(p * ls).sum())
                if loss in ("dino",):
                    per_sample.append(ces[0])
                elif loss == "mean":
                    per_sample.append(sum(ces) / len(ces))
                elif loss == "sum":
                    per_sample.append(sum(ces))
                else:
                    patches = ces[1:]
                    per_sample.append(lam * ces[0] + (1 - lam) * sum(patches) / len(patches)
                                      if patches else ces[0])
            total = total + sum(per_sample) / len(per_sample)
            n_pairs += 1
    return total / n_pairs


@pytest.mark.parametrize("loss", ["dino", "mean", "sum", "lambda"])
@pytest.mark.parametrize("center", ["global", "per-token"])
def test_vectorised_loss_equals_per_sample_loop(loss, center):
    teacher, student, matches = _random_views(seed=hash((loss, center)) % 1000)
    crit = PWSelfLoss(K, n_teacher_tokens=50, loss=loss, lam=0.3, center=center,
                      teacher_temps=[0.04])
    crit.center.normal_()  # a non-trivial centre
    centre = crit.center.clone()
    got = crit(student, teacher, matches, epoch=0, update_center=False)
    want = _loop_loss(teacher, student, matches, loss, 0.3, center=centre)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # and the gradients agree too
    g_got = torch.autograd.grad(got, student)
    g_want = torch.autograd.grad(want, student)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def _cls_only(matches):
    out = {}
    for key, m in matches.items():
        valid = torch.zeros_like(m.valid)
        valid[..., 0] = True
        out[key] = PatchMatch(torch.zeros_like(m.idx_a), torch.zeros_like(m.idx_b), valid)
    return out


def test_mean_with_only_cls_pairs_equals_dino():
    teacher, student, matches = _random_views(seed=1)
    dino = PWSelfLoss(K, 50, loss="dino")(student, teacher, None, 0, update_center=False)
    mean = PWSelfLoss(K, 50, loss="mean")(student, teacher, _cls_only(matches), 0,
                                          update_center=False)
    torch.testing.assert_close(mean, dino)


def test_lambda_one_equals_dino_and_zero_is_patch_mean():
    teacher, student, matches = _random_views(seed=2)
    dino = PWSelfLoss(K, 50, loss="dino")(student, teacher, None, 0, update_center=False)
    lam1 = PWSelfLoss(K, 50, loss="lambda", lam=1.0)(student, teacher, matches, 0,
                                                     update_center=False)
    torch.testing.assert_close(lam1, dino)
    lam0 = PWSelfLoss(K, 50, loss="lambda", lam=0.0)(student, teacher, matches, 0,
                                                     update_center=False)
    assert not torch.allclose(lam0, dino)


def test_sum_is_mean_times_pair_count():
    ce = torch.rand(6, 10)
    valid = torch.rand(6, 10) < 0.6
    valid[:, 0] = True
    ce = ce * valid
    s = reduce_tokens(ce, valid, "sum")
    m = reduce_tokens(ce, valid, "mean")
    torch.testing.assert_close(s, m * valid.sum(1).float())
    # and through the whole loss with a single pair (one global + one local view)
    teacher, student, matches = _random_views(seed=3, n_local=1)
    teacher, student = teacher[:1], [student[0], student[2]]
    m01 = {(0, 1): matches[(0, 2)]}
    counts = matches[(0, 2)].num_valid.float()
    crit_s = PWSelfLoss(K, 50, loss="sum")
    crit_m = PWSelfLoss(K, 50, loss="mean")
    tp = crit_s.teacher_probs(teacher[0], 0)
    sl = F.log_softmax(student[1] / 0.1, -1)
    m = m01[(0, 1)]
    per_mean = reduce_tokens(token_cross_entropy(tp, sl, m.idx_a, m.idx_b, m.valid), m.valid, "mean")
    total_sum = crit_s(student, teacher, m01, 0, update_center=False)
    total_mean = crit_m(student, teacher, m01, 0, update_center=False)
    torch.testing.assert_close(total_sum, (per_mean * counts).mean())
    torch.testing.assert_close(total_mean, per_mean.mean())


def test_padding_slots_do_not_contribute():
    p = torch.softmax(torch.randn(2, 5, K), -1)
    lp = torch.log_softmax(torch.randn(2, 5, K), -1)
    idx = torch.tensor([[0, 1, 2], [0, 3, 0]])
    valid = torch.tensor([[True, True, True], [True, True, False]])
    ce = token_cross_entropy(p, lp, idx, idx, valid)
    assert ce[1, 2] == 0
    want = -(p[1, 3] * lp[1, 3]).sum()
    torch.testing.assert_close(ce[1, 1], want)


def test_lambda_without_patches_keeps_cls_term():
    ce = torch.tensor([[2.0, 0.0], [2.0, 4.0]])
    valid = torch.tensor([[True, False], [True, True]])
    out = reduce_tokens(ce, valid, "lambda", 0.25)
    torch.testing.assert_close(out, torch.tensor([2.0, 0.25 * 2 + 0.75 * 4]))


@pytest.mark.parametrize("center", ["global", "per-token"])
def test_center_ema_update(center):
    crit = PWSelfLoss(K, n_teacher_tokens=3, center=center, center_momentum=0.9)
    t = [torch.randn(4, 3, K), torch.randn(4, 3, K)]
    crit.update_center(t)
    cat = torch.cat(t)
    batch_mean = cat.mean(0, keepdim=True) if center == "per-token" else cat.mean((0, 1)).view(1, 1, -1)
    torch.testing.assert_close(crit.center, 0.1 * batch_mean)
    crit.update_center(t)
    torch.testing.assert_close(crit.center, 0.9 * 0.1 * batch_mean + 0.1 * batch_mean)


def test_per_token_center_update_of_kept_rows():
    """Under --head-tokens matched the teacher rows are the kept tokens: each centre position
    moves towards the mean of its kept rows, and a position no sample kept stays."""
    from pwself_reference.network import HeadOutput

    crit = PWSelfLoss(K, n_teacher_tokens=3, center="per-token", center_momentum=0.9)
    crit.center.copy_(torch.randn(1, 3, K))
    before = crit.center.clone()
    full = torch.randn(2 * 2 * 3, K)                     # 2 views x 2 samples x 3 tokens
    kept = torch.tensor([0, 2, 3, 5, 8, 11])             # token 1 is never kept
    out = HeadOutput(full[kept], batch=2, tokens=(3, 3), kept=kept)
    crit.update_center(out)
    token = kept % 3
    for t in range(3):
        rows = full[kept[token == t]]
        want = before[0, t] if rows.shape[0] == 0 else 0.9 * before[0, t] + 0.1 * rows.mean(0)
        torch.testing.assert_close(crit.center[0, t], want)
    assert torch.equal(crit.center[0, 1], before[0, 1])


def test_teacher_temperature_follows_schedule():
    temps = teacher_temp_schedule(0.04, 0.07, 3, 5)
    crit = PWSelfLoss(K, 1, loss="dino", teacher_temps=temps)
    assert crit.teacher_temp(0) == pytest.approx(0.04)
    assert crit.teacher_temp(1) == pytest.approx(0.055)
    assert crit.teacher_temp(4) == pytest.approx(0.07)
    assert crit.teacher_temp(99) == pytest.approx(0.07)
    t = torch.randn(2, 1, K)
    torch.testing.assert_close(crit.teacher_probs(t, 1), F.softmax(t / 0.055, -1))


def test_cosine_schedule_endpoints():
    s = cosine_schedule(1.0, 0.1, epochs=10, niter_per_ep=5, warmup_epochs=2, start_warmup_value=0)
    assert s.shape == (50,)
    assert s[0] == 0 and s[9] == pytest.approx(1.0) and s[10] == pytest.approx(1.0)
    assert np.all(np.diff(s[10:]) <= 0) and s[-1] > 0.1 and s[-1] == pytest.approx(0.1, abs=1e-2)


@pytest.mark.parametrize("kwargs, match", [
    (dict(loss="foo"), "loss"), (dict(center="x"), "center"), (dict(lam=1.5), "lambda"),
    (dict(teacher_temps=[]), "teacher_temps"), (dict(student_temp=0), "student_temp"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PWSelfLoss(K, 1, **kwargs)


def test_missing_matches_is_an_error():
    teacher, student, _ = _random_views(seed=4)
    with pytest.raises(ValueError, match="matches"):
        PWSelfLoss(K, 50, loss="mean")(student, teacher, None, 0)
