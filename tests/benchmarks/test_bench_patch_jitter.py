"""``benchmarks/bench_patch_jitter.py``: its pipelines build and run, its GPU report renders."""

from __future__ import annotations

import torch

from tests.benchmarks import load_benchmark

bench = load_benchmark("bench_patch_jitter")


def test_patch_sequential_baseline_takes_the_presets_operators() -> None:
    seq = bench.kornia_patch_sequential(bench.PatchJitter.paper(16), "ColorJiggle")
    blur = seq[2]
    assert tuple(blur.flags["kernel_size"]) == (13, 13)
    x = torch.rand(1, 3, 224, 224)
    assert seq(x).shape == x.shape


def test_per_patch_pipelines_draw_the_same_parameters_from_one_seed() -> None:
    x = torch.rand(1, 3, 224, 224)
    outs = []
    for pipeline in bench.per_patch_pipelines().values():
        torch.manual_seed(0)
        outs.append(pipeline(x))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=0)


def test_gpu_part_runs_and_renders_without_a_gpu() -> None:
    # device="cpu" is the smoke-test mode: the torch engine only, a tiny batch
    gpu = bench.gpu_part(1, device="cpu", batch=2)
    assert set(gpu["rows"]) == {
        "paper_torch_float32", "authors_torch_float32", "paper_torch_bfloat16",
        "authors_torch_bfloat16", "kornia_patch_sequential_float32",
    }
    assert all(row["median_s"] > 0 for row in gpu["rows"].values())
    text = "\n".join(bench.gpu_markdown(gpu))
    assert "| PatchJitter.paper(16) | torch | bfloat16 |" in text
    assert "Kornia PatchSequential" in text
