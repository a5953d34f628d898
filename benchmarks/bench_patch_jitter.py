"""Benchmark PatchJitter against Kornia's PatchSequential, a per-patch loop and Kornia's ops.

Writes ``benchmarks/results/patch_jitter.json`` and ``benchmarks/results/patch_jitter.md``
(and ``patch_jitter_table.rst``, which the docs page includes).

CPU part (always, ``torch.set_num_threads(2)``), B = 32 images of 3 x 224 x 224, patch 16:

* ``PatchJitter.paper(16)`` eager, and under ``torch.compile`` (compiled in a subprocess with a
  time limit; a failure or time-out is recorded as such);
* Kornia ``PatchSequential(ColorJiggle, RandomSolarize, RandomGaussianBlur, RandomGaussianNoise,
  grid_size=(14, 14), patchwise_apply=False)`` with the preset's probabilities and ranges
  (Kornia's noise has one fixed std: the middle of the preset's range), and the same with
  ``ColorJitter``, whose colour definitions are the ones PatchJitter uses;
* a plain Python loop over the 6272 patches applying Kornia's functional ops one patch at a
  time (run once, it is slow);
* every operator alone on the ``(B * N, C, p, p)`` = (6272, 3, 16, 16) patch batch, all
  patches, against Kornia's functional op with per-patch parameters;
* ``patchaug.PerPatch(ColorJiggle(0.4, 0.4, 0.2, 0.1, p=0.8), RandomGaussianBlur((13, 13),
  (0.1, 2.0), p=0.5), patch_size=16)`` against Kornia ``PatchSequential`` with the same two
  augmentations (``grid_size=(14, 14), patchwise_apply=False``), timed round-robin; both draw the
  same per-patch parameters from the same seed, and the largest difference of their outputs
  under one seed is recorded too.

GPU part (only when CUDA is available): B = 256 at 224, both presets on every engine (the fused
Triton kernel and the torch engine), float32 and bfloat16, and Kornia's PatchSequential:
images/s and the fraction of the memory roofline, ``2 * B * 3 * 224 * 224 * itemsize`` bytes
(image read and written once) over the time, against the device-to-device copy bandwidth
measured on the same GPU for the same dtype.

Run: ``PYTHONPATH=. python benchmarks/bench_patch_jitter.py [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import kornia  # noqa: E402
import kornia.augmentation as K  # noqa: E402

from patchaug import operators as O  # noqa: E402
from patchaug.patch_jitter import PatchJitter  # noqa: E402
from patchaug.per_patch import PerPatch  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
THREADS = 2
BATCH, SIZE, PATCH = 32, 224, 16


def timeit(fn: Any, repeats: int, warmup: int = 2, sync: Any = None) -> dict[str, float]:
    """Median and min wall time in seconds over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - start)
    times.sort()
    return {"median_s": times[len(times) // 2], "min_s": times[0], "repeats": repeats}


def timeit_interleaved(
    fns: dict[str, Any], repeats: int, warmup: int = 1, sync: Any = None
) -> dict[str, dict[str, Any]]:
    """Time several callables round-robin, so that a change of machine load hits all alike.

    Returns per name the median and min wall time and the list of per-round times.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if sync:
                sync()
            start = time.perf_counter()
            fn()
            if sync:
                sync()
            times[name].append(time.perf_counter() - start)
    return summarise(times)


def timeit_steady(
    fns: dict[str, Any], rounds: int, per_block: int = 5
) -> dict[str, dict[str, Any]]:
    """Time each callable in its steady state: blocks of ``per_block`` calls in a row.

    The first call of a block is not timed (it pays for the caches and the allocator state the
    other pipelines left behind); the blocks of the pipelines alternate, in a rotated order,
    over ``rounds`` rounds. Returns per name the median and min over the timed calls.
    """
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            fns[name]()
            for _ in range(per_block - 1):
                start = time.perf_counter()
                fns[name]()
                times[name].append(time.perf_counter() - start)
    return summarise(times)


def summarise(times: dict[str, list[float]]) -> dict[str, dict[str, Any]]:
    """Per name, the median and min of the times (s) and the times themselves."""
    out = {}
    for name, ts in times.items():
        srt = sorted(ts)
        out[name] = {"median_s": srt[len(srt) // 2], "min_s": srt[0], "times_s": ts}
    return out


def paired_ratio(slow: dict[str, Any], fast: dict[str, Any]) -> float:
    """Median over rounds of slow / fast, both timed in the same round."""
    ratios = sorted(a / b for a, b in zip(slow["times_s"], fast["times_s"]))
    return ratios[len(ratios) // 2]


def kornia_patch_sequential(jitter: PatchJitter, colour: str) -> torch.nn.Module:
    """Kornia's PatchSequential with the operators, probabilities and ranges of ``jitter``."""
    ops = {op.name: op for op in jitter.operators}
    colour_cls = K.ColorJiggle if colour == "ColorJiggle" else K.ColorJitter
    c = [(ops[k].low, ops[k].high) for k in ("brightness", "contrast", "saturation", "hue")]
    blur = ops["blur"]
    std = (ops["noise"].low + ops["noise"].high) / 2  # Kornia's noise has one fixed std
    return K.PatchSequential(
        colour_cls(*c, p=ops["hue"].p),
        K.RandomSolarize(thresholds=0.0, additions=0.0, p=ops["solarize"].p),
        K.RandomGaussianBlur(blur.kernel_for(PATCH), (blur.low, blur.high), p=blur.p),
        K.RandomGaussianNoise(mean=0.0, std=std, p=ops["noise"].p),
        grid_size=(SIZE // PATCH, SIZE // PATCH),
        patchwise_apply=False,
    )


def per_patch_pipelines() -> dict[str, torch.nn.Module]:
    """PerPatch and Kornia's PatchSequential around the same two augmentations (own instances)."""

    def augs() -> tuple[torch.nn.Module, torch.nn.Module]:
        return (
            K.ColorJiggle(0.4, 0.4, 0.2, 0.1, p=0.8),
            K.RandomGaussianBlur((13, 13), (0.1, 2.0), p=0.5),
        )

    return {
        "perpatch_colorjiggle_blur": PerPatch(*augs(), patch_size=PATCH),
        "kornia_patchsequential_colorjiggle_blur": K.PatchSequential(
            *augs(), grid_size=(SIZE // PATCH, SIZE // PATCH), patchwise_apply=False
        ),
    }


def per_patch_part(x: torch.Tensor, repeats: int) -> dict[str, Any]:
    """PerPatch against PatchSequential on ``x``: times (round-robin), ratio, same-seed diff."""
    pipelines = per_patch_pipelines()
    outs = []
    for fn in pipelines.values():
        # Kornia draws from the global generator: one seed gives both the same parameters
        torch.manual_seed(0)
        outs.append(fn(x))
    out: dict[str, Any] = timeit_interleaved(
        {name: (lambda fn=fn: fn(x)) for name, fn in pipelines.items()}, repeats
    )
    ours = out["perpatch_colorjiggle_blur"]
    theirs = out["kornia_patchsequential_colorjiggle_blur"]
    out["speedup_vs_patchsequential"] = theirs["median_s"] / ours["median_s"]
    out["speedup_vs_patchsequential_paired"] = paired_ratio(theirs, ours)
    out["max_abs_diff_same_seed"] = float((outs[0] - outs[1]).abs().max())
    return out


def per_patch_markdown(part: dict[str, Any] | None) -> list[str]:
    """Markdown lines of the PerPatch comparison (none for results from before it existed)."""
    if not part:
        return []
    ours = part["perpatch_colorjiggle_blur"]["median_s"]
    theirs = part["kornia_patchsequential_colorjiggle_blur"]["median_s"]
    return [
        "",
        "`PerPatch` against Kornia `PatchSequential(..., grid_size=(14, 14), "
        "patchwise_apply=False)`, both around `ColorJiggle(0.4, 0.4, 0.2, 0.1, p=0.8)` and "
        "`RandomGaussianBlur((13, 13), (0.1, 2.0), p=0.5)`, same input, timed round-robin "
        f"(median of {len(part['perpatch_colorjiggle_blur']['times_s'])} rounds):",
        "",
        "| pipeline | time (ms) | time / `PerPatch` |",
        "|---|---:|---:|",
        f"| `PerPatch(..., patch_size=16)` | {1e3 * ours:.1f} | 1.0x |",
        f"| Kornia `PatchSequential` | {1e3 * theirs:.1f} | {theirs / ours:.2f}x |",
        "",
        f"PatchSequential / PerPatch: **{part['speedup_vs_patchsequential']:.2f}x** (ratio of "
        f"medians; median of the per-round ratios: "
        f"{part['speedup_vs_patchsequential_paired']:.2f}x). Under one seed both draw the same "
        f"per-patch parameters; largest output difference {part['max_abs_diff_same_seed']:.1e}.",
    ]


def per_patch_rst(part: dict[str, Any] | None) -> list[str]:
    """reStructuredText lines of the PerPatch comparison."""
    if not part:
        return []
    ours = part["perpatch_colorjiggle_blur"]["median_s"]
    theirs = part["kornia_patchsequential_colorjiggle_blur"]["median_s"]
    return [
        "",
        ".. list-table:: ``PerPatch`` against Kornia ``PatchSequential`` (``patchwise_apply="
        "False``), both around ColorJiggle(0.4, 0.4, 0.2, 0.1, p=0.8) and "
        "RandomGaussianBlur((13, 13), (0.1, 2.0), p=0.5), same CPU and input",
        "   :header-rows: 1",
        "",
        "   * - pipeline",
        "     - time (ms)",
        "     - relative to ``PerPatch``",
        "   * - ``PerPatch(..., patch_size=16)``",
        f"     - {1e3 * ours:.1f}",
        "     - 1.0x",
        "   * - Kornia ``PatchSequential(..., grid_size=(14, 14), patchwise_apply=False)``",
        f"     - {1e3 * theirs:.1f}",
        f"     - {theirs / ours:.2f}x",
        "",
        f"Under one seed both draw the same per-patch parameters (largest output difference "
        f"{part['max_abs_diff_same_seed']:.1e}).",
    ]


def per_patch_loop(
    images: torch.Tensor, jitter: PatchJitter, generator: torch.Generator
) -> torch.Tensor:
    """The naive way: one Python iteration per patch, Kornia's functional ops on (1, C, p, p)."""
    ops = {op.name: op for op in jitter.operators}
    r = {name: (op.low, op.high) for name, op in ops.items()}
    pr = {name: op.p for name, op in ops.items()}
    p = PATCH
    out = images.clone()
    b, _, h, w = images.shape
    ks = ops["blur"].kernel_for(PATCH)

    def u(lo: float = 0.0, hi: float = 1.0) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=generator))

    for i in range(b):
        for y in range(0, h, p):
            for x in range(0, w, p):
                patch = out[i : i + 1, :, y : y + p, x : x + p]
                if u() < pr["brightness"]:
                    patch = kornia.enhance.adjust_brightness_accumulative(
                        patch, u(*r["brightness"])
                    )
                if u() < pr["contrast"]:
                    patch = kornia.enhance.adjust_contrast_with_mean_subtraction(
                        patch, u(*r["contrast"])
                    )
                if u() < pr["saturation"]:
                    patch = kornia.enhance.adjust_saturation_with_gray_subtraction(
                        patch, u(*r["saturation"])
                    )
                if u() < pr["hue"]:
                    patch = kornia.enhance.adjust_hue(patch, u(*r["hue"]) * 2 * math.pi)
                if u() < pr["solarize"]:
                    patch = kornia.enhance.solarize(patch, u(*r["solarize"]))
                if u() < pr["blur"]:
                    s = u(*r["blur"])
                    patch = kornia.filters.gaussian_blur2d(patch, ks, (s, s))
                if u() < pr["noise"]:
                    noise = torch.randn(patch.shape, generator=generator)
                    patch = (patch + u(*r["noise"]) * noise).clamp(0, 1)
                out[i : i + 1, :, y : y + p, x : x + p] = patch
    return out


def per_op_rows(repeats: int) -> list[dict[str, Any]]:
    """Each operator alone on all 6272 patches: the torch engine's fast path (in place on a
    copy, as PatchJitter runs it) vs Kornia's functional op with per-patch parameters."""
    g = torch.Generator().manual_seed(1)
    n = BATCH * (SIZE // PATCH) ** 2
    x = torch.rand(n, 3, PATCH, PATCH, generator=g)
    noise = torch.randn(x.shape, generator=g)
    work = torch.empty(2 * x.numel())
    cases = [
        ("brightness", O.Brightness(0.5)),
        ("contrast", O.Contrast(0.5)),
        ("saturation", O.Saturation(0.5)),
        ("hue", O.Hue(0.5)),
        ("grayscale", O.Grayscale()),
        ("solarize", O.Solarize((0.0, 1.0))),
        ("blur 13x13", O.GaussianBlur((0.1, 2.0), kernel_size=13)),
        ("blur 5x1", O.GaussianBlur((0.1, 2.0), kernel_size=(5, 1))),
        ("noise", O.GaussianNoise((0.0, 0.1))),
        ("posterize", O.Posterize((1, 7))),
        ("sharpness", O.Sharpness((0.5, 1.5))),
    ]
    rows = []
    for name, op in cases:
        v = op.sample(torch.rand(n, generator=g))
        nz = noise if op.draws_noise else None

        def ours(op: O.PatchOp = op, v: torch.Tensor = v, nz: Any = nz) -> torch.Tensor:
            return op.run(x.clone(), *op.prepare(v, PATCH, nz), work=work)

        def theirs(op: O.PatchOp = op, v: torch.Tensor = v, nz: Any = nz) -> torch.Tensor:
            return op.reference(x, v, nz)

        err = float((ours() - theirs()).abs().max())
        timed = timeit_interleaved({"ours": ours, "kornia": theirs}, repeats)
        t_ours = timed["ours"]["median_s"]
        t_kornia = timed["kornia"]["median_s"]
        rows.append(
            {
                "op": name,
                "patchjitter_ms": 1e3 * t_ours,
                "kornia_ms": 1e3 * t_kornia,
                "speedup": t_kornia / t_ours,
                "max_abs_diff": err,
            }
        )
        print(
            f"  {name:12s} ours {1e3 * t_ours:7.2f} ms  kornia {1e3 * t_kornia:7.2f} ms  diff {err:.1e}"
        )
    return rows


_COMPILE_CHILD = r"""
import json, sys, time, torch
sys.path.insert(0, {root!r})
from patchaug.patch_jitter import PatchJitter
torch.set_num_threads({threads})
x = torch.rand({b}, 3, {s}, {s})
jitter = PatchJitter.paper({p})
fn = torch.compile(jitter)
times = []
for _ in range({calls}):
    t0 = time.perf_counter(); fn(x); times.append(time.perf_counter() - t0)
tail = sorted(times[-5:])
print("RESULT " + json.dumps({{"first_call_s": times[0], "times_s": times,
                              "median_s": tail[len(tail) // 2], "min_s": min(times[1:]),
                              "recompiling_calls": sum(t > 1.0 for t in times[1:])}}))
"""


def compiled_run(repeats: int, timeout_s: int, threads: int) -> dict[str, Any]:
    code = _COMPILE_CHILD.format(
        root=str(ROOT), threads=threads, b=BATCH, s=SIZE, p=PATCH, calls=repeats + 5
    )
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout_s
        )
    except subprocess.TimeoutExpired:
        return {"status": f"timed out after {timeout_s} s (compile included)"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            out = json.loads(line[len("RESULT ") :])
            out["status"] = "ok"
            out["wall_incl_compile_s"] = time.perf_counter() - start
            return out
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"status": "failed: " + " | ".join(tail)}


GPU_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def gpu_part(repeats: int, device: str = "cuda", batch: int = 256) -> dict[str, Any] | None:
    """GPU timings of every engine, float32 and bfloat16 (``device="cpu"`` only to smoke-test
    this function without a GPU: the Triton rows are then skipped)."""
    if device == "cuda" and not torch.cuda.is_available():
        return None
    from patchaug.triton_engine import triton_available

    dev = torch.device(device)
    b = batch
    x = torch.rand(b, 3, SIZE, SIZE, device=dev)
    g = torch.Generator(device=dev).manual_seed(0)
    sync = torch.cuda.synchronize if dev.type == "cuda" else None
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (smoke test)"
    out: dict[str, Any] = {"device": name, "batch": b, "torch": torch.__version__, "rows": {}}
    backends = ["triton", "torch"] if dev.type == "cuda" and triton_available(dev) else ["torch"]
    for dname, dtype in GPU_DTYPES.items():
        xd = x.to(dtype)
        nbytes = 2 * xd.numel() * xd.element_size()  # the images read and written once
        copy = timeit(lambda xd=xd: xd.clone(), repeats, sync=sync)["median_s"]
        out[f"copy_bandwidth_GBps_{dname}"] = nbytes / copy / 1e9
        for preset in ("paper", "authors"):
            for backend in backends:
                jitter = getattr(PatchJitter, preset)(PATCH, backend=backend)
                t = timeit(lambda j=jitter, xd=xd: j(xd, generator=g), repeats, sync=sync)
                out["rows"][f"{preset}_{backend}_{dname}"] = {
                    "median_s": t["median_s"],
                    "images_per_s": b / t["median_s"],
                    "achieved_GBps": nbytes / t["median_s"] / 1e9,
                    "roofline_fraction": copy / t["median_s"],
                }
    kseq = kornia_patch_sequential(PatchJitter.paper(PATCH), "ColorJiggle").to(dev)
    t = timeit(lambda: kseq(x), max(3, repeats // 3), sync=sync)["median_s"]
    out["rows"]["kornia_patch_sequential_float32"] = {"median_s": t, "images_per_s": b / t}
    best = out["rows"][f"paper_{backends[0]}_float32"]["median_s"]
    out["speedup_vs_patchsequential"] = t / best
    out["speedup_vs_torch_engine"] = out["rows"]["paper_torch_float32"]["median_s"] / best
    return out


def gpu_markdown(gpu: dict[str, Any] | None) -> list[str]:
    """Markdown lines of the GPU part (or a line saying there was none)."""
    if gpu is None:
        return [
            "GPU: not available on the machine that ran this benchmark (the GPU branch "
            "runs only where CUDA is available; `--gpu-only` writes patch_jitter_gpu.md)."
        ]
    lines = [
        f"GPU: {gpu['device']}, torch {gpu.get('torch', '?')}, B = {gpu['batch']} at 224; "
        "roofline = the images read and written once at the copy bandwidth measured for the "
        "same dtype ("
        + ", ".join(
            f"{d}: {gpu[f'copy_bandwidth_GBps_{d}']:.0f} GB/s" for d in GPU_DTYPES
        )
        + ").",
        "",
        "| pipeline | engine | dtype | ms / batch | images/s | roofline fraction |",
        "|---|---|---|---:|---:|---:|",
    ]
    for key, row in gpu["rows"].items():
        if key.startswith("kornia"):
            continue
        preset, backend, dtype = key.split("_")
        lines.append(
            f"| PatchJitter.{preset}(16) | {backend} | {dtype} | {1e3 * row['median_s']:.2f} | "
            f"{row['images_per_s']:.0f} | {row['roofline_fraction']:.3f} |"
        )
    k = gpu["rows"]["kornia_patch_sequential_float32"]
    lines += [
        f"| Kornia PatchSequential | | float32 | {1e3 * k['median_s']:.2f} | "
        f"{k['images_per_s']:.0f} | |",
        "",
        f"PatchJitter.paper(16), float32, fastest engine: {gpu['speedup_vs_patchsequential']:.1f}x "
        f"faster than PatchSequential and {gpu['speedup_vs_torch_engine']:.1f}x faster than the "
        "torch engine on this GPU.",
    ]
    return lines


def markdown(res: dict[str, Any]) -> str:
    cpu = res["cpu"]
    lines = [
        "# PatchJitter benchmark",
        "",
        f"CPU: {res['machine']['processor']}, torch {res['machine']['torch']}, kornia "
        f"{res['machine']['kornia']}, {res['machine']['threads']} threads, load average (1, 5, "
        f"15 min) at start {res['machine']['loadavg']}, at end {res['machine']['loadavg_end']}"
        " (the machine is shared: other jobs may have run at the same time).",
        "",
        f"Input: {BATCH} x 3 x {SIZE} x {SIZE} float32, patch {PATCH} "
        f"({BATCH * (SIZE // PATCH) ** 2} patches). Median wall time over "
        f"{len(cpu['patchjitter_paper']['times_s'])} rounds; the pipelines are timed "
        "round-robin so that load changes hit all of them alike. The per-patch loop "
        f"{cpu['per_patch_loop']['note']}.",
        "",
        "| pipeline | time (ms) | time / eager `PatchJitter.paper(16)` |",
        "|---|---:|---:|",
    ]
    ours = cpu["patchjitter_paper"]["median_s"]
    for key, label in (
        ("patchjitter_paper", "`PatchJitter.paper(16)`, eager"),
        ("patchjitter_authors", "`PatchJitter.authors(16)`, eager"),
        ("patchjitter_paper_reference", "`PatchJitter.paper(16, backend=\"reference\")`"),
        ("kornia_patchsequential_colorjiggle", "Kornia `PatchSequential` (ColorJiggle, ...)"),
        ("kornia_patchsequential_colorjitter", "Kornia `PatchSequential` (ColorJitter, ...)"),
        ("per_patch_loop", "Python loop over patches, Kornia ops"),
    ):
        t = cpu[key]["median_s"]
        lines.append(f"| {label} | {1e3 * t:.1f} | {t / ours:.1f}x |")
    comp = cpu["patchjitter_paper_compiled"]
    if comp.get("status") == "ok":
        lines.append(
            f"| `torch.compile(PatchJitter.paper(16))` (its forward opts out of compilation "
            f"and runs eagerly), in a process of its own: median of the last 5 of "
            f"{len(comp['times_s'])} calls in a row (first call {comp['first_call_s']:.1f} s; "
            f"{comp['recompiling_calls']} later calls over 1 s) | "
            f"{1e3 * comp['median_s']:.1f} | {comp['median_s'] / ours:.2f}x |"
        )
    else:
        lines.append(f"| `torch.compile(PatchJitter.paper(16))` | {comp['status']} | |")
    lines += [
        "",
        "Last column: that pipeline's time over eager `PatchJitter.paper(16)`'s (how many "
        "times slower it is).",
        "",
        f"**PatchJitter.paper(16) vs Kornia PatchSequential (ColorJiggle): "
        f"{cpu['speedup_vs_patchsequential']:.1f}x faster** (ratio of medians; median of the "
        f"per-round ratios: {cpu['speedup_vs_patchsequential_paired']:.1f}x).",
        "",
    ]
    steady = cpu.get("steady_state")
    if steady:
        n = len(steady["patchjitter_paper"]["times_s"])
        lines += [
            f"Steady state (each pipeline called 5 times in a row, the first call not timed, "
            f"the two alternating; median of {n} calls each): `PatchJitter.paper(16)` "
            f"{1e3 * steady['patchjitter_paper']['median_s']:.1f} ms, `PatchSequential` "
            f"{1e3 * steady['kornia_patchsequential_colorjiggle']['median_s']:.1f} ms: "
            f"**{steady['speedup_vs_patchsequential']:.1f}x**.",
        ]
    lines += [
        "",
        "Each operator alone on the (6272, 3, 16, 16) patch batch, every patch augmented: the "
        "torch engine's fast path (`op.prepare` + `op.run`, in place on a copy of the batch, "
        "the copy included) against Kornia's functional op (`op.reference`):",
        "",
        "| operator | PatchJitter op (ms) | Kornia functional op (ms) | speed-up | max abs diff |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in res["per_op"]:
        lines.append(
            f"| {row['op']} | {row['patchjitter_ms']:.2f} | {row['kornia_ms']:.2f} | "
            f"{row['speedup']:.1f}x | {row['max_abs_diff']:.1e} |"
        )
    lines += per_patch_markdown(res["cpu"].get("per_patch"))
    lines.append("")
    lines += gpu_markdown(res.get("gpu"))
    return "\n".join(lines) + "\n"


def rst_table(res: dict[str, Any]) -> str:
    """The headline numbers as reStructuredText, included by the docs page."""
    cpu = res["cpu"]
    ours = cpu["patchjitter_paper"]["median_s"]
    rows = [
        ("``PatchJitter.paper(16)``, eager", cpu["patchjitter_paper"]["median_s"]),
        ("``PatchJitter.authors(16)``, eager", cpu["patchjitter_authors"]["median_s"]),
        (
            "``PatchJitter.paper(16, backend=\"reference\")``",
            cpu["patchjitter_paper_reference"]["median_s"],
        ),
        (
            "Kornia ``PatchSequential`` (ColorJiggle, ...)",
            cpu["kornia_patchsequential_colorjiggle"]["median_s"],
        ),
        (
            "Kornia ``PatchSequential`` (ColorJitter, ...)",
            cpu["kornia_patchsequential_colorjitter"]["median_s"],
        ),
        ("Python loop over patches, Kornia ops", cpu["per_patch_loop"]["median_s"]),
    ]
    comp = cpu["patchjitter_paper_compiled"]
    lines = [
        f".. list-table:: CPU, {res['machine']['threads']} threads, {BATCH} x 3 x {SIZE} x {SIZE}, "
        f"patch {PATCH} (median wall time)",
        "   :header-rows: 1",
        "",
        "   * - pipeline",
        "     - time (ms)",
        "     - relative to eager ``PatchJitter.paper(16)``",
    ]
    for label, t in rows:
        lines += [f"   * - {label}", f"     - {1e3 * t:.1f}", f"     - {t / ours:.1f}x"]
    if comp.get("status") == "ok":
        lines += [
            "   * - ``torch.compile(PatchJitter.paper(16))`` (runs eagerly: its forward opts "
            "out of compilation), in a process of its own, median of the last 5 of "
            f"{len(comp['times_s'])} calls in a row",
            f"     - {1e3 * comp['median_s']:.1f} (first call {comp['first_call_s']:.1f} s, "
            f"{comp['recompiling_calls']} later calls over 1 s)",
            f"     - {comp['median_s'] / ours:.2f}x",
        ]
    else:
        lines += [
            "   * - ``torch.compile(PatchJitter.paper(16))``",
            f"     - {comp['status']}",
            "     -",
        ]
    steady = cpu.get("steady_state")
    if steady:
        lines += [
            "",
            "Steady state (blocks of 5 calls in a row, the first not timed, alternating): "
            f"``PatchJitter.paper(16)`` {1e3 * steady['patchjitter_paper']['median_s']:.1f} ms, "
            "``PatchSequential`` "
            f"{1e3 * steady['kornia_patchsequential_colorjiggle']['median_s']:.1f} ms, "
            f"{steady['speedup_vs_patchsequential']:.1f}x.",
        ]
    lines += [
        "",
        "Each operator alone on the 6272-patch batch, every patch augmented (the torch "
        "engine's in-place fast path on a copy, the copy included, against Kornia's op):",
        "",
    ]
    lines += [
        ".. list-table::",
        "   :header-rows: 1",
        "",
        "   * - operator",
        "     - PatchJitter op (ms)",
        "     - Kornia op (ms)",
        "     - speed-up",
    ]
    for row in res["per_op"]:
        lines += [
            f"   * - {row['op']}",
            f"     - {row['patchjitter_ms']:.2f}",
            f"     - {row['kornia_ms']:.2f}",
            f"     - {row['speedup']:.1f}x",
        ]
    lines += per_patch_rst(cpu.get("per_patch"))
    gpu = res.get("gpu")
    lines.append("")
    if gpu is None:
        lines.append("No GPU was available where this table was produced.")
    else:
        row = next(iter(gpu["rows"].values()))
        lines.append(
            f"GPU ({gpu['device']}, {gpu['batch']} images): ``PatchJitter.paper(16)`` "
            f"{row['images_per_s']:.0f} images/s, "
            f"{100 * row['roofline_fraction']:.0f} % of the copy-bandwidth roofline."
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, no loop, no compile")
    parser.add_argument("--compile-timeout", type=int, default=300)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--threads", type=int, default=THREADS)
    parser.add_argument(
        "--tag",
        default="",
        help="suffix of the result files, e.g. 1thread -> patch_jitter_1thread.*",
    )
    parser.add_argument(
        "--gpu-only",
        action="store_true",
        help="only the GPU part; writes patch_jitter_gpu.json and .md (into --out)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="output directory")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    repeats = 3 if args.quick else 10
    if args.gpu_only:
        gpu = gpu_part(repeats)
        if gpu is None:
            print("error: --gpu-only needs a CUDA device", file=sys.stderr)
            raise SystemExit(2)
        print(json.dumps(gpu, indent=2))
        if not args.no_write:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "patch_jitter_gpu.json").write_text(json.dumps(gpu, indent=2) + "\n")
            lines = ["# PatchJitter on a GPU", ""] + gpu_markdown(gpu)
            (args.out / "patch_jitter_gpu.md").write_text("\n".join(lines) + "\n")
            print(f"wrote {args.out / 'patch_jitter_gpu'}.json and .md")
        return
    res: dict[str, Any] = {
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "kornia": kornia.__version__,
            "threads": args.threads,
            "loadavg": [round(v, 2) for v in os.getloadavg()],
        },
        "config": {"batch": BATCH, "size": SIZE, "patch": PATCH},
    }
    g = torch.Generator().manual_seed(0)
    x = torch.rand(BATCH, 3, SIZE, SIZE, generator=g)
    # before the PatchJitter pipelines, so that its numbers print even if those fail
    print("CPU: PerPatch vs PatchSequential (interleaved)")
    per_patch = per_patch_part(x, repeats)
    print(
        f"  PerPatch {1e3 * per_patch['perpatch_colorjiggle_blur']['median_s']:.1f} ms, "
        f"PatchSequential "
        f"{1e3 * per_patch['kornia_patchsequential_colorjiggle_blur']['median_s']:.1f} ms: "
        f"{per_patch['speedup_vs_patchsequential']:.2f}x (paired "
        f"{per_patch['speedup_vs_patchsequential_paired']:.2f}x; same-seed max diff "
        f"{per_patch['max_abs_diff_same_seed']:.1e})"
    )
    paper = PatchJitter.paper(PATCH)
    authors = PatchJitter.authors(PATCH)
    reference = PatchJitter.paper(PATCH, backend="reference")
    jiggle = kornia_patch_sequential(paper, "ColorJiggle")
    jitter = kornia_patch_sequential(paper, "ColorJitter")
    print("CPU pipelines (interleaved)")
    cpu: dict[str, Any] = timeit_interleaved(
        {
            "patchjitter_paper": lambda: paper(x, generator=g),
            "patchjitter_authors": lambda: authors(x, generator=g),
            "patchjitter_paper_reference": lambda: reference(x, generator=g),
            "kornia_patchsequential_colorjiggle": lambda: jiggle(x),
            "kornia_patchsequential_colorjitter": lambda: jitter(x),
        },
        repeats,
    )
    loop_images = 2 if args.quick else 4
    cpu["per_patch_loop"] = timeit(lambda: per_patch_loop(x[:loop_images], paper, g), 1, warmup=0)
    cpu["per_patch_loop"]["median_s"] *= BATCH / loop_images
    cpu["per_patch_loop"]["note"] = f"run on {loop_images} images, scaled to {BATCH}"
    if args.quick:
        cpu["patchjitter_paper_compiled"] = {"status": "skipped (--quick)"}
    else:
        cpu["patchjitter_paper_compiled"] = compiled_run(
            repeats, args.compile_timeout, args.threads
        )
    print("CPU steady state (blocks of calls in a row)")
    steady = timeit_steady(
        {
            "patchjitter_paper": lambda: paper(x, generator=g),
            "kornia_patchsequential_colorjiggle": lambda: jiggle(x),
        },
        rounds=2 if args.quick else 6,
    )
    steady["speedup_vs_patchsequential"] = (
        steady["kornia_patchsequential_colorjiggle"]["median_s"]
        / steady["patchjitter_paper"]["median_s"]
    )
    cpu["steady_state"] = steady
    ours = cpu["patchjitter_paper"]["median_s"]
    cpu["speedup_vs_patchsequential"] = cpu["kornia_patchsequential_colorjiggle"]["median_s"] / ours
    cpu["speedup_vs_patchsequential_paired"] = paired_ratio(
        cpu["kornia_patchsequential_colorjiggle"], cpu["patchjitter_paper"]
    )
    cpu["speedup_vs_patchsequential_colorjitter"] = (
        cpu["kornia_patchsequential_colorjitter"]["median_s"] / ours
    )
    cpu["speedup_vs_loop"] = cpu["per_patch_loop"]["median_s"] / ours
    cpu["per_patch"] = per_patch
    for k, v in cpu.items():
        if isinstance(v, dict) and "median_s" in v:
            print(f"  {k:40s} {1e3 * v['median_s']:9.1f} ms")
    print(
        f"  speed-up vs PatchSequential: {cpu['speedup_vs_patchsequential']:.1f}x "
        f"(paired per round: {cpu['speedup_vs_patchsequential_paired']:.1f}x; steady state: "
        f"{steady['speedup_vs_patchsequential']:.1f}x)"
    )
    res["cpu"] = cpu
    print("Per operator")
    res["per_op"] = per_op_rows(repeats)
    print("GPU")
    res["gpu"] = gpu_part(repeats)
    print(res["gpu"])
    res["machine"]["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    if not args.no_write:
        results_dir = args.out
        results_dir.mkdir(parents=True, exist_ok=True)
        stem = "patch_jitter" + (f"_{args.tag}" if args.tag else "")
        (results_dir / f"{stem}.json").write_text(json.dumps(res, indent=2) + "\n")
        (results_dir / f"{stem}.md").write_text(markdown(res))
        (results_dir / f"{stem}_table.rst").write_text(rst_table(res))
        print(f"wrote {results_dir / stem}.json, .md and _table.rst")


if __name__ == "__main__":
    main()
