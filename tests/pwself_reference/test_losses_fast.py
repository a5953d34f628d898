"""The sparse PW-Self loss against the gather-based implementation it replaced.

``_GatherLoss`` below is a verbatim copy of the loss before it was rewritten (one
``torch.gather`` per side and pair, a ``(B, M, K)`` product, a reduction per
sample, a concatenation for the centre update). The fast loss must give the same
value, the same gradient w.r.t. every student output and the same centre.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from patchaug import PatchMatch, match_patches
from pwself_reference.losses import (
    LossSlots,
    PWSelfLoss,
    matched_cross_entropy,
    matched_cross_entropy_reference,
    pair_weights,
    reduce_tokens,
)
from pwself_reference.network import HeadOutput

LOSS_NAMES = ("dino", "mean", "sum", "lambda")


# ---------------------------------------------------------------- the old implementation
def _old_token_cross_entropy(teacher_probs, student_log_probs, idx_teacher, idx_student, valid):
    k = teacher_probs.shape[-1]
    t = teacher_probs.gather(1, idx_teacher.unsqueeze(-1).expand(-1, -1, k))
    s = student_log_probs.gather(1, idx_student.unsqueeze(-1).expand(-1, -1, k))
    ce = -(t * s).sum(-1)
    return ce * valid.to(ce.dtype)


class _GatherLoss:
    """The forward and centre update of the gather-based ``PWSelfLoss``."""

    def __init__(self, center, center_mode, loss, lam, teacher_temp, student_temp=0.1,
                 momentum=0.9):
        self.center = center.clone()
        self.center_mode, self.loss, self.lam = center_mode, loss, lam
        self.teacher_temp, self.student_temp, self.momentum = teacher_temp, student_temp, momentum

    def __call__(self, student_out, teacher_out, matches, update_center=False):
        t_probs = [F.softmax((t.detach().float() - self.center) / self.teacher_temp, dim=-1)
                   for t in teacher_out]
        s_logp = [F.log_softmax(s.float() / self.student_temp, dim=-1) for s in student_out]
        total = torch.zeros(())
        n_pairs = 0
        for i, tp in enumerate(t_probs):
            for j, sl in enumerate(s_logp):
                if i == j:
                    continue
                if self.loss == "dino":
                    per_sample = -(tp[:, 0] * sl[:, 0]).sum(-1)
                else:
                    m = matches[(i, j)]
                    ce = _old_token_cross_entropy(tp, sl, m.idx_a, m.idx_b, m.valid)
                    per_sample = reduce_tokens(ce, m.valid, self.loss, self.lam)
                total = total + per_sample.mean()
                n_pairs += 1
        if update_center:
            self.update_center(teacher_out)
        return total / n_pairs

    @torch.no_grad()
    def update_center(self, teacher_out):
        t = torch.cat([x.detach().float() for x in teacher_out], dim=0)
        if self.center_mode == "per-token":
            batch_center = t.sum(0, keepdim=True) / t.shape[0]
        else:
            batch_center = t.sum((0, 1)).view(1, 1, -1) / (t.shape[0] * t.shape[1])
        self.center.mul_(self.momentum).add_(batch_center * (1 - self.momentum))


# ---------------------------------------------------------------- random views and matches
def _views(seed, batch=4, k=24, t_grid=(4, 6), s_grids=((2, 3), (3, 2), (2, 2)), n_teacher=2,
           rule="half", dtype=torch.float32):
    """Teacher/student outputs and real matches of random crops (with flips) of a 40x48 image.

    The teacher views are global crops of grid ``t_grid`` (also the first student
    views); the other student views have the grids ``s_grids`` (several resolutions).
    """
    g = torch.Generator().manual_seed(seed)
    grids = [t_grid] * n_teacher + list(s_grids)
    n_views = len(grids)
    teacher = [(3 * torch.randn(batch, 1 + t_grid[0] * t_grid[1], k, generator=g)).to(dtype)
               for _ in range(n_teacher)]
    student = [(3 * torch.randn(batch, 1 + r * c, k, generator=g)).to(dtype).requires_grad_()
               for r, c in grids]
    boxes = []
    for v in range(n_views):
        lo_size = (10, 41) if v < n_teacher else (4, 20)
        size = torch.randint(*lo_size, (batch, 2), generator=g).float()
        x0 = (torch.rand(batch, generator=g) * (48 - size[:, 0])).floor()
        y0 = (torch.rand(batch, generator=g) * (40 - size[:, 1])).floor()
        boxes.append(torch.stack([x0, y0, x0 + size[:, 0], y0 + size[:, 1]], -1))
    flips = [torch.rand(batch, generator=g) < 0.5 for _ in range(n_views)]
    matches = {
        (i, j): match_patches(boxes[i], boxes[j], grids[i], grids[j], flips[i], flips[j],
                              rule=rule)
        for i in range(n_teacher) for j in range(n_views) if i != j
    }
    return teacher, student, matches


def _criteria(loss, center_mode, n_tokens, k, lam=0.3, seed=0):
    crit = PWSelfLoss(k, n_teacher_tokens=n_tokens, loss=loss, lam=lam, center=center_mode,
                      teacher_temps=[0.04, 0.06], student_temp=0.1)
    crit.center.copy_(torch.randn(crit.center.shape, generator=torch.Generator().manual_seed(seed)))
    ref = _GatherLoss(crit.center, center_mode, loss, lam, teacher_temp=0.06)
    return crit, ref


def _assert_same(got, want, student, rtol=1e-5):
    """Same value (relative 1e-5) and same gradient w.r.t. every student output
    (max abs error below 1e-5 of the largest gradient entry)."""
    torch.testing.assert_close(got, want, rtol=rtol, atol=1e-6)
    g_got = torch.autograd.grad(got, student, allow_unused=True)
    g_want = torch.autograd.grad(want, student, allow_unused=True)
    scale = max(float(g.abs().max()) for g in g_want if g is not None)
    for a, b in zip(g_got, g_want):
        if b is None:
            assert a is None or not a.any()
            continue
        assert a is not None and a.dtype == b.dtype and a.shape == b.shape
        assert float((a.float() - b.float()).abs().max()) <= 1e-5 * scale


# ---------------------------------------------------------------- tests
@pytest.mark.parametrize("loss", LOSS_NAMES)
@pytest.mark.parametrize("center", ["global", "per-token"])
@pytest.mark.parametrize("rule", ["half", "official", "centre"])
def test_fast_loss_equals_gather_loss(loss, center, rule):
    seed = LOSS_NAMES.index(loss) * 10 + len(center) + len(rule)
    teacher, student, matches = _views(seed, rule=rule)
    assert any(bool((~m.valid).any()) for m in matches.values())  # padding slots present
    assert any(bool((m.num_valid == 1).any()) for m in matches.values())  # CLS-only samples
    crit, ref = _criteria(loss, center, teacher[0].shape[1], teacher[0].shape[-1], seed=seed)
    got = crit(student, teacher, matches, epoch=1, update_center=False)
    want = ref(student, teacher, matches)
    assert got.dtype == torch.float32 and got.dim() == 0
    _assert_same(got, want, student)


@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_square_grids_three_teachers_and_lambda_extremes(loss):
    teacher, student, matches = _views(5, batch=3, k=40, t_grid=(5, 5), s_grids=((2, 2), (3, 3)),
                                       n_teacher=3)
    for lam in (0.0, 1.0, 0.7):
        crit, ref = _criteria(loss, "per-token", 26, 40, lam=lam, seed=7)
        got = crit(student, teacher, matches, epoch=0, update_center=False)
        ref.teacher_temp = 0.04
        _assert_same(got, ref(student, teacher, matches), student)


def test_more_teacher_than_student_views_and_unpaired_view():
    # one teacher view and one other student view: student view 0 (= the teacher's) is unused
    teacher, student, matches = _views(6, n_teacher=1, s_grids=((3, 3),))
    crit, ref = _criteria("mean", "global", 25, 24)
    got = crit(student, teacher, matches, epoch=1, update_center=False)
    want = ref(student, teacher, matches)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    g = torch.autograd.grad(got, student[1])[0]
    torch.testing.assert_close(g, torch.autograd.grad(want, student[1])[0], rtol=1e-4, atol=1e-7)


def test_dino_uses_only_cls_rows_and_ignores_matches():
    teacher, student, matches = _views(8)
    crit, ref = _criteria("dino", "per-token", teacher[0].shape[1], 24)
    got = crit(student, teacher, None, epoch=1, update_center=False)
    _assert_same(got, ref(student, teacher, None), student)
    g = torch.autograd.grad(crit(student, teacher, matches, 1, update_center=False), student)
    for x in g:
        assert x[:, 1:].abs().max() == 0 and x[:, 0].abs().max() > 0
    # CLS-only outputs, as train.py passes them for DINO
    cls_t = [t[:, :1] for t in teacher]
    cls_s = [s[:, :1].detach().clone().requires_grad_() for s in student]
    crit1, ref1 = _criteria("dino", "global", 1, 24)
    _assert_same(crit1(cls_s, cls_t, None, 1, update_center=False), ref1(cls_s, cls_t, None),
                 cls_s)


def test_duplicate_and_arbitrary_pairs_are_summed_like_the_gathers():
    # matches need not come from match_patches: repeated tokens, any order, CLS not first
    g = torch.Generator().manual_seed(9)
    b, k, t_tok, s_tok, m = 3, 16, 7, 5, 9
    teacher = [torch.randn(b, t_tok, k, generator=g) for _ in range(2)]
    student = [torch.randn(b, t_tok if j < 2 else s_tok, k, generator=g, requires_grad=True)
               for j in range(4)]
    matches = {}
    for i in range(2):
        for j in range(4):
            if i != j:
                n_s = student[j].shape[1]
                valid = torch.rand(b, m, generator=g) < 0.7
                valid[:, 0] = True
                matches[(i, j)] = PatchMatch(torch.randint(0, t_tok, (b, m), generator=g),
                                             torch.randint(0, n_s, (b, m), generator=g), valid)
    for loss in ("mean", "sum", "lambda"):
        crit, ref = _criteria(loss, "global", t_tok, k)
        got = crit(student, teacher, matches, epoch=1, update_center=False)
        _assert_same(got, ref(student, teacher, matches), student)


def test_large_out_dim_rows():
    # K large enough for the long-row kernels of (log_)softmax, computed in place on the CPU
    teacher, student, matches = _views(10, batch=2, k=70000, t_grid=(2, 2), s_grids=((1, 2),))
    for loss in ("mean", "lambda"):
        crit, ref = _criteria(loss, "per-token", 5, 70000)
        got = crit(student, teacher, matches, epoch=1, update_center=False)
        _assert_same(got, ref(student, teacher, matches), student)


def test_out_of_place_path_of_other_devices(monkeypatch):
    # off the CPU the (log-)softmax is not written in place; the same arithmetic must result
    import pwself_reference.losses as losses

    monkeypatch.setattr(losses, "_in_place", lambda device: False)
    for loss in ("dino", "lambda"):
        teacher, student, matches = _views(16)
        crit, ref = _criteria(loss, "per-token", teacher[0].shape[1], 24)
        got = crit(student, teacher, matches, epoch=1, update_center=False)
        _assert_same(got, ref(student, teacher, matches), student)


def test_bfloat16_outputs_under_autocast():
    teacher, student, matches = _views(11, dtype=torch.bfloat16)
    crit, ref = _criteria("mean", "per-token", teacher[0].shape[1], 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = crit(student, teacher, matches, epoch=1, update_center=False)
        want = ref(student, teacher, matches)
    assert got.dtype == torch.float32
    assert torch.autograd.grad(got, student[0], retain_graph=True)[0].dtype == torch.bfloat16
    _assert_same(got, want, student)


def test_backward_twice_with_retained_graph():
    teacher, student, matches = _views(12)
    crit, _ = _criteria("sum", "global", teacher[0].shape[1], 24)
    loss = crit(student, teacher, matches, epoch=1, update_center=False)
    g1 = torch.autograd.grad(loss, student, retain_graph=True)
    g2 = torch.autograd.grad(2 * loss, student)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(2 * a, b)


def test_no_grad_evaluation_and_student_without_grad():
    teacher, student, matches = _views(13)
    crit, ref = _criteria("mean", "global", teacher[0].shape[1], 24)
    plain = [s.detach() for s in student]
    with torch.no_grad():
        got = crit(plain, teacher, matches, epoch=1, update_center=False)
    torch.testing.assert_close(got, ref(plain, teacher, matches), rtol=1e-5, atol=1e-6)
    assert not got.requires_grad


@pytest.mark.parametrize("center", ["global", "per-token"])
def test_center_update_and_stats_equal_the_old_ones(center):
    teacher, student, matches = _views(14)
    crit, ref = _criteria("mean", center, teacher[0].shape[1], 24)
    for epoch in (0, 1, 5):
        ref.teacher_temp = crit.teacher_temp(epoch)
        got = crit(student, teacher, matches, epoch=epoch)
        want = ref(student, teacher, matches, update_center=True)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(crit.center, ref.center, rtol=1e-5, atol=1e-6)
    mean_pairs = np.mean([float(m.valid.sum(1).float().mean()) for m in matches.values()])
    assert crit.last_stats["matched_tokens"] == pytest.approx(mean_pairs)


@settings(max_examples=30)
@given(st.integers(1, 5), st.integers(1, 9), st.sampled_from(LOSS_NAMES),
       st.floats(0.0, 1.0), st.integers(0, 2**16))
def test_pair_weights_reproduce_reduce_tokens(batch, m, loss, lam, seed):
    g = torch.Generator().manual_seed(seed)
    valid = torch.rand(batch, m, generator=g) < 0.6
    valid[: batch // 2 + 1, 0] = True
    ce = torch.rand(batch, m, generator=g) * valid
    w = pair_weights(valid, loss, lam)
    assert w.shape == valid.shape and not w[~valid].any()
    torch.testing.assert_close((w * ce).sum(1), reduce_tokens(ce, valid, loss, lam))
    torch.testing.assert_close((w * ce).sum(1), reduce_tokens(ce, valid, loss, lam))


def test_bad_matches_raise_value_error():
    teacher, student, matches = _views(15)
    crit = PWSelfLoss(24, teacher[0].shape[1], loss="mean")
    m = matches[(0, 2)]
    bad = dict(matches)
    bad[(0, 2)] = PatchMatch(m.idx_a, torch.where(m.valid, m.idx_b + 100, m.idx_b), m.valid)
    with pytest.raises(ValueError, match="outside"):
        crit(student, teacher, bad, 0)
    bad[(0, 2)] = PatchMatch(m.idx_a[:2], m.idx_b[:2], m.valid[:2])
    with pytest.raises(ValueError, match=r"matches\[\(0, 2\)\]"):
        crit(student, teacher, bad, 0)
    with pytest.raises(ValueError, match="last dim"):
        crit([s[..., :5] for s in student], teacher, matches, 0)
    with pytest.raises(ValueError, match="per-token centre"):
        PWSelfLoss(24, 3, loss="mean", center="per-token")(student, teacher, matches, 0)
    with pytest.raises(ValueError, match="valid"):
        pair_weights(torch.ones(3, dtype=torch.bool))
    assert torch.equal(crit.center, torch.zeros_like(crit.center))  # nothing was updated


def _slots(seed, n_s=9, n_t=7, p=30, k=24, dtype=torch.float32):
    """Random rows, teacher probabilities and slots (with duplicate slots)."""
    g = torch.Generator().manual_seed(seed)
    student = (3 * torch.randn(n_s, k, generator=g)).to(dtype).requires_grad_()
    probs = F.softmax(3 * torch.randn(n_t, k, generator=g), -1)
    s_row = torch.randint(0, n_s - 1, (p,), generator=g)  # the last row is in no slot
    t_row = torch.randint(0, n_t, (p,), generator=g)
    s_row[1], t_row[1] = s_row[0], t_row[0]
    return student, probs, LossSlots(s_row, t_row, torch.rand(p, generator=g))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matched_cross_entropy_engine_equals_the_reference(seed):
    student, probs, slots = _slots(seed)
    got = matched_cross_entropy(student, probs, slots, 0.1)
    want = matched_cross_entropy_reference(student, probs, slots, 0.1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    (g_got,) = torch.autograd.grad(got, student)
    (g_want,) = torch.autograd.grad(want, student)
    assert float((g_got - g_want).abs().max()) <= 1e-5 * float(g_want.abs().max())
    assert not g_got[-1].any()


def test_matched_cross_entropy_engine_bfloat16_rows(monkeypatch):
    import pwself_reference.losses as losses

    monkeypatch.setattr(losses, "_CHUNK_VALUES", 2 * 24)  # several chunks
    student, probs, slots = _slots(3, dtype=torch.bfloat16)
    got = matched_cross_entropy(student, probs, slots, 0.1)
    (g_got,) = torch.autograd.grad(got, student)
    s32 = student.detach().float().requires_grad_()
    want = matched_cross_entropy_reference(s32, probs, slots, 0.1)
    (g_want,) = torch.autograd.grad(want, s32)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert g_got.dtype == torch.bfloat16
    torch.testing.assert_close(g_got.float(), g_want, rtol=2 ** -7, atol=1e-6)


@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_head_output_equals_the_per_view_outputs(loss):
    """The stacked HeadOutput gives the loss of its views; its gradient lands on its rows."""
    teacher, student, matches = _views(17, s_grids=((2, 3), (2, 3), (3, 2)))
    stacked = HeadOutput.from_views([s.detach() for s in student])
    stacked.rows.requires_grad_()
    crit, ref = _criteria(loss, "per-token", teacher[0].shape[1], 24)
    got = crit(stacked, HeadOutput.from_views(teacher), matches, epoch=1, update_center=False)
    want = ref(student, teacher, matches)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    (g_got,) = torch.autograd.grad(got, stacked.rows)
    g_want = torch.cat([g.reshape(-1, 24) for g in torch.autograd.grad(want, student)])
    assert float((g_got - g_want).abs().max()) <= 1e-5 * float(g_want.abs().max())
    assert [tuple(v.shape) for v in stacked] == [tuple(s.shape) for s in student]


def test_head_output_rejects_a_bad_layout():
    with pytest.raises(ValueError, match="rows must hold the 8 tokens"):
        HeadOutput(torch.zeros(7, 3), batch=2, tokens=(3, 1))
    with pytest.raises(ValueError, match="do not fit"):
        HeadOutput(torch.zeros(2, 3), batch=2, tokens=(3, 1), kept=torch.arange(3))
    with pytest.raises(ValueError, match="every token"):
        HeadOutput(torch.zeros(4, 3), batch=2, tokens=(3, 1), kept=torch.arange(3)).view(0)


@pytest.mark.parametrize("center", ["global", "per-token"])
def test_centre_of_outputs_tiling_one_tensor_equals_the_per_view_sum(center):
    # the teacher head's output, cut into views, is summed in one pass: same centre
    g = torch.Generator().manual_seed(12)
    base = 3 * torch.randn(3 * 4 * 6, 10, generator=g)
    tiled = list(base.view(3, 4, 6, 10).unbind(0))
    separate = [t.clone() for t in tiled]
    a = PWSelfLoss(10, n_teacher_tokens=6, center=center)
    b = PWSelfLoss(10, n_teacher_tokens=6, center=center)
    a.update_center(tiled)
    b.update_center(separate)
    torch.testing.assert_close(a.center, b.center, rtol=1e-6, atol=1e-7)
    ref = _GatherLoss(torch.zeros_like(a.center), center, "mean", 0.5, 0.04)
    ref.update_center(separate)
    torch.testing.assert_close(a.center, ref.center, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- the bfloat16 route
def _saved_buffers(loss):
    """The gradient buffers the loss's autograd nodes keep for the backward pass."""
    out, todo, seen = [], [loss.grad_fn], set()
    while todo:
        fn = todo.pop()
        if fn is None or id(fn) in seen:
            continue
        seen.add(id(fn))
        if "MatchedCrossEntropy" in type(fn).__name__:
            out += list(fn.saved_tensors)
        todo += [f for f, _ in fn.next_functions]
    return out


