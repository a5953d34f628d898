"""DINO / PW-Self self-supervised pretraining of a ViT, with k-NN monitoring.

Run ``python pwself_reference/train.py`` (or ``pwself-train``, installed with the
package) with no arguments to pretrain PW-Self on the bundled Fashion-MNIST
subset on the CPU; ``--help`` lists every flag and ``--preset`` the paper's
settings. Multi-GPU / multi-node: ``torchrun --nproc_per_node=N pwself_reference/train.py ...``.

Laid out like DINO's ``main_dino.py``: :func:`train_pwself` builds the run section
by section (data, networks, loss, optimizer and schedules, resume) and loops over
the epochs; :func:`train_one_epoch` is the method, one step at a time (augment,
match, forward, loss, optimizer step, teacher EMA).

Outputs in ``--output-dir``: ``config.json`` (resolved flags), ``log.jsonl``
(one JSON record per logged step, per epoch and per k-NN evaluation),
``checkpoint.pth`` (last, for ``--resume``), ``checkpointNNNN.pth`` (after NNNN epochs,
every ``--saveckp-freq`` epochs), ``final.pth`` (end of training),
``curves.png`` (loss and k-NN) and ``matches.png`` (matched patches of one
training pair).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Subset

from pwself_reference import distributed as D
from pwself_reference.augment import (
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
    match_batch,
    view_grids,
)
from pwself_reference.checkpoint import load_checkpoint, save_checkpoint
from pwself_reference.config import (
    ConfigError,
    build_parser,
    default_threads,
    parse_args,
    resolve_device,
    to_dict,
)
from pwself_reference.losses import PWSelfLoss, matched_token_masks
from pwself_reference.models import DINOHead, build_backbone
from pwself_reference.network import MultiCropNetwork
from pwself_reference.schedules import cosine_schedule, teacher_temp_schedule

__all__ = ["main", "cli", "train_pwself", "train_one_epoch", "Trainer", "Schedules",
           "NonFiniteLossError", "resolve_device"]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


# ============================================================================ main
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run a training from command-line flags; returns a summary dict."""
    args = parse_args(argv)
    # subnormal floats (tiny gradients and probabilities) make x86 CPU arithmetic 5-10x
    # slower: flush them to zero while training (set before the thread pool starts, which
    # inherits the mode), and leave the caller's floating-point mode as it was
    torch.set_flush_denormal(True)
    try:
        return train_pwself(args)
    finally:
        torch.set_flush_denormal(False)


