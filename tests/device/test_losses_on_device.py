"""``PWSelfLoss`` on the device: same value, gradients and centre as on the CPU."""

from __future__ import annotations

import pytest
import torch

from pwself_reference.losses import PWSelfLoss
from tests.pwself_reference.test_losses_fast import _views

LOSS_NAMES = ("dino", "mean", "sum", "lambda")


def _to(device, tensors, grad):
    return [t.detach().to(device).requires_grad_(grad) for t in tensors]


def _criterion(loss, center, n_tokens, k, device):
    crit = PWSelfLoss(k, n_teacher_tokens=n_tokens, loss=loss, lam=0.3, center=center,
                      teacher_temps=[0.04, 0.06])
    crit.center.copy_(torch.randn(crit.center.shape, generator=torch.Generator().manual_seed(3)))
    return crit.to(device)


@pytest.mark.parametrize("loss", LOSS_NAMES)
@pytest.mark.parametrize("center", ["global", "per-token"])
@pytest.mark.parametrize("k", [24, 70000])
def test_value_gradient_and_centre_equal_the_cpu(device, loss, center, k):
    seed = LOSS_NAMES.index(loss) + 10 * len(center) + k % 7
    batch = 4 if k < 1000 else 2
    teacher, student, matches = _views(seed, batch=batch, k=k)
    n_tok = teacher[0].shape[1]
    results = []
    for where in ("cpu", device):
        crit = _criterion(loss, center, n_tok, k, where)
        s = _to(where, student, True)
        t = _to(where, teacher, False)
        m = {key: type(v)(v.idx_a.to(where), v.idx_b.to(where), v.valid.to(where))
             for key, v in matches.items()}
        value = crit(s, t, m, epoch=1)
        grads = torch.autograd.grad(value, s)
        results.append((value.detach().cpu(), [g.cpu() for g in grads], crit.center.cpu()))
    (v0, g0, c0), (v1, g1, c1) = results
    torch.testing.assert_close(v1, v0, rtol=1e-5, atol=1e-6)
    scale = max(float(g.abs().max()) for g in g0)
    for a, b in zip(g0, g1):
        assert float((a - b).abs().max()) <= 1e-5 * scale
    torch.testing.assert_close(c1, c0, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_outputs_give_a_float32_loss(device, dtype):
    teacher, student, matches = _views(11, k=64, dtype=dtype)
    crit = _criterion("mean", "per-token", teacher[0].shape[1], 64, device)
    s = _to(device, student, True)
    m = {key: type(v)(v.idx_a.to(device), v.idx_b.to(device), v.valid.to(device))
         for key, v in matches.items()}
    value = crit(s, _to(device, teacher, False), m, epoch=1)
    assert value.dtype == torch.float32 and torch.isfinite(value)
    ref = _criterion("mean", "per-token", teacher[0].shape[1], 64, "cpu")
    s32 = [x.detach().float().requires_grad_() for x in student]
    want = ref(s32, [x.float() for x in teacher], matches, 1)
    torch.testing.assert_close(value.cpu(), want.detach(), rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(value, s)
    assert all(g.dtype == dtype and torch.isfinite(g.float()).all() for g in grads)
    # the gradient of the float32 loss, up to the rounding to the outputs' dtype
    ulp = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}[dtype]
    for g, r in zip(grads, torch.autograd.grad(want, s32)):
        assert float((g.float().cpu() - r).abs().max()) <= 2 * ulp * float(r.abs().max())