def _bf16_and_float32_runs(seed, loss, center, monkeypatch, chunk_rows=None, k=24):
    """The loss and gradients of bfloat16 outputs, and of the same values in float32."""
    import pwself_reference.losses as losses

    if chunk_rows is not None:  # several chunks, some without any matched row
        monkeypatch.setattr(losses, "_CHUNK_VALUES", chunk_rows * k)
    teacher, student, matches = _views(seed, k=k, dtype=torch.bfloat16)
    crit, _ = _criteria(loss, center, teacher[0].shape[1], k, seed=seed)
    got = crit(student, teacher, matches, epoch=1, update_center=False)
    saved = _saved_buffers(got)
    assert saved and all(b.dtype == torch.bfloat16 for b in saved)  # no float32 copy kept
    g_got = torch.autograd.grad(got, student)
    student32 = [s.detach().float().requires_grad_() for s in student]
    want = crit(student32, [t.float() for t in teacher], matches, epoch=1, update_center=False)
    g_want = torch.autograd.grad(want, student32)
    return got, want, g_got, g_want, student


@pytest.mark.parametrize("loss", ["mean", "sum", "lambda"])
@pytest.mark.parametrize("chunk_rows", [None, 5])
def test_bfloat16_outputs_give_the_float32_loss_and_its_rounded_gradient(loss, chunk_rows,
                                                                         monkeypatch):
    got, want, g_got, g_want, _ = _bf16_and_float32_runs(3, loss, "per-token", monkeypatch,
                                                         chunk_rows)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for a, b in zip(g_got, g_want):
        assert a.dtype == torch.bfloat16
        # the same float32 gradient, rounded once to bfloat16
        assert torch.equal(a, b.to(torch.bfloat16))


def test_bfloat16_gradient_of_a_scaled_loss(monkeypatch):
    _, _, g_unit, _, student = _bf16_and_float32_runs(4, "mean", "global", monkeypatch, 7)
    teacher, _, matches = _views(4, dtype=torch.bfloat16)
    crit, _ = _criteria("mean", "global", teacher[0].shape[1], 24, seed=4)
    scaled = crit(student, teacher, matches, epoch=1, update_center=False) * 0.3
    for a, b in zip(torch.autograd.grad(scaled, student), g_unit):
        torch.testing.assert_close(a.float(), 0.3 * b.float(), rtol=2 ** -7, atol=1e-6)
