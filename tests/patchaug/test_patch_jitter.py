"""PatchJitter: identity, confinement, faithfulness to Kornia's ops, replay, validation."""

from __future__ import annotations

import math
from typing import Any

import kornia
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import patchaug.patch_jitter as pj
import patchaug.patch_ops as po
from patchaug.patch_jitter import OPERATORS, PatchJitter, PatchJitterParams

KE = kornia.enhance
TOL = 1e-5

# one configuration per operator with that operator alone, always applied
SOLO: dict[str, dict[str, Any]] = {
    "brightness": dict(brightness=(0.3, 1.7)),
    "contrast": dict(contrast=(0.3, 1.7)),
    "saturation": dict(saturation=(0.0, 2.0)),
    "hue": dict(hue=0.5),
    "grayscale": dict(),
    "posterize": dict(posterize_bits=(0, 8)),
    "solarize": dict(solarize_threshold=(0.2, 0.8)),
    "sharpness": dict(sharpness=(0.0, 3.0)),
    "blur": dict(blur_sigma=(0.1, 3.0), blur_kernel_size=(7, 5)),
    "noise": dict(noise_std=(0.0, 0.3)),
}


def solo(name: str, patch_size: int = 8, p_op: float = 1.0, **extra: Any) -> PatchJitter:
    """A PatchJitter running only ``name``, with probability ``p_op``."""
    kwargs: dict[str, Any] = {f"p_{op}": 0.0 for op in OPERATORS}
    kwargs.update(SOLO[name])
    kwargs[f"p_{name}"] = p_op
    kwargs.update(extra)
    return PatchJitter(patch_size, **kwargs)


def everything(patch_size: int = 8, random_order: bool = True, p: float = 0.9) -> PatchJitter:
    """Every operator at once, each with probability 0.6."""
    kwargs: dict[str, Any] = {f"p_{op}": 0.6 for op in OPERATORS}
    for cfg in SOLO.values():
        kwargs.update(cfg)
    return PatchJitter(patch_size, p=p, random_order=random_order, **kwargs)


CONFIGS = {
    "paper": lambda: PatchJitter.paper(8),
    "authors": lambda: PatchJitter.authors(8),
    "everything_random_order": lambda: everything(),
    "everything_fixed_order": lambda: everything(random_order=False),
}


def images(seed: int, b: int = 2, c: int = 3, gh: int = 2, gw: int = 3, p: int = 8) -> torch.Tensor:
    return torch.rand(b, c, gh * p, gw * p, generator=torch.Generator().manual_seed(seed))


def to_patches(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B * N, C, p, p), written independently of patchaug."""
    b, c, h, w = x.shape
    t = x.unfold(2, p, p).unfold(3, p, p)  # (B, C, gh, gw, p, p)
    return t.permute(0, 2, 3, 1, 4, 5).reshape(-1, c, p, p)


def kornia_op(
    name: str, x: torch.Tensor, v: Any, jitter: PatchJitter, noise: Any = None
) -> torch.Tensor:
    """Reference: Kornia's functional op on (K, C, p, p) with per-patch values ``v``."""
    rgb = x.shape[1] == 3
    if name == "brightness":
        return KE.adjust_brightness_accumulative(x, v)
    if name == "contrast":
        return KE.adjust_contrast_with_mean_subtraction(x, v)
    if name == "saturation":
        return KE.adjust_saturation_with_gray_subtraction(x, v) if rgb else x
    if name == "hue":
        return KE.adjust_hue(x, v * 2 * math.pi) if rgb else x
    if name == "grayscale":
        return kornia.color.rgb_to_grayscale(x).expand_as(x) if rgb else x
    if name == "posterize":
        return KE.posterize(x, v)
    if name == "solarize":
        return KE.solarize(x, v)
    if name == "sharpness":
        return KE.sharpness(x, v)
    if name == "blur":
        return kornia.filters.gaussian_blur2d(
            x,
            jitter.blur_kernel_size,
            torch.stack([v, v], -1).reshape(-1, 2),
            border_type="reflect",
        )
    if name == "noise":
        return (x + v.reshape(-1, 1, 1, 1) * noise).clamp(0, 1)
    raise AssertionError(name)


