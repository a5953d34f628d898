"""Training throughput (images/s) of DINO and PW-Self on a CUDA device.

For each architecture (default ViT-S/16 and ViT-B/16) and each configuration (DINO,
PW-Self ``mean``, PW-Self ``mean`` + patch augmentation ``PatchJitter.authors(16)``)
the ImageNet-100 preset (``--preset imagenet100-<arch>16-<loss>``: 2 x 224 + 8 x 96
crops, out_dim 65536, per-token centre, batch 64) is built and
:func:`pwself_reference.train.train_one_epoch` itself is timed, so the timed step is
the training step: batched crops + DINO photometric augmentation (+ patch
augmentation) on the device, matching, teacher and student forward under bf16
autocast, loss, backward, per-parameter clipping, AdamW, teacher EMA.

What is not timed: data loading and JPEG decoding. The images are random uint8
``(B, 3, 256, 256)`` tensors already on the device, cropped by the batched
(on-device) crop path (``--crops batched``); the ImageNet presets crop in the data
loader instead, which costs CPU time that depends on the host, not the GPU.

``warmup`` steps (CUDA kernels, autotuning, allocator) run first, then ``steps``
steps are timed between two ``torch.cuda.synchronize()``; images/s = steps x batch /
elapsed. Peak memory is ``torch.cuda.max_memory_allocated``. A configuration that
runs out of memory is retried with half the batch (the JSON records the batch used
and the batches that failed).

Usage::

    python benchmarks/bench_gpu_throughput.py            # CUDA only; writes
                                                         # benchmarks/results/gpu_throughput.{json,md}
    python benchmarks/bench_gpu_throughput.py --archs vit_base --configs dino pwself-mean
    python benchmarks/bench_gpu_throughput.py --smoke    # tiny model on the CPU, writes nothing
                                                         # unless --out is given (code-path check)

Without a CUDA device (and without ``--smoke``) it refuses with exit status 2.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: configuration name -> (loss, patch_aug, further train.py flags); PW-Self runs with the
#: fused loss (the default) unless a configuration turns it off
CONFIGS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "dino": ("dino", "none", ()),
    "pwself-mean": ("mean", "none", ()),
    "pwself-mean-patchaug": ("mean", "authors", ()),
    "pwself-mean-matched": ("mean", "none", ("--head-tokens", "matched")),
    "pwself-mean-unfused": ("mean", "none", ("--fused-loss", "off")),
}
ARCHS = ("vit_tiny", "vit_small", "vit_base")

#: flags of the ``--smoke`` mode: a 1-block, 32-wide ViT on 32 / 16 px crops, patch 8
SMOKE_FLAGS = ["--depth", "1", "--embed-dim", "32", "--num-heads", "2", "--patch-size", "8",
               "--global-crop-size", "32", "--local-crop-size", "16", "--local-crops-number", "2",
               "--out-dim", "64", "--head-hidden-dim", "32", "--head-bottleneck-dim", "16"]


def build_args(arch: str, config: str, batch: int, device: str, precision: str,
               smoke: bool, local_crops: int | None = None) -> argparse.Namespace:
    """train.py's flags for one measurement: the ImageNet-100 preset, on-device crops."""
    from pwself_reference.config import parse_args

    loss, patch_aug, flags = CONFIGS[config]
    argv = ["--preset", f"imagenet100-{arch.replace('_', '-')}16-{loss}",
            # no data is read: a dataset that needs no directory, and on-device crops
            "--dataset", "fashion-mnist-mini", "--crops", "batched",
            "--patch-aug", patch_aug, "--batch-size", str(batch), "--device", device,
            "--precision", precision, "--knn-every", "0", "--no-plots", "--no-progress",
            "--output-dir", tempfile.gettempdir(), *flags]
    if smoke:
        argv += SMOKE_FLAGS
    if local_crops is not None:
        argv += ["--local-crops-number", str(local_crops)]
    return parse_args(argv)