def train_pwself(args: argparse.Namespace) -> dict[str, Any]:
    """Pretrain with the resolved flags ``args``; returns a summary dict."""
    t_main = time.perf_counter()
    run = start_run(args)
    say = run.say

    # ============ preparing data ... ============
    data = build_data(args, run.dist)
    say(f"data: {args.dataset}, {data.n_images} training images, {data.steps_per_epoch} "
        f"steps/epoch of {args.batch_size} x {run.dist.world_size} process(es), crops: "
        f"{data.crops}, device: {run.device}")
    knn = build_knn_loaders(args) if args.knn_every > 0 and run.dist.is_main else None

    # ============ building student and teacher networks ... ============
    torch.manual_seed(args.seed)
    student, teacher = build_student_teacher(args, run.device)
    n_params = sum(p.numel() for p in student.backbone.parameters())
    say(f"model: {args.arch} (patch {args.patch_size}, {n_params / 1e6:.2f} M backbone params), "
        f"loss {args.loss}, head out_dim {args.out_dim}")

    # ============ preparing loss ... ============
    criterion = build_criterion(args).to(run.device)

    # ============ preparing optimizer and schedules ... ============
    optimizer, scaler = build_optimizer(args, student, run.amp_dtype)
    schedules = build_schedules(args, data.steps_per_epoch, run.dist.world_size)
    if run.dist.distributed:
        student = nn.parallel.DistributedDataParallel(
            student, device_ids=[run.device.index] if run.device.type == "cuda" else None)
    spec = crop_spec(args)
    tr = Trainer(args=args, device=run.device, dist=run.dist, student=student, teacher=teacher,
                 criterion=criterion, optimizer=optimizer, scaler=scaler,
                 amp_dtype=run.amp_dtype, spec=spec, view_aug=build_view_augment(args, spec),
                 schedules=schedules, steps_per_epoch=data.steps_per_epoch,
                 out_dir=run.out_dir)

    # ============ optionally resume training ... ============
    start_epoch, start_it = resume_or_start(tr)
    tr.log_file = open(tr.log_path, "a") if run.dist.is_main else None  # noqa: SIM115

    # ============ training ... ============
    init_top1 = None
    if not args.resume and knn is not None:
        init_top1 = run_knn(tr, knn, epoch=0)
        say(f"k-NN (k={args.knn_k}) at initialisation: top-1 {init_top1:.2f}%")
    elif args.resume:
        init_top1 = next((h["top1"] for h in tr.history if h["epoch"] == 0), None)
    D.barrier()
    stopped = False
    try:
        for epoch in range(start_epoch, args.epochs):
            first_it = start_it if epoch == start_epoch else 0
            tr.loader = data.loader(epoch, first_it, args, pin=run.device.type == "cuda")
            stats = train_one_epoch(tr, epoch, first_it)
            if stats["stopped"]:  # --stop-after-steps: leave as if killed, no checkpoint
                stopped = True
                say(f"stopped after {tr.steps_this_process} steps (--stop-after-steps)")
                break
            end_of_epoch(tr, knn, epoch, stats)
        if run.dist.is_main and not stopped:
            tr.checkpoint(epoch_done=True, epoch=args.epochs - 1, path=run.out_dir / "final.pth")
    finally:
        if tr.log_file is not None:
            tr.log_file.close()
        D.cleanup()

    final_top1 = next((h["top1"] for h in reversed(tr.history)), None)
    wall = time.perf_counter() - t_main
    if init_top1 is not None and final_top1 is not None and not stopped:
        say(f"k-NN top-1: {init_top1:.2f}% at initialisation -> {final_top1:.2f}% after "
            f"{args.epochs} epochs ({final_top1 - init_top1:+.2f} points); wall time {wall:.0f} s")
        if knn is not None:  # the regime: what the input itself gives, same images, k and T
            from pwself_reference.evaluation.baselines import raw_pixel_knn

            pixels = raw_pixel_knn((knn.train, knn.test), args.knn_k, args.knn_temperature,
                                   knn.num_classes)[0]
            say(f"k-NN top-1 on raw pixels (flattened input, same k-NN): {pixels:.2f}%")
    say(f"outputs in {run.out_dir}")
    return {"init_knn_top1": init_top1, "final_knn_top1": final_top1, "wall_time_s": wall,
            "steps": tr.global_step, "output_dir": str(run.out_dir), "stopped": stopped}


def cli(argv: Sequence[str] | None = None) -> int:
    """Console entry point ``pwself-train``: exit status 2 for a bad configuration or input
    (a missing or corrupt checkpoint, a data path without images, an output directory that
    cannot be written or holds a finished run: one line on stderr, the traceback only with
    ``--debug``), 3 for a non-finite loss, 1 when ``--stop-after-steps`` stopped the run."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # read before the checks of parse_args, whose errors --debug decides how to report
    debug = build_parser().parse_known_args(argv)[0].debug
    try:
        summary = main(argv)
    except NonFiniteLossError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except (OSError, ValueError) as exc:  # ConfigError is a ValueError
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 1 if summary["stopped"] else 0


# ============================================================================ run set-up
@dataclass
class Run:
    """Where and how this process trains."""

    device: torch.device
    amp_dtype: torch.dtype | None
    dist: D.DistInfo
    out_dir: Path

    def say(self, *args: Any, **kwargs: Any) -> None:
        """``print`` on rank 0 only."""
        if self.dist.is_main:
            print(*args, **kwargs)


def start_run(args: argparse.Namespace) -> Run:
    """Device, precision, processes and threads; the output directory and ``config.json``."""
    device = resolve_device(args.device)
    amp_dtype = resolve_precision(args.precision, device)
    dinfo = D.init_distributed(device.type, args.dist_backend)
    if device.type == "cuda" and dinfo.distributed:
        device = torch.device("cuda", dinfo.local_rank)
    torch.set_num_threads(args.threads or default_threads())
    out_dir = Path(args.output_dir)
    if not args.resume and (out_dir / "final.pth").exists():  # never overwrite a finished run
        raise ConfigError(f"--output-dir {out_dir} holds a finished run (final.pth); give "
                          "another --output-dir")
    if dinfo.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(to_dict(args), indent=2) + "\n")
    D.barrier()
    return Run(device, amp_dtype, dinfo, out_dir)


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype (``None`` = fp32)."""
    if name == "fp32" or (name == "auto" and device.type != "cuda"):
        return None
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type != "cuda" and name == "fp16":
        raise ConfigError("--precision fp16 needs a CUDA device")
    return torch.bfloat16 if name == "bf16" else torch.float16