def reference(
    x: torch.Tensor, jitter: PatchJitter, params: PatchJitterParams, rows: list[int]
) -> torch.Tensor:
    """Per-patch loop: apply the recorded operators to each listed patch on its own."""
    p = jitter.patch_size
    patches = to_patches(x, p)
    gates = {k: v.flatten() for k, v in params.gates.items()}
    values = {k: v.flatten() for k, v in params.values.items()}
    noise_rows = params.noise(x.shape[1], patches.dtype)
    rank = torch.cumsum(gates["noise"], 0) - 1 if "noise" in gates else None
    out = []
    for i in range(patches.shape[0]) if rows is None else rows:
        patch = patches[i : i + 1]
        order = (
            range(len(params.ops))
            if params.order is None
            else params.order.reshape(-1, len(params.ops))[i].tolist()
        )
        for j in order:
            name = params.ops[j]
            if not gates[name][i]:
                continue
            v = values.get(name)
            v = None if v is None else v[i : i + 1]
            nz = noise_rows[rank[i] : rank[i] + 1] if name == "noise" else None
            patch = kornia_op(name, patch, v, jitter, nz)
        out.append(patch)
    return torch.cat(out)


# ----------------------------------------------------------------------------- identity
@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    config=st.sampled_from(sorted(CONFIGS)),
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]),
    c=st.sampled_from([1, 3]),
)
def test_p_zero_is_identity_bit_for_bit(seed: int, config: str, dtype: torch.dtype, c: int) -> None:
    x = images(seed, c=c).to(dtype)
    jitter = CONFIGS[config]()
    jitter.p = 0.0
    out = jitter(x)
    assert out.dtype == dtype
    assert torch.equal(out, x)
    assert out.data_ptr() != x.data_ptr()


def test_p_zero_constructor_argument_is_identity() -> None:
    x = images(0)
    assert torch.equal(PatchJitter(8, p=0.0)(x), x)


def test_no_active_operator_is_identity_with_empty_params() -> None:
    jitter = PatchJitter(8, **{f"p_{op}": 0.0 for op in OPERATORS})
    x = images(0)
    out, params = jitter(x, return_params=True)
    assert jitter.ops == () and params.gates == {} and params.values == {}
    assert torch.equal(out, x)


# ------------------------------------------------------------------------ confinement
@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    config=st.sampled_from(sorted(CONFIGS)),
    target=st.integers(0, 11),
)
def test_perturbing_one_patch_changes_no_other_output_patch(
    seed: int, config: str, target: int
) -> None:
    jitter = CONFIGS[config]()
    x = images(seed)
    out, params = jitter(x, return_params=True)
    b, n = divmod(target, 6)
    r, c = divmod(n, 3)
    y = x.clone()
    y[b, :, r * 8 : (r + 1) * 8, c * 8 : (c + 1) * 8] = torch.rand(3, 8, 8)
    out2 = jitter(y, params=params)
    changed = (to_patches(out2, 8) != to_patches(out, 8)).flatten(1).any(1)
    changed[target] = False
    assert not changed.any()


# ----------------------------------------------------------------- faithful per operator
@settings(max_examples=8, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    name=st.sampled_from(OPERATORS),
    c=st.sampled_from([1, 3]),
)
def test_each_operator_equals_kornia_op_with_recorded_parameter(
    seed: int, name: str, c: int
) -> None:
    jitter = solo(name)
    x = images(seed, c=c)
    g = torch.Generator().manual_seed(seed)
    out, params = jitter(x, return_params=True, generator=g)
    assert params.ops == (name,) and bool(params.gates[name].all())
    patches = to_patches(x, 8)
    v = params.values.get(name)
    v = None if v is None else v.flatten()
    ref = kornia_op(name, patches, v, jitter, params.noise(c))
    torch.testing.assert_close(to_patches(out, 8), ref, atol=TOL, rtol=0)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), name=st.sampled_from(OPERATORS))
