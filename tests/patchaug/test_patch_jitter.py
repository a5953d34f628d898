"""PatchJitter: identity, confinement, faithfulness to Kornia, replay, Kornia and nn.Module
integration, input policy."""

from __future__ import annotations

import copy
import pickle
from typing import Any

import kornia.augmentation as K
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from patchaug import operators as O
from patchaug.patch_jitter import PatchJitter, PatchJitterParams, apply_reference

from .jitter_cases import (
    CONFIGS,
    NAMES,
    TOL,
    everything,
    images,
    kornia_chain,
    solo,
    to_patches,
)


# ----------------------------------------------------------------------------- identity
@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    config=st.sampled_from(sorted(CONFIGS)),
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]),
    c=st.sampled_from([1, 3]),
    which=st.sampled_from(["p", "p_patch"]),
)
def test_probability_zero_is_identity_bit_for_bit(
    seed: int, config: str, dtype: torch.dtype, c: int, which: str
) -> None:
    x = images(seed, c=c).to(dtype)
    out = CONFIGS[config](**{which: 0.0})(x)
    assert out.dtype == dtype
    assert torch.equal(out, x)
    assert out.data_ptr() != x.data_ptr()


def test_no_operator_is_identity_with_empty_params() -> None:
    x = images(0)
    out, params = PatchJitter(8, [])(x, return_params=True)
    assert params.ops == () and params.gates == {} and params.values == {}
    assert torch.equal(out, x)


def test_operators_with_probability_zero_are_dropped() -> None:
    jitter = PatchJitter(8, [O.Brightness(0.4, p=0.0), O.Hue(0.1, p=0.5)])
    assert jitter.ops == ("hue",)


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


# ------------------------------------------------------------- faithful to Kornia, per patch
@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), name=st.sampled_from(NAMES), c=st.sampled_from([1, 3]))
def test_each_operator_equals_kornia_with_the_recorded_parameter(
    seed: int, name: str, c: int
) -> None:
    jitter = solo(name)
    x = images(seed, c=c)
    out, params = jitter(x, return_params=True, generator=torch.Generator().manual_seed(seed))
    assert params.ops == (name,) and bool(params.gates[name].all())
    ref = kornia_chain(x, jitter, params, list(range(12)))
    torch.testing.assert_close(to_patches(out, 8), ref, atol=TOL, rtol=0)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), name=st.sampled_from(NAMES))
def test_ungated_patches_are_untouched(seed: int, name: str) -> None:
    jitter = solo(name, p_op=0.5)
    x = images(seed, b=4)
    out, params = jitter(x, return_params=True, generator=torch.Generator().manual_seed(seed))
    gate = params.gates[name].flatten()
    assert torch.equal(to_patches(out, 8)[~gate], to_patches(x, 8)[~gate])


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), config=st.sampled_from(sorted(CONFIGS)))
def test_composition_equals_the_per_patch_kornia_chain_in_recorded_order(
    seed: int, config: str
) -> None:
    jitter = CONFIGS[config]()
    x = images(seed)
    out, params = jitter(x, return_params=True, generator=torch.Generator().manual_seed(seed))
    rows = [0, 4, 7, 11]
    ref = kornia_chain(x, jitter, params, rows)
    torch.testing.assert_close(to_patches(out, 8)[rows], ref, atol=TOL, rtol=0)


def test_random_order_draws_different_orders_per_patch() -> None:
    jitter = everything(random_order=True)
    _, params = jitter(images(0, b=4), return_params=True)
    order = params.order.reshape(-1, len(params.ops)).long()
    assert torch.equal(order.sort(dim=1).values, torch.arange(len(params.ops)).expand_as(order))
    assert len({tuple(row) for row in order.tolist()}) > 10


def test_fixed_order_follows_the_operator_list() -> None:
    jitter = everything(random_order=False)
    _, params = jitter(images(0), return_params=True)
    assert params.order is None and params.ops == NAMES


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_backends_give_the_same_output(backend: str) -> None:
    x = images(5, b=3)
    for config in CONFIGS:
        params = CONFIGS[config]().sample_params(3, 16, 24, generator=torch.Generator().manual_seed(1))
        want = CONFIGS[config]()(x, params=params)
        got = CONFIGS[config](backend=backend)(x, params=params)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_auto_runs_the_torch_engine_on_the_cpu() -> None:
    x = images(0)
    assert PatchJitter.paper(8)._engine(x) == "torch"
    assert PatchJitter.paper(8, backend="reference")._engine(x) == "reference"


