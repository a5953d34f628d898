"""patchaug.blocked_ops: every fast in-place operator equals its readable formula."""

from __future__ import annotations

import math

import kornia
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from patchaug import blocked_ops as fo
from patchaug import patch_ops as po

from .test_patch_ops import _uniform, patch_batches, rgb_batches


@given(x=patch_batches, seed=st.integers(0, 1000))
def test_in_place_operators_write_into_their_input_and_equal_the_formula(
    x: torch.Tensor, seed: int
) -> None:
    f = _uniform(x, 0.0, 1.5, seed)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    bits = torch.randint(0, 9, (x.shape[0],), generator=torch.Generator().manual_seed(seed))
    cases = [
        (lambda y: fo.brightness_(y, f), po.brightness(x, f)),
        (lambda y: fo.contrast_(y, f), po.contrast(x, f)),
        (lambda y: fo.saturation_(y, f), po.saturation(x, f)),
        (lambda y: fo.solarize_(y, f / 2), po.solarize(x, f / 2)),
        (lambda y: fo.gaussian_noise_(y, f / 10, noise), po.gaussian_noise(x, f / 10, noise)),
        (lambda y: fo.grayscale_(y), po.grayscale(x)),
        (lambda y: fo.posterize_(y, bits), po.posterize(x, bits)),
    ]
    if x.shape[-1] >= 3:
        cases.append((lambda y: fo.sharpness_(y, f), po.sharpness(x, f)))
    for run, want in cases:
        work = x.clone()
        got = run(work)
        assert got.data_ptr() == work.data_ptr()
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


@settings(max_examples=20, deadline=None)
@given(x=rgb_batches, seed=st.integers(0, 1000), block=st.integers(1, 13))
def test_hue_with_offsets_equals_the_formula_for_any_chunk_size(
    x: torch.Tensor, seed: int, block: int
) -> None:
    f = _uniform(x, -0.5, 0.5, seed)
    offsets = fo.hue_offsets(f, x)
    assert offsets.shape == (3, x.shape[0], 1, 1)
    work = x.new_empty((5, block, *x.shape[2:]))
    out = fo.hue_with_offsets(x.clone(), offsets, work)
    torch.testing.assert_close(out, po.hue(x, f), atol=1e-6, rtol=0)
    torch.testing.assert_close(out, kornia.enhance.adjust_hue(x, f * 2 * math.pi), atol=1e-5,
                               rtol=0)


@settings(max_examples=20, deadline=None)
@given(x=patch_batches, seed=st.integers(0, 1000), kh=st.integers(0, 7), kw=st.integers(0, 7))
def test_blur_with_precomputed_matrices_equals_the_formula(
    x: torch.Tensor, seed: int, kh: int, kw: int
) -> None:
    p = x.shape[-1]
    size = (min(2 * kh + 1, 2 * p - 1), min(2 * kw + 1, 2 * p - 1))
    s = _uniform(x, 0.1, 3.0, seed)
    mat_h, mat_w = fo.blur_matrices(s, size, p)
    assert (mat_h is None) == (size[0] == 1) and (mat_w is None) == (size[1] == 1)
    for mat, k in ((mat_h, size[0]), (mat_w, size[1])):
        if mat is not None:
            torch.testing.assert_close(mat, po.blur_matrix(s, k, p), atol=1e-7, rtol=0)
    out = fo.blur_with_matrices(x, mat_h, mat_w)
    torch.testing.assert_close(out, po.gaussian_blur(x, s, size), atol=1e-6, rtol=0)
    # a subset of rows with the matching rows of the matrices: the same rows of the result
    rows = torch.arange(0, x.shape[0], 2)
    sub = fo.blur_with_matrices(
        x[rows],
        None if mat_h is None else mat_h[rows],
        None if mat_w is None else mat_w[rows],
    )
    torch.testing.assert_close(sub, out[rows], atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("call", "arg"),
    [
        (lambda: fo.blur_matrices(torch.ones(2, 1), (5, 5), 8), "sigma"),
        (lambda: fo.blur_matrices(torch.ones(2), (4, 5), 8), r"kernel_size\[0\]"),
        (lambda: fo.blur_matrices(torch.ones(2), (5, 17), 8), r"kernel_size\[1\]"),
        (lambda: fo.blur_with_matrices(torch.rand(2, 3, 8, 6), None, None), "x"),
        (lambda: fo.blur_with_matrices(torch.rand(2, 3, 8, 8), torch.rand(3, 8, 8), None),
         "mat_h"),
        (lambda: fo.blur_with_matrices(torch.rand(2, 3, 8, 8), None, torch.rand(2, 4, 4)),
         "mat_w"),
        (lambda: fo.hue_offsets(torch.rand(2, 2), torch.rand(4, 3, 8, 8)), "factor"),
        (lambda: fo.hue_with_offsets(torch.rand(2, 1, 8, 8), torch.zeros(3, 2, 1, 1)), "x"),
        (lambda: fo.hue_with_offsets(torch.rand(2, 3, 8, 8), torch.zeros(3, 4, 1, 1)),
         "offsets"),
        (lambda: fo.hue_with_offsets(torch.rand(2, 3, 8, 8), torch.zeros(3, 2, 1, 1),
                                     torch.empty(4, 2, 8, 8)), "work"),
    ],
)
def test_reusable_kernels_reject_bad_input(call, arg) -> None:
    with pytest.raises(ValueError, match=arg):
        call()


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda: fo.saturation_(torch.rand(2, 3, 4, 4), torch.ones(2), work=[0.0]), TypeError),
        (lambda: fo.saturation_(torch.rand(2, 3, 4, 4), torch.ones(2), work=torch.empty(31)),
         ValueError),
        (lambda: fo.solarize_(torch.rand(2, 3, 4, 4), torch.ones(2),
                              work=torch.empty(96, dtype=torch.float64)), ValueError),
        (lambda: fo.solarize_(torch.rand(2, 3, 4, 4), torch.ones(2),
                              work=torch.empty(2, 96)[:, :48]), ValueError),
        (lambda: fo.blur_matrices(torch.ones(2), (5, 3), 8, work=torch.empty(127)), ValueError),
        (lambda: fo.blur_with_matrices(torch.rand(2, 3, 8, 8), *fo.blur_matrices(
            torch.ones(2), (5, 5), 8), work=torch.empty(767)), ValueError),
    ],
)
def test_scratch_buffers_are_checked(call, error) -> None:
    with pytest.raises(error, match="work"):
        call()


def test_scratch_buffers_give_the_same_results() -> None:
    x = torch.rand(5, 3, 8, 8)
    f = torch.rand(5) + 0.5
    work = torch.empty(2 * x.numel())
    assert torch.equal(fo.saturation_(x.clone(), f, work), fo.saturation_(x.clone(), f))
    assert torch.equal(fo.solarize_(x.clone(), f / 2, work), fo.solarize_(x.clone(), f / 2))
    mats = fo.blur_matrices(f, (5, 3), 8, work=torch.empty(2 * 5 * 64))
    for got, want in zip(mats, fo.blur_matrices(f, (5, 3), 8)):
        assert torch.equal(got, want)
    assert torch.equal(fo.blur_with_matrices(x, *mats, work=work), fo.blur_with_matrices(x, *mats))