def test_ungated_patches_are_untouched_and_gated_ones_follow_kornia(seed: int, name: str) -> None:
    jitter = solo(name, p_op=0.5)
    x = images(seed, b=4)
    out, params = jitter(x, return_params=True, generator=torch.Generator().manual_seed(seed))
    gate = params.gates[name].flatten()
    src, dst = to_patches(x, 8), to_patches(out, 8)
    assert torch.equal(dst[~gate], src[~gate])
    if gate.any():
        v = params.values.get(name)
        v = None if v is None else v.flatten()[gate]
        ref = kornia_op(name, src[gate], v, jitter, params.noise(3))
        torch.testing.assert_close(dst[gate], ref, atol=TOL, rtol=0)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), config=st.sampled_from(sorted(CONFIGS)))
def test_composition_equals_per_patch_kornia_chain_in_recorded_order(
    seed: int, config: str
) -> None:
    jitter = CONFIGS[config]()
    x = images(seed)
    out, params = jitter(x, return_params=True, generator=torch.Generator().manual_seed(seed))
    rows = [0, 4, 7, 11]
    ref = reference(x, jitter, params, rows)
    torch.testing.assert_close(to_patches(out, 8)[rows], ref, atol=TOL, rtol=0)


def test_random_order_draws_different_orders_per_patch() -> None:
    jitter = everything(random_order=True)
    _, params = jitter(
        images(0, b=4), return_params=True, generator=torch.Generator().manual_seed(0)
    )
    order = params.order.reshape(-1, len(params.ops)).long()
    assert torch.equal(order.sort(dim=1).values, torch.arange(len(params.ops)).expand_as(order))
    assert len({tuple(row) for row in order.tolist()}) > 10


def test_fixed_order_follows_operators_tuple() -> None:
    jitter = everything(random_order=False)
    _, params = jitter(images(0), return_params=True)
    assert params.order is None
    assert params.ops == OPERATORS


# ------------------------------------------------------------------ replay, determinism
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), config=st.sampled_from(sorted(CONFIGS)))
def test_replaying_params_reproduces_output_exactly(seed: int, config: str) -> None:
    jitter = CONFIGS[config]()
    x = images(seed)
    out, params = jitter(x, return_params=True)
    again = jitter(x, params=params)
    assert torch.equal(again, out)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), config=st.sampled_from(sorted(CONFIGS)))
def test_same_generator_seed_gives_same_output(seed: int, config: str) -> None:
    jitter = CONFIGS[config]()
    x = images(seed)
    a = jitter(x, generator=torch.Generator().manual_seed(seed))
    b = jitter(x, generator=torch.Generator().manual_seed(seed))
    c = jitter(x, generator=torch.Generator().manual_seed(seed + 1))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_module_generator_is_used_when_call_gives_none() -> None:
    x = images(3)
    a = PatchJitter.paper(8, generator=torch.Generator().manual_seed(5))(x)
    b = PatchJitter.paper(8, generator=torch.Generator().manual_seed(5))(x)
    assert torch.equal(a, b)


def test_global_seed_reproduces_without_generator() -> None:
    x = images(4)
    torch.manual_seed(11)
    a = PatchJitter.paper(8)(x)
    torch.manual_seed(11)
    b = PatchJitter.paper(8)(x)
    assert torch.equal(a, b)


# --------------------------------------------------------------------- params structure
def test_params_are_small_per_patch_tensors_within_ranges() -> None:
    jitter = everything()
    x = images(0, b=3)
    _, params = jitter(x, return_params=True, generator=torch.Generator().manual_seed(0))
    n = 6
    assert params.grid == (2, 3) and params.patch_size == 8
    assert params.applied.shape == (3, n) and params.applied.dtype == torch.bool
    total = params.applied.numel()
    for name in params.ops:
        gate = params.gates[name]
        assert gate.shape == (3, n) and gate.dtype == torch.bool
        assert not (gate & ~params.applied).any()
        total += gate.numel()
    for name, v in params.values.items():
        lo, hi = jitter.ranges[name]
        assert v.shape == (3, n)
        assert bool((v >= lo).all()) and bool((v <= hi).all())
        total += v.numel()
    assert params.values["posterize"].dtype == torch.int64
    assert params.order is not None and params.order.shape == (3, n, len(params.ops))
    total += params.order.numel()
    # per patch: 1 overall gate, one gate per operator, one value per operator but grayscale,
    # one order slot per operator; no pixel-sized tensor
    assert total == 3 * n * (1 + 10 + 9 + 10)
    assert total < x.numel() / 5
    assert isinstance(params.noise_seed, int)