# ------------------------------------------------------------------ replay, determinism
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), config=st.sampled_from(sorted(CONFIGS)))
def test_replaying_params_reproduces_output_exactly(seed: int, config: str) -> None:
    jitter = CONFIGS[config]()
    x = images(seed)
    out, params = jitter(x, return_params=True)
    assert torch.equal(jitter(x, params=params), out)
    assert torch.equal(jitter(x, params=jitter._params), out)  # Kornia's way


def test_same_generator_seed_gives_same_output() -> None:
    for config in CONFIGS:
        x = images(7)
        a = CONFIGS[config]()(x, generator=torch.Generator().manual_seed(7))
        b = CONFIGS[config]()(x, generator=torch.Generator().manual_seed(7))
        c = CONFIGS[config]()(x, generator=torch.Generator().manual_seed(8))
        assert torch.equal(a, b) and not torch.equal(a, c)


def test_module_generator_is_used_when_the_call_gives_none() -> None:
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


# ----------------------------------------------------------------------- Kornia integration
def test_is_a_kornia_intensity_augmentation() -> None:
    assert isinstance(PatchJitter.paper(16), K.IntensityAugmentationBase2D)


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_replays_inside_augmentation_sequential_with_boxes_unchanged(config: str) -> None:
    seq = K.AugmentationSequential(
        K.ColorJiggle(0.2, 0.2, 0.2, 0.05, p=1.0),
        CONFIGS[config](),
        data_keys=["input", "bbox_xyxy"],
    )
    x = images(2, b=3)
    boxes = torch.tensor([[[1.0, 2.0, 10.0, 12.0]], [[0.0, 0.0, 5.0, 5.0]], [[3.0, 1.0, 7.0, 9.0]]])
    out, out_boxes = seq(x, boxes)
    assert out.shape == x.shape and not torch.equal(out, x)
    torch.testing.assert_close(out_boxes, boxes)
    again, again_boxes = seq(x, boxes, params=seq._params)
    assert torch.equal(again, out)
    torch.testing.assert_close(again_boxes, boxes)


def test_kornia_params_are_a_flat_dict_of_tensors() -> None:
    jitter = PatchJitter.paper(8)
    jitter(images(0))
    assert jitter._params and all(isinstance(v, torch.Tensor) for v in jitter._params.values())
    assert jitter._params["batch_prob"].shape == (2,)
    seq = K.AugmentationSequential(PatchJitter.paper(8))
    params = seq.forward_parameters(torch.Size((2, 3, 16, 24)))
    assert params[0].data["applied"].shape == (2, 6)


def test_image_probability_gates_whole_images() -> None:
    jitter = PatchJitter.paper(8, p=0.5, generator=torch.Generator().manual_seed(0))
    x = images(1, b=64, gh=1, gw=1)
    out, params = jitter(x, return_params=True)
    augmented = params.applied.any(dim=1)
    assert 10 < int(augmented.sum()) < 54
    assert torch.equal(out[~augmented], x[~augmented])


# --------------------------------------------------------------------- nn.Module behaviour
def test_moves_with_to_cpu_half_and_inside_sequential() -> None:
    jitter = PatchJitter.paper(8)
    model = torch.nn.Sequential(jitter)
    assert model.cpu() is model and model.to("cpu") is model
    assert jitter.to(torch.float64) is jitter and model.half() is model and model.float() is model
    out = model(images(0))
    assert out.shape == (2, 3, 16, 24)


def test_state_dict_pickle_and_deepcopy_keep_behaviour() -> None:
    jitter = PatchJitter.authors(8, generator=None)
    x = images(1)
    params = jitter.sample_params(2, 16, 24, generator=torch.Generator().manual_seed(1))
    out = jitter(x, params=params)
    assert jitter.state_dict() == {}
    holder = torch.nn.Sequential(jitter)
    for clone in (pickle.loads(pickle.dumps(holder)), copy.deepcopy(holder)):
        assert torch.equal(clone[0](x, params=params), out)
        assert clone[0].operators == jitter.operators
    holder.load_state_dict(holder.state_dict())