# ============================================================================ data
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


def seeded_subset(dataset: Any, n: int, seed: int) -> Any:
    """``n`` images of ``dataset`` drawn under ``seed`` (all of it for ``n = 0``)."""
    if not n or n >= len(dataset):
        return dataset
    idx = np.sort(np.random.default_rng(seed).choice(len(dataset), size=n, replace=False))
    sub = Subset(dataset, idx.tolist())
    if hasattr(dataset, "labels"):
        sub.labels = np.asarray(dataset.labels)[idx]  # type: ignore[attr-defined]
    return sub


@dataclass
class TrainData:
    """The pretraining images, how a batch is made, and the epoch's order."""

    train_set: Any
    collate: Any
    sampler: ResumableSampler
    crops: str
    n_images: int
    steps_per_epoch: int

    def loader(self, epoch: int, start_it: int, args: argparse.Namespace, pin: bool
               ) -> DataLoader:
        """The epoch's data loader, starting at step ``start_it`` (resume)."""
        self.sampler.set_epoch(epoch)
        self.sampler.start = start_it * args.batch_size
        if isinstance(self.train_set, MultiCropDataset):
            self.train_set.set_epoch(epoch)
        return DataLoader(self.train_set, batch_size=args.batch_size, sampler=self.sampler,
                          num_workers=args.num_workers, collate_fn=self.collate, pin_memory=pin,
                          drop_last=True)


def build_data(args: argparse.Namespace, dinfo: D.DistInfo) -> TrainData:
    """The training set: crops in the loader (with matches) or whole images for the device."""
    from pwself_reference.data import build_pretrain_dataset

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
    return TrainData(train_set, collate, sampler, crops, len(base), steps_per_epoch)


@dataclass
class KnnData:
    """The k-NN monitor's memory (training split) and query (test split) loaders."""

    train: DataLoader
    test: DataLoader
    num_classes: int | None


def build_knn_loaders(args: argparse.Namespace) -> KnnData:
    """Labelled training and test images at ``global_crop_size``, for the k-NN monitor."""
    from pwself_reference.data import build_labelled_dataset
    from pwself_reference.evaluation import eval_transform

    tf = eval_transform(args.global_crop_size, args.eval_resize_ratio)
    knn_train = seeded_subset(build_labelled_dataset(args.dataset, args.data_path, True, tf),
                              args.train_subset, args.seed)
    knn_test = seeded_subset(build_labelled_dataset(args.dataset, args.data_path, False, tf),
                             args.test_subset, args.seed)
    labels = getattr(knn_train, "labels", None)
    train, test = (DataLoader(ds, batch_size=args.eval_batch_size, shuffle=False,
                              num_workers=args.num_workers) for ds in (knn_train, knn_test))
    return KnnData(train, test, int(np.max(labels)) + 1 if labels is not None else None)


def crop_spec(args: argparse.Namespace) -> CropSpec:
    """The multi-crop sizes, counts and scales of the flags."""
    return CropSpec(args.global_crop_size, args.local_crop_size, args.global_crops_number,
                    args.local_crops_number, tuple(args.global_crops_scale),
                    tuple(args.local_crops_scale), args.interpolation)


def build_patch_jitter(name: str, patch_size: int) -> Any:
    """``--patch-aug``: None, or a :class:`patchaug.PatchJitter` preset."""
    if name == "none":
        return None
    from patchaug.patch_jitter import PatchJitter

    return PatchJitter.paper(patch_size) if name == "paper" else PatchJitter.authors(patch_size)


def build_view_augment(args: argparse.Namespace, spec: CropSpec) -> ViewAugment:
    """DINO's photometric augmentation per view, then ``--patch-aug`` if any."""
    return ViewAugment(spec.n_global, spec.n_local,
                       build_patch_jitter(args.patch_aug, args.patch_size), tuple(args.blur_sigma))


