"""patchaug.patch_ops: layout helpers and every per-patch operator against its reference."""

from __future__ import annotations

import math

import kornia
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from patchaug import patch_ops as po

KE = kornia.enhance
TOL = 1e-5


def _patches(seed: int, n: int, c: int, p: int, ties: bool) -> torch.Tensor:
    """Random patches; with ``ties`` the values are quantised so channels often tie or clip."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, c, p, p, generator=g)
    if ties:
        x = (x * 4).round() / 4
    return x


patch_batches = st.builds(
    _patches,
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 12),
    c=st.sampled_from([1, 3]),
    p=st.sampled_from([3, 4, 8, 16]),
    ties=st.booleans(),
)
rgb_batches = st.builds(
    _patches,
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 12),
    c=st.just(3),
    p=st.sampled_from([3, 4, 8, 16]),
    ties=st.booleans(),
)


def _uniform(x: torch.Tensor, lo: float, hi: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    return lo + (hi - lo) * torch.rand(x.shape[0], generator=g)


# ---------------------------------------------------------------------------------- layout
@settings(max_examples=25, deadline=None)
@given(
    b=st.integers(1, 3),
    c=st.sampled_from([1, 3]),
    gh=st.integers(1, 3),
    gw=st.integers(1, 4),
    p=st.sampled_from([1, 2, 5, 8]),
)
def test_patchify_orders_patches_row_major(b: int, c: int, gh: int, gw: int, p: int) -> None:
    x = torch.rand(b, c, gh * p, gw * p)
    patches = po.patchify(x, p)
    n = gh * gw
    for i in range(b):
        for k in range(n):
            r, col = divmod(k, gw)
            assert torch.equal(
                patches[i * n + k], x[i, :, r * p : (r + 1) * p, col * p : (col + 1) * p]
            )


@settings(max_examples=25, deadline=None)
@given(
    b=st.integers(1, 3), gh=st.integers(1, 3), gw=st.integers(1, 3), p=st.sampled_from([1, 4, 8])
)
def test_unpatchify_inverts_patchify_and_copies(b: int, gh: int, gw: int, p: int) -> None:
    x = torch.rand(b, 3, gh * p, gw * p)
    patches = po.patchify(x, p)
    patches.add_(0.0)  # writing into the patches must never touch x (even for a 1 x 1 grid)
    patches[0].fill_(7.0)
    assert not (x == 7.0).any()
    patches[0].copy_(po.patchify(x, p)[0])
    assert torch.equal(po.unpatchify(patches, b, gh * p, gw * p), x)


def test_patchify_rejects_sizes_not_multiple_of_patch() -> None:
    with pytest.raises(ValueError, match="patch_size"):
        po.patchify(torch.rand(1, 3, 20, 16), 16)


# ---------------------------------------------------------------------- operators vs kornia
@given(x=patch_batches, seed=st.integers(0, 1000))
def test_brightness_equals_kornia_accumulative(x: torch.Tensor, seed: int) -> None:
    f = _uniform(x, 0.0, 2.0, seed)
    torch.testing.assert_close(
        po.brightness(x, f), KE.adjust_brightness_accumulative(x, f), atol=TOL, rtol=0
    )


@given(x=patch_batches, seed=st.integers(0, 1000))
def test_contrast_equals_kornia_mean_subtraction_per_patch(x: torch.Tensor, seed: int) -> None:
    f = _uniform(x, 0.0, 2.0, seed)
    ref = KE.adjust_contrast_with_mean_subtraction(x, f)
    torch.testing.assert_close(po.contrast(x, f), ref, atol=TOL, rtol=0)


@given(x=patch_batches, seed=st.integers(0, 1000))
def test_saturation_equals_kornia_gray_subtraction(x: torch.Tensor, seed: int) -> None:
    f = _uniform(x, 0.0, 2.0, seed)
    ref = KE.adjust_saturation_with_gray_subtraction(x, f)
    torch.testing.assert_close(po.saturation(x, f), ref, atol=TOL, rtol=0)


@given(x=rgb_batches, seed=st.integers(0, 1000))
def test_hue_equals_kornia_adjust_hue(x: torch.Tensor, seed: int) -> None:
    f = _uniform(x, -0.5, 0.5, seed)
    ref = KE.adjust_hue(x, f * 2 * math.pi)
    torch.testing.assert_close(po.hue(x, f), ref, atol=TOL, rtol=0)


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    factor=st.sampled_from([-0.5, -1 / 3, -1 / 6, 0.0, 1 / 6, 1 / 3, 0.5, 1e-7, -1e-7]),
)
def test_hue_matches_kornia_on_sextant_boundaries(seed: int, factor: float) -> None:
    # pure and mixed primaries, greys, black: hue exactly on sextant edges and ties
    g = torch.Generator().manual_seed(seed)
    levels = torch.tensor([0.0, 1e-6, 0.25, 0.5, 0.75, 1.0])
    x = levels[torch.randint(0, 6, (16, 3, 4, 4), generator=g)]
    f = torch.full((16,), factor)
    torch.testing.assert_close(po.hue(x, f), KE.adjust_hue(x, f * 2 * math.pi), atol=TOL, rtol=0)


@given(x=patch_batches)
def test_grayscale_equals_kornia_rgb_to_grayscale(x: torch.Tensor) -> None:
    ref = kornia.color.rgb_to_grayscale(x).expand_as(x) if x.shape[1] == 3 else x
    torch.testing.assert_close(po.grayscale(x), ref, atol=TOL, rtol=0)


@given(x=patch_batches, seed=st.integers(0, 1000))
def test_solarize_equals_kornia_solarize(x: torch.Tensor, seed: int) -> None:
    t = _uniform(x, 0.0, 1.0, seed)
    torch.testing.assert_close(po.solarize(x, t), KE.solarize(x, t), atol=TOL, rtol=0)


@given(
    x=patch_batches,
    seed=st.integers(0, 1000),
    kh=st.integers(0, 15),
    kw=st.integers(0, 15),
)
def test_gaussian_blur_equals_kornia_reflect_blur(
    x: torch.Tensor, seed: int, kh: int, kw: int
) -> None:
    p = x.shape[-1]
    size = (min(2 * kh + 1, 2 * p - 1), min(2 * kw + 1, 2 * p - 1))
    s = _uniform(x, 0.1, 3.0, seed)
    ref = kornia.filters.gaussian_blur2d(x, size, torch.stack([s, s], 1), border_type="reflect")
    torch.testing.assert_close(po.gaussian_blur(x, s, size), ref, atol=TOL, rtol=0)


@given(x=patch_batches, seed=st.integers(0, 1000))
def test_gaussian_noise_is_clamped_scaled_addition(x: torch.Tensor, seed: int) -> None:
    std = _uniform(x, 0.0, 0.5, seed)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    ref = (x + std.view(-1, 1, 1, 1) * noise).clamp(0, 1)
    torch.testing.assert_close(po.gaussian_noise(x, std, noise), ref, atol=TOL, rtol=0)


@given(x=patch_batches, seed=st.integers(0, 1000))
def test_posterize_equals_kornia_posterize(x: torch.Tensor, seed: int) -> None:
    bits = torch.randint(0, 9, (x.shape[0],), generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(po.posterize(x, bits), KE.posterize(x, bits), atol=TOL, rtol=0)


@given(x=patch_batches, seed=st.integers(0, 1000))
def test_sharpness_equals_kornia_sharpness(x: torch.Tensor, seed: int) -> None:
    f = _uniform(x, 0.0, 3.0, seed)
    torch.testing.assert_close(po.sharpness(x, f), KE.sharpness(x, f), atol=TOL, rtol=0)


# ------------------------------------------------------------------ identities and in place
@given(x=patch_batches)
def test_identity_parameters_are_bit_exact(x: torch.Tensor) -> None:
    # PatchJitter updates the whole batch in place with these values on ungated patches
    ones = torch.ones(x.shape[0])
    assert torch.equal(po.brightness(x, ones), x)
    assert torch.equal(po.contrast(x, ones), x)
    assert torch.equal(po.saturation(x, ones), x)
    assert torch.equal(po.solarize(x, torch.full((x.shape[0],), 2.0)), x)
    assert torch.equal(po.posterize(x, torch.full((x.shape[0],), 8)), x)


def test_gaussian_blur_rejects_kernel_wider_than_reflect_allows() -> None:
    x = torch.rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match="kernel_size"):
        po.gaussian_blur(x, torch.ones(2), (17, 3))
    with pytest.raises(ValueError, match="kernel_size"):
        po.gaussian_blur(x, torch.ones(2), (3, 4))


def test_gaussian_kernel_matches_kornia() -> None:
    s = torch.tensor([0.3, 1.0, 2.5])
    ref = kornia.filters.get_gaussian_kernel1d(7, s.view(-1, 1))
    torch.testing.assert_close(po.gaussian_kernel1d(7, s), ref, atol=1e-7, rtol=0)


# ------------------------------------------------------------- building blocks for PatchJitter
@settings(max_examples=20, deadline=None)
@given(b=st.integers(1, 3), gh=st.integers(1, 3), gw=st.integers(1, 3), p=st.sampled_from([2, 8]))
def test_patchify_and_unpatchify_write_into_given_tensors(b: int, gh: int, gw: int, p: int) -> None:
    x = torch.rand(b, 3, gh * p, gw * p)
    buf = torch.full((b * gh * gw, 3, p, p), -1.0)
    assert po.patchify(x, p, out=buf) is buf
    assert torch.equal(buf, po.patchify(x, p))
    # unpatchify into a slice of rows of a larger contiguous batch (how blocks are written)
    big = torch.zeros(b + 1, 3, (gh + 1) * p, gw * p)
    target = big[1:, :, p:]
    assert po.unpatchify(buf, b, gh * p, gw * p, out=target) is target
    assert torch.equal(big[1:, :, p:], x)
    assert not big[0].any() and not big[1:, :, :p].any()


def test_patchify_and_unpatchify_reject_wrong_out() -> None:
    x = torch.rand(1, 3, 16, 16)
    with pytest.raises(ValueError, match="out"):
        po.patchify(x, 8, out=torch.empty(3, 3, 8, 8))
    with pytest.raises(ValueError, match="out"):
        po.patchify(x, 8, out=torch.empty(4, 8, 3, 8).transpose(1, 2))  # not contiguous
    with pytest.raises(ValueError, match="out"):
        po.unpatchify(po.patchify(x, 8), 1, 16, 16, out=torch.empty(1, 3, 16, 8))


@given(x=rgb_batches, seed=st.integers(0, 1000), turns=st.integers(-2, 2))
def test_hue_is_periodic_in_whole_turns(x: torch.Tensor, seed: int, turns: int) -> None:
    # hue_offsets reduces the shift modulo one turn: any shift equals Kornia's rotation
    f = _uniform(x, -0.5, 0.5, seed)
    ref = KE.adjust_hue(x, f * 2 * math.pi)
    torch.testing.assert_close(po.hue(x, f + turns), ref, atol=TOL, rtol=0)


def _fast_hue(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    from patchaug import blocked_ops as fo

    return fo.hue_with_offsets(x.clone(), fo.hue_offsets(f, x))


@pytest.mark.parametrize("hue", [po.hue, _fast_hue], ids=["formula", "blocked_ops"])
@given(x=rgb_batches, seed=st.integers(0, 1000), tiny=st.booleans())
def test_hue_keeps_each_pixel_between_its_min_and_max(
    hue, x: torch.Tensor, seed: int, tiny: bool
) -> None:
    if tiny:  # minima far below the maxima: the rounding-sensitive case for the lower bound
        x = x * torch.tensor([1.0, 1e-3, 1e-7]).view(1, 3, 1, 1)
    y = hue(x, _uniform(x, -0.5, 0.5, seed))
    assert bool((y >= 0).all()) and bool((y <= x.amax(dim=1, keepdim=True)).all())  # exact
    assert bool((y >= x.amin(dim=1, keepdim=True) - 1e-7).all())  # up to rounding


@pytest.mark.parametrize(
    ("dtype", "atol"), [(torch.float16, 1e-2), (torch.bfloat16, 6e-2), (torch.float64, 1e-12)]
)
def test_colour_operators_keep_the_dtype(dtype: torch.dtype, atol: float) -> None:
    # computed in the input's dtype: within its rounding of the float64 result
    x = torch.rand(5, 3, 4, 4, generator=torch.Generator().manual_seed(0)).to(dtype)
    f = torch.rand(5, generator=torch.Generator().manual_seed(1)) + 0.5
    for fn in (po.brightness, po.contrast, po.saturation, po.hue):
        out = fn(x, f)
        assert out.dtype == dtype
        ref = fn(x.double(), f.double())
        torch.testing.assert_close(out.double(), ref, atol=atol, rtol=0)