# ------------------------------------------------------------------ params structure
def test_params_are_small_per_patch_tensors_within_ranges() -> None:
    jitter = everything()
    x = images(0, b=3)
    _, params = jitter(x, return_params=True, generator=torch.Generator().manual_seed(0))
    n = 6
    assert params.grid == (2, 3) and params.patch_size == 8
    assert params.applied.shape == (3, n) and params.applied.dtype == torch.bool
    for op in jitter.operators:
        gate = params.gates[op.name]
        assert gate.shape == (3, n) and gate.dtype == torch.bool
        assert not (gate & ~params.applied).any()
        if op.has_parameter:
            v = params.values[op.name]
            assert v.shape == (3, n) and bool((v >= op.low).all()) and bool((v <= op.high).all())
    assert "grayscale" not in params.values
    assert params.order is not None and params.order.shape == (3, n, len(params.ops))
    assert isinstance(params.noise_seed, int)
    assert len(repr(params)) < 300


def test_gate_frequencies_match_probabilities() -> None:
    ops = [O.Brightness(0.4, p=0.5), O.Hue(0.1, p=0.25), O.GaussianBlur(1.0, 3, p=0.9)]
    jitter = PatchJitter(4, ops, p_patch=0.7)
    _, params = jitter(
        torch.rand(8, 3, 64, 64), return_params=True, generator=torch.Generator().manual_seed(0)
    )
    assert abs(params.applied.float().mean().item() - 0.7) < 0.03
    for name, prob in (("brightness", 0.5), ("hue", 0.25), ("blur", 0.9)):
        assert abs(params.gates[name].float().mean().item() - 0.7 * prob) < 0.03


def test_params_round_trip_through_the_kornia_dict() -> None:
    jitter = everything()
    _, params = jitter(images(0), return_params=True)
    back = PatchJitterParams.from_dict(params.as_dict(), 8, (2, 3), params.ops)
    assert back.noise_seed == params.noise_seed and back.ops == params.ops
    assert all(torch.equal(back.values[k], v) for k, v in params.values.items())
    assert torch.equal(back.order, params.order)


def test_noise_regeneration_has_one_sample_per_gated_patch() -> None:
    jitter = solo("noise", p_op=0.5)
    _, params = jitter(images(1, b=4), return_params=True)
    noise = params.noise(3)
    assert noise.shape == (int(params.gates["noise"].sum()), 3, 8, 8)
    assert torch.equal(noise, params.noise(3))
    assert torch.equal(params.noise(3, out=torch.empty(noise.numel() + 5)), noise)
    with pytest.raises(TypeError, match="out"):
        params.noise(3, out=[0.0])
    with pytest.raises(ValueError, match="out"):
        params.noise(3, out=torch.empty(noise.numel() - 1))


# ------------------------------------------------------------------- dtype, device, shapes
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_output_dtype_and_device_follow_input(dtype: torch.dtype) -> None:
    x = images(0).to(dtype)
    out, params = PatchJitter.paper(8)(x, return_params=True)
    assert out.dtype == dtype and out.device == x.device and out.shape == x.shape
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert params.applied.device == x.device
    if dtype in (torch.float16, torch.bfloat16):  # the float32 result rounded once
        ref = PatchJitter.paper(8)(x.float(), params=params).to(dtype)
        assert torch.equal(out, ref)


def test_one_channel_images_are_augmented() -> None:
    x = images(0, c=1)
    out = PatchJitter.paper(8)(x)
    assert out.shape == x.shape and not torch.equal(out, x)


def test_single_image_keeps_its_shape_and_matches_a_batch_of_one() -> None:
    x = images(0, b=1)
    jitter = everything()
    out, params = jitter(x[0], return_params=True)
    assert out.shape == x.shape[1:]
    assert params.applied.shape == (1, 6)
    assert torch.equal(out, jitter(x, params=params)[0])
    assert PatchJitter.paper(8, keepdim=False)(x[0]).shape == x.shape