# ============================================================================ networks
def build_network(args: argparse.Namespace, drop_path: float) -> MultiCropNetwork:
    """A ViT backbone and a DINO head, as the flags describe them."""
    backbone = build_backbone(
        args.arch, args.patch_size, args.global_crop_size, drop_path,
        depth=args.depth, embed_dim=args.embed_dim, num_heads=args.num_heads,
    )
    head = DINOHead(backbone.embed_dim, args.out_dim, hidden_dim=args.head_hidden_dim,
                    bottleneck_dim=args.head_bottleneck_dim, norm_last_layer=args.norm_last_layer)
    return MultiCropNetwork(backbone, head)


def build_student_teacher(args: argparse.Namespace, device: torch.device
                          ) -> tuple[MultiCropNetwork, MultiCropNetwork]:
    """The student, and the teacher: a copy of it that receives no gradient."""
    student = build_network(args, args.drop_path).to(device)
    teacher = build_network(args, 0.0).to(device)
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad_(False)
    return student, teacher


# ============================================================================ loss
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


# ============================================================================ optimizer and schedules
def param_groups(model: nn.Module) -> list[dict[str, Any]]:
    """DINO's groups: weight decay on weights, none on biases and norm parameters."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name.endswith(".bias") or p.ndim <= 1 else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(args: argparse.Namespace, student: nn.Module, amp_dtype: torch.dtype | None
                    ) -> tuple[torch.optim.Optimizer, torch.amp.GradScaler | None]:
    """AdamW (or SGD) on DINO's parameter groups, and the fp16 loss scaler."""
    groups = param_groups(student)
    if args.optimizer == "adamw":
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(groups, foreach=True)
    else:
        optimizer = torch.optim.SGD(groups, lr=0, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    return optimizer, scaler


@dataclass
class Schedules:
    """One value per training step: learning rate, weight decay, teacher momentum."""

    lr: np.ndarray
    wd: np.ndarray
    momentum: np.ndarray


def build_schedules(args: argparse.Namespace, steps_per_epoch: int, world_size: int
                    ) -> Schedules:
    """DINO's schedules; the learning rate scales with the total batch (``/ 256``)."""
    total_batch = args.batch_size * world_size
    return Schedules(
        lr=cosine_schedule(args.lr * total_batch / 256.0, args.min_lr, args.epochs,
                           steps_per_epoch, args.warmup_epochs),
        wd=cosine_schedule(args.weight_decay, args.weight_decay_end, args.epochs,
                           steps_per_epoch),
        momentum=cosine_schedule(args.momentum_teacher, 1.0, args.epochs, steps_per_epoch),
    )


def build_models(args: argparse.Namespace, device: torch.device, amp_dtype: torch.dtype | None
                 ) -> tuple[nn.Module, MultiCropNetwork, PWSelfLoss, torch.optim.Optimizer,
                            torch.amp.GradScaler | None]:
    """Student, teacher, loss, optimizer and fp16 loss scaler, seeded by ``--seed``, as
    :func:`train_pwself` builds them (for the benchmarks)."""
    torch.manual_seed(args.seed)
    student, teacher = build_student_teacher(args, device)
    criterion = build_criterion(args).to(device)
    optimizer, scaler = build_optimizer(args, student, amp_dtype)
    return student, teacher, criterion, optimizer, scaler


# ============================================================================ training state
@dataclass(kw_only=True)
class Trainer:
    """Everything :func:`train_one_epoch` needs, and the progress of the run (built by
    keyword)."""

    args: argparse.Namespace
    device: torch.device
    dist: D.DistInfo
    student: nn.Module
    teacher: MultiCropNetwork
    criterion: PWSelfLoss
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    amp_dtype: torch.dtype | None
    spec: CropSpec
    view_aug: ViewAugment
    schedules: Schedules
    steps_per_epoch: int
    out_dir: Path
    loader: Any = None
    global_step: int = 0
    steps_this_process: int = 0
    log_file: Any = None
    history: list[dict[str, Any]] = field(default_factory=list)
    plotted_matches: bool = False

    @property
    def log_path(self) -> Path:
        return self.out_dir / "log.jsonl"

    def log(self, record: dict[str, Any]) -> None:
        if self.dist.is_main and self.log_file is not None:
            self.log_file.write(json.dumps(record) + "\n")
            self.log_file.flush()

    def checkpoint(self, epoch_done: bool, epoch: int, path: Path | None = None) -> None:
        """Write ``checkpoint.pth`` (or ``path``) atomically (rank 0): enough to continue
        exactly from here."""
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
        """The batch's views on the device in ``[0, 1]``: the loader's crops, or crops
        drawn here from whole images (``--crops batched``)."""
        if isinstance(batch, MultiCropBatch):
            mb = batch.to(self.device, non_blocking=True)
            mb.views = [v.float() / 255.0 for v in mb.views]
            return mb
        images = batch.to(self.device, non_blocking=True)
        return batched_multicrop(images, self.spec, shared=self.args.same_spatial_aug)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)