def build_trainer(args: argparse.Namespace, images: Any, n_steps: int) -> Any:
    """A :class:`pwself_reference.train.Trainer` as ``train.main`` builds it, minus the data.

    ``images`` is one ``(B, 3, H, W)`` uint8 batch on the device, served ``n_steps``
    times by a plain list standing in for the data loader.
    """

    from pwself_reference import distributed as D
    from pwself_reference import train as T
    from pwself_reference.schedules import cosine_schedule

    device = T.resolve_device(args.device)
    amp_dtype = T.resolve_precision(args.precision, device)
    student, teacher, criterion, optimizer, scaler = T.build_models(args, device, amp_dtype)
    spec = T.crop_spec(args)
    view_aug = T.build_view_augment(args, spec)
    batch = images.shape[0]
    schedules = T.Schedules(
        lr=cosine_schedule(args.lr * batch / 256.0, args.min_lr, 1, n_steps, 0),
        wd=cosine_schedule(args.weight_decay, args.weight_decay_end, 1, n_steps),
        momentum=cosine_schedule(args.momentum_teacher, 1.0, 1, n_steps),
    )
    return T.Trainer(args=args, device=device, dist=D.DistInfo(), student=student,
                     teacher=teacher, criterion=criterion, optimizer=optimizer, scaler=scaler,
                     amp_dtype=amp_dtype, spec=spec, view_aug=view_aug, schedules=schedules,
                     steps_per_epoch=n_steps, out_dir=Path(args.output_dir),
                     loader=[images] * n_steps)


