"""Command-line flags, presets and validation of ``pwself_reference/train.py``.

Every flag has help text (``python pwself_reference/train.py --help``). A
``--preset`` sets a group of defaults (the paper's settings); flags given on the
command line override it. :func:`validate` rejects a bad configuration before
anything is built, with a message naming the flag.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["PRESETS", "build_parser", "parse_args", "validate", "ConfigError", "to_dict",
           "center_batch_mean", "resolve_device", "default_threads", "NOT_IN_CONFIG"]

_PAPER_CIFAR = dict(
    dataset="cifar10", arch="vit_tiny", patch_size=16, depth=None, embed_dim=None, num_heads=None,
    out_dim=1000, head_hidden_dim=2048, head_bottleneck_dim=256,
    global_crop_size=224, local_crop_size=96, local_crops_number=8,
    global_crops_scale=(0.4, 1.0), local_crops_scale=(0.05, 0.4),
    batch_size=40, lr=5e-4, min_lr=1e-6, epochs=200, warmup_epochs=10, drop_path=0.1,
    weight_decay=0.04, weight_decay_end=0.4, momentum_teacher=0.996, teacher_temp=0.07,
    warmup_teacher_temp=0.04, warmup_teacher_temp_epochs=30, clip_grad=3.0, freeze_last_layer=1,
    blur_sigma=(0.1, 2.0), knn_every=10, eval_resize_ratio=1.0, crops="batched",
    center="per-token", same_spatial_aug=True, match_rule="official", patch_aug="none",
)
_PAPER_IN100 = dict(
    _PAPER_CIFAR, dataset="imagefolder", out_dim=65536, batch_size=64, epochs=200,
    eval_resize_ratio=256 / 224, crops="loader", knn_every=20,
)

#: Named groups of defaults. ``fashion-mnist-cpu`` is the no-argument default.
PRESETS: dict[str, dict[str, Any]] = {
    "fashion-mnist-cpu": {},
    # Table 7 (CIFAR-10, ViT-Tiny/16, 32 px upsampled to 224/96, 200 epochs)
    "cifar10-vit-tiny16-dino": dict(_PAPER_CIFAR, loss="dino"),
    "cifar10-vit-tiny16-mean": dict(_PAPER_CIFAR, loss="mean"),
    "cifar10-vit-tiny16-mean-patchaug": dict(_PAPER_CIFAR, loss="mean", patch_aug="authors"),
    "cifar10-vit-tiny16-sum": dict(_PAPER_CIFAR, loss="sum"),
    **{f"cifar10-vit-tiny16-lambda{lam}": dict(_PAPER_CIFAR, loss="lambda", lam=lam)
       for lam in (0.9, 0.8, 0.5, 0.2, 0.1)},
    "cifar10-vit-tiny32-dino": dict(_PAPER_CIFAR, loss="dino", patch_size=32),
    "cifar10-vit-tiny32-mean": dict(_PAPER_CIFAR, loss="mean", patch_size=32),
    # Table 3 / Table 9 (ImageNet-100, 200 epochs)
    **{f"imagenet100-{arch.replace('_', '-')}16-{loss}": dict(_PAPER_IN100, arch=arch, loss=loss)
       for arch in ("vit_tiny", "vit_small", "vit_base") for loss in ("dino", "mean")},
    "imagenet100-vit-base16-mean-patchaug": dict(_PAPER_IN100, arch="vit_base", loss="mean",
                                                 patch_aug="authors"),
    "imagenet100-vit-base8-mean": dict(_PAPER_IN100, arch="vit_base", loss="mean", patch_size=8),
    # Table 4 (ImageNet-1K, ViT-B/16, 50 epochs)
    "imagenet1k-vit-base16-mean": dict(_PAPER_IN100, arch="vit_base", loss="mean", epochs=50,
                                       warmup_epochs=10, knn_every=10),
}


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the flag."""


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with the ``fashion-mnist-cpu`` defaults."""
    p = argparse.ArgumentParser(
        prog="python pwself_reference/train.py",
        description="DINO / PW-Self self-supervised pretraining of a ViT, with k-NN monitoring.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("run")
    g.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="group of defaults for one of the paper's settings; explicit flags win")
    g.add_argument("--output-dir", default="runs/pwself",
                   help="directory for checkpoints, config.json, log.jsonl and plots")
    g.add_argument("--resume", action="store_true",
                   help="continue from OUTPUT_DIR/checkpoint.pth (same flags needed)")
    g.add_argument("--seed", type=int, default=0, help="random seed (data, init, augmentation)")
    g.add_argument("--device", default="auto",
                   help="'auto' (CUDA when available, else CPU), 'cpu', 'cuda' or 'cuda:N'")
    g.add_argument("--num-workers", type=int, default=0, help="data loader worker processes")
    g.add_argument("--threads", type=int, default=0,
                   help="CPU threads for torch (0: all cores / processes on this node)")
    g.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="mixed precision: auto = bf16 (or fp16 with loss scaling) on CUDA, fp32 on CPU")
    g.add_argument("--save-every-steps", type=int, default=0,
                   help="also checkpoint every N steps (0: only at the end of each epoch)")
    g.add_argument("--saveckp-freq", type=int, default=0,
                   help="also keep checkpointNNNN.pth (NNNN: epochs done) every N epochs, "
                        "beside the rolling checkpoint.pth (0: off)")
    g.add_argument("--log-every", type=int, default=10, help="log a JSON record every N steps")
    g.add_argument("--knn-every", type=int, default=1,
                   help="k-NN evaluation every N epochs (and at init and at the end); 0 disables")
    g.add_argument("--knn-k", type=int, default=20, help="neighbours of the k-NN classifier")
    g.add_argument("--knn-temperature", type=float, default=0.07, help="k-NN vote temperature")
    g.add_argument("--eval-resize-ratio", type=float, default=1.0,
                   help="k-NN images: resize the short side to global_crop_size * ratio, then "
                        "centre-crop global_crop_size (ImageNet: 256/224)")
    g.add_argument("--no-plots", action="store_true", help="do not write the PNG plots")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--stop-after-steps", type=int, default=0,
                   help="testing aid: exit (as if killed) after this many steps of this process")
    g.add_argument("--dist-backend", default="auto", choices=["auto", "nccl", "gloo"],
                   help="torch.distributed backend under torchrun (auto: nccl on CUDA, gloo on CPU)")
    g.add_argument("--debug", action="store_true",
                   help="on a bad configuration or input, raise with the traceback instead of "
                        "one line on stderr and exit status 2 (not part of config.json)")

    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="fashion-mnist-mini",
                   help="fashion-mnist-mini (bundled), fashion-mnist, cifar10, cifar100, stl10, "
                        "imagefolder")
    g.add_argument("--data-path", default=None,
                   help="data directory (not needed for fashion-mnist-mini; for imagefolder the "
                        "root holding train/ and val/)")
    g.add_argument("--train-subset", type=int, default=0,
                   help="use only this many (seeded, random) training images (0: all)")
    g.add_argument("--test-subset", type=int, default=0,
                   help="use only this many (seeded, random) k-NN test images (0: all)")
    g.add_argument("--batch-size", type=int, default=32, help="images per process and step")
    g.add_argument("--eval-batch-size", type=int, default=256, help="batch size of k-NN feature extraction")

    g = p.add_argument_group("model")
    g.add_argument("--arch", default="vit_tiny",
                   help="vit_tiny, vit_small, vit_base or any timm ViT name")
    g.add_argument("--patch-size", type=int, default=4, help="ViT patch size in pixels")
    g.add_argument("--depth", type=int, default=4,
                   help="override: number of transformer blocks (omit with --preset for timm's)")
    g.add_argument("--embed-dim", type=int, default=128,
                   help="override: token width (omit with --preset for timm's)")
    g.add_argument("--num-heads", type=int, default=4,
                   help="override: attention heads (omit with --preset for timm's)")
    g.add_argument("--drop-path", type=float, default=0.0, help="stochastic depth rate")
    g.add_argument("--out-dim", type=int, default=1024, help="prototypes K of the DINO head")
    g.add_argument("--head-hidden-dim", type=int, default=256, help="DINO head MLP width (DINO: 2048)")
    g.add_argument("--head-bottleneck-dim", type=int, default=64, help="DINO head bottleneck (DINO: 256)")
    g.add_argument("--norm-last-layer", type=_bool, default=True,
                   help="fix the weight-norm gain of the head's last layer (DINO's default)")

    g = p.add_argument_group("crops")
    g.add_argument("--global-crops-number", type=int, default=2, help="global crops per image (>= 1)")
    g.add_argument("--global-crop-size", type=int, default=28, help="global crop side in pixels")
    g.add_argument("--global-crops-scale", type=float, nargs=2, metavar=("LO", "HI"), default=(0.4, 1.0),
                   help="area fraction range of global crops")
    g.add_argument("--local-crops-number", type=int, default=6, help="local crops per image (0 allowed)")
    g.add_argument("--local-crop-size", type=int, default=12, help="local crop side in pixels")
    g.add_argument("--local-crops-scale", type=float, nargs=2, metavar=("LO", "HI"), default=(0.1, 0.4),
                   help="area fraction range of local crops")
    g.add_argument("--interpolation", default="bicubic", choices=["bicubic", "bilinear"],
                   help="resize interpolation of the crops")
    g.add_argument("--crops", default="auto", choices=["auto", "loader", "batched"],
                   help="where crops are made: per image in the data loader (any image size) or "
                        "per batch on the device (same-size images); auto: batched unless "
                        "imagefolder")
    g.add_argument("--same-spatial-aug", action="store_true",
                   help="share each view's crop box and flip across the batch (the paper's "
                        "shortcut); default: per sample")
    g.add_argument("--blur-sigma", type=float, nargs=2, metavar=("LO", "HI"), default=(0.1, 1.0),
                   help="Gaussian blur sigma range in pixels (DINO: 0.1 2)")
    g.add_argument("--patch-aug", default="none", choices=["none", "paper", "authors"],
                   help="patch-level augmentation (patchaug.PatchJitter preset) on every view")

    g = p.add_argument_group("loss")
    g.add_argument("--loss", default="mean", choices=["dino", "mean", "sum", "lambda"],
                   help="dino: CLS only (Eq. 7); mean / sum over matched tokens incl. CLS "
                        "(Eq. 8 / 9); lambda: lambda * CLS + (1 - lambda) * patch mean (Eq. 10)")
    g.add_argument("--lambda", dest="lam", type=float, default=0.5,
                   help="CLS weight of --loss lambda, in [0, 1]")
    g.add_argument("--match-rule", default="half", choices=["half", "official", "centre"],
                   help="patch matching rule of patchaug.match_patches")
    g.add_argument("--head-tokens", default="all", choices=["all", "matched"],
                   help="patch-level losses: run the DINO head on every token, or only on CLS "
                        "and the patch tokens of a matched pair (same loss, less time and "
                        "memory; the centre's batch mean is then over those teacher tokens)")
    g.add_argument("--fused-loss", default="on", choices=["on", "off"],
                   help="patch-level losses: fuse the head's last layer with the loss, chunk by "
                        "chunk from the bottleneck features (same loss and gradients, less time "
                        "and memory; no tokens x out_dim tensor, see pwself_reference.fused_loss)")
    g.add_argument("--center", default="global", choices=["global", "per-token"],
                   help="loss centering: one centre (DINO) or one per teacher token (authors)")
    g.add_argument("--center-momentum", type=float, default=0.9, help="EMA momentum of the centre")
    g.add_argument("--student-temp", type=float, default=0.1, help="student temperature")
    g.add_argument("--teacher-temp", type=float, default=0.04, help="final teacher temperature")
    g.add_argument("--warmup-teacher-temp", type=float, default=0.04, help="initial teacher temperature")
    g.add_argument("--warmup-teacher-temp-epochs", type=int, default=0,
                   help="epochs of the teacher temperature warm-up")

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=5, help="training epochs")
    g.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"], help="optimizer")
    g.add_argument("--lr", type=float, default=2e-3,
                   help="peak learning rate for a total batch of 256 (scaled by batch/256)")
    g.add_argument("--min-lr", type=float, default=1e-5, help="final learning rate of the cosine")
    g.add_argument("--warmup-epochs", type=float, default=1, help="linear learning-rate warm-up epochs")
    g.add_argument("--weight-decay", type=float, default=0.04, help="initial weight decay")
    g.add_argument("--weight-decay-end", type=float, default=0.4, help="final weight decay (cosine)")
    g.add_argument("--momentum-teacher", type=float, default=0.99,
                   help="initial EMA momentum of the teacher (cosine to 1)")
    g.add_argument("--clip-grad", type=float, default=3.0,
                   help="per-parameter gradient norm clip (0: off)")
    g.add_argument("--freeze-last-layer", type=int, default=1,
                   help="epochs during which the head's last layer is not trained")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse flags, apply ``--preset`` (explicit flags win) and validate."""
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    if pre.preset:
        parser.set_defaults(**PRESETS[pre.preset])
    args = parser.parse_args(argv)
    validate(args)
    args.center_batch_mean = center_batch_mean(args)
    return args


