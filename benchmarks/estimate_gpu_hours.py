"""GPU-hour estimates for the paper's pretraining runs, from counted FLOPs.

For each preset of Table 7 (CIFAR-10), Table 3 / Table 9 (ImageNet-100) and Table 4
(ImageNet-1K), the matrix-multiply FLOPs of one training image are counted with
:class:`torch.utils.flop_counter.FlopCounterMode` over the real networks of
``pwself_reference.train.build_network`` with the preset's flags: teacher forward
of the global crops, student forward of all crops and student backward, with the
DINO head on the CLS token (DINO) or on every token (PW-Self). The networks run on
PyTorch's ``meta`` device (shapes only, no arithmetic), which gives the same counts
as a CPU run (checked by ``--check-cpu``) in a fraction of the time. timm's fused
attention is switched off while counting so that attention appears as two batched
matrix products (the fused CPU kernel is not in the counter's registry); the
arithmetic is the same.

GPU time = FLOPs per image x images per epoch x epochs / (peak x utilisation),
for an assumed sustained fraction ``--mfu`` (default 0.4) of the dense bf16 peak of
an H100 SXM (989 TFLOP/s) and of an A100 (312 TFLOP/s). Counted: matrix products
and convolutions (forward and backward). Not counted: element-wise work
(LayerNorm, GELU, softmax, the loss, augmentation, the optimizer), data loading,
communication; with out_dim 65536 and the head on every token the softmax / loss
traffic is large (see ``head_outputs_per_image``), so the PW-Self rows at out_dim
65536 are the least certain. Also given: the k-NN monitoring that the presets run
during training and a 100-epoch linear probe with fresh views, both forward-only.

When ``benchmarks/results/gpu_throughput.json`` holds a GPU measurement (not a smoke
run) of ``bench_gpu_throughput.py``, the rows it covers also get GPU-hours from the
measured images/s, which replace the estimate.

Usage::

    python benchmarks/estimate_gpu_hours.py     # writes benchmarks/results/gpu_hours.{json,md}
                                                # and gpu_hours_table.rst
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: training images per epoch
IMAGES = {"CIFAR-10": 50_000, "ImageNet-100": 126_689, "ImageNet-1K": 1_281_167}
#: evaluation (test / validation) images
EVAL_IMAGES = {"CIFAR-10": 10_000, "ImageNet-100": 5_000, "ImageNet-1K": 50_000}
#: dense bf16 peak, TFLOP/s
PEAKS = {"H100 SXM": 989.0, "A100": 312.0}

#: (table, row, preset, dataset, paper linear, paper k-NN k=10, paper k-NN k=20)
ROWS: list[tuple[str, str, str, str, float, float, float]] = [
    ("7", "DINO, ViT-Tiny/32", "cifar10-vit-tiny32-dino", "CIFAR-10", 71.05, 72.19, 72.67),
    ("7", "PW-Self mean, ViT-Tiny/32", "cifar10-vit-tiny32-mean", "CIFAR-10", 75.73, 77.17, 77.24),
    ("7", "DINO, ViT-Tiny/16", "cifar10-vit-tiny16-dino", "CIFAR-10", 75.29, 76.38, 76.24),
    ("7", "PW-Self mean + patch aug, ViT-Tiny/16", "cifar10-vit-tiny16-mean-patchaug", "CIFAR-10",
     79.23, 83.68, 83.56),
    ("7", "PW-Self mean, ViT-Tiny/16", "cifar10-vit-tiny16-mean", "CIFAR-10", 78.10, 82.51, 82.41),
    ("7", "PW-Self sum, ViT-Tiny/16", "cifar10-vit-tiny16-sum", "CIFAR-10", 78.58, 78.86, 78.52),
    ("7", "PW-Self lambda 0.9, ViT-Tiny/16", "cifar10-vit-tiny16-lambda0.9", "CIFAR-10",
     75.87, 76.82, 76.64),
    ("7", "PW-Self lambda 0.8, ViT-Tiny/16", "cifar10-vit-tiny16-lambda0.8", "CIFAR-10",
     76.52, 76.65, 76.94),
    ("7", "PW-Self lambda 0.5, ViT-Tiny/16", "cifar10-vit-tiny16-lambda0.5", "CIFAR-10",
     79.28, 79.10, 79.12),
    ("7", "PW-Self lambda 0.2, ViT-Tiny/16", "cifar10-vit-tiny16-lambda0.2", "CIFAR-10",
     79.65, 79.48, 79.42),
    ("7", "PW-Self lambda 0.1, ViT-Tiny/16", "cifar10-vit-tiny16-lambda0.1", "CIFAR-10",
     79.06, 79.36, 79.04),
    ("3", "DINO, ViT-Tiny/16", "imagenet100-vit-tiny16-dino", "ImageNet-100", 58.08, 51.84, 52.74),
    ("3", "PW-Self mean, ViT-Tiny/16", "imagenet100-vit-tiny16-mean", "ImageNet-100",
     61.83, 59.23, 59.07),
    ("3", "DINO, ViT-Small/16", "imagenet100-vit-small16-dino", "ImageNet-100",
     70.92, 64.64, 64.74),
    ("3", "PW-Self mean, ViT-Small/16", "imagenet100-vit-small16-mean", "ImageNet-100",
     74.70, 68.45, 68.28),
    ("3", "DINO, ViT-Base/16", "imagenet100-vit-base16-dino", "ImageNet-100", 78.22, 68.58, 68.84),
    ("3", "PW-Self mean, ViT-Base/16", "imagenet100-vit-base16-mean", "ImageNet-100",
     83.46, 76.37, 76.23),
    ("9", "PW-Self mean + patch aug, ViT-Base/16", "imagenet100-vit-base16-mean-patchaug",
     "ImageNet-100", 83.46, 76.37, 76.23),
    ("9", "PW-Self mean, ViT-Base/8", "imagenet100-vit-base8-mean", "ImageNet-100",
     78.53, 69.88, 68.78),
    ("4", "PW-Self mean, ViT-Base/16", "imagenet1k-vit-base16-mean", "ImageNet-1K",
     73.51, 68.71, 68.42),
]


def preset_args(preset: str) -> argparse.Namespace:
    from pwself_reference.config import parse_args

    # no data is read: a dataset that needs no directory
    return parse_args(["--preset", preset, "--dataset", "fashion-mnist-mini", "--crops",
                       "batched"])


def _unfuse_attention(net: Any) -> None:
    for m in net.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False


def count_flops(args: argparse.Namespace, device: str = "meta") -> dict[str, float]:
    """Matrix-multiply FLOPs of one training image and of one evaluation forward.

    Returns
    -------
    dict
        ``teacher_fwd``, ``student_fwd``, ``student_bwd``, ``train`` (their sum),
        ``head`` (the head's share of ``train``), ``eval_fwd`` (backbone forward of
        one ``global_crop_size`` image, the k-NN / linear-probe feature), and
        ``head_outputs_per_image`` (teacher + student head output values, tokens x
        out_dim).
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from pwself_reference import train as T

    patch_level = args.loss != "dino"
    with torch.device(device):
        student = T.build_network(args, 0.0)
        teacher = T.build_network(args, 0.0)
    for net in (student, teacher):
        _unfuse_attention(net)
    for p in teacher.parameters():
        p.requires_grad_(False)
    g, lo = args.global_crop_size, args.local_crop_size
    views = ([torch.rand(1, 3, g, g, device=device) for _ in range(args.global_crops_number)]
             + [torch.rand(1, 3, lo, lo, device=device) for _ in range(args.local_crops_number)])

    def head_flops(counter: FlopCounterMode) -> float:
        return float(sum(n for k, d in counter.get_flop_counts().items()
                         if k.endswith(".head") for n in d.values()))

    with FlopCounterMode(display=False) as fc_t, torch.no_grad():
        t_out = teacher(views[: args.global_crops_number], all_tokens=patch_level)
    with FlopCounterMode(display=False) as fc_f, torch.no_grad():  # student forward alone
        student(views, all_tokens=patch_level)
    with FlopCounterMode(display=False) as fc_s:  # student forward + backward
        s_out = student(views, all_tokens=patch_level)
        loss = sum(o.float().sum() for o in s_out)  # element-wise: no matmul FLOPs
        loss.backward()
    with FlopCounterMode(display=False) as fc_e, torch.no_grad():
        teacher.backbone.forward_features(torch.rand(1, 3, g, g, device=device))
    res = {
        "teacher_fwd": float(fc_t.get_total_flops()),
        "student_fwd": float(fc_f.get_total_flops()),
        "student_bwd": float(fc_s.get_total_flops() - fc_f.get_total_flops()),
        "eval_fwd": float(fc_e.get_total_flops()),
        "head_outputs_per_image": float(sum(o[0].numel() for o in t_out)
                                        + sum(o[0].numel() for o in s_out)),
    }
    res["train"] = res["teacher_fwd"] + res["student_fwd"] + res["student_bwd"]
    res["head"] = head_flops(fc_t) + head_flops(fc_s)
    return res


