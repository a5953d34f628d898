"""The fused head-output loss on the device: same value and gradients as the reference on
the CPU (on CUDA it takes the whole-chunk route: the targets of a chunk at once through a
sparse product, no cache blocks, and the Triton row pass where triton is installed, or
torch operators), in float32 and under bfloat16 autocast, and at a large
out_dim with the default chunk."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pwself_reference.fused_loss import fused_head_loss, reference_head_loss
from pwself_reference.losses import LOSSES, LossSlots
from tests.pwself_reference.test_fused_loss import (
    TAU_S,
    TAU_T,
    centre,
    close,
    grads,
    matched_pairs,
    random_matches,
    setup,
)


def _on(device, pairs: LossSlots) -> LossSlots:
    return LossSlots(*(x.to(device) for x in (pairs.student_row, pairs.teacher_row,
                                                pairs.weight)))


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("mode", ["global", "per-token"])
@pytest.mark.parametrize("chunk", [3, None])
@pytest.mark.parametrize("engine", ["auto", "torch"])   # auto: the Triton row pass on CUDA
def test_fused_on_device_equals_cpu_reference(device, loss, mode, chunk, engine):
    gen, xs, v, g, xt, wt = setup(4)
    c, index = centre(gen, mode)
    pairs = matched_pairs(random_matches(gen), loss)
    xs_c = xs.clone().requires_grad_()
    v_c = v.detach().clone().requires_grad_()
    ref = reference_head_loss(xs_c, g.detach() * F.normalize(v_c, dim=-1), xt, wt, c, pairs,
                              TAU_S, TAU_T, center_index=index)
    xs_d = xs.to(device).requires_grad_()
    v_d = v.detach().to(device).requires_grad_()
    fused = fused_head_loss(xs_d, g.detach().to(device) * F.normalize(v_d, dim=-1),
                            xt.to(device), wt.to(device), c.to(device), _on(device, pairs),
                            TAU_S, TAU_T,
                            center_index=None if index is None else index.to(device),
                            chunk_size=chunk, engine=engine)
    assert fused.device.type == torch.device(device).type
    assert torch.allclose(fused.cpu(), ref, rtol=1e-4, atol=1e-5)
    for a, b in zip(grads(fused, [xs_d, v_d]), grads(ref, [xs_c, v_c])):
        close(a.cpu(), b, 1e-4)


def test_fused_on_device_under_bfloat16_autocast(device):
    gen, xs, v, g, xt, wt = setup(5)
    c, index = centre(gen, "per-token")
    pairs = matched_pairs(random_matches(gen), "mean")
    w = (g * F.normalize(v, dim=-1)).detach()
    ref = reference_head_loss(xs.bfloat16(), w.bfloat16(), xt.bfloat16(), wt.bfloat16(), c,
                              pairs, TAU_S, TAU_T, center_index=index)
    dev = torch.device(device)
    with torch.autocast(dev.type, dtype=torch.bfloat16):
        fused = fused_head_loss(xs.to(dev), w.to(dev), xt.to(dev), wt.to(dev), c.to(dev),
                                _on(dev, pairs), TAU_S, TAU_T, center_index=index.to(dev))
    assert fused.dtype == torch.float32
    assert torch.allclose(fused.cpu(), ref, rtol=2e-2)


def test_fused_on_device_at_a_large_out_dim(device):
    """out_dim 65536 with the default chunk (512 rows): value and feature gradient."""
    k, d = 65536, 16
    gen = torch.Generator().manual_seed(6)
    n_s, n_t = 700, 300
    xs = F.normalize(torch.randn(n_s, d, generator=gen), dim=-1)
    xt = F.normalize(torch.randn(n_t, d, generator=gen), dim=-1)
    w = F.normalize(torch.randn(k, d, generator=gen), dim=-1)
    c = 0.1 * torch.randn(1, k, generator=gen)
    pairs = LossSlots(torch.randint(0, n_s, (900,), generator=gen),
                      torch.randint(0, n_t, (900,), generator=gen), torch.full((900,), 1 / 900))
    xs_c = xs.clone().requires_grad_()
    ref = reference_head_loss(xs_c, w, xt, w, c, pairs, TAU_S, TAU_T)
    xs_d = xs.to(device).requires_grad_()
    fused = fused_head_loss(xs_d, w.to(device), xt.to(device), w.to(device), c.to(device),
                            _on(device, pairs), TAU_S, TAU_T)
    assert torch.allclose(fused.cpu(), ref, rtol=1e-4)
    (gx,) = torch.autograd.grad(fused, xs_d)
    (gx_ref,) = torch.autograd.grad(ref, xs_c)
    close(gx.cpu(), gx_ref, 1e-4)