def resume_or_start(tr: Trainer) -> tuple[int, int]:
    """``--resume``: load ``checkpoint.pth`` into ``tr`` and drop the log records written
    after it; otherwise start a new log. Returns the epoch and step in it to start at."""
    args, out_dir = tr.args, tr.out_dir
    if not args.resume:
        if tr.dist.is_main and tr.log_path.exists():
            tr.log_path.unlink()
        return 0, 0
    ckpt = load_checkpoint(out_dir / "checkpoint.pth", map_location=tr.device)
    if ckpt.get("world_size", 1) != tr.dist.world_size:
        raise ConfigError(f"--resume: checkpoint was written with {ckpt.get('world_size')} "
                          f"processes, this run has {tr.dist.world_size}")
    unwrap(tr.student).load_state_dict(ckpt["student"])
    tr.teacher.load_state_dict(ckpt["teacher"])
    tr.optimizer.load_state_dict(ckpt["optimizer"])
    tr.criterion.load_state_dict(ckpt["criterion"])
    if tr.scaler is not None and ckpt.get("scaler"):
        tr.scaler.load_state_dict(ckpt["scaler"])
    tr.global_step = int(ckpt["step"])
    tr.history = list(ckpt.get("history", []))
    start_epoch = int(ckpt["epoch"])
    start_it = tr.global_step - start_epoch * tr.steps_per_epoch
    if not 0 <= start_it < tr.steps_per_epoch and start_epoch < args.epochs:
        raise ConfigError("--resume: the checkpoint does not fit this configuration's "
                          "steps per epoch (change of --batch-size or data?)")
    if tr.dist.is_main and tr.log_path.is_file():
        kept = [line for line in tr.log_path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= tr.global_step]
        tr.log_path.write_text("".join(line + "\n" for line in kept))
    if tr.dist.is_main:
        print(f"resumed from {out_dir / 'checkpoint.pth'}: epoch {start_epoch + 1}, step "
              f"{tr.global_step}")
    return start_epoch, start_it


# ============================================================================ one epoch
def train_one_epoch(tr: Trainer, epoch: int, start_it: int = 0) -> dict[str, Any]:
    """One epoch of self-distillation from step ``start_it``; returns its mean loss, its
    throughput, and whether ``--stop-after-steps`` ended it early."""
    args = tr.args
    patch_level = args.loss != "dino"
    n_global = tr.spec.n_global
    tr.student.train()
    progress = StepLog(tr, epoch)
    stopped = False
    for it, batch in enumerate(tr.loader, start=start_it):
        if it >= tr.steps_per_epoch:
            break
        step = tr.global_step
        set_step_hyperparameters(tr.optimizer, tr.schedules, step)
        # every random draw of this step (crops, photometric, drop-path) depends on (seed, rank, step)
        torch.manual_seed(item_seed(args.seed, 1, tr.dist.rank, step))

        # augment: the multi-crop views, DINO's photometric recipe, optional patch jitter
        mb = tr.prepare_batch(batch)
        views = tr.view_aug(mb.views)

        # match: token pairs of every (teacher, student) view pair
        matches = mb.matches
        if patch_level and matches is None:  # crops drawn on the device: match them here
            with torch.profiler.record_function("match_patches"):
                matches = match_batch(mb, n_global, args.patch_size, args.match_rule)

        # forward: the teacher sees the global views, the student every view; the head runs
        # on every token or on the matched ones (--head-tokens), and stops before its last
        # layer when the loss applies it (--fused-loss on); then the loss
        keep_t, keep_s = head_token_masks(args, views, matches, n_global)
        fused = patch_level and args.fused_loss == "on"
        with tr.autocast():
            with torch.no_grad():
                teacher_out = tr.teacher(views[:n_global], all_tokens=patch_level, keep=keep_t,
                                         features=fused)
            student_out = tr.student(views, all_tokens=patch_level, keep=keep_s, features=fused)
            loss = tr.criterion(student_out, teacher_out, matches, epoch)
        check_finite(tr, loss, epoch, step)

        # student step: backward, per-parameter clipping, frozen last layer, optimizer
        optimizer_step(tr, loss, epoch)

        # teacher: exponential moving average of the student
        ema_update(tr.teacher, unwrap(tr.student), float(tr.schedules.momentum[step]))

        tr.global_step += 1
        tr.steps_this_process += 1
        progress.step_done(it, step, float(loss.item()), views[0].shape[0])
        after_step(tr, epoch, it, mb, views, batch)
        if args.stop_after_steps and tr.steps_this_process >= args.stop_after_steps:
            stopped = True
            break
    return {**progress.summary(), "stopped": stopped}