def center_batch_mean(args: argparse.Namespace) -> str:
    """What the centre's EMA averages each step, as the configuration resolves it."""
    per = ("per token position over the samples and global views" if args.center == "per-token"
           else "over the samples, global views and tokens")
    if args.loss == "dino":
        return f"teacher head outputs of the CLS token, {per}"
    if args.head_tokens == "all":
        return f"teacher head outputs of every token, {per}"
    return (f"teacher head outputs of the CLS token and of every patch token in at least one "
            f"matched pair (the tokens the head ran on), {per}"
            + ("; a position no sample kept keeps its centre" if args.center == "per-token"
               else ""))


def _divides(flag: str, size: int, patch: int) -> None:
    if size % patch:
        raise ConfigError(f"--{flag} {size} is not a multiple of --patch-size {patch}")


def validate(args: argparse.Namespace) -> None:
    """Reject configurations that cannot run, naming the flag (:class:`ConfigError`)."""
    from pwself_reference.data import DATASETS

    if args.dataset not in DATASETS:
        raise ConfigError(f"--dataset {args.dataset!r} is unknown; choose from {list(DATASETS)}")
    if args.dataset != "fashion-mnist-mini":
        if not args.data_path:
            raise ConfigError(f"--data-path is required for --dataset {args.dataset}")
        if not Path(args.data_path).expanduser().is_dir():
            raise ConfigError(f"--data-path {args.data_path} is not a directory (create it to let "
                              "torchvision download CIFAR/STL there)")
    try:
        import timm

        from pwself_reference.models import ARCH_ALIASES

        name = ARCH_ALIASES.get(args.arch, args.arch)
        ok = timm.is_model(name) and name.startswith(("vit_", "deit_"))
    except ImportError as exc:  # pragma: no cover - timm is a dependency
        raise ConfigError(f"--arch needs timm ({exc})") from exc
    if not ok:
        raise ConfigError(
            f"--arch {args.arch!r} is not a timm ViT; use vit_tiny, vit_small, vit_base or a timm "
            "name such as vit_small_patch16_224"
        )
    for flag in ("patch_size", "global_crop_size", "local_crop_size", "batch_size",
                 "eval_batch_size", "epochs", "out_dim", "head_hidden_dim",
                 "head_bottleneck_dim", "knn_k", "log_every"):
        if getattr(args, flag) <= 0:
            raise ConfigError(f"--{flag.replace('_', '-')} must be > 0, got {getattr(args, flag)}")
    for flag in ("depth", "embed_dim", "num_heads"):
        v = getattr(args, flag)
        if v is not None and v <= 0:
            raise ConfigError(f"--{flag.replace('_', '-')} must be > 0, got {v}")
    if args.embed_dim is not None:
        heads = args.num_heads or 3
        if args.embed_dim % heads:
            raise ConfigError(f"--embed-dim {args.embed_dim} must be a multiple of --num-heads {heads}")
    if args.global_crops_number < 1:
        raise ConfigError(f"--global-crops-number must be >= 1, got {args.global_crops_number}")
    if args.local_crops_number < 0:
        raise ConfigError(f"--local-crops-number must be >= 0, got {args.local_crops_number}")
    if args.global_crops_number + args.local_crops_number < 2:
        raise ConfigError("--global-crops-number + --local-crops-number must be >= 2 (no view pair)")
    _divides("global-crop-size", args.global_crop_size, args.patch_size)
    if args.local_crops_number:
        _divides("local-crop-size", args.local_crop_size, args.patch_size)
    for flag in ("global_crops_scale", "local_crops_scale", "blur_sigma"):
        lo, hi = getattr(args, flag)
        if not 0 < lo <= hi or (flag != "blur_sigma" and hi > 1):
            raise ConfigError(f"--{flag.replace('_', '-')} must satisfy 0 < LO <= HI"
                              f"{' <= 1' if flag != 'blur_sigma' else ''}, got {lo} {hi}")
    if not 0.0 <= args.lam <= 1.0:
        raise ConfigError(f"--lambda must be in [0, 1], got {args.lam}")
    if not 0.0 <= args.drop_path < 1.0:
        raise ConfigError(f"--drop-path must be in [0, 1), got {args.drop_path}")
    if not 0.0 <= args.center_momentum < 1.0:
        raise ConfigError(f"--center-momentum must be in [0, 1), got {args.center_momentum}")
    if not 0.0 <= args.momentum_teacher <= 1.0:
        raise ConfigError(f"--momentum-teacher must be in [0, 1], got {args.momentum_teacher}")
    for flag in ("student_temp", "teacher_temp", "warmup_teacher_temp", "lr"):
        if getattr(args, flag) <= 0:
            raise ConfigError(f"--{flag.replace('_', '-')} must be > 0, got {getattr(args, flag)}")
    for flag in ("min_lr", "warmup_epochs", "weight_decay", "weight_decay_end", "clip_grad",
                 "freeze_last_layer", "warmup_teacher_temp_epochs", "num_workers", "threads",
                 "save_every_steps", "saveckp_freq", "knn_every", "stop_after_steps", "train_subset",
                 "test_subset"):
        if getattr(args, flag) < 0:
            raise ConfigError(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")
    if args.eval_resize_ratio < 1.0:
        raise ConfigError(f"--eval-resize-ratio must be >= 1, got {args.eval_resize_ratio}")
    if args.device not in ("auto", "cpu") and not args.device.startswith("cuda"):
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {args.device!r}")
    if args.crops == "batched" and args.dataset == "imagefolder":
        raise ConfigError("--crops batched needs images of one size; use --crops loader with imagefolder")
    if args.resume and not (Path(args.output_dir) / "checkpoint.pth").is_file():
        raise ConfigError(f"--resume: no checkpoint.pth in --output-dir {args.output_dir}")


#: Flags that change how the command reports, never what it computes: left out of the
#: resolved configuration (config.json and the checkpoints' "config").
NOT_IN_CONFIG = frozenset({"debug"})


def to_dict(args: argparse.Namespace) -> dict[str, Any]:
    """The resolved configuration as a JSON-able dict (tuples become lists), without the
    reporting-only flags of :data:`NOT_IN_CONFIG`."""
    out = {}
    for k, v in sorted(vars(args).items()):
        if k not in NOT_IN_CONFIG:
            out[k] = list(v) if isinstance(v, tuple) else v
    json.dumps(out)  # fail early if something is not plain data
    return out


def resolve_device(name: str | None) -> Any:
    """The ``torch.device`` of a ``--device`` flag.

    ``"auto"`` or ``None``: CUDA when available, else the CPU. A CUDA device on a
    machine without CUDA raises :class:`ConfigError` naming the flag.
    """
    import torch

    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"--device {name!r} is not a torch device ({exc})") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available")
    return dev


def default_threads() -> int:
    """CPU threads per process: the cores this process may use, shared by local ranks."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, cores // max(local, 1))
