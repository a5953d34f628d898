"""Command line: ``python -m pwself_reference.eval {knn,linear,copydays,retrieval,correspondence}``.

Every subcommand loads the backbone of a training checkpoint (teacher by
default, ``--which student`` otherwise) with ``torch.load(weights_only=True)``,
runs one protocol (one of DINO's, or the patch-token correspondence), prints its
numbers and writes them as JSON to ``--output`` (default: ``eval_<protocol>.json``
next to the checkpoint).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch

from pwself_reference.config import resolve_device

__all__ = ["main", "build_parser"]


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, type=Path,
                   help="training checkpoint written by train.py")
    p.add_argument("--which", choices=("teacher", "student"), default="teacher",
                   help="which network's backbone to evaluate (DINO: teacher)")
    p.add_argument("--output", type=Path, default=None,
                   help="JSON file for the results (default: eval_<protocol>.json beside the checkpoint)")
    p.add_argument("--device", default=None,
                   help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--num-workers", type=int, default=2, help="data loading workers")
    p.add_argument("--debug", action="store_true",
                   help="on an error, show the full traceback instead of one line")


def _labelled(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default=None,
                   help="dataset name for pwself_reference.data.build_labelled_dataset "
                        "(default: the checkpoint's training dataset)")
    p.add_argument("--data-path", default=None, help="dataset root (default: the checkpoint's)")
    p.add_argument("--img-size", type=_positive_int, default=None,
                   help="evaluation crop size (default: the checkpoint's global_crop_size)")
    p.add_argument("--resize-ratio", type=float, default=None,
                   help="resize the short side to img_size * ratio before the centre crop "
                        "(default: the checkpoint's --eval-resize-ratio, else DINO's 256/224)")
    p.add_argument("--batch-size", type=_positive_int, default=128)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m pwself_reference.eval``."""
    parser = argparse.ArgumentParser(
        prog="python -m pwself_reference.eval",
        description="DINO's evaluation protocols on a pwself_reference checkpoint.",
    )
    sub = parser.add_subparsers(dest="protocol", required=True)

    knn = sub.add_parser("knn", help="weighted k-NN classification on frozen features")
    _common(knn)
    _labelled(knn)
    knn.add_argument("--nb-knn", type=_positive_int, nargs="+", default=[10, 20, 100, 200])
    knn.add_argument("--temperature", type=float, default=0.07)
    knn.add_argument("--dump-features", type=Path, default=None,
                     help="directory where features and labels are saved")
    knn.add_argument("--load-features", type=Path, default=None,
                     help="directory with features saved by --dump-features (skips the backbone)")

    lin = sub.add_parser("linear", help="linear classifier on frozen features")
    _common(lin)
    _labelled(lin)
    lin.add_argument("--n-last-blocks", type=_positive_int, default=4,
                     help="concatenate the CLS of the last n blocks (DINO: 4 ViT-S, 1 ViT-B)")
    lin.add_argument("--avgpool-patchtokens", action="store_true",
                     help="append the average of the last block's patch tokens (DINO: ViT-B)")
    lin.add_argument("--epochs", type=_positive_int, default=100)
    lin.add_argument("--lr", type=float, default=1e-3, help="learning rate for a batch of 256")
    lin.add_argument("--val-freq", type=_positive_int, default=1)
    lin.add_argument("--num-labels", type=_positive_int, default=None,
                     help="number of classes (default: inferred from the labels)")
    lin.add_argument("--cache-features", action="store_true",
                     help="extract centre-crop features once and train on them, instead of "
                          "DINO's fresh RandomResizedCrop+flip views every epoch")
    lin.add_argument("--seed", type=int, default=0)

    cd = sub.add_parser("copydays", help="copy detection on Copydays (strong and other blocks)")
    _common(cd)
    cd.add_argument("--data-path", required=True, type=Path,
                    help="Copydays directory (original/, strong/, jpegqual/, crops/)")
    cd.add_argument("--distractors-path", type=Path, default=None,
                    help="directory of distractor images added to the database (DINO: 10k)")
    cd.add_argument("--whitening-path", type=Path, default=None,
                    help="directory of images to learn the whitening on (DINO: 20k)")
    cd.add_argument("--imsize", type=_positive_int, default=320)
    cd.add_argument("--topk", type=_positive_int, default=20)
    cd.add_argument("--blocks", nargs="+", default=None,
                    help="query blocks (default: every Copydays block present)")
    cd.add_argument("--centered-whitening", action="store_true",
                    help="centre the whitening covariance (DINO does not)")
    cd.add_argument("--batch-size", type=_positive_int, default=16)

    rt = sub.add_parser("retrieval", help="image retrieval on revisited Oxford / Paris")
    _common(rt)
    rt.add_argument("--data-path", required=True, type=Path,
                    help="directory holding roxford5k/ and/or rparis6k/")
    rt.add_argument("--dataset", choices=("roxford5k", "rparis6k"), default="roxford5k")
    rt.add_argument("--imsize", type=_positive_int, default=224,
                    help="longer image side (images are only shrunk)")
    rt.add_argument("--multiscale", action="store_true",
                    help="average CLS over scales 1, 1/sqrt(2), 1/2")
    rt.add_argument("--crop-queries", action="store_true",
                    help="crop queries to their bounding box (revisitop); DINO uses full images")
    co = sub.add_parser("correspondence",
                        help="do patch tokens find their geometric match in another view?")
    _common(co)
    co.add_argument("--dataset", default=None,
                    help="dataset name as for knn (default: the checkpoint's training dataset); "
                         "its test/val split is read, labels unused")
    co.add_argument("--data-path", default=None, help="dataset root (default: the checkpoint's)")
    co.add_argument("--image-dir", type=Path, default=None,
                    help="instead of --dataset: every image directly inside this directory "
                         "(unlabelled)")
    co.add_argument("--split", choices=("test", "train"), default="test",
                    help="dataset split (imagefolder: val/ or train/)")
    co.add_argument("--max-images", type=_positive_int, default=1000,
                    help="evaluate this many images, evenly spaced over the split")
    co.add_argument("--source-size", type=_positive_int, default=None,
                    help="images are resized (short side) and centre-cropped to this before the "
                         "views are cut (default: the checkpoint's global_crop_size)")
    co.add_argument("--global-size", type=_positive_int, default=None,
                    help="global view side (default: the checkpoint's global_crop_size)")
    co.add_argument("--local-size", type=int, default=None,
                    help="local view side (default: the checkpoint's local_crop_size; 0 skips "
                         "the global-local pairs)")
    co.add_argument("--global-scale", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                    help="global crop area range (default: the checkpoint's)")
    co.add_argument("--local-scale", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                    help="local crop area range (default: the checkpoint's)")
    co.add_argument("--rule", choices=("centre", "half", "official"), default="centre",
                    help="patchaug.match_patches rule of the ground truth")
    co.add_argument("--foreground-std", type=float, default=0.1,
                    help="foreground query tokens: patch pixel std (normalised input) above this")
    co.add_argument("--seed", type=int, default=0, help="seed of the crops and flips")
    co.add_argument("--batch-size", type=_positive_int, default=256)
    return parser




