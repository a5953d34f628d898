"""``match_patches`` on the device equals the CPU result, bit for bit."""

from __future__ import annotations

import pytest
import torch

from patchaug import match_patches

RULES = ("half", "official", "centre")


def _random_boxes(g: torch.Generator, n: int, size: tuple[float, float], integer: bool,
                  dtype: torch.dtype) -> torch.Tensor:
    side = torch.rand(n, 2, generator=g, dtype=torch.float64) * (size[1] - size[0]) + size[0]
    x0 = torch.rand(n, generator=g, dtype=torch.float64) * (256 - side[:, 0])
    y0 = torch.rand(n, generator=g, dtype=torch.float64) * (256 - side[:, 1])
    boxes = torch.stack([x0, y0, x0 + side[:, 0], y0 + side[:, 1]], -1)
    if integer:
        boxes = boxes.floor()
        boxes[:, 2:] = torch.maximum(boxes[:, 2:], boxes[:, :2] + 1)
    return boxes.to(dtype)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("integer", [True, False])
@pytest.mark.parametrize("grids", [((14, 14), (6, 6)), ((14, 14), (14, 14)), ((6, 6), (14, 14)),
                                   ((5, 7), (3, 2))])
def test_same_pairs_as_on_the_cpu(device, rule, dtype, integer, grids):
    seed = RULES.index(rule) * 100 + 10 * (dtype == torch.float64) + 5 * integer + grids[1][0]
    g = torch.Generator().manual_seed(seed)
    n = 512
    box_a = _random_boxes(g, n, (90.0, 256.0), integer, dtype)
    box_b = _random_boxes(g, n, (12.0, 120.0), integer, dtype)
    flip_a = torch.rand(n, generator=g) < 0.5
    flip_b = torch.rand(n, generator=g) < 0.5
    for cls in (True, False):
        cpu = match_patches(box_a, box_b, *grids, flip_a, flip_b, rule=rule, cls=cls)
        dev = match_patches(box_a.to(device), box_b.to(device), *grids, flip_a.to(device),
                            flip_b.to(device), rule=rule, cls=cls)
        assert dev.idx_a.device.type == device.type and dev.valid.device.type == device.type
        for name in ("idx_a", "idx_b", "valid"):
            a, b = getattr(cpu, name), getattr(dev, name).cpu()
            assert a.dtype == b.dtype and torch.equal(a, b), (name, cls)
    # the sample set is not degenerate: both matched and CLS-only samples occur
    assert (cpu.valid.sum(-1) > 1).any()


def test_broadcast_leading_shapes_on_device(device):
    g = torch.Generator().manual_seed(3)
    teacher = _random_boxes(g, 8, (100.0, 256.0), True, torch.float32).view(2, 4, 4)
    student = _random_boxes(g, 3, (20.0, 100.0), True, torch.float32).view(3, 1, 1, 4)
    cpu = match_patches(teacher, student, 14, 6, rule="half")
    dev = match_patches(teacher.to(device), student.to(device), 14, 6, rule="half")
    assert dev.idx_a.shape == cpu.idx_a.shape == (3, 2, 4, 1 + 36)
    assert torch.equal(cpu.idx_b, dev.idx_b.cpu()) and torch.equal(cpu.valid, dev.valid.cpu())
