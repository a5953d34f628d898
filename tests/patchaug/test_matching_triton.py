"""The fused Triton matching engine and :func:`match_view_pairs`.

Without a GPU the kernel runs in Triton's interpreter (``TRITON_INTERPRET=1``, set in
``tests/conftest.py``), about 40 ms per (pair, sample) program here: the batches stay small.
It must equal the numpy and torch engines bit for bit and the exact reference.
"""

from __future__ import annotations

import textwrap

import pytest
import torch

from patchaug import PatchMatch, match_patches, match_view_pairs
from patchaug.matching import match_patches_reference
from tests.patchaug.triton_compile import assert_compiles

pytest.importorskip("triton")
from patchaug.triton_engine import triton_available  # noqa: E402

needs_triton = pytest.mark.skipif(not triton_available("cpu"),
                                  reason="needs TRITON_INTERPRET=1 (set by conftest without CUDA)")
RULES = ("half", "official", "centre")


def _boxes(g: torch.Generator, n: int, integer: bool, size: float = 224.0) -> torch.Tensor:
    side = torch.rand(n, 2, generator=g, dtype=torch.float64) * (size - 8) + 4
    corner = torch.rand(n, 2, generator=g, dtype=torch.float64) * (size - side)
    boxes = torch.cat([corner, corner + side], -1)
    return boxes.round() if integer else boxes