def test_empty_batch_gives_an_empty_batch() -> None:
    x = torch.rand(0, 3, 16, 24)
    out, params = PatchJitter.paper(8)(x, return_params=True)
    assert out.shape == x.shape and params.applied.shape == (0, 6)


def test_works_inside_torchvision_v2_pipelines() -> None:
    from PIL import Image
    from torchvision import tv_tensors
    from torchvision.transforms import v2

    img = (torch.rand(3, 32, 48) * 255).to(torch.uint8)
    pipeline = v2.Compose(
        [v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True), PatchJitter.authors(16)]
    )
    out = pipeline(tv_tensors.Image(img))
    assert isinstance(out, tv_tensors.Image)
    assert out.shape == (3, 32, 48) and out.dtype == torch.float32
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    pil = Image.fromarray(img.permute(1, 2, 0).numpy())
    from_pil = v2.Compose(
        [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), PatchJitter.paper(16)]
    )(pil)
    assert from_pil.shape == (3, 32, 48)


# ----------------------------------------------------------------------- input policy
def test_values_slightly_outside_the_unit_range_are_clamped_by_default() -> None:
    # bicubic resampling (DINO's crops) overshoots [0, 1] slightly
    x = images(0) * 1.04 - 0.02
    g = torch.Generator().manual_seed(4)
    got = PatchJitter.paper(8)(x, generator=g)
    want = PatchJitter.paper(8)(x.clamp(0, 1), generator=torch.Generator().manual_seed(4))
    assert torch.equal(got, want)
    assert torch.equal(PatchJitter.paper(8, p=0.0)(x), x.clamp(0, 1))


def test_clamp_input_false_rejects_values_outside_before_any_draw() -> None:
    bad = images(0)
    bad[1, 2, 15, 15] = 2.0
    gen = torch.Generator().manual_seed(3)
    state = gen.get_state()
    torch.manual_seed(5)
    global_state = torch.get_rng_state()
    with pytest.raises(ValueError, match=r"expected values in \[0, 1\].*clamp_input"):
        PatchJitter.paper(8, clamp_input=False)(bad, generator=gen)
    with pytest.raises(ValueError, match="expected values in"):
        PatchJitter.paper(8, clamp_input=False)(bad)
    assert torch.equal(gen.get_state(), state)
    assert torch.equal(torch.get_rng_state(), global_state)


def test_input_that_requires_grad_raises_instead_of_detaching() -> None:
    x = images(0).requires_grad_()
    with pytest.raises(ValueError, match="not differentiable"):
        PatchJitter.paper(8)(x)
    with torch.no_grad():
        assert PatchJitter.paper(8)(x).shape == x.shape


BAD_IMAGES = [
    (torch.rand(1, 3, 20, 16), ValueError, "images"),
    (torch.rand(1, 2, 16, 16), ValueError, "channels"),
    (torch.rand(16, 16), ValueError, "images"),
    ((torch.rand(1, 3, 16, 16) * 255).to(torch.uint8), TypeError, "images"),
    (torch.full((1, 3, 16, 16), float("nan")), ValueError, "NaN"),
    (torch.full((1, 3, 16, 16), float("inf")), ValueError, "infinite"),
    ([[0.5]], TypeError, "images"),
]


