"""``PatchJitter`` on the device: parameters drawn there, every engine equal to the CPU's."""

from __future__ import annotations

import pytest
import torch

from patchaug import PatchJitter
from patchaug import operators as O
from patchaug.patch_jitter import apply_reference, paper_operators


def _no_noise() -> list[O.PatchOp]:
    return [op for op in paper_operators() if not op.draws_noise]


def _every_op() -> list[O.PatchOp]:
    return [
        O.Brightness(0.4, p=0.8), O.Contrast(0.4, p=0.8), O.Saturation(0.2, p=0.8),
        O.Hue(0.5, p=0.8), O.Grayscale(p=0.3), O.Posterize((2, 8), p=0.4),
        O.Solarize((0.3, 0.9), p=0.3), O.Sharpness((0.0, 3.0), p=0.5),
        O.GaussianBlur((0.1, 2.0), p=0.5), O.GaussianNoise((0.0, 0.1), p=0.3),
    ]


NO_NOISE = {
    "paper": lambda **kw: PatchJitter(16, _no_noise(), **kw),
    "authors": lambda **kw: PatchJitter.authors(16, **kw),
    "every-op": lambda **kw: PatchJitter(16, _every_op()[:-1], random_order=True, **kw),
}


def _images(shape=(6, 3, 64, 48), seed=0) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("preset", list(NO_NOISE))
@pytest.mark.parametrize("channels", [1, 3])
def test_replay_on_the_cpu_gives_the_same_output(device, preset, channels):
    jitter = NO_NOISE[preset]()
    x = _images((6, channels, 64, 48))
    g = torch.Generator(device=device).manual_seed(1)
    out, params = jitter(x.to(device), return_params=True, generator=g)
    assert out.device.type == device.type and params.applied.device.type == device.type
    assert all(v.device.type == device.type for v in params.values.values())
    assert params.applied.float().mean() > 0.5  # most patches were augmented
    cpu = jitter(x, params=params.to("cpu"))
    torch.testing.assert_close(out.cpu(), cpu, atol=2e-5, rtol=0)
    assert not torch.allclose(cpu, x)


@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
@pytest.mark.parametrize("random_order", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_engine_equals_the_reference_on_the_device(device, backend, random_order, dtype):
    if backend == "triton" and device.type != "cuda":
        pytest.skip("the Triton kernel runs on CUDA")
    jitter = PatchJitter(16, _every_op(), random_order=random_order, backend=backend)
    x = _images((8, 3, 64, 48), seed=2).to(device, dtype)
    params = jitter.sample_params(8, 64, 48, device=device,
                                  generator=torch.Generator(device=device).manual_seed(3))
    out = jitter(x, params=params)
    ref = apply_reference(x.float(), jitter.operators, params)
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    else:  # the float32 result rounded once: at most one unit in the last place apart
        ulp = torch.finfo(dtype).eps * ref.abs().clamp(min=2**-6)
        assert bool(((out.float() - ref).abs() <= ulp + 1e-6).all())


def test_noise_is_regenerated_on_the_device_and_replays_exactly(device):
    jitter = PatchJitter(16, [O.GaussianNoise((0.02, 0.05), p=1.0)])
    x = _images().to(device) * 0.2 + 0.4  # far from 0 and 1: no clamping
    g = torch.Generator(device=device).manual_seed(4)
    out, params = jitter(x, return_params=True, generator=g)
    assert torch.equal(out, jitter(x, params=params))
    p = 16
    b, c, h, w = x.shape
    diff = (out - x).view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    diff = diff.reshape(-1, c, p, p)
    noise = params.noise(c)
    std = params.values["noise"].flatten()
    assert noise.device.type == device.type and noise.shape[0] == diff.shape[0]
    torch.testing.assert_close(diff, noise * std.view(-1, 1, 1, 1), atol=1e-5, rtol=0)


def test_same_generator_seed_same_output(device):
    x = _images().to(device)
    jitter = PatchJitter.paper(16)
    runs = [jitter(x, generator=torch.Generator(device=device).manual_seed(9)) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


def test_a_module_holding_it_moves_to_the_device(device):
    model = torch.nn.Sequential(PatchJitter.paper(16)).to(device)
    out = model(_images().to(device))
    assert out.device.type == device.type
    assert model.cpu()[0](_images()).device.type == "cpu"


def test_large_batch_matches_the_cpu(device):
    jitter = PatchJitter(16, _no_noise())
    x = _images((32, 3, 224, 224), seed=3)
    out, params = jitter(x.to(device), return_params=True,
                         generator=torch.Generator(device=device).manual_seed(6))
    torch.testing.assert_close(out.cpu(), jitter(x, params=params.to("cpu")), atol=2e-5,
                               rtol=0)