def _assert_same(a: PatchMatch, b: PatchMatch) -> None:
    for name in ("idx_a", "idx_b", "valid"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert torch.equal(x, y), name


@needs_triton
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("grids", [((14, 14), (6, 6)), ((6, 6), (14, 14)), ((5, 7), (7, 3)),
                                   ((1, 1), (3, 2))])
def test_triton_engine_equals_the_other_engines(rule, grids):
    g = torch.Generator().manual_seed(RULES.index(rule) * 10 + grids[1][0])
    n = 6
    # integer boxes (exact ties on patch borders happen) and fractional ones
    box_a = torch.cat([_boxes(g, n, True), _boxes(g, n, False)])
    box_b = torch.cat([_boxes(g, n, True, 120.0) + 40, _boxes(g, n, False)])
    flip_a, flip_b = torch.rand(2 * n, generator=g) < 0.5, torch.rand(2 * n, generator=g) < 0.5
    for cls in (True, False):
        fused = match_patches(box_a, box_b, *grids, flip_a, flip_b, rule=rule, cls=cls,
                              engine="triton")
        _assert_same(fused, match_patches(box_a, box_b, *grids, flip_a, flip_b, rule=rule,
                                          cls=cls, engine="torch"))
        _assert_same(fused, match_patches(box_a, box_b, *grids, flip_a, flip_b, rule=rule,
                                          cls=cls, engine="numpy"))
    if grids[0] != (1, 1):  # the samples are not degenerate: with and without pairs (cls=False)
        assert (fused.valid.sum(-1) > 0).any() and (fused.valid.sum(-1) == 0).any()


@needs_triton
@pytest.mark.parametrize("rule", RULES)
def test_triton_engine_gives_the_reference_pairs(rule):
    cases = [  # exact ties, touching boxes, a box inside the other, flips, non-square grids
        ((0, 0, 224, 224), (0, 0, 112, 112), 14, 7, False, True),
        ((0, 0, 224, 224), (8, 8, 120, 120), 14, 7, True, False),
        ((10, 20, 110, 90), (60, 30, 160, 130), (5, 7), (6, 4), True, True),
        ((0, 0, 100, 100), (100, 0, 200, 100), 4, 4, False, False),
        ((0.5, 1.25, 99.5, 80.75), (3.3, 0, 57.1, 33.3), (6, 5), (3, 3), False, True),
        ((0, 0, 16, 16), (0, 0, 224, 224), 1, 14, False, False),
    ]
    for box_a, box_b, grid_a, grid_b, flip_a, flip_b in cases:
        m = match_patches(torch.tensor(box_a, dtype=torch.float64), box_b, grid_a, grid_b, flip_a,
                          flip_b, rule=rule, engine="triton")
        assert m.pairs() == match_patches_reference(box_a, box_b, grid_a, grid_b, flip_a, flip_b,
                                                    rule=rule)


@needs_triton
def test_triton_engine_broadcasts_and_takes_empty_batches():
    g = torch.Generator().manual_seed(1)
    teacher = _boxes(g, 4, True).view(2, 2, 4)
    student = _boxes(g, 3, True).view(3, 1, 1, 4)
    flip = torch.tensor([True, False])
    fused = match_patches(teacher, student, 14, 6, flip, rule="half", engine="triton")
    assert fused.idx_a.shape == (3, 2, 2, 37)
    _assert_same(fused, match_patches(teacher, student, 14, 6, flip, rule="half", engine="torch"))
    empty = match_patches(torch.zeros(0, 4), torch.zeros(0, 4), 14, 6, engine="triton")
    assert empty.idx_a.shape == (0, 37) and empty.valid.dtype == torch.bool


def _multicrop(g: torch.Generator, batch: int):
    """2 global views (grid 14) and 3 local ones (grid 6): DINO's pairs."""
    boxes = torch.stack([_boxes(g, batch, True) for _ in range(5)])
    flips = torch.rand(5, batch, generator=g) < 0.5
    grids = [(14, 14)] * 2 + [(6, 6)] * 3
    pairs = [(i, j) for i in range(2) for j in range(5) if j != i]
    return boxes, flips, grids, pairs


@pytest.mark.parametrize("engine", ["numpy", "torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("rule", RULES)
def test_match_view_pairs_equals_match_patches_per_pair(engine, rule):
    boxes, flips, grids, pairs = _multicrop(torch.Generator().manual_seed(7), 3)
    out = match_view_pairs(boxes, flips, grids, pairs, rule=rule, engine=engine)
    assert list(out) == pairs
    for i, j in pairs:
        expect = match_patches(boxes[i], boxes[j], grids[i], grids[j], flips[i], flips[j],
                               rule=rule, engine="torch")
        _assert_same(out[(i, j)], expect)


@needs_triton
def test_match_view_pairs_is_one_kernel_launch(monkeypatch):
    from patchaug import matching_triton

    launches = []
    kernel = matching_triton._match_kernel

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]

    monkeypatch.setattr(matching_triton, "_match_kernel", Counting())
    boxes, flips, grids, pairs = _multicrop(torch.Generator().manual_seed(2), 2)
    match_view_pairs(boxes, flips, grids, pairs, engine="triton")
    assert launches == [(len(pairs) * 2,)]


def test_auto_engine_choice(monkeypatch):
    from patchaug import matching

    cpu = torch.zeros(2, 4)
    assert matching._pick_engine("auto", cpu, None) == "numpy"
    assert matching._pick_engine("auto", [0, 0, 1, 1], (0, 0, 1, 1)) == "numpy"
    meta = torch.zeros(2, 4, device="meta")
    assert matching._pick_engine("auto", meta, None) == "torch"
    # under the interpreter (tests) CUDA would not take Triton: it is for testing only
    monkeypatch.setattr(matching, "_triton_compiles", lambda device: True)
    assert matching._pick_engine("auto", cpu, None) == "numpy"
    assert matching._pick_engine("torch", cpu, None) == "torch"


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(boxes=torch.zeros(5, 4)), ValueError, "boxes must be a .V, B, 4."),
    (dict(boxes=[[[0, 0, 1, 1]]]), ValueError, "boxes must be a .V, B, 4."),
    (dict(flips=torch.zeros(5, 2)), TypeError, "flips must be a bool tensor"),
    (dict(flips=torch.zeros(5, 3, dtype=torch.bool)), ValueError, r"flips must have shape \(V, B\)"),
    (dict(grids=[(14, 14)] * 4), ValueError, "grids must hold one"),
    (dict(grids="abcde"), ValueError, "grids must hold one"),
    (dict(grids=[(14, 14)] * 4 + [(0, 6)]), ValueError, r"grids\[4\]"),
    (dict(pairs=[(0, 5)]), ValueError, "pairs must hold"),
    (dict(pairs=[(0,)]), ValueError, "pairs must hold"),
    (dict(pairs=[(-1, 2)]), ValueError, "pairs must hold"),
    (dict(rule="nearest"), ValueError, "rule must be one of"),
    (dict(cls=1), TypeError, "cls must be a bool"),
    (dict(engine="cuda"), ValueError, "engine must be one of"),
])
def test_match_view_pairs_rejects_bad_input(kwargs, error, match):
    boxes, flips, grids, pairs = _multicrop(torch.Generator().manual_seed(0), 2)
    args = dict(boxes=boxes, flips=flips, grids=grids, pairs=pairs)
    args.update(kwargs)
    rest = {k: args.pop(k) for k in ("rule", "cls", "engine") if k in args}
    with pytest.raises(error, match=match):
        match_view_pairs(args["boxes"], args["flips"], args["grids"], args["pairs"], **rest)