def _load(args: argparse.Namespace, device: torch.device):
    from pwself_reference.checkpoint import load_backbone

    backbone, config = load_backbone(args.checkpoint, which=args.which, map_location="cpu")
    return backbone.to(device).eval(), config


def _loader(dataset, batch_size: int, num_workers: int, device: torch.device, shuffle=False):
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
        pin_memory=device.type == "cuda", drop_last=False,
    )


def _datasets(args, config, train_transform, val_transform):
    from pwself_reference.data import build_labelled_dataset

    name = args.dataset or config.get("dataset") or "fashion-mnist-mini"
    root = args.data_path if args.data_path is not None else config.get("data_path")
    train = build_labelled_dataset(name, root, True, train_transform)
    val = build_labelled_dataset(name, root, False, val_transform)
    return name, train, val


def _img_size(args, config) -> int:
    size = args.img_size or config.get("global_crop_size")
    if not isinstance(size, int) or size <= 0:
        raise ValueError("img_size: give --img-size (the checkpoint has no global_crop_size)")
    return size


def _resize_ratio(args, config) -> float:
    """The flag, else the ratio train.py's k-NN monitor used, so both report the same number."""
    if args.resize_ratio is not None:
        return args.resize_ratio
    return float(config.get("eval_resize_ratio", 256 / 224))


