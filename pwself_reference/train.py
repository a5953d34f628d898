"""DINO / PW-Self self-supervised pretraining of a ViT, with k-NN monitoring.

Run ``python pwself_reference/train.py`` (or ``python -m pwself_reference.train``)
with no arguments to pretrain PW-Self on the bundled Fashion-MNIST subset on
the CPU; ``--help`` lists every flag and ``--preset`` the paper's settings.
Multi-GPU / multi-node: ``torchrun --nproc_per_node=N pwself_reference/train.py ...``.

Outputs in ``--output-dir``: ``config.json`` (resolved flags), ``log.jsonl``
(one JSON record per logged step, per epoch and per k-NN evaluation),
``checkpoint.pth`` (last, for ``--resume``), ``final.pth`` (end of training),
``curves.png`` (loss and k-NN) and ``matches.png`` (matched patches of one
training pair).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the package, not its siblings
    _root = str(Path(__file__).resolve().parents[1])
    if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
        sys.path[0] = _root
    elif _root not in sys.path:
        sys.path.insert(0, _root)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, DistributedSampler, Subset  # noqa: E402

from pwself_reference import distributed as D  # noqa: E402
from pwself_reference.augment import (  # noqa: E402
    IMAGENET_MEAN,
    IMAGENET_STD,
    CropSpec,
    ImageTensorDataset,
    MatchingCollate,
    MultiCropBatch,
    MultiCropDataset,
    ViewAugment,
    batched_multicrop,
    collate_images,
    collate_multicrop,
    item_seed,
    match_views,
    view_grids,
)
from pwself_reference.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from pwself_reference.config import ConfigError, default_threads, parse_args, to_dict  # noqa: E402
from pwself_reference.losses import PWSelfLoss, matched_token_masks  # noqa: E402
from pwself_reference.models import DINOHead, build_backbone  # noqa: E402
from pwself_reference.network import MultiCropNetwork  # noqa: E402
from pwself_reference.schedules import cosine_schedule, teacher_temp_schedule  # noqa: E402

__all__ = ["main", "train_one_epoch", "NonFiniteLossError"]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


# ----------------------------------------------------------------------------- helpers
class ProgressBar:
    """A one-line progress bar (``\\r`` on a terminal, a line every ``every`` steps otherwise)."""

    def __init__(self, total: int, prefix: str, enabled: bool = True, every: int = 10) -> None:
        self.total, self.prefix, self.enabled, self.every = total, prefix, enabled, max(every, 1)
        self.tty = sys.stderr.isatty()
        self.start = time.perf_counter()

    def update(self, done: int, **fields: Any) -> None:
        if not self.enabled:
            return
        last = done == self.total
        if not self.tty and not last and done % self.every:
            return
        frac = done / max(self.total, 1)
        bar = "#" * int(20 * frac) + "-" * (20 - int(20 * frac))
        elapsed = time.perf_counter() - self.start
        info = " ".join(f"{k} {v}" for k, v in fields.items())
        line = f"{self.prefix} [{bar}] {done}/{self.total} {info} {elapsed:.0f}s"
        if self.tty:
            sys.stderr.write("\r" + line + ("\n" if last else ""))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can start an epoch part-way (to resume mid-epoch)."""

    def __init__(self, dataset: Any, num_replicas: int, rank: int, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed,
                         drop_last=True)
        self.start = 0

    def __iter__(self):  # type: ignore[override]
        return iter(list(super().__iter__())[self.start:])

    def __len__(self) -> int:
        return self.num_samples - self.start


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available")
    return dev


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype (``None`` = fp32)."""
    if name == "fp32" or (name == "auto" and device.type != "cuda"):
        return None
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type != "cuda" and name == "fp16":
        raise ConfigError("--precision fp16 needs a CUDA device")
    return torch.bfloat16 if name == "bf16" else torch.float16


def seeded_subset(dataset: Any, n: int, seed: int) -> Any:
    if not n or n >= len(dataset):
        return dataset
    idx = np.sort(np.random.default_rng(seed).choice(len(dataset), size=n, replace=False))
    sub = Subset(dataset, idx.tolist())
    if hasattr(dataset, "labels"):
        sub.labels = np.asarray(dataset.labels)[idx]  # type: ignore[attr-defined]
    return sub


def param_groups(model: nn.Module) -> list[dict[str, Any]]:
    """DINO's groups: weight decay on weights, none on biases and norm parameters."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name.endswith(".bias") or p.ndim <= 1 else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def clip_gradients(model: nn.Module, clip: float) -> None:
    """DINO's per-parameter clipping: scale each gradient to norm <= ``clip``."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads or clip <= 0:
        return
    norms = torch._foreach_norm(grads)
    for g, n in zip(grads, norms):
        g.mul_(torch.clamp(clip / (n + 1e-6), max=1.0))


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``teacher = momentum * teacher + (1 - momentum) * student`` for every parameter."""
    t = [p for p in teacher.parameters()]
    s = [p.detach() for p in student.parameters()]
    torch._foreach_mul_(t, momentum)
    torch._foreach_add_(t, s, alpha=1.0 - momentum)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def build_network(args: argparse.Namespace, drop_path: float) -> MultiCropNetwork:
    backbone = build_backbone(
        args.arch, args.patch_size, args.global_crop_size, drop_path,
        depth=args.depth, embed_dim=args.embed_dim, num_heads=args.num_heads,
    )
    head = DINOHead(backbone.embed_dim, args.out_dim, hidden_dim=args.head_hidden_dim,
                    bottleneck_dim=args.head_bottleneck_dim, norm_last_layer=args.norm_last_layer)
    return MultiCropNetwork(backbone, head)