def test_gate_frequencies_match_probabilities() -> None:
    jitter = PatchJitter(
        4,
        p=0.7,
        p_brightness=0.5,
        p_hue=0.25,
        p_blur=0.9,
        p_contrast=0.0,
        p_saturation=0.0,
        p_solarize=0.0,
        p_noise=0.0,
        blur_kernel_size=3,
    )
    _, params = jitter(
        torch.rand(8, 3, 64, 64), return_params=True, generator=torch.Generator().manual_seed(0)
    )
    assert abs(params.applied.float().mean().item() - 0.7) < 0.03
    for name, prob in (("brightness", 0.5), ("hue", 0.25), ("blur", 0.9)):
        assert abs(params.gates[name].float().mean().item() - 0.7 * prob) < 0.03


def test_params_to_moves_every_tensor() -> None:
    _, params = everything()(images(0), return_params=True)
    moved = params.to("cpu")
    assert moved.noise_seed == params.noise_seed
    assert torch.equal(moved.values["hue"], params.values["hue"])


def test_noise_regeneration_has_one_sample_per_gated_patch() -> None:
    jitter = solo("noise", p_op=0.5)
    _, params = jitter(images(1, b=4), return_params=True)
    noise = params.noise(3)
    assert noise.shape == (int(params.gates["noise"].sum()), 3, 8, 8)
    assert torch.equal(noise, params.noise(3))


# ------------------------------------------------------------------- dtype, device, shapes
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_output_dtype_and_device_follow_input(dtype: torch.dtype) -> None:
    x = images(0).to(dtype)
    out, params = PatchJitter.paper(8)(x, return_params=True)
    assert out.dtype == dtype and out.device == x.device and out.shape == x.shape
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert params.applied.device == x.device
    # the half-precision result is the float32 result rounded once
    if dtype in (torch.float16, torch.bfloat16):
        ref = PatchJitter.paper(8)(x.float(), params=params).to(dtype)
        assert torch.equal(out, ref)


def test_device_of_output_params_and_generator_follow_input() -> None:
    # on CUDA where available, else on the CPU: the same checks
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    x = images(0).to(device)
    g = torch.Generator(device=device).manual_seed(0)
    jitter = PatchJitter.authors(8)  # no noise: CUDA and CPU generators draw different noise
    out, params = jitter(x, return_params=True, generator=g)
    assert out.device == x.device and params.applied.device == x.device
    assert all(v.device == x.device for v in params.values.values())
    cpu_out = jitter(x.cpu(), params=params.to("cpu"))
    torch.testing.assert_close(out.cpu(), cpu_out, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["hue", "saturation", "grayscale"])
def test_colour_only_operators_leave_one_channel_images_unchanged(name: str) -> None:
    x = images(0, c=1)
    assert torch.equal(solo(name)(x), x)


def test_one_channel_images_are_augmented() -> None:
    x = images(0, c=1)
    out = PatchJitter.paper(8)(x)
    assert out.shape == x.shape and not torch.equal(out, x)


def test_single_image_matches_batch_of_one() -> None:
    x = images(0, b=1)
    jitter = everything()
    out, params = jitter(x[0], return_params=True)
    assert out.shape == x.shape[1:]
    assert params.applied.shape == (1, 6)
    assert torch.equal(out, jitter(x, params=params)[0])


def test_works_inside_torchvision_v2_pipeline() -> None:
    v2 = pytest.importorskip("torchvision.transforms.v2")
    tv_tensors = pytest.importorskip("torchvision.tv_tensors")
    img = (torch.rand(3, 32, 48) * 255).to(torch.uint8)
    pipeline = v2.Compose(
        [v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True), PatchJitter.authors(16)]
    )
    out = pipeline(tv_tensors.Image(img))
    assert isinstance(out, tv_tensors.Image)
    assert out.shape == (3, 32, 48) and out.dtype == torch.float32
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    assert not torch.equal(out.as_subclass(torch.Tensor), img.float() / 255)