def _run_knn(args, device) -> dict[str, Any]:
    from pwself_reference.evaluation.features import eval_transform, extract_features
    from pwself_reference.evaluation.knn import knn_classify

    settings: dict[str, Any] = {"nb_knn": args.nb_knn, "temperature": args.temperature}
    if args.load_features is not None:
        d = args.load_features
        tensors = {}
        for key in ("train_features", "train_labels", "test_features", "test_labels"):
            f = d / f"{key}.pth"
            if not f.is_file():
                raise FileNotFoundError(f"load_features: {f} not found")
            tensors[key] = torch.load(f, map_location="cpu", weights_only=True)
        settings["features_from"] = str(d)
    else:
        backbone, config = _load(args, device)
        size = _img_size(args, config)
        ratio = _resize_ratio(args, config)
        transform = eval_transform(size, ratio)
        name, train, val = _datasets(args, config, transform, transform)
        too_big = [k for k in args.nb_knn if k > len(train)]
        if too_big:
            raise ValueError(f"nb_knn: k={too_big} larger than the {len(train)} train images")
        settings.update(dataset=name, img_size=size, resize_ratio=ratio,
                        n_train=len(train), n_test=len(val))
        tensors = {}
        for split, ds in (("train", train), ("test", val)):
            f, y = extract_features(backbone, _loader(ds, args.batch_size, args.num_workers,
                                                      device), device)
            tensors[f"{split}_features"], tensors[f"{split}_labels"] = f, y
        if args.dump_features is not None:
            args.dump_features.mkdir(parents=True, exist_ok=True)
            for key, t in tensors.items():
                torch.save(t.cpu(), args.dump_features / f"{key}.pth")
    results = {}
    for k in args.nb_knn:
        top1, top5 = knn_classify(
            tensors["train_features"].to(device), tensors["train_labels"],
            tensors["test_features"].to(device), tensors["test_labels"], k=k, T=args.temperature,
        )
        results[str(k)] = {"top1": top1, "top5": top5}
        print(f"{k}-NN classifier result: Top1: {top1:.2f}, Top5: {top5:.2f}")
    return {"settings": settings, "results": results}


def _run_linear(args, device) -> dict[str, Any]:
    from torchvision import transforms as T

    from pwself_reference.evaluation.features import (
        IMAGENET_MEAN,
        IMAGENET_STD,
        eval_transform,
        extract_features,
        last_blocks_features,
    )
    from pwself_reference.evaluation.linear_probe import linear_probe, train_linear_classifier

    backbone, config = _load(args, device)
    size = _img_size(args, config)
    val_tf = eval_transform(size, _resize_ratio(args, config))
    if args.cache_features:
        train_tf = val_tf
    else:
        train_tf = T.Compose([
            T.Lambda(lambda im: im.convert("RGB")),
            T.RandomResizedCrop(size),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ])
    name, train, val = _datasets(args, config, train_tf, val_tf)
    num_labels = args.num_labels
    if num_labels is None:
        labels = getattr(train, "labels", None)
        if labels is None:
            labels = [train[i][1] for i in range(len(train))]
        num_labels = int(max(labels)) + 1
    settings = {"dataset": name, "img_size": size, "n_last_blocks": args.n_last_blocks,
                "avgpool_patchtokens": args.avgpool_patchtokens, "epochs": args.epochs,
                "lr": args.lr, "batch_size": args.batch_size, "num_labels": num_labels,
                "cache_features": args.cache_features, "n_train": len(train), "n_test": len(val)}
    if args.cache_features:
        features = partial(last_blocks_features, n_last_blocks=args.n_last_blocks,
                           avgpool_patchtokens=args.avgpool_patchtokens)
        data = []
        for ds in (train, val):
            data += list(extract_features(backbone, _loader(ds, args.batch_size, args.num_workers,
                                                            device), device, features=features))
        out = train_linear_classifier(*data, num_classes=num_labels, epochs=args.epochs,
                                      lr=args.lr, batch_size=args.batch_size,
                                      val_freq=args.val_freq, seed=args.seed, device=device,
                                      log=print)
    else:
        torch.manual_seed(args.seed)
        out = linear_probe(
            backbone, _loader(train, args.batch_size, args.num_workers, device, shuffle=True),
            _loader(val, args.batch_size, args.num_workers, device), num_labels,
            epochs=args.epochs, lr=args.lr, val_freq=args.val_freq, seed=args.seed,
            device=device, log=print, n_last_blocks=args.n_last_blocks,
            avgpool_patchtokens=args.avgpool_patchtokens,
        )
    out.pop("classifier")
    print(f"Linear probe: best top-1 {out['best_top1']:.2f} (final {out['final_top1']:.2f})")
    return {"settings": settings, "results": out}


