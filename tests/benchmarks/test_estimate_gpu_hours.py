"""benchmarks/estimate_gpu_hours.py: the FLOP count against a closed form, and the hours."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.benchmarks import load_benchmark

ROOT = Path(__file__).resolve().parents[2]


est = load_benchmark("estimate_gpu_hours")


def vit_forward_flops(tokens: int, width: int, depth: int, patch: int) -> int:
    """Matrix-multiply FLOPs of a timm ViT forward (2 per multiply-add), one image."""
    n, d = tokens, width
    embed = 2 * (n - 1) * 3 * patch * patch * d
    block = 2 * n * d * 3 * d + 2 * 2 * n * n * d + 2 * n * d * d + 2 * 2 * n * d * 4 * d
    return embed + depth * block


def head_forward_flops(tokens: int, width: int, hidden: int, bottleneck: int, k: int) -> int:
    return 2 * tokens * (width * hidden + hidden * hidden + hidden * bottleneck + bottleneck * k)


@pytest.mark.parametrize("preset", ["cifar10-vit-tiny32-dino", "cifar10-vit-tiny32-mean"])
def test_counted_forward_flops_match_the_closed_form(preset: str) -> None:
    args = est.preset_args(preset)
    f = est.count_flops(args)  # meta device
    g_tok = 1 + (224 // 32) ** 2
    l_tok = 1 + (96 // 32) ** 2
    kept = (g_tok, l_tok) if args.loss != "dino" else (1, 1)
    head = lambda t: head_forward_flops(t, 192, 2048, 256, 1000)  # noqa: E731
    teacher = 2 * (vit_forward_flops(g_tok, 192, 12, 32) + head(kept[0]))
    student = teacher + 8 * (vit_forward_flops(l_tok, 192, 12, 32) + head(kept[1]))
    assert f["teacher_fwd"] == teacher
    assert f["student_fwd"] == student
    # backward: input and weight gradients of every product (twice the forward), except
    # the patch embedding's gradient for the input images, which is not computed
    embed = 2 * (g_tok - 1) * 3 * 32 * 32 * 192 * 2 + 2 * (l_tok - 1) * 3 * 32 * 32 * 192 * 8
    assert f["student_bwd"] == 2 * student - embed
    assert f["train"] == f["teacher_fwd"] + f["student_fwd"] + f["student_bwd"]
    # teacher (2 global views) + student (2 global + 8 local views) head outputs
    assert f["head_outputs_per_image"] == 1000 * (2 * kept[0] + 2 * kept[0] + 8 * kept[1])
    assert 0 < f["head"] < f["train"]


def test_measured_hours_use_the_matching_row() -> None:
    args = est.preset_args("imagenet100-vit-small16-mean")
    measured = {"meta": {"device_name": "GPU X", "smoke": False}, "results": [
        {"arch": "vit_small", "loss": "dino", "patch_aug": "none", "out_dim": 65536,
         "images_per_s": 1000.0},
        {"arch": "vit_small", "loss": "mean", "patch_aug": "none", "out_dim": 65536,
         "images_per_s": 500.0},
    ]}
    images = 126_689 * 200
    assert est.measured_hours("imagenet100-vit-small16-mean", args, images, measured) == \
        pytest.approx(images / 500.0 / 3600.0)
    # no measurement of this arch, or a CIFAR preset: no measured hours
    other = est.preset_args("imagenet100-vit-base16-mean")
    assert est.measured_hours("imagenet100-vit-base16-mean", other, images, measured) is None
    cifar = est.preset_args("cifar10-vit-tiny16-mean")
    assert est.measured_hours("cifar10-vit-tiny16-mean", cifar, 1e7, measured) is None