@pytest.mark.parametrize("engine", ["numpy", "torch", pytest.param("triton", marks=needs_triton)])
def test_every_engine_rejects_bad_boxes_alike(engine):
    with pytest.raises(ValueError, match="box_b must satisfy x1 > x0"):
        match_patches(torch.tensor([0.0, 0, 10, 10]), torch.tensor([5.0, 0, 1, 10]), 2, 2,
                      engine=engine)
    with pytest.raises(ValueError, match="box_a must be finite"):
        match_patches(torch.tensor([0.0, 0, float("nan"), 10]), (0, 0, 1, 1), 2, 2, engine=engine)
    with pytest.raises(ValueError, match="engine must be one of"):
        match_patches((0, 0, 1, 1), (0, 0, 1, 1), 2, 2, engine=None)  # type: ignore[arg-type]
    if engine == "triton":
        boxes, flips, grids, pairs = _multicrop(torch.Generator().manual_seed(0), 1)
        boxes[3, 0, 2] = -1.0
        with pytest.raises(ValueError, match="boxes must satisfy x1 > x0"):
            match_view_pairs(boxes, flips, grids, pairs, engine="triton")


def test_triton_engine_needs_triton_where_it_runs(monkeypatch):
    from patchaug import triton_engine

    monkeypatch.setattr(triton_engine, "triton_available", lambda device: False)
    with pytest.raises(RuntimeError, match="engine='triton' needs triton"):
        match_patches(torch.zeros(4) + torch.tensor([0, 0, 1, 1]), (0, 0, 1, 1), 2, 2,
                      engine="triton")


# ---------------------------------------------------------------------- compiled (no GPU)
# The kernel through Triton's CUDA pipeline down to a cubin for sm_90 (Triton ships ptxas): checks
# what the interpreter does not (float64 lowering, constexpr branches, types). In a subprocess,
# because triton.language is built in one mode per process.
_COMPILE_SCRIPT = textwrap.dedent("""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    import triton

    from patchaug.matching_triton import _RULE_CODES, _match_kernel as kernel
    from patchaug.triton_engine import _interpreting

    assert not _interpreting()
    n = 0
    for rule in _RULE_CODES.values():
        for cls in (0, 1):
            constexprs = dict(RULE=rule, CLS=cls, BLOCK_M=256)
            pointers = {"boxes_ptr": "*fp64", "flips_ptr": "*u8", "pairs_ptr": "*i32",
                        "idx_a_ptr": "*i64", "idx_b_ptr": "*i64", "valid_ptr": "*i8"}
            signature = {a: pointers.get(a, "constexpr" if a in constexprs else "i32")
                         for a in kernel.arg_names}
            try:
                compiled = triton.compile(ASTSource(kernel, signature, constexprs=constexprs),
                                          target=GPUTarget("cuda", 90, 32),
                                          options={"num_warps": 4, "enable_fp_fusion": False})
            except RuntimeError as error:
                if "ptxas" in str(error).lower():
                    raise SystemExit("SKIP " + str(error)) from None
                raise
            assert compiled.asm["cubin"]
            assert "fma.rn.f64" not in compiled.asm["ptx"], "a contracted multiply-add"
            n += 1
    print("compiled", n)
""")


def test_kernel_compiles_for_a_cuda_target() -> None:
    assert_compiles(_COMPILE_SCRIPT, 6)
