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


@pytest.mark.parametrize("engine", ["torch", "triton"])
@pytest.mark.parametrize("rule", RULES)
def test_each_device_engine_equals_the_cpu(device, engine, rule):
    if engine == "triton":
        pytest.importorskip("triton")
    g = torch.Generator().manual_seed(11 + RULES.index(rule))
    n = 256
    box_a = _random_boxes(g, n, (90.0, 256.0), False, torch.float32)
    box_b = _random_boxes(g, n, (12.0, 120.0), True, torch.float32)
    flip_a, flip_b = torch.rand(n, generator=g) < 0.5, torch.rand(n, generator=g) < 0.5
    for grids in (((14, 14), (6, 6)), ((6, 6), (14, 14)), ((5, 7), (3, 2))):
        cpu = match_patches(box_a, box_b, *grids, flip_a, flip_b, rule=rule)
        dev = match_patches(box_a.to(device), box_b.to(device), *grids, flip_a.to(device),
                            flip_b.to(device), rule=rule, engine=engine)
        for name in ("idx_a", "idx_b", "valid"):
            assert torch.equal(getattr(cpu, name), getattr(dev, name).cpu()), (engine, grids, name)


def test_match_view_pairs_on_device_one_compile(device):
    """Every teacher-student pair of a DINO step (2 x 224 + 8 x 96 px views) in one launch,
    equal to the CPU, and new box values never recompile the kernel."""
    triton = pytest.importorskip("triton")
    del triton
    from patchaug import match_view_pairs
    from patchaug.matching_triton import _match_kernel

    g = torch.Generator().manual_seed(5)
    grids = [(14, 14)] * 2 + [(6, 6)] * 8
    pairs = [(i, j) for i in range(2) for j in range(10) if j != i]

    def n_compiled() -> int:
        caches = _match_kernel.device_caches.get(torch.cuda.current_device())
        return len(caches[0]) if caches else 0

    # other tests in the session may have compiled other specialisations already
    before = n_compiled() if device.type == "cuda" else 0
    for step in range(3):
        boxes = torch.stack([_random_boxes(g, 64, (30.0, 256.0), True, torch.float32)
                             for _ in range(10)])
        flips = torch.rand(10, 64, generator=g) < 0.5
        cpu = match_view_pairs(boxes, flips, grids, pairs)
        dev = match_view_pairs(boxes.to(device), flips.to(device), grids, pairs, engine="triton")
        for key in pairs:
            for name in ("idx_a", "idx_b", "valid"):
                assert torch.equal(getattr(cpu[key], name), getattr(dev[key], name).cpu()), key
        if device.type == "cuda":  # the interpreter (PATCHAUG_TEST_DEVICE=cpu) compiles nothing
            assert n_compiled() - before <= 1, f"recompiled at step {step}"