def head_token_masks(args: argparse.Namespace, views: Sequence[torch.Tensor], matches: Any,
                     n_global: int) -> tuple[Any, Any]:
    """``--head-tokens matched``: the teacher's and the student's keep masks (CLS and
    every token of a matched pair, :func:`~pwself_reference.losses.matched_token_masks`);
    ``(None, None)``, every token, otherwise."""
    if args.loss == "dino" or args.head_tokens != "matched":
        return None, None
    tokens = [1 + r * c for r, c in view_grids(views, args.patch_size)]
    return matched_token_masks(matches, tokens[:n_global], tokens, views[0].shape[0])


def set_step_hyperparameters(optimizer: torch.optim.Optimizer, schedules: Schedules,
                             step: int) -> None:
    """The step's learning rate (every group) and weight decay (the decayed group)."""
    for i, group in enumerate(optimizer.param_groups):
        group["lr"] = float(schedules.lr[step])
        if i == 0:
            group["weight_decay"] = float(schedules.wd[step])


def check_finite(tr: Trainer, loss: torch.Tensor, epoch: int, step: int) -> None:
    """Stop every process when the loss is NaN or infinite on any of them."""
    bad = torch.tensor(0.0 if math.isfinite(loss.item()) else 1.0, device=tr.device)
    if tr.dist.distributed:
        torch.distributed.all_reduce(bad)
    if bad.item() > 0:
        raise NonFiniteLossError(
            f"loss is {loss.item()} at epoch {epoch + 1}, step {step}: stopping; the last good "
            f"checkpoint is {tr.out_dir / 'checkpoint.pth'} (try a lower --lr or "
            "--precision fp32)"
        )


def optimizer_step(tr: Trainer, loss: torch.Tensor, epoch: int) -> None:
    """Backward pass, DINO's per-parameter clipping, the head's last layer frozen for
    ``--freeze-last-layer`` epochs, optimizer step (with fp16 loss scaling)."""
    tr.optimizer.zero_grad(set_to_none=True)
    model = unwrap(tr.student)
    if tr.scaler is not None:
        tr.scaler.scale(loss).backward()
        tr.scaler.unscale_(tr.optimizer)
    else:
        loss.backward()
    clip_gradients(model, tr.args.clip_grad)
    if epoch < tr.args.freeze_last_layer:
        for p in model.head.last_layer_parameters():
            p.grad = None
    if tr.scaler is not None:
        tr.scaler.step(tr.optimizer)
        tr.scaler.update()
    else:
        tr.optimizer.step()


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


# ============================================================================ logging, plots, checkpoints
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