def load_measured(path: Path) -> dict[str, Any] | None:
    """GPU measurements of ``bench_gpu_throughput.py`` (``None`` without a real one)."""
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    if data.get("meta", {}).get("smoke", True):
        return None
    return data


def measured_hours(preset: str, args: argparse.Namespace, images: float,
                   measured: dict[str, Any] | None) -> float | None:
    """GPU-hours from a measured images/s of the same arch / loss / patch aug, if any."""
    if measured is None or not preset.startswith("imagenet") or args.patch_size != 16:
        return None
    for r in measured["results"]:
        if (r.get("images_per_s") and r["arch"] == args.arch and r["loss"] == args.loss
                and r["patch_aug"] == args.patch_aug and r["out_dim"] == args.out_dim):
            return images / r["images_per_s"] / 3600.0
    return None


def build(mfu: float, check_cpu: bool, measured: dict[str, Any] | None) -> dict[str, Any]:
    cache: dict[tuple, dict[str, float]] = {}
    rows = []
    for table, label, preset, dataset, lin, k10, k20 in ROWS:
        args = preset_args(preset)
        # mean / sum / lambda and patch augmentation do not change the matrix products
        key = (args.arch, args.patch_size, args.loss == "dino", args.out_dim,
               args.global_crops_number, args.local_crops_number, args.global_crop_size,
               args.local_crop_size)
        if key not in cache:
            cache[key] = count_flops(args)
        f = cache[key]
        n_train = IMAGES[dataset] * args.epochs
        knn_evals = 1 + (args.epochs // args.knn_every if args.knn_every else 0)
        if args.knn_every and args.epochs % args.knn_every:
            knn_evals += 1  # the last epoch is always evaluated
        knn_flops = knn_evals * (IMAGES[dataset] + EVAL_IMAGES[dataset]) * f["eval_fwd"]
        linear_flops = 100 * (IMAGES[dataset] + EVAL_IMAGES[dataset]) * f["eval_fwd"]
        train_flops = n_train * f["train"]
        row: dict[str, Any] = {
            "table": table, "row": label, "preset": preset, "dataset": dataset,
            "paper_linear": lin, "paper_knn10": k10, "paper_knn20": k20,
            "arch": args.arch, "patch_size": args.patch_size, "loss": args.loss,
            "patch_aug": args.patch_aug, "out_dim": args.out_dim, "epochs": args.epochs,
            "batch_per_gpu": args.batch_size, "images_per_epoch": IMAGES[dataset],
            "crops": f"{args.global_crops_number}x{args.global_crop_size} + "
                     f"{args.local_crops_number}x{args.local_crop_size}",
            "gflop_per_image": {k: v / 1e9 for k, v in f.items() if k != "head_outputs_per_image"},
            "head_outputs_per_image": f["head_outputs_per_image"],
            "train_pflop": train_flops / 1e15, "knn_evals": knn_evals,
            "knn_pflop": knn_flops / 1e15, "linear_probe_pflop": linear_flops / 1e15,
            "gpu_hours": {}, "gpu_hours_knn": {}, "gpu_hours_linear_probe": {},
        }
        for gpu, peak in PEAKS.items():
            rate = peak * 1e12 * mfu
            row["gpu_hours"][gpu] = train_flops / rate / 3600.0
            row["gpu_hours_knn"][gpu] = knn_flops / rate / 3600.0
            row["gpu_hours_linear_probe"][gpu] = linear_flops / rate / 3600.0
        mh = measured_hours(preset, args, n_train, measured)
        if mh is not None:
            row["gpu_hours_measured"] = {measured["meta"]["device_name"]: mh}
        rows.append(row)

    check = None
    if check_cpu:  # the meta-device count equals a real CPU forward + backward
        args = preset_args("cifar10-vit-tiny16-mean")
        cpu, meta = count_flops(args, "cpu"), count_flops(args, "meta")
        check = {"preset": "cifar10-vit-tiny16-mean", "cpu": cpu, "meta": meta,
                 "equal": cpu == meta}
        if cpu != meta:
            raise SystemExit(f"meta and CPU FLOP counts differ: {cpu} vs {meta}")
    import torch

    meta_info = {
        "mfu": mfu, "peak_tflops_bf16_dense": PEAKS, "images_per_epoch": IMAGES,
        "eval_images": EVAL_IMAGES, "torch": torch.__version__, "cpu_check": check,
        "counted": "matrix products and convolutions of teacher forward, student forward and "
                   "student backward (torch.utils.flop_counter), batch 1, meta device",
        "not_counted": "element-wise work (LayerNorm, GELU, softmax, loss, augmentation, "
                       "optimizer, EMA), data loading, communication",
        "measured_source": (measured["meta"]["device_name"] if measured else None),
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }
    return {"meta": meta_info, "rows": rows}


def _fmt_h(h: float) -> str:
    return f"{h:.2f}" if h < 1 else f"{h:.1f}" if h < 100 else f"{h:.0f}"


def write(payload: dict[str, Any], out: Path) -> list[Path]:
    """``gpu_hours.json``, ``gpu_hours.md`` and the docs table ``gpu_hours_table.rst``."""
    out.mkdir(parents=True, exist_ok=True)
    meta, rows = payload["meta"], payload["rows"]
    mfu_pct = f"{100 * meta['mfu']:.0f}%"
    has_measured = any("gpu_hours_measured" in r for r in rows)
    cols = ["table", "row", "preset", "GFLOP / image (train)", "head share", "PFLOP (train)",
            f"H100 h @ {mfu_pct}", f"A100 h @ {mfu_pct}", "k-NN monitor H100 h",
            "linear probe H100 h"] + (["measured GPU h"] if has_measured else [])
    cells = []
    for r in rows:
        g = r["gpu_hours"]
        c = [r["table"], r["row"], r["preset"], f"{r['gflop_per_image']['train']:.1f}",
             f"{100 * r['gflop_per_image']['head'] / r['gflop_per_image']['train']:.0f}%",
             f"{r['train_pflop']:.0f}", _fmt_h(g["H100 SXM"]), _fmt_h(g["A100"]),
             _fmt_h(r["gpu_hours_knn"]["H100 SXM"]),
             _fmt_h(r["gpu_hours_linear_probe"]["H100 SXM"])]
        if has_measured:
            m = r.get("gpu_hours_measured")
            c.append(", ".join(f"{_fmt_h(v)} ({k})" for k, v in m.items()) if m else "")
        cells.append(c)

    (out / "gpu_hours.json").write_text(json.dumps(payload, indent=2) + "\n")
    md = ["# Estimated GPU-hours of the paper's pretraining runs", "",
          f"Matrix-multiply FLOPs per training image counted with torch.utils.flop_counter "
          f"(teacher forward + student forward + student backward, batch 1); GPU-hours = FLOPs "
          f"x images x epochs / ({mfu_pct} of the dense bf16 peak: H100 SXM "
          f"{PEAKS['H100 SXM']:.0f}, A100 {PEAKS['A100']:.0f} TFLOP/s). Estimates, not "
          f"measurements. Not counted: {meta['not_counted']}.", "",
          "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(c) + " |" for c in cells]
    (out / "gpu_hours.md").write_text("\n".join(md) + "\n")

    rst = [f".. list-table:: Estimated GPU-hours per pretraining run ({mfu_pct} of the dense "
           "bf16 peak)", "   :header-rows: 1", ""]
    for line in [cols] + [[c[0], c[1], f"``{c[2]}``", *c[3:]] for c in cells]:
        rst.append("   * - " + (line[0] or " "))
        rst += [f"     - {x}" if x else "     -" for x in line[1:]]
    (out / "gpu_hours_table.rst").write_text("\n".join(rst) + "\n")
    return [out / "gpu_hours.json", out / "gpu_hours.md", out / "gpu_hours_table.rst"]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mfu", type=float, default=0.4,
                    help="assumed sustained fraction of the dense bf16 peak (0-1]")
    ap.add_argument("--check-cpu", action="store_true",
                    help="also count one CIFAR ViT-Tiny/16 configuration on the CPU and require "
                         "the same numbers as on the meta device")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    a = ap.parse_args(argv)
    if not 0 < a.mfu <= 1:
        raise SystemExit(f"error: --mfu must be in (0, 1], got {a.mfu}")
    import torch

    torch.set_num_threads(1)
    measured = load_measured(a.out / "gpu_throughput.json")
    payload = build(a.mfu, a.check_cpu, measured)
    for p in write(payload, a.out):
        print(f"wrote {p}")
    print((a.out / "gpu_hours.md").read_text())
    return payload


if __name__ == "__main__":
    main()
