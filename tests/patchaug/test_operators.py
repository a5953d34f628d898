"""Each operator: its functional op equals its Kornia reference; ranges, sampling, checks."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from patchaug import operators as O
from patchaug.patch_jitter import PatchJitter, apply_reference

from .jitter_cases import NAMES, TOL, images, make_op


def test_every_builtin_operator_is_listed_once_with_a_unique_name() -> None:
    assert len(set(NAMES)) == len(O.OPERATORS) == 10
    assert all(issubclass(cls, O.PatchOp) for cls in O.OPERATORS)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), name=st.sampled_from(NAMES), c=st.sampled_from([1, 3]))
def test_apply_equals_the_kornia_reference_per_patch(seed: int, name: str, c: int) -> None:
    op = make_op(name)
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(7, c, 8, 8, generator=g)
    v = op.sample(torch.rand(7, generator=g))
    noise = torch.randn(x.shape, generator=g) if op.draws_noise else None
    torch.testing.assert_close(op.apply(x, v, noise), op.reference(x, v, noise), atol=TOL, rtol=0)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), name=st.sampled_from(NAMES), c=st.sampled_from([1, 3]))
def test_the_engine_fast_path_equals_apply(seed: int, name: str, c: int) -> None:
    op = make_op(name)
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(5, c, 8, 8, generator=g)
    v = op.sample(torch.rand(5, generator=g))
    noise = torch.randn(x.shape, generator=g) if op.draws_noise else None
    work = torch.empty(2 * x.numel())
    got = op.run(x.clone(), *op.prepare(v, 8, noise), work=work)
    torch.testing.assert_close(got, op.apply(x, v, noise), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", [n for n in NAMES if n != "grayscale"])
def test_samples_lie_in_the_range(name: str) -> None:
    op = make_op(name)
    u = torch.cat([torch.rand(1000), torch.tensor([0.0, 1.0 - 2**-24, 1.0])])
    v = op.sample(u)
    assert bool((v >= op.low).all()) and bool((v <= op.high).all())
    if name == "posterize":
        assert torch.equal(v, v.round()) and set(v.tolist()) == set(range(9))


@pytest.mark.parametrize("name", ["brightness", "contrast", "saturation", "solarize"])
def test_identity_parameters_return_the_patch_bit_for_bit(name: str) -> None:
    op = make_op(name)
    x = torch.rand(4, 3, 8, 8)
    assert torch.equal(op.apply(x, torch.full((4,), op.identity)), x)


@pytest.mark.parametrize("name", ["hue", "saturation", "grayscale"])
def test_colour_operators_leave_one_channel_patches_unchanged(name: str) -> None:
    x = torch.rand(3, 1, 8, 8)
    op = make_op(name)
    assert torch.equal(op.apply(x, op.sample(torch.rand(3))), x)


def test_blur_kernel_defaults_to_three_sigma_capped_inside_the_patch() -> None:
    assert O.GaussianBlur((0.1, 2.0)).kernel_for(16) == (13, 13)
    assert O.GaussianBlur((0.1, 2.0)).kernel_for(4) == (7, 7)
    assert O.GaussianBlur(1.0, kernel_size=(5, 1)).kernel_for(16) == (5, 1)


def test_factor_convention_is_torchvisions() -> None:
    assert (O.Brightness(0.4).low, O.Brightness(0.4).high) == (0.6, 1.4)
    assert (O.Contrast(1.5).low, O.Contrast(1.5).high) == (0.0, 2.5)
    assert (O.Hue(0.1).low, O.Hue(0.1).high) == (-0.1, 0.1)
    assert (O.Sharpness(2.0).low, O.Sharpness(2.0).high) == (2.0, 2.0)


BAD = [
    (lambda: O.Brightness(-1.0), ValueError, "brightness"),
    (lambda: O.Contrast((1.5, 0.5)), ValueError, "contrast"),
    (lambda: O.Saturation((0.5,)), TypeError, "saturation"),
    (lambda: O.Hue(0.7), ValueError, "hue"),
    (lambda: O.Hue((-0.6, 0.1)), ValueError, "hue"),
    (lambda: O.Posterize(9), ValueError, "posterize_bits"),
    (lambda: O.Posterize(2.5), TypeError, "posterize_bits"),
    (lambda: O.GaussianBlur(kernel_size=4), ValueError, "blur_kernel_size"),
    (lambda: O.GaussianBlur((0.0, 1.0)), ValueError, "blur_sigma"),
    (lambda: O.GaussianNoise((0.0, 2.0)), ValueError, "noise_std"),
    (lambda: O.Solarize(1.5), ValueError, "solarize_threshold"),
    (lambda: O.Sharpness(-1.0), ValueError, "sharpness"),
    (lambda: O.Hue(0.1, p=-0.1), ValueError, "hue.p"),
    (lambda: O.GaussianBlur(p="0.5"), TypeError, "blur.p"),
]


@pytest.mark.parametrize(("make", "error", "match"), BAD)
def test_bad_arguments_raise_naming_the_argument(make: Any, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        make()


def test_operators_that_do_not_fit_the_patch_are_rejected() -> None:
    with pytest.raises(ValueError, match="blur_kernel_size"):
        PatchJitter(16, [O.GaussianBlur(1.0, kernel_size=33)])
    with pytest.raises(ValueError, match="patch_size"):
        PatchJitter(2, [O.Sharpness(2.0)])


# ------------------------------------------------------------ adding an operator is one class
class Invert(O.PatchOp):
    """A new operator, as a user would add one: ``1 - x`` blended by a per-patch amount."""

    name = "invert"
    identity = 0.0

    def __init__(self, amount: tuple[float, float] = (0.0, 1.0), p: float = 1.0) -> None:
        self.low, self.high = amount
        self.p = p

    def apply(self, patches, values, noise=None):
        a = values.view(-1, 1, 1, 1)
        return patches * (1 - a) + (1 - patches) * a

    def reference(self, patches, values, noise=None):
        import kornia

        a = values.view(-1, 1, 1, 1)
        return kornia.enhance.add_weighted(patches, 1 - a, kornia.enhance.invert(patches), a, 0.0)


@pytest.mark.parametrize("random_order", [False, True])
def test_a_new_operator_class_runs_in_every_engine(random_order: bool) -> None:
    ops = [O.Brightness(0.4, p=0.7), Invert(p=0.6), O.GaussianBlur((0.5, 1.5), p=0.5)]
    x = images(3, b=3)
    jitter = PatchJitter(8, ops, random_order=random_order)
    out, params = jitter(x, return_params=True, generator=torch.Generator().manual_seed(0))
    assert params.ops == ("brightness", "invert", "blur") and "invert" in params.values
    torch.testing.assert_close(out, apply_reference(x, jitter.operators, params), atol=1e-6, rtol=0)
    assert not torch.equal(out, x)