def build_criterion(args: argparse.Namespace) -> PWSelfLoss:
    """The DINO / PW-Self loss of a configuration (patch tokens only when the loss uses them)."""
    patch_level = args.loss != "dino"
    grid = args.global_crop_size // args.patch_size
    return PWSelfLoss(
        args.out_dim, n_teacher_tokens=1 + grid * grid if patch_level else 1, loss=args.loss,
        lam=args.lam, center=args.center,
        teacher_temps=teacher_temp_schedule(args.warmup_teacher_temp, args.teacher_temp,
                                            args.warmup_teacher_temp_epochs, args.epochs),
        student_temp=args.student_temp, center_momentum=args.center_momentum,
    )


def build_patch_jitter(name: str, patch_size: int) -> Any:
    if name == "none":
        return None
    from patchaug.patch_jitter import PatchJitter

    return PatchJitter.paper(patch_size) if name == "paper" else PatchJitter.authors(patch_size)


def crop_spec(args: argparse.Namespace) -> CropSpec:
    """The multi-crop sizes, counts and scales of the flags."""
    return CropSpec(args.global_crop_size, args.local_crop_size, args.global_crops_number,
                    args.local_crops_number, tuple(args.global_crops_scale),
                    tuple(args.local_crops_scale), args.interpolation)


def build_view_augment(args: argparse.Namespace, spec: CropSpec) -> ViewAugment:
    """DINO's photometric augmentation per view, then ``--patch-aug`` if any."""
    return ViewAugment(spec.n_global, spec.n_local,
                       build_patch_jitter(args.patch_aug, args.patch_size), tuple(args.blur_sigma))