def _run_copydays(args, device) -> dict[str, Any]:
    from pwself_reference.evaluation.copy_detection import (
        CopydaysBenchmark,
        evaluate_copy_detection,
    )

    CopydaysBenchmark.from_directory(args.data_path, args.blocks)  # check the layout first
    for path in (args.distractors_path, args.whitening_path):
        if path is not None and not path.is_dir():
            raise FileNotFoundError(f"image directory not found: {path}")
    backbone, _ = _load(args, device)
    out = evaluate_copy_detection(
        backbone, args.data_path, imsize=args.imsize, distractors_path=args.distractors_path,
        whitening_path=args.whitening_path, blocks=args.blocks, batch_size=args.batch_size,
        device=device, num_workers=args.num_workers, topk=args.topk,
        centered_whitening=args.centered_whitening,
    )
    for block, m in out["mAP"].items():
        print(f"eval on {block} mAP={m:.2f}")
    return {"settings": {"data_path": str(args.data_path), "imsize": args.imsize,
                         "topk": args.topk}, "results": out}


def _run_retrieval(args, device) -> dict[str, Any]:
    from pwself_reference.evaluation.retrieval import RevisitedDataset, evaluate_retrieval

    for split in ("database", "query"):  # check the ground truth and images first
        RevisitedDataset(args.data_path, args.dataset, split, args.imsize)
    backbone, _ = _load(args, device)
    out = evaluate_retrieval(
        backbone, args.data_path, args.dataset, imsize=args.imsize, multiscale=args.multiscale,
        crop_queries=args.crop_queries, device=device, num_workers=args.num_workers,
    )
    print(f">> {args.dataset}: mAP M: {out['mAP_medium']:.2f}, H: {out['mAP_hard']:.2f}")
    print(f">> {args.dataset}: mP@k{out['kappas']} M: {[round(v, 2) for v in out['mP@k_medium']]}"
          f", H: {[round(v, 2) for v in out['mP@k_hard']]}")
    return {"settings": {"dataset": args.dataset, "imsize": args.imsize,
                         "multiscale": args.multiscale, "crop_queries": args.crop_queries},
            "results": out}


class _ImageDir(torch.utils.data.Dataset):
    """Unlabelled images directly inside a directory, through ``transform`` (label: index)."""

    def __init__(self, directory: Path, transform: Any) -> None:
        from pwself_reference.evaluation.copy_detection import list_images

        self.paths = list_images(directory)
        if not self.paths:
            raise FileNotFoundError(f"image_dir: no images in {directory}")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        with Image.open(self.paths[i]) as im:
            return self.transform(im.convert("RGB")), i


