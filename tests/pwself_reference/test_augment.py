"""``ViewAugment``: the patch jitter runs once per view size, on every view."""

from __future__ import annotations

import torch

from patchaug import PatchJitter
from pwself_reference.augment import ViewAugment


class _Recorder:
    """A stand-in jitter that records its inputs and marks its output."""

    def __init__(self) -> None:
        self.calls: list[torch.Size] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(x.shape)
        return x * 0.5


def _views(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return ([torch.rand(3, 3, 32, 32, generator=g) for _ in range(2)]
            + [torch.rand(3, 3, 16, 16, generator=g) for _ in range(4)])


def test_one_jitter_call_per_view_size_covering_every_view():
    rec = _Recorder()
    views = _views()
    torch.manual_seed(1)
    jittered = ViewAugment(2, 4, patch_jitter=rec)(views)
    torch.manual_seed(1)
    plain = ViewAugment(2, 4)(views)
    assert rec.calls == [torch.Size([6, 3, 32, 32]), torch.Size([12, 3, 16, 16])]
    # normalize(0.5 * x) for every view, in the original order
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    for a, b in zip(jittered, plain):
        want = ((b * std + mean) * 0.5 - mean) / std
        torch.testing.assert_close(a, want, atol=1e-5, rtol=1e-5)


def test_a_lone_view_size_is_jittered_alone():
    rec = _Recorder()
    ViewAugment(1, 2, patch_jitter=rec)(_views()[1:4])
    assert rec.calls == [torch.Size([3, 3, 32, 32]), torch.Size([6, 3, 16, 16])]


def test_patch_jitter_with_p_zero_changes_nothing():
    views = _views(2)
    torch.manual_seed(3)
    a = ViewAugment(2, 4, patch_jitter=PatchJitter(16, p=0.0))(views)
    torch.manual_seed(3)
    b = ViewAugment(2, 4)(views)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