@pytest.mark.parametrize(("x", "error", "match"), BAD_IMAGES)
def test_bad_images_raise_naming_the_argument(x: Any, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        PatchJitter.paper(16)(x)


BAD_ARGS = [
    (dict(p=1.5), ValueError, "p"),
    (dict(p_patch=float("nan")), ValueError, "p_patch"),
    (dict(random_order=1), TypeError, "random_order"),
    (dict(clamp_input="yes"), TypeError, "clamp_input"),
    (dict(generator=0), TypeError, "generator"),
    (dict(backend="cuda"), ValueError, "backend"),
    (dict(operators=["brightness"]), TypeError, "operators"),
    (dict(operators=[O.Hue(0.1), O.Hue(0.2)]), ValueError, "unique"),
]


@pytest.mark.parametrize(("kwargs", "error", "match"), BAD_ARGS)
def test_bad_arguments_raise_naming_the_argument(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        PatchJitter(16, **kwargs)


@pytest.mark.parametrize(("patch_size", "error"), [(0, ValueError), (2.5, TypeError), (True, TypeError)])
def test_bad_patch_size_raises(patch_size: Any, error: type) -> None:
    with pytest.raises(error, match="patch_size"):
        PatchJitter(patch_size)


@pytest.mark.parametrize("generator", [42, "cpu", torch.device("cpu")])
def test_a_generator_that_is_not_one_raises_naming_it(generator: Any) -> None:
    with pytest.raises(TypeError, match="generator"):
        PatchJitter.paper(8)(images(0), generator=generator)


def test_mismatched_params_are_rejected() -> None:
    jitter = PatchJitter.paper(8)
    _, params = jitter(images(0), return_params=True)
    with pytest.raises(ValueError, match="params"):
        jitter(images(0, b=3), params=params)
    with pytest.raises(ValueError, match="params"):
        jitter(images(0, gw=2), params=params)
    with pytest.raises(ValueError, match="params"):
        PatchJitter.authors(8)(images(0), params=params)
    with pytest.raises(ValueError, match="params"):
        jitter(images(0), params={"applied": params.applied})
    with pytest.raises(TypeError, match="params"):
        jitter(images(0), params=[params.applied])


def test_generator_on_another_device_type_is_rejected() -> None:
    with pytest.raises(ValueError, match="generator"):
        PatchJitter.paper(8).sample_params(1, 16, 16, device="meta", generator=torch.Generator())


def test_torch_compile_runs_the_module_eagerly_without_recompiling() -> None:
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    jitter = PatchJitter.paper(8)
    compiled = torch.compile(jitter, backend=counter)
    for seed in range(3):
        x = images(seed)
        params = jitter.sample_params(2, 16, 24, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(compiled(x, params=params), jitter(x, params=params))
    assert counter.frame_count == 0


# ------------------------------------------------------------------------------ presets
def test_paper_preset_names_the_paper_operators() -> None:
    paper = PatchJitter.paper(16)
    assert paper.ops == ("brightness", "contrast", "saturation", "hue", "solarize", "blur", "noise")
    ops = {op.name: op for op in paper.operators}
    assert (ops["brightness"].low, ops["brightness"].high) == (0.6, 1.4)
    assert (ops["hue"].low, ops["hue"].high) == (-0.1, 0.1)
    assert ops["hue"].p == 0.8 and ops["solarize"].p == 0.2
    assert ops["blur"].kernel_for(16) == (13, 13) and not paper.random_order
    assert PatchJitter(16).operators == paper.operators


def test_authors_preset_matches_their_branch() -> None:
    a = PatchJitter.authors(16)
    assert a.ops == ("brightness", "hue", "posterize", "sharpness", "blur")
    ops = {op.name: op for op in a.operators}
    assert (ops["brightness"].low, ops["brightness"].high) == (0.9, 1.1)
    assert (ops["posterize"].low, ops["posterize"].high) == (3, 3) and ops["posterize"].p == 0.5
    assert (ops["sharpness"].low, ops["sharpness"].high) == (2.0, 2.0)
    assert ops["blur"].kernel_for(16) == (5, 1) and ops["blur"].p == 1.0
    assert a.random_order


def test_authors_blur_is_vertical() -> None:
    jitter = PatchJitter(8, [O.GaussianBlur((0.5, 2.0), kernel_size=(5, 1))])
    x = torch.rand(1, 3, 1, 8).expand(1, 3, 8, 8).contiguous()  # constant along H
    assert torch.allclose(jitter(x), x, atol=1e-6)


def test_repr_names_the_operators() -> None:
    text = repr(PatchJitter.paper(16))
    assert "Brightness((0.6, 1.4), p=0.8)" in text and "random_order=False" in text


def test_outputs_differ_from_a_direct_reference_call_only_by_rounding() -> None:
    jitter = everything()
    x = images(9, b=3)
    out, params = jitter(x, return_params=True)
    torch.testing.assert_close(out, apply_reference(x, jitter.operators, params), atol=1e-6, rtol=0)