def measure(arch: str, config: str, batch: int, steps: int, warmup: int, image_size: int,
            device: str, precision: str, smoke: bool,
            local_crops: int | None = None) -> dict[str, Any]:
    """Time ``steps`` training steps (after ``warmup``) of one configuration."""
    import torch

    from pwself_reference import train as T

    args = build_args(arch, config, batch, device, precision, smoke, local_crops)
    dev = T.resolve_device(args.device)
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, image_size, image_size), dtype=torch.uint8,
                           generator=gen).to(dev)
    tr = build_trainer(args, images, warmup + steps)
    # past the frozen-last-layer epoch(s): the whole head trains, as in most of a run
    epoch = args.freeze_last_layer

    def run(n: int) -> tuple[float, dict[str, float]]:
        tr.steps_per_epoch = tr.global_step + n  # train_one_epoch stops at this index
        tr.loader = [images] * n
        if cuda:
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        stats = T.train_one_epoch(tr, epoch, start_it=tr.global_step)
        if cuda:
            torch.cuda.synchronize(dev)
        return time.perf_counter() - t0, stats

    run(warmup)
    elapsed, stats = run(steps)
    tokens = sum(1 + (s // args.patch_size) ** 2 for s in
                 [args.global_crop_size] * args.global_crops_number
                 + [args.local_crop_size] * args.local_crops_number)
    res = {
        "config": config, "arch": arch, "patch_size": args.patch_size, "loss": args.loss,
        "patch_aug": args.patch_aug, "head_tokens": args.head_tokens,
        "fused_loss": args.fused_loss if args.loss != "dino" else None,
        "out_dim": args.out_dim, "batch": batch,
        "crops": f"{args.global_crops_number}x{args.global_crop_size} + "
                 f"{args.local_crops_number}x{args.local_crop_size}",
        "precision": str(tr.amp_dtype).replace("torch.", "") if tr.amp_dtype else "fp32",
        "warmup_steps": warmup, "timed_steps": steps, "elapsed_s": elapsed,
        "s_per_step": elapsed / steps, "images_per_s": steps * batch / elapsed,
        "student_tokens_per_image": tokens if args.loss != "dino" else
        args.global_crops_number + args.local_crops_number,
        "mean_loss": stats["loss"],
        "peak_memory_gib": torch.cuda.max_memory_allocated(dev) / 2**30 if cuda else None,
    }
    return res


def measure_with_fallback(arch: str, config: str, batch: int, min_batch: int,
                          **kw: Any) -> dict[str, Any]:
    """:func:`measure`, halving the batch after a CUDA out-of-memory error."""
    import torch

    failed: list[int] = []
    while batch >= min_batch:
        try:
            res = measure(arch, config, batch, **kw)
            res["oom_batches"] = failed
            return res
        except torch.OutOfMemoryError:
            failed.append(batch)
        # outside the except block: the traceback no longer holds the trainer's tensors
        gc.collect()
        torch.cuda.empty_cache()
        batch //= 2
    return {"config": config, "arch": arch, "batch": None, "oom_batches": failed,
            "images_per_s": None, "error": f"out of memory down to batch {failed[-1]}"}


def median_round(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The round with the median images/s of one configuration (the lower middle one for an
    even count), with every round's images/s beside it; the first round if every one failed
    (out of memory)."""
    ok = sorted((r for r in runs if r.get("images_per_s")), key=lambda r: r["images_per_s"])
    if not ok:
        return runs[0]
    return {**ok[(len(ok) - 1) // 2],
            "images_per_s_rounds": [r.get("images_per_s") for r in runs]}


def environment(device: str) -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(),
                           "host": platform.node(), "cpu": platform.processor() or
                           platform.machine()}
    if device.startswith("cuda"):
        dev = torch.device(device)
        props = torch.cuda.get_device_properties(dev)
        env.update({
            "device_name": torch.cuda.get_device_name(dev),
            "device_memory_gib": props.total_memory / 2**30,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "bf16_supported": torch.cuda.is_bf16_supported(),
        })
    else:
        env["device_name"] = f"CPU ({env['cpu']}), smoke test only"
    return env


def write_results(payload: dict[str, Any], out: Path) -> list[Path]:
    """Write ``gpu_throughput.json`` and ``gpu_throughput.md`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    meta, results = payload["meta"], payload["results"]
    js = out / "gpu_throughput.json"
    js.write_text(json.dumps(payload, indent=2) + "\n")
    lines = [
        "# Training throughput on a GPU",
        "",
        f"Device: **{meta['device_name']}**; torch {meta['torch']}"
        + (f", CUDA {meta['cuda']}" if meta.get("cuda") else "")
        + f"; {meta['precision']} autocast; {meta['warmup']} warm-up + {meta['steps']} timed "
        f"steps of `pwself_reference.train.train_one_epoch` per row (source images "
        f"{meta['image_size']} px uint8 on the device, on-device batched crops; no data "
        f"loading)."
        + (f" Each row is the median of {meta['rounds']} rounds that interleave the "
           "configurations; images/s of the slowest and fastest round in brackets."
           if meta.get("rounds", 1) > 1 else "")
        + (" SMOKE RUN (tiny model), not a measurement." if meta["smoke"] else ""),
        "",
        "| arch | config | crops | out_dim | batch | images/s | s/step | x DINO time/image | "
        "peak memory (GiB) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    dino = {r["arch"]: r for r in results if r["config"] == "dino" and r.get("images_per_s")}
    for r in results:
        if not r.get("images_per_s"):
            lines.append(f"| {r['arch']} | {r['config']} | | | | {r.get('error')} | | | |")
            continue
        d = dino.get(r["arch"])
        ratio = f"{d['images_per_s'] / r['images_per_s']:.2f}x" if d else ""
        mem = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "n/a"
        ips = f"{r['images_per_s']:.1f}"
        spread = [x for x in r.get("images_per_s_rounds", []) if x]
        if len(spread) > 1:
            ips += f" ({min(spread):.1f}-{max(spread):.1f})"
        lines.append(f"| {r['arch']}/{r['patch_size']} | {r['config']} | {r['crops']} | "
                     f"{r['out_dim']} | {r['batch']} | {ips} | "
                     f"{r['s_per_step']:.3f} | {ratio} | {mem} |")
    md = out / "gpu_throughput.md"
    md.write_text("\n".join(lines) + "\n")
    rst = out / "gpu_throughput_table.rst"
    rst.write_text(rst_table(payload))
    return [js, md, rst]


def rst_table(payload: dict[str, Any]) -> str:
    """The measurements as a reStructuredText list-table (included by the docs)."""
    meta, results = payload["meta"], payload["results"]
    head = ["arch", "config", "batch", "images/s", "s / step", "x DINO time / image",
            "peak GiB"]
    out = [f".. list-table:: Training throughput on {meta['device_name']} "
           f"({meta['precision']} autocast, torch {meta['torch']})",
           "   :header-rows: 1", ""]
    rows = [head]
    dino = {r["arch"]: r for r in results if r["config"] == "dino" and r.get("images_per_s")}
    for r in results:
        if not r.get("images_per_s"):
            rows.append([r["arch"], r["config"], "", r.get("error", ""), "", "", ""])
            continue
        d = dino.get(r["arch"])
        rows.append([f"{r['arch']}/{r['patch_size']}", r["config"], str(r["batch"]),
                     f"{r['images_per_s']:.1f}", f"{r['s_per_step']:.3f}",
                     f"{d['images_per_s'] / r['images_per_s']:.2f}x" if d else "",
                     f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else ""])
    for row in rows:
        out.append(f"   * - {row[0]}")
        out += [f"     - {cell}" for cell in row[1:]]
    return "\n".join(out) + "\n"


def _refuse(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the measurements; returns ``{"meta": ..., "results": [...]}``."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--archs", nargs="+", default=["vit_small", "vit_base"], choices=ARCHS)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--batch-size", type=int, default=None,
                    help="images per step (default: the preset's, 64; --smoke: 4)")
    ap.add_argument("--min-batch", type=int, default=8,
                    help="give up a configuration when out of memory below this batch")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 10; smoke 2)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 3; smoke 1)")
    ap.add_argument("--image-size", type=int, default=None,
                    help="side of the random source images (default 256; smoke 40)")
    ap.add_argument("--local-crops-number", type=int, default=None,
                    help="local 96 px crops per image (default: the preset's, 8; DINO also "
                         "used 10)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="measure every configuration this many times, interleaved, and "
                         "report the median round (step times move by up to 17%% between "
                         "runs on a shared GPU machine)")
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--device", default="cuda", help="cuda or cuda:N (cpu only with --smoke)")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny model, 2 steps, on the CPU unless --device says otherwise: checks "
                         "the code path; writes nothing unless --out is given")
    ap.add_argument("--out", type=Path, default=None,
                    help="output directory (default: benchmarks/results; --smoke: none)")
    a = ap.parse_args(argv)

    import torch

    if a.smoke and a.device == "cuda" and not torch.cuda.is_available():
        a.device = "cpu"
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        _refuse("no CUDA device here; this benchmark measures GPU throughput. Run it on a "
                "machine with a GPU, or use --smoke for a CPU check of the code path.")
    if a.device == "cpu" and not a.smoke:
        _refuse("--device cpu is only allowed with --smoke (CPU step times are measured by "
                "benchmarks/bench_training_cost.py)")
    for flag in ("batch_size", "steps", "warmup", "image_size", "min_batch", "rounds"):
        v = getattr(a, flag)
        if v is not None and v <= 0 and not (flag == "warmup" and v == 0):
            _refuse(f"--{flag.replace('_', '-')} must be > 0, got {v}")
    batch = a.batch_size or (4 if a.smoke else 64)
    steps = a.steps or (2 if a.smoke else 10)
    warmup = a.warmup if a.warmup is not None else (1 if a.smoke else 3)
    image_size = a.image_size or (40 if a.smoke else 256)
    out = a.out if a.out is not None else (None if a.smoke else ROOT / "benchmarks" / "results")
    if a.smoke and a.device == "cpu":
        torch.set_num_threads(1)

    meta = {**environment(a.device), "precision": a.precision, "steps": steps,
            "warmup": warmup, "image_size": image_size, "smoke": a.smoke,
            "requested_batch": batch, "local_crops_number": a.local_crops_number,
            "rounds": a.rounds, "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
            "command": "python benchmarks/bench_gpu_throughput.py " + " ".join(
                argv if argv is not None else sys.argv[1:])}
    results = []
    for arch in a.archs:
        # rounds interleave the configurations, so a slow spell of the machine hits them all
        rounds: dict[str, list[dict[str, Any]]] = {c: [] for c in a.configs}
        for _ in range(a.rounds):
            for config in a.configs:
                r = measure_with_fallback(arch, config, batch, min(a.min_batch, batch),
                                          steps=steps, warmup=warmup, image_size=image_size,
                                          device=a.device, precision=a.precision,
                                          smoke=a.smoke, local_crops=a.local_crops_number)
                rounds[config].append(r)
                ips = r["images_per_s"]
                print(f"{arch:9s} {config:22s} batch {r['batch']}: "
                      + (f"{ips:.1f} images/s, {r['s_per_step']:.3f} s/step" if ips
                         else r["error"]), flush=True)
        results += [median_round(rounds[c]) for c in a.configs]
    payload = {"meta": meta, "results": results}
    if out is not None:
        for p in write_results(payload, out):
            print(f"wrote {p}")
    return payload


if __name__ == "__main__":
    main()