class StepLog:
    """The epoch's progress bar, per-step log records and throughput."""

    def __init__(self, tr: Trainer, epoch: int) -> None:
        self.tr, self.epoch = tr, epoch
        self.bar = ProgressBar(tr.steps_per_epoch, f"epoch {epoch + 1}/{tr.args.epochs}",
                               enabled=tr.dist.is_main and not tr.args.no_progress,
                               every=tr.args.log_every)
        self.losses: list[float] = []
        self.images = 0
        self.t_start = self.t_step = time.perf_counter()

    def step_done(self, it: int, step: int, loss: float, batch: int) -> None:
        tr = self.tr
        now = time.perf_counter()
        n_img = batch * tr.dist.world_size
        ips = n_img / max(now - self.t_step, 1e-9)
        self.t_step = now
        self.losses.append(loss)
        self.images += n_img
        lr = tr.optimizer.param_groups[0]["lr"]
        self.bar.update(it + 1, loss=f"{loss:.4f}", lr=f"{lr:.2e}", **{"img/s": f"{ips:.0f}"})
        if tr.global_step % tr.args.log_every == 0 or it + 1 == tr.steps_per_epoch:
            tr.log({
                "type": "step", "epoch": self.epoch + 1, "step": tr.global_step, "loss": loss,
                "lr": lr, "wd": float(tr.schedules.wd[step]),
                "momentum": float(tr.schedules.momentum[step]),
                "teacher_temp": tr.criterion.teacher_temp(self.epoch),
                "matched_tokens": tr.criterion.last_stats.get("matched_tokens", 1.0),
                "images_per_s": ips,
            })

    def summary(self) -> dict[str, float]:
        elapsed = time.perf_counter() - self.t_start
        return {"loss": float(np.mean(self.losses)) if self.losses else float("nan"),
                "images_per_s": self.images / max(elapsed, 1e-9), "time_s": elapsed}


def after_step(tr: Trainer, epoch: int, it: int, mb: MultiCropBatch,
               views: Sequence[torch.Tensor], batch: Any) -> None:
    """The first step's ``matches.png``, and ``--save-every-steps`` checkpoints."""
    if not tr.plotted_matches and tr.dist.is_main and not tr.args.no_plots:
        tr.plotted_matches = True
        plot_first_pair(tr, mb, views, batch)
    every = tr.args.save_every_steps
    if every and tr.global_step % every == 0 and it + 1 < tr.steps_per_epoch:
        tr.checkpoint(epoch_done=False, epoch=epoch)


def plot_first_pair(tr: Trainer, mb: MultiCropBatch, views: Sequence[torch.Tensor],
                    batch: Any) -> None:
    """``matches.png``: the matched patches of global view 1 and one other view."""
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


def run_knn(tr: Trainer, knn: KnnData, epoch: int) -> float:
    """k-NN top-1 of the teacher's backbone, logged and kept in the history."""
    from pwself_reference.evaluation import extract_features, knn_classify

    backbone = tr.teacher.backbone
    train_f, train_l = extract_features(backbone, knn.train, tr.device)
    test_f, test_l = extract_features(backbone, knn.test, tr.device)
    top1, top5 = knn_classify(train_f, train_l, test_f, test_l, k=tr.args.knn_k,
                              T=tr.args.knn_temperature, num_classes=knn.num_classes)
    rec = {"type": "knn", "epoch": epoch, "step": tr.global_step, "top1": top1, "top5": top5}
    tr.history.append(rec)
    tr.log(rec)
    return top1


def end_of_epoch(tr: Trainer, knn: KnnData | None, epoch: int, stats: dict[str, Any]) -> None:
    """k-NN when due, the epoch's log record, ``checkpointNNNN.pth`` every ``--saveckp-freq``
    epochs, ``checkpoint.pth``, ``curves.png``."""
    args = tr.args
    top1 = None
    if knn is not None and args.knn_every and ((epoch + 1) % args.knn_every == 0
                                               or epoch + 1 == args.epochs):
        top1 = run_knn(tr, knn, epoch + 1)
    tr.log({"type": "epoch", "epoch": epoch + 1, "step": tr.global_step, "loss": stats["loss"],
            "images_per_s": stats["images_per_s"], "time_s": stats["time_s"],
            "knn_top1": top1})
    if args.saveckp_freq and (epoch + 1) % args.saveckp_freq == 0:
        # before checkpoint.pth: a run killed in between redoes this epoch on --resume and
        # writes it again, so every epoch that checkpoint.pth has passed has its file
        tr.checkpoint(epoch_done=True, epoch=epoch,
                      path=tr.out_dir / f"checkpoint{epoch + 1:04d}.pth")
    tr.checkpoint(epoch_done=True, epoch=epoch)
    if tr.dist.is_main and not args.no_plots:
        from pwself_reference.plots import plot_curves

        plot_curves(tr.log_path, tr.out_dir / "curves.png")
    if tr.dist.is_main:
        knn_text = f", k-NN top-1 {top1:.2f}%" if top1 is not None else ""
        print(f"epoch {epoch + 1}/{args.epochs}: loss {stats['loss']:.4f}, "
              f"{stats['images_per_s']:.0f} img/s{knn_text}")
    D.barrier()


if __name__ == "__main__":
    sys.exit(cli())
