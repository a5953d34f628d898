"""``PatchJitter`` on the device: parameters drawn there, output equal to the CPU's."""

from __future__ import annotations

import pytest
import torch

from patchaug import PatchJitter

NO_NOISE = {
    "paper": lambda: PatchJitter.paper(16, p_noise=0.0),
    "authors": lambda: PatchJitter.authors(16),
    "every-op": lambda: PatchJitter(16, p_grayscale=0.3, p_posterize=0.4, p_sharpness=0.5,
                                    p_noise=0.0, random_order=True),
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


def test_noise_is_regenerated_on_the_device_and_replays_exactly(device):
    jitter = PatchJitter(16, p_brightness=0, p_contrast=0, p_saturation=0, p_hue=0,
                         p_solarize=0, p_blur=0, p_noise=1.0, noise_std=(0.02, 0.05))
    x = _images().to(device) * 0.2 + 0.4  # far from 0 and 1: no clamping
    g = torch.Generator(device=device).manual_seed(4)
    out, params = jitter(x, return_params=True, generator=g)
    again = jitter(x, params=params)
    assert torch.equal(out, again)
    # out - x is std * the params' noise, patch by patch
    p = 16
    b, c, h, w = x.shape
    diff = (out - x).view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    diff = diff.reshape(-1, c, p, p)
    noise = params.noise(c)
    std = params.values["noise"].flatten()
    assert noise.device.type == device.type and noise.shape[0] == diff.shape[0]
    torch.testing.assert_close(diff, noise * std.view(-1, 1, 1, 1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_dtypes_follow_the_input(device, dtype):
    jitter = PatchJitter.paper(16, p_noise=0.0)
    x = _images()
    g = torch.Generator(device=device).manual_seed(5)
    out, params = jitter(x.to(device, dtype), return_params=True, generator=g)
    assert out.dtype == dtype and out.device.type == device.type
    ref = jitter(x.to(device, dtype).float(), params=params)
    tol = {torch.float16: 4e-3, torch.bfloat16: 2e-2, torch.float64: 1e-6}[dtype]
    assert (out.float() - ref).abs().max() <= tol
    assert torch.isfinite(out.float()).all() and out.min() >= 0 and out.max() <= 1


def test_same_generator_seed_same_output(device):
    x = _images().to(device)
    jitter = PatchJitter.paper(16)
    runs = [jitter(x, generator=torch.Generator(device=device).manual_seed(9)) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


def test_large_batch_matches_the_cpu(device):
    # the GPU path works on the whole batch at once (no CPU blocks): same arithmetic
    jitter = PatchJitter.paper(16, p_noise=0.0)
    x = _images((32, 3, 224, 224), seed=3)
    out, params = jitter(x.to(device), return_params=True,
                         generator=torch.Generator(device=device).manual_seed(6))
    torch.testing.assert_close(out.cpu(), jitter(x, params=params.to("cpu")), atol=2e-5,
                               rtol=0)
