"""Shared helpers of the PatchJitter tests: operator configurations, images, a per-patch loop."""

from __future__ import annotations

import torch

from patchaug import operators as O
from patchaug.patch_jitter import PatchJitter, PatchJitterParams

TOL = 1e-5


def make_op(name: str, p: float = 1.0) -> O.PatchOp:
    """Each built-in operator with a wide range (its whole range where it has one)."""
    return {
        "brightness": lambda: O.Brightness((0.3, 1.7), p=p),
        "contrast": lambda: O.Contrast((0.3, 1.7), p=p),
        "saturation": lambda: O.Saturation((0.0, 2.0), p=p),
        "hue": lambda: O.Hue(0.5, p=p),
        "grayscale": lambda: O.Grayscale(p=p),
        "posterize": lambda: O.Posterize((0, 8), p=p),
        "solarize": lambda: O.Solarize((0.2, 0.8), p=p),
        "sharpness": lambda: O.Sharpness((0.0, 3.0), p=p),
        "blur": lambda: O.GaussianBlur((0.1, 3.0), kernel_size=(7, 5), p=p),
        "noise": lambda: O.GaussianNoise((0.0, 0.3), p=p),
    }[name]()


NAMES = tuple(cls.name for cls in O.OPERATORS)


def solo(name: str, patch_size: int = 8, p_op: float = 1.0, **kwargs) -> PatchJitter:
    """A PatchJitter running only ``name``, with probability ``p_op``."""
    return PatchJitter(patch_size, [make_op(name, p_op)], **kwargs)


def everything(
    patch_size: int = 8, random_order: bool = True, p_patch: float = 0.9, **kwargs
) -> PatchJitter:
    """Every built-in operator at once, each with probability 0.6."""
    ops = [make_op(name, 0.6) for name in NAMES]
    return PatchJitter(patch_size, ops, p_patch=p_patch, random_order=random_order, **kwargs)


CONFIGS = {
    "paper": lambda **kw: PatchJitter.paper(8, **kw),
    "authors": lambda **kw: PatchJitter.authors(8, **kw),
    "everything_random_order": lambda **kw: everything(**kw),
    "everything_fixed_order": lambda **kw: everything(random_order=False, **kw),
}


def images(seed: int, b: int = 2, c: int = 3, gh: int = 2, gw: int = 3, p: int = 8) -> torch.Tensor:
    return torch.rand(b, c, gh * p, gw * p, generator=torch.Generator().manual_seed(seed))


def to_patches(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B * N, C, p, p), written independently of patchaug."""
    b, c, h, w = x.shape
    t = x.unfold(2, p, p).unfold(3, p, p)  # (B, C, gh, gw, p, p)
    return t.permute(0, 2, 3, 1, 4, 5).reshape(-1, c, p, p)


def kornia_chain(
    x: torch.Tensor, jitter: PatchJitter, params: PatchJitterParams, rows: list[int]
) -> torch.Tensor:
    """Per-patch loop: each listed patch alone through the Kornia references, in its order."""
    patches = to_patches(x, jitter.patch_size)
    k = len(jitter.operators)
    noise = params.noise(x.shape[1], patches.dtype)
    out = []
    for i in rows:
        patch = patches[i : i + 1]
        order = range(k) if params.order is None else params.order.reshape(-1, k)[i].tolist()
        for j in order:
            op = jitter.operators[j]
            gate = params.gates[op.name].flatten()
            if not gate[i]:
                continue
            v = params.values.get(op.name, torch.zeros(gate.shape)).flatten()[i : i + 1]
            rank = int(gate[: i + 1].sum()) - 1
            patch = op.reference(patch, v, noise[rank : rank + 1] if op.draws_noise else None)
        out.append(patch)
    return torch.cat(out)