def _run_correspondence(args, device) -> dict[str, Any]:
    import numpy as np

    from pwself_reference.data import build_labelled_dataset
    from pwself_reference.evaluation.correspondence import PositionOnly, correspondence_recall
    from pwself_reference.evaluation.features import eval_transform

    backbone, config = _load(args, device)
    size = args.global_size or config.get("global_crop_size")
    local = args.local_size if args.local_size is not None else config.get("local_crop_size")
    source = args.source_size or config.get("global_crop_size") or size
    if not isinstance(size, int) or not isinstance(source, int):
        raise ValueError("global_size: give --global-size and --source-size (the checkpoint has "
                         "no global_crop_size)")
    transform = eval_transform(source, 1.0)
    if args.image_dir is not None:
        dataset, name = _ImageDir(args.image_dir, transform), str(args.image_dir)
    else:
        name = args.dataset or config.get("dataset") or "fashion-mnist-mini"
        root = args.data_path if args.data_path is not None else config.get("data_path")
        dataset = build_labelled_dataset(name, root, args.split == "train", transform)
    n = min(args.max_images, len(dataset))
    # evenly spaced over the split: every class of a class-sorted split takes part
    subset = torch.utils.data.Subset(dataset, np.linspace(0, len(dataset) - 1, n).round()
                                     .astype(int).tolist())
    kw = dict(global_size=size, local_size=local or None,
              global_scale=tuple(args.global_scale or config.get("global_crops_scale", (0.4, 1.0))),
              local_scale=tuple(args.local_scale or config.get("local_crops_scale", (0.1, 0.4))),
              rule=args.rule, foreground_std=args.foreground_std, seed=args.seed, device=device)
    results = {}
    for label, model in (("backbone", backbone), ("position_only", PositionOnly(backbone))):
        loader = _loader(subset, args.batch_size, args.num_workers, device)
        results[label] = correspondence_recall(model, loader, **kw)
    settings = {"dataset": name, "split": args.split, "n_images": n, "source_size": source,
                **results["backbone"]["settings"]}
    print(f"{'group':<14} {'tokens':>7}  {'recall@1':>8} {'pos-only':>8} {'chance':>7}  "
          f"{'within1':>8} {'pos-only':>8} {'chance':>7}")
    for sel in ("all", "foreground") if args.foreground_std is not None else ("all",):
        for grp, r in results["backbone"][sel].items():
            p = results["position_only"][sel][grp]
            if not r["tokens"]:
                continue
            print(f"{sel[:2]}:{grp:<11} {r['tokens']:>7}  {r['recall_at_1']:>8.2f} "
                  f"{p['recall_at_1']:>8.2f} {r['chance_at_1']:>7.2f}  {r['recall_within_1']:>8.2f} "
                  f"{p['recall_within_1']:>8.2f} {r['chance_within_1']:>7.2f}")
    for r in results.values():
        r.pop("settings")
    return {"settings": settings, "results": results}


_RUNNERS = {"knn": _run_knn, "linear": _run_linear, "copydays": _run_copydays,
            "retrieval": _run_retrieval, "correspondence": _run_correspondence}


def main(argv: Sequence[str] | None = None) -> int:
    """Run one evaluation; returns the process exit status (0 on success, 2 on bad input).

    Examples
    --------
    Needs a checkpoint written by ``train.py``::

        main(["knn", "--checkpoint", "runs/pwself/final.pth"])
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    output = args.output or args.checkpoint.parent / f"eval_{args.protocol}.json"
    started = time.time()
    try:
        device = resolve_device(args.device)  # the training's rule: auto = CUDA when available
        _check_writable(output)  # before the run, not after an hour of features
        body = _RUNNERS[args.protocol](args, device)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        # the user's input is at fault (a path, a file, a flag): one line, no traceback
        if args.debug:
            raise
        print(f"{parser.prog} {args.protocol}: error: {exc}", file=sys.stderr)
        return 2
    record = {
        "protocol": args.protocol,
        "checkpoint": str(args.checkpoint),
        "which": args.which,
        "device": str(device),
        "seconds": round(time.time() - started, 3),
        **body,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(record, indent=2, default=_jsonable) + "\n")
    print(f"results written to {output}")
    return 0


def _check_writable(output: Path) -> None:
    """The results file can be written: its directory exists (or is made) and takes a file."""
    if output.is_dir():
        raise IsADirectoryError(f"--output {output} is a directory; give a file name")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=output.parent, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise PermissionError(f"--output {output}: cannot write to {output.parent} "
                              f"({exc.strerror or exc})") from exc


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