def test_input_that_requires_grad_is_augmented_without_tracking() -> None:
    x = images(0).requires_grad_()
    out = PatchJitter.paper(8)(x, generator=torch.Generator().manual_seed(0))
    assert not out.requires_grad
    same = PatchJitter.paper(8)(x.detach(), generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, same)


def test_clamp_input_clamps_instead_of_raising() -> None:
    x = images(0) * 1.2 - 0.1
    out = PatchJitter(8, p=0.0, clamp_input=True)(x)
    assert torch.equal(out, x.clamp(0, 1))


# ------------------------------------------------------------------------------ presets
def test_paper_preset_is_the_default_and_names_the_paper_operators() -> None:
    paper = PatchJitter.paper(16)
    assert paper.ops == ("brightness", "contrast", "saturation", "hue", "solarize", "blur", "noise")
    assert paper.ranges == PatchJitter(16).ranges and paper.probs == PatchJitter(16).probs
    assert paper.ranges["brightness"] == (0.6, 1.4) and paper.ranges["hue"] == (-0.1, 0.1)
    assert paper.probs["hue"] == 0.8 and paper.probs["solarize"] == 0.2
    assert paper.ranges["blur"] == (0.1, 2.0) and paper.blur_kernel_size == (13, 13)
    assert not paper.random_order


def test_authors_preset_matches_their_branch() -> None:
    a = PatchJitter.authors(16)
    assert a.ops == ("brightness", "hue", "posterize", "sharpness", "blur")
    assert a.ranges["brightness"] == (0.9, 1.1) and a.ranges["hue"] == (-0.1, 0.1)
    assert a.ranges["posterize"] == (3, 3) and a.probs["posterize"] == 0.5
    assert a.ranges["sharpness"] == (2.0, 2.0) and a.probs["sharpness"] == 0.5
    assert a.blur_kernel_size == (5, 1) and a.probs["blur"] == 1.0
    assert a.random_order


def test_authors_blur_is_vertical() -> None:
    jitter = solo("blur", patch_size=8, blur_kernel_size=(5, 1))
    x = torch.rand(1, 3, 1, 8).expand(1, 3, 8, 8).contiguous()  # constant along H
    assert torch.allclose(jitter(x), x, atol=1e-6)


def test_preset_overrides_replace_values() -> None:
    assert PatchJitter.paper(16, p_noise=0.0).ops[-1] == "blur"


# --------------------------------------------------------------------------- bad input
BAD_IMAGES = [
    (torch.rand(1, 3, 20, 16), ValueError, "images"),
    (torch.rand(1, 2, 16, 16), ValueError, "channels"),
    (torch.rand(16, 16), ValueError, "images"),
    ((torch.rand(1, 3, 16, 16) * 255).to(torch.uint8), TypeError, "images"),
    (torch.full((1, 3, 16, 16), float("nan")), ValueError, "NaN"),
    (torch.full((1, 3, 16, 16), 1.5), ValueError, r"\[0, 1\]"),
    ([[0.5]], TypeError, "images"),
]