def build_models(args: argparse.Namespace, device: torch.device, amp_dtype: torch.dtype | None
                 ) -> tuple[nn.Module, MultiCropNetwork, PWSelfLoss, torch.optim.Optimizer,
                            torch.amp.GradScaler | None]:
    """Student, teacher (a frozen copy), loss, optimizer and fp16 loss scaler, seeded by ``--seed``."""
    torch.manual_seed(args.seed)
    student = build_network(args, args.drop_path).to(device)
    teacher = build_network(args, 0.0).to(device)
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad_(False)
    criterion = build_criterion(args).to(device)
    groups = param_groups(student)
    if args.optimizer == "adamw":
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(groups, foreach=True)
    else:
        optimizer = torch.optim.SGD(groups, lr=0, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    return student, teacher, criterion, optimizer, scaler


def compute_matches(batch: MultiCropBatch, n_global: int, patch_size: int, rule: str
                    ) -> dict[tuple[int, int], Any]:
    """Matches between every teacher (global) view ``i`` and student view ``j != i``.

    :func:`pwself_reference.augment.match_views` on the batch's boxes, flips and view
    grids; the result for pair ``(i, j)`` is ``(B, M)``. The training step calls it only
    when the batch did not bring its matches (``--crops batched``, where the crops are
    drawn on the device); on the ``loader`` path :class:`MatchingCollate` computes the
    same dict in the data-loader workers.
    """
    return match_views(batch.boxes, batch.flips, view_grids(batch.views, patch_size), n_global,
                       rule)


def evaluate_knn(backbone: nn.Module, loaders: tuple[DataLoader, DataLoader], device: torch.device,
                 k: int, T: float, num_classes: int | None) -> tuple[float, float]:
    from pwself_reference.evaluation import extract_features, knn_classify

    train_f, train_l = extract_features(backbone, loaders[0], device)
    test_f, test_l = extract_features(backbone, loaders[1], device)
    return knn_classify(train_f, train_l, test_f, test_l, k=k, T=T, num_classes=num_classes)


# ----------------------------------------------------------------------------- state
@dataclass
class Trainer:
    """Everything :func:`train_one_epoch` needs."""

    args: argparse.Namespace
    device: torch.device
    dist: D.DistInfo
    student: nn.Module
    teacher: MultiCropNetwork
    criterion: PWSelfLoss
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    amp_dtype: torch.dtype | None
    loader: DataLoader
    sampler: ResumableSampler
    spec: CropSpec
    view_aug: ViewAugment
    lr_schedule: np.ndarray
    wd_schedule: np.ndarray
    momentum_schedule: np.ndarray
    steps_per_epoch: int
    out_dir: Path
    global_step: int = 0
    steps_this_process: int = 0
    log_file: Any = None
    history: list[dict[str, Any]] = field(default_factory=list)
    plotted_matches: bool = False

    def log(self, record: dict[str, Any]) -> None:
        if self.dist.is_main and self.log_file is not None:
            self.log_file.write(json.dumps(record) + "\n")
            self.log_file.flush()

    def checkpoint(self, epoch_done: bool, epoch: int, path: Path | None = None) -> None:
        """Write ``checkpoint.pth`` (rank 0): enough to continue exactly from here."""
        if not self.dist.is_main:
            return
        state = {
            "config": to_dict(self.args),
            "student": unwrap(self.student).state_dict(),
            "teacher": self.teacher.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "criterion": self.criterion.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "epoch": epoch + 1 if epoch_done else epoch,  # next epoch to run
            "step": self.global_step,
            "history": self.history,
            "world_size": self.dist.world_size,
        }
        save_checkpoint(state, path or self.out_dir / "checkpoint.pth")

    def prepare_batch(self, batch: Any) -> MultiCropBatch:
        if isinstance(batch, MultiCropBatch):
            mb = batch.to(self.device, non_blocking=True)
            mb.views = [v.float() / 255.0 for v in mb.views]
            return mb
        images = batch.to(self.device, non_blocking=True)
        return batched_multicrop(images, self.spec, shared=self.args.same_spatial_aug)


def train_one_epoch(tr: Trainer, epoch: int, start_it: int = 0) -> dict[str, float]:
    """One epoch of self-distillation; returns the epoch's mean loss and throughput."""
    args = tr.args
    patch_level = args.loss != "dino"
    tr.student.train()
    bar = ProgressBar(tr.steps_per_epoch, f"epoch {epoch + 1}/{args.epochs}",
                      enabled=tr.dist.is_main and not args.no_progress, every=args.log_every)
    losses: list[float] = []
    t_start = time.perf_counter()
    images_seen = 0
    for it, batch in enumerate(tr.loader, start=start_it):
        if it >= tr.steps_per_epoch:
            break
        step = tr.global_step
        t0 = time.perf_counter()
        for i, group in enumerate(tr.optimizer.param_groups):
            group["lr"] = float(tr.lr_schedule[step])
            if i == 0:
                group["weight_decay"] = float(tr.wd_schedule[step])
        # every random draw of this step (crops, photometric, drop-path) depends on (seed, rank, step)
        torch.manual_seed(item_seed(args.seed, 1, tr.dist.rank, step))

        mb = tr.prepare_batch(batch)
        raw_views = mb.views
        views = tr.view_aug(raw_views)
        matches = None
        if patch_level:
            matches = mb.matches
            if matches is None:  # crops drawn on the device: match here (a profile shows it)
                with torch.profiler.record_function("match_patches"):
                    matches = compute_matches(mb, tr.spec.n_global, args.patch_size,
                                              args.match_rule)

        # --fused-loss on: the network stops before the head's last layer, the loss applies it
        fused = patch_level and args.fused_loss == "on"
        keep_t = keep_s = None
        if patch_level and args.head_tokens == "matched":
            tokens = [1 + r * c for r, c in view_grids(views, args.patch_size)]
            keep_t, keep_s = matched_token_masks(matches, tokens[: tr.spec.n_global], tokens,
                                                 views[0].shape[0])
        autocast = (torch.autocast(tr.device.type, dtype=tr.amp_dtype)
                    if tr.amp_dtype is not None else contextlib.nullcontext())
        with autocast:
            with torch.no_grad():
                teacher_out = tr.teacher(views[: tr.spec.n_global], all_tokens=patch_level,
                                         keep=keep_t, features=fused)
            student_out = tr.student(views, all_tokens=patch_level, keep=keep_s,
                                     features=fused)
            loss = tr.criterion(student_out, teacher_out, matches, epoch)

        bad = torch.tensor(0.0 if math.isfinite(loss.item()) else 1.0, device=tr.device)
        if tr.dist.distributed:
            torch.distributed.all_reduce(bad)
        if bad.item() > 0:
            raise NonFiniteLossError(
                f"loss is {loss.item()} at epoch {epoch + 1}, step {step}: stopping; the last good "
                f"checkpoint is {tr.out_dir / 'checkpoint.pth'} (try a lower --lr or "
                "--precision fp32)"
            )

        tr.optimizer.zero_grad(set_to_none=True)
        model = unwrap(tr.student)
        if tr.scaler is not None:
            tr.scaler.scale(loss).backward()
            tr.scaler.unscale_(tr.optimizer)
        else:
            loss.backward()
        clip_gradients(model, args.clip_grad)
        if epoch < args.freeze_last_layer:
            for p in model.head.last_layer_parameters():
                p.grad = None
        if tr.scaler is not None:
            tr.scaler.step(tr.optimizer)
            tr.scaler.update()
        else:
            tr.optimizer.step()
        ema_update(tr.teacher, model, float(tr.momentum_schedule[step]))

        if not tr.plotted_matches and tr.dist.is_main and not args.no_plots:
            tr.plotted_matches = True
            _plot_first_pair(tr, mb, raw_views, views, batch)

        tr.global_step += 1
        tr.steps_this_process += 1
        loss_value = float(loss.item())
        losses.append(loss_value)
        n_img = views[0].shape[0] * tr.dist.world_size
        images_seen += n_img
        ips = n_img / max(time.perf_counter() - t0, 1e-9)
        lr = tr.optimizer.param_groups[0]["lr"]
        bar.update(it + 1, loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", **{"img/s": f"{ips:.0f}"})
        if tr.global_step % args.log_every == 0 or it + 1 == tr.steps_per_epoch:
            tr.log({
                "type": "step", "epoch": epoch + 1, "step": tr.global_step, "loss": loss_value,
                "lr": lr, "wd": float(tr.wd_schedule[step]),
                "momentum": float(tr.momentum_schedule[step]),
                "teacher_temp": tr.criterion.teacher_temp(epoch),
                "matched_tokens": tr.criterion.last_stats.get("matched_tokens", 1.0),
                "images_per_s": ips,
            })
        if args.save_every_steps and tr.global_step % args.save_every_steps == 0 \
                and it + 1 < tr.steps_per_epoch:
            tr.checkpoint(epoch_done=False, epoch=epoch)
        if args.stop_after_steps and tr.steps_this_process >= args.stop_after_steps:
            raise SystemExit(f"stopped after {tr.steps_this_process} steps (--stop-after-steps)")
    elapsed = time.perf_counter() - t_start
    return {"loss": float(np.mean(losses)) if losses else float("nan"),
            "images_per_s": images_seen / max(elapsed, 1e-9), "time_s": elapsed}


def _plot_first_pair(tr: Trainer, mb: MultiCropBatch, raw_views: Sequence[torch.Tensor],
                     views: Sequence[torch.Tensor], batch: Any) -> None:
    from pwself_reference.plots import plot_matches

    j = tr.spec.n_global if tr.spec.n_local else min(1, len(views) - 1)
    if j == 0:
        return
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    va = (views[0][0].detach().float().cpu() * std + mean).clamp(0, 1)
    vb = (views[j][0].detach().float().cpu() * std + mean).clamp(0, 1)
    source = batch[0].float().cpu() / 255.0 if isinstance(batch, torch.Tensor) else None
    try:
        plot_matches(va, vb, mb.boxes[0, 0].cpu(), mb.boxes[j, 0].cpu(), bool(mb.flips[0, 0]),
                     bool(mb.flips[j, 0]), tr.args.patch_size, tr.out_dir / "matches.png",
                     rule=tr.args.match_rule, source=source)
    except Exception as exc:  # a plot must never stop training
        print(f"warning: could not draw matches.png: {exc}", file=sys.stderr)


# ----------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run a training from command-line flags; returns a summary dict."""
    try:
        return _main(argv)
    finally:
        # the run flushes subnormal floats to zero (see _main); do not leave that
        # process-wide floating-point mode behind for the caller
        torch.set_flush_denormal(False)


def _main(argv: Sequence[str] | None) -> dict[str, Any]:
    t_main = time.perf_counter()
    args = parse_args(argv)
    device = resolve_device(args.device)
    amp_dtype = resolve_precision(args.precision, device)
    dinfo = D.init_distributed(device.type, args.dist_backend)
    if device.type == "cuda" and dinfo.distributed:
        device = torch.device("cuda", dinfo.local_rank)
    # subnormal floats (tiny gradients and probabilities) make x86 CPU arithmetic 5-10x
    # slower; flush them to zero. Set before the thread pool starts, which inherits the mode.
    torch.set_flush_denormal(True)
    torch.set_num_threads(args.threads or default_threads())
    out_dir = Path(args.output_dir)
    if not args.resume and (out_dir / "final.pth").exists():  # never overwrite a finished run
        raise ConfigError(f"--output-dir {out_dir} holds a finished run (final.pth); give "
                          "another --output-dir")
    if dinfo.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(to_dict(args), indent=2) + "\n")
    D.barrier()
    say = print if dinfo.is_main else (lambda *a, **k: None)

    # data
    from pwself_reference.data import build_labelled_dataset, build_pretrain_dataset

    base = seeded_subset(build_pretrain_dataset(args.dataset, args.data_path), args.train_subset,
                         args.seed)
    spec = crop_spec(args)
    crops = args.crops if args.crops != "auto" else ("loader" if args.dataset == "imagefolder"
                                                     else "batched")
    if crops == "loader":
        train_set: Any = MultiCropDataset(base, spec, args.seed, args.same_spatial_aug)
        # match the views where they are drawn: in the workers, off the training step
        collate: Any = (MatchingCollate(spec.n_global, args.patch_size, args.match_rule)
                        if args.loss != "dino" else collate_multicrop)
    else:
        train_set = ImageTensorDataset(base)
        collate = collate_images
    sampler = ResumableSampler(train_set, dinfo.world_size, dinfo.rank, args.seed)
    steps_per_epoch = len(sampler) // args.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(
            f"--batch-size {args.batch_size} exceeds the {len(sampler)} training images per process"
        )
    say(f"data: {args.dataset}, {len(base)} training images, {steps_per_epoch} steps/epoch of "
        f"{args.batch_size} x {dinfo.world_size} process(es), crops: {crops}, device: {device}")

    knn_loaders = None
    num_classes = None
    if args.knn_every > 0 and dinfo.is_main:
        from pwself_reference.evaluation import eval_transform

        tf = eval_transform(args.global_crop_size, args.eval_resize_ratio)
        knn_train = build_labelled_dataset(args.dataset, args.data_path, True, tf)
        knn_train = seeded_subset(knn_train, args.train_subset, args.seed)
        knn_test = seeded_subset(build_labelled_dataset(args.dataset, args.data_path, False, tf),
                                 args.test_subset, args.seed)
        labels = getattr(knn_train, "labels", None)
        num_classes = int(np.max(labels)) + 1 if labels is not None else None
        knn_loaders = tuple(
            DataLoader(ds, batch_size=args.eval_batch_size, shuffle=False,
                       num_workers=args.num_workers)
            for ds in (knn_train, knn_test)
        )

    # model
    student, teacher, criterion, optimizer, scaler = build_models(args, device, amp_dtype)
    n_params = sum(p.numel() for p in student.backbone.parameters())
    say(f"model: {args.arch} (patch {args.patch_size}, {n_params / 1e6:.2f} M backbone params), "
        f"loss {args.loss}, head out_dim {args.out_dim}")
    if dinfo.distributed:
        student = nn.parallel.DistributedDataParallel(
            student, device_ids=[device.index] if device.type == "cuda" else None)

    total_batch = args.batch_size * dinfo.world_size
    lr_schedule = cosine_schedule(args.lr * total_batch / 256.0, args.min_lr, args.epochs,
                                  steps_per_epoch, args.warmup_epochs)
    wd_schedule = cosine_schedule(args.weight_decay, args.weight_decay_end, args.epochs,
                                  steps_per_epoch)
    momentum_schedule = cosine_schedule(args.momentum_teacher, 1.0, args.epochs, steps_per_epoch)

    tr = Trainer(args, device, dinfo, student, teacher, criterion, optimizer, scaler, amp_dtype,
                 None, sampler, spec,  # type: ignore[arg-type]
                 build_view_augment(args, spec),
                 lr_schedule, wd_schedule, momentum_schedule, steps_per_epoch, out_dir)

    start_epoch, start_it = 0, 0
    log_path = out_dir / "log.jsonl"
    if args.resume:
        ckpt = load_checkpoint(out_dir / "checkpoint.pth", map_location=device)
        if ckpt.get("world_size", 1) != dinfo.world_size:
            raise ConfigError(f"--resume: checkpoint was written with {ckpt.get('world_size')} "
                              f"processes, this run has {dinfo.world_size}")
        unwrap(student).load_state_dict(ckpt["student"])
        teacher.load_state_dict(ckpt["teacher"])
        optimizer.load_state_dict(ckpt["optimizer"])
        criterion.load_state_dict(ckpt["criterion"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        tr.global_step = int(ckpt["step"])
        tr.history = list(ckpt.get("history", []))
        start_epoch = int(ckpt["epoch"])
        start_it = tr.global_step - start_epoch * steps_per_epoch
        if not 0 <= start_it < steps_per_epoch and start_epoch < args.epochs:
            raise ConfigError("--resume: the checkpoint does not fit this configuration's "
                              "steps per epoch (change of --batch-size or data?)")
        if dinfo.is_main and log_path.is_file():  # drop records written after the checkpoint
            kept = [line for line in log_path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= tr.global_step]
            log_path.write_text("".join(line + "\n" for line in kept))
        say(f"resumed from {out_dir / 'checkpoint.pth'}: epoch {start_epoch + 1}, step "
            f"{tr.global_step}")
    elif dinfo.is_main and log_path.exists():
        log_path.unlink()
    tr.log_file = open(log_path, "a") if dinfo.is_main else None  # noqa: SIM115

    def run_knn(epoch: int) -> float | None:
        if knn_loaders is None:
            return None
        top1, top5 = evaluate_knn(teacher.backbone, knn_loaders, device, args.knn_k,
                                  args.knn_temperature, num_classes)
        rec = {"type": "knn", "epoch": epoch, "step": tr.global_step, "top1": top1, "top5": top5}
        tr.history.append(rec)
        tr.log(rec)
        return top1

    init_top1 = None
    if not args.resume and dinfo.is_main:
        init_top1 = run_knn(0)
        if init_top1 is not None:
            say(f"k-NN (k={args.knn_k}) at initialisation: top-1 {init_top1:.2f}%")
    else:
        init_top1 = next((h["top1"] for h in tr.history if h["epoch"] == 0), None)
    D.barrier()

    try:
        for epoch in range(start_epoch, args.epochs):
            sampler.set_epoch(epoch)
            sampler.start = start_it * args.batch_size if epoch == start_epoch else 0
            if isinstance(train_set, MultiCropDataset):
                train_set.set_epoch(epoch)
            tr.loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler,
                                   num_workers=args.num_workers, collate_fn=collate,
                                   pin_memory=device.type == "cuda", drop_last=True)
            stats = train_one_epoch(tr, epoch, start_it if epoch == start_epoch else 0)
            top1 = None
            if dinfo.is_main and args.knn_every and ((epoch + 1) % args.knn_every == 0
                                                     or epoch + 1 == args.epochs):
                top1 = run_knn(epoch + 1)
            tr.log({"type": "epoch", "epoch": epoch + 1, "step": tr.global_step,
                    "loss": stats["loss"], "images_per_s": stats["images_per_s"],
                    "time_s": stats["time_s"], "knn_top1": top1})
            tr.checkpoint(epoch_done=True, epoch=epoch)
            if dinfo.is_main and not args.no_plots:
                from pwself_reference.plots import plot_curves

                plot_curves(log_path, out_dir / "curves.png")
            knn_text = f", k-NN top-1 {top1:.2f}%" if top1 is not None else ""
            say(f"epoch {epoch + 1}/{args.epochs}: loss {stats['loss']:.4f}, "
                f"{stats['images_per_s']:.0f} img/s{knn_text}")
            D.barrier()
        if dinfo.is_main:
            tr.checkpoint(epoch_done=True, epoch=args.epochs - 1, path=out_dir / "final.pth")
    finally:
        if tr.log_file is not None:
            tr.log_file.close()
        D.cleanup()

    final_top1 = next((h["top1"] for h in reversed(tr.history)), None)
    wall = time.perf_counter() - t_main
    summary = {"init_knn_top1": init_top1, "final_knn_top1": final_top1, "wall_time_s": wall,
               "steps": tr.global_step, "output_dir": str(out_dir)}
    if init_top1 is not None and final_top1 is not None:
        say(f"k-NN top-1: {init_top1:.2f}% at initialisation -> {final_top1:.2f}% after "
            f"{args.epochs} epochs ({final_top1 - init_top1:+.2f} points); wall time {wall:.0f} s")
        if knn_loaders is not None:  # the regime: what the input itself gives, same images, k and T
            from pwself_reference.evaluation.baselines import raw_pixel_knn

            pixels = raw_pixel_knn(knn_loaders, args.knn_k, args.knn_temperature, num_classes)[0]
            say(f"k-NN top-1 on raw pixels (flattened input, same k-NN): {pixels:.2f}%")
    say(f"outputs in {out_dir}")
    return summary


def cli(argv: Sequence[str] | None = None) -> int:
    """Console entry point ``pwself-train``: exit status 2 for a bad configuration or input
    (a missing or corrupt checkpoint, a data path without images, an output directory that
    cannot be written or holds a finished run: one line on stderr, the traceback only with
    ``--debug``), 3 for a non-finite loss."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        main(argv)
    except NonFiniteLossError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except (OSError, ValueError) as exc:  # ConfigError is a ValueError
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