@pytest.mark.parametrize(("x", "error", "match"), BAD_IMAGES)
def test_bad_images_raise_naming_the_argument(x: Any, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        PatchJitter(16)(x)


BAD_ARGS = [
    (dict(p=1.5), ValueError, "p"),
    (dict(p=float("nan")), ValueError, "p"),
    (dict(p_hue=-0.1), ValueError, "p_hue"),
    (dict(p_blur="0.5"), TypeError, "p_blur"),
    (dict(hue=0.7), ValueError, "hue"),
    (dict(hue=(-0.6, 0.1)), ValueError, "hue"),
    (dict(brightness=-1.0), ValueError, "brightness"),
    (dict(contrast=(1.5, 0.5)), ValueError, "contrast"),
    (dict(saturation=(0.5,)), TypeError, "saturation"),
    (dict(posterize_bits=9, p_posterize=0.5), ValueError, "posterize_bits"),
    (dict(posterize_bits=2.5), TypeError, "posterize_bits"),
    (dict(blur_kernel_size=4), ValueError, "blur_kernel_size"),
    (dict(blur_kernel_size=33), ValueError, "blur_kernel_size"),
    (dict(blur_sigma=(0.0, 1.0)), ValueError, "blur_sigma"),
    (dict(noise_std=(0.0, 2.0)), ValueError, "noise_std"),
    (dict(solarize_threshold=1.5), ValueError, "solarize_threshold"),
    (dict(sharpness=-1.0, p_sharpness=0.5), ValueError, "sharpness"),
    (dict(random_order=1), TypeError, "random_order"),
    (dict(generator=0), TypeError, "generator"),
]


@pytest.mark.parametrize(("kwargs", "error", "match"), BAD_ARGS)
def test_bad_arguments_raise_naming_the_argument(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        PatchJitter(16, **kwargs)


@pytest.mark.parametrize(
    ("patch_size", "error"), [(0, ValueError), (2.5, TypeError), (True, TypeError)]
)
def test_bad_patch_size_raises(patch_size: Any, error: type) -> None:
    with pytest.raises(error, match="patch_size"):
        PatchJitter(patch_size)


def test_sharpness_needs_patches_of_three_pixels() -> None:
    with pytest.raises(ValueError, match="patch_size"):
        PatchJitter(2, p_sharpness=0.5, blur_kernel_size=3)


def test_mismatched_params_are_rejected() -> None:
    jitter = PatchJitter.paper(8)
    _, params = jitter(images(0), return_params=True)
    with pytest.raises(ValueError, match="params"):
        jitter(images(0, b=3), params=params)
    with pytest.raises(ValueError, match="params"):
        jitter(images(0, gw=2), params=params)
    with pytest.raises(ValueError, match="params"):
        PatchJitter.authors(8)(images(0), params=params)
    with pytest.raises(TypeError, match="params"):
        jitter(images(0), params={"applied": params.applied})


def test_generator_on_another_device_type_is_rejected() -> None:
    # a CPU generator cannot draw on another device (meta here, CUDA in practice)
    with pytest.raises(ValueError, match="generator"):
        PatchJitter(8).sample_params(1, 16, 16, device="meta", generator=torch.Generator())


# ----------------------------------------------------------------- block-wise processing
def _run_in_blocks(
    jitter: PatchJitter, x: torch.Tensor, params: PatchJitterParams, patches_per_block: int
) -> torch.Tensor:
    """``jitter(x, params=params)`` with the CPU blocks forced to ``patches_per_block``."""
    pixels = patches_per_block * jitter.patch_size**2
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pj, "_CPU_BLOCK_PIXELS", pixels)
        mp.setattr(pj, "_CPU_LARGE_BLOCK_PIXELS", pixels)
        # and hue rotated two patches at a time (several chunks per block)
        mp.setattr(po, "_CPU_BLOCK_PIXELS", 2 * jitter.patch_size**2)
        mp.setattr(po, "_CPU_LARGE_BLOCK_PIXELS", 2 * jitter.patch_size**2)
        return jitter(x, params=params)


@settings(max_examples=12, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    config=st.sampled_from(sorted(CONFIGS)),
    c=st.sampled_from([1, 3]),
)
def test_block_sizes_do_not_change_the_output(seed: int, config: str, c: int) -> None:
    # 4 images of 3 x 2 patches: blocks of one patch row, of two rows (4 + 2 patches: blocks of
    # unequal size), of whole images, of several images, and a single block
    jitter = CONFIGS[config]()
    x = images(seed, b=4, c=c, gh=3, gw=2)
    out, params = jitter(x, return_params=True, generator=torch.Generator().manual_seed(seed))
    whole = _run_in_blocks(jitter, x, params, 10**6)
    torch.testing.assert_close(whole, out, atol=0, rtol=0)
    for per_block in (1, 4, 6, 13):
        got = _run_in_blocks(jitter, x, params, per_block)
        torch.testing.assert_close(got, whole, atol=1e-6, rtol=0)
    if c == 3:  # and faithful to the per-patch Kornia chain
        rows = [0, 5, 13, 23]
        ref = reference(x, jitter, params, rows)
        got = to_patches(_run_in_blocks(jitter, x, params, 4), 8)[rows]
        torch.testing.assert_close(got, ref, atol=TOL, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_block_wise_processing_keeps_dtype_and_untouched_patches(dtype: torch.dtype) -> None:
    jitter = everything(p=0.5)
    x = images(3, b=3).to(dtype)
    out, params = jitter(x, return_params=True, generator=torch.Generator().manual_seed(3))
    got = _run_in_blocks(jitter, x, params, 2)
    assert got.dtype == dtype and got.is_contiguous()
    torch.testing.assert_close(got, out, atol=1e-3 if dtype == torch.float16 else 1e-12, rtol=0)
    untouched = ~params.applied.flatten()
    assert untouched.any()
    assert torch.equal(to_patches(got, 8)[untouched], to_patches(x, 8)[untouched])


@pytest.mark.parametrize("per_block", [1, 6, 10**6])
def test_value_range_is_checked_in_every_block(per_block: int) -> None:
    jitter = PatchJitter.paper(8)
    x = images(0, b=3)
    params = jitter.sample_params(3, 16, 24, generator=torch.Generator().manual_seed(0))
    bad = x.clone()
    bad[2, 1, 15, 23] = float("nan")  # in the last patch of the last image
    with pytest.raises(ValueError, match="NaN"):
        _run_in_blocks(jitter, bad, params, per_block)
    bad[2, 1, 15, 23] = 1.5
    bad[1, 0, 0, 0] = -0.25
    with pytest.raises(ValueError, match=r"min -0.25 and max 1.5"):
        _run_in_blocks(jitter, bad, params, per_block)
    clamping = PatchJitter.paper(8, clamp_input=True)
    expected = jitter(bad.clamp(0, 1), params=params)
    torch.testing.assert_close(
        _run_in_blocks(clamping, bad, params, per_block), expected, atol=1e-6, rtol=0
    )


def test_bad_values_fail_before_any_random_draw() -> None:
    jitter = PatchJitter.paper(8)
    bad = images(0, b=2)
    bad[1, 2, 15, 15] = float("nan")
    gen = torch.Generator().manual_seed(3)
    state = gen.get_state()
    with pytest.raises(ValueError, match="NaN"):
        jitter(bad, generator=gen)
    assert torch.equal(gen.get_state(), state)
    bad[1, 2, 15, 15] = 2.0
    with pytest.raises(ValueError, match="expected values in"):
        jitter(bad, generator=gen)
    assert torch.equal(gen.get_state(), state)


def test_bad_values_leave_the_global_and_the_module_generator_as_they_were() -> None:
    bad = images(0, b=2)
    bad[0, 0, 3, 3] = -1.0
    torch.manual_seed(5)
    state = torch.get_rng_state()
    with pytest.raises(ValueError, match="expected values in"):
        PatchJitter.paper(8)(bad)
    assert torch.equal(torch.get_rng_state(), state)
    gen = torch.Generator().manual_seed(9)
    state = gen.get_state()
    with pytest.raises(ValueError, match="expected values in"):
        PatchJitter.paper(8, generator=gen)(bad)
    assert torch.equal(gen.get_state(), state)


def test_clamp_input_draws_as_for_the_clamped_images() -> None:
    bad = images(1, b=2)
    bad[1, 2, 0, 9] = 1.75
    bad[0, 1, 12, 2] = -0.5
    got = PatchJitter.paper(8, clamp_input=True)(bad, generator=torch.Generator().manual_seed(4))
    want = PatchJitter.paper(8)(bad.clamp(0, 1), generator=torch.Generator().manual_seed(4))
    assert torch.equal(got, want)


@pytest.mark.parametrize(
    ("batch", "rows", "cols", "target"),
    [
        (1, 1, 1, 1),
        (3, 2, 3, 1),
        (3, 2, 3, 4),
        (3, 2, 3, 6),
        (5, 2, 3, 13),
        (2, 7, 5, 11),
        (4, 3, 3, None),
    ],
)
def test_blocks_cover_every_patch_once_in_order(
    batch: int, rows: int, cols: int, target: int | None
) -> None:
    p = 4
    blocks = pj._blocks(batch, rows, cols, p, target)
    x = torch.arange(batch * rows * p * cols * p, dtype=torch.float64).reshape(
        batch, 1, rows * p, cols * p
    )
    patches = to_patches(x, p)
    assert blocks[0][0] == 0 and blocks[-1][1] == batch * rows * cols
    for (start, stop, images_, pixel_rows), nxt in zip(blocks, blocks[1:] + [None]):
        assert stop > start and (nxt is None or nxt[0] == stop)
        assert stop - start <= blocks[0][1] - blocks[0][0]
        if target is not None and stop - start > target:
            assert stop - start == cols  # never more than one patch row above the target
        # the block's pixels are exactly its patches, in patch order
        assert torch.equal(to_patches(x[images_, :, pixel_rows], p), patches[start:stop])


def test_block_size_depends_on_device_and_threads() -> None:
    assert pj._block_patches(torch.device("cuda"), 16) is None
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = pj._block_patches(torch.device("cpu"), 16)
        torch.set_num_threads(2)
        two = pj._block_patches(torch.device("cpu"), 16)
    finally:
        torch.set_num_threads(threads)
    assert one is not None and two is not None and 1 <= one <= two


def test_torch_compile_runs_the_module_eagerly_without_recompiling() -> None:
    # the gated subsets change shape every call: compiled, each call would recompile
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    jitter = PatchJitter.paper(8)
    compiled = torch.compile(jitter, backend=counter)
    for seed in range(3):
        x = images(seed)
        params = jitter.sample_params(2, 16, 24, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(compiled(x, params=params), jitter(x, params=params))
    assert counter.frame_count == 0


# ------------------------------------------------------------------ scratch between calls
def test_cpu_scratch_is_kept_and_reused_between_calls() -> None:
    jitter = PatchJitter.paper(8)
    x = images(0, b=3)
    params = jitter.sample_params(3, 16, 24, generator=torch.Generator().manual_seed(0))
    first = jitter(x, params=params)
    (ws,) = jitter._workspaces
    arena = ws._buffers["arena"].data_ptr()
    assert torch.equal(jitter(x, params=params), first)
    assert jitter._workspaces == [ws] and ws._buffers["arena"].data_ptr() == arena


def test_scratch_is_neither_pickled_nor_deep_copied() -> None:
    import copy
    import pickle

    jitter = PatchJitter.paper(8)
    x = images(1)
    params = jitter.sample_params(2, 16, 24, generator=torch.Generator().manual_seed(1))
    out = jitter(x, params=params)
    assert jitter._workspaces  # filled by the call
    for clone in (pickle.loads(pickle.dumps(jitter)), copy.deepcopy(jitter)):
        assert clone._workspaces == []
        assert torch.equal(clone(x, params=params), out)


def test_concurrent_calls_from_threads_do_not_share_scratch() -> None:
    from concurrent.futures import ThreadPoolExecutor

    jitter = PatchJitter.authors(8)  # random order: the most scratch in use
    cases = []
    for seed in range(8):
        x = images(seed, b=3)
        params = jitter.sample_params(3, 16, 24, generator=torch.Generator().manual_seed(seed))
        cases.append((x, params, jitter(x, params=params)))
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda case: jitter(case[0], params=case[1]), cases * 4))
    for (_, _, want), got in zip(cases * 4, outs):
        assert torch.equal(got, want)


def test_noise_out_buffer_is_checked_and_gives_the_same_rows() -> None:
    params = PatchJitter.paper(8).sample_params(2, 16, 24, generator=torch.Generator().manual_seed(2))
    rows = params.noise(3)
    assert torch.equal(params.noise(3, out=torch.empty(rows.numel() + 5)), rows)
    with pytest.raises(TypeError, match="out"):
        params.noise(3, out=[0.0])
    with pytest.raises(ValueError, match="out"):
        params.noise(3, out=torch.empty(rows.numel() - 1))
    with pytest.raises(ValueError, match="out"):
        params.noise(3, out=torch.empty(rows.numel(), dtype=torch.float64))
