"""Copy detection on Copydays, as DINO evaluates it.

Layout of the benchmark directory (the INRIA Copydays release)::

    <root>/original/*.jpg          157 originals (the database)
    <root>/strong/*.jpg            229 strong attacks; the positives of a strong
                                   image are the originals sharing its first 4
                                   characters (e.g. 200000.jpg <- 200000*.jpg)
    <root>/jpegqual/<q>/*.jpg      JPEG attacks, one per original (same order)
    <root>/crops/<c>/*.jpg         crop attacks, one per original (same order)

Every block present is used as a query set; the database is the originals plus
the optional distractor images. Descriptor: CLS of the last block concatenated
with GeM (p=4) of its patch tokens, images resized to ``imsize x imsize``.
Optionally a whitening (:mod:`.whitening`, DINO's uncentred-covariance variant)
learned on a separate image set is applied, then descriptors are
L2-normalised, compared by cosine similarity and each query is scored by the
trapezoid AP over its top-20 results (the Holidays package's
``score_ap_from_ranks_1``, identical to :func:`.retrieval.average_precision`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pwself_reference.evaluation._checks import feature_matrix
from pwself_reference.evaluation.retrieval import average_precision
from pwself_reference.evaluation.whitening import learn_whitening

__all__ = [
    "COPYDAYS_BLOCKS",
    "IMAGE_EXTENSIONS",
    "CopydaysBenchmark",
    "ImageListDataset",
    "list_images",
    "score_copy_detection",
    "evaluate_copy_detection",
]

#: DINO's block list, in its order.
COPYDAYS_BLOCKS = (
    ("original", "strong")
    + tuple(f"jpegqual/{q}" for q in (3, 5, 8, 10, 15, 20, 30, 50, 75))
    + tuple(f"crops/{c}" for c in (10, 15, 20, 30, 40, 50, 60, 70, 80))
)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def list_images(directory: str | os.PathLike[str], extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[Path]:
    """Sorted image files (by extension, case-insensitive) directly inside ``directory``."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"image directory not found: {directory}")
    exts = tuple(e.lower() for e in extensions)
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in exts)


@dataclass
class CopydaysBenchmark:
    """Files of a Copydays-layout directory and the positives of every query.

    Parameters
    ----------
    root : path
        Benchmark directory (see the module docstring).
    blocks : sequence of str or None
        Query blocks to use; ``None`` takes every block of
        :data:`COPYDAYS_BLOCKS` present under ``root`` (``original`` is required).
    prefix_len : int
        Characters of the file name that identify a strong attack's originals.
    """

    root: Path
    blocks: list[str] = field(default_factory=list)
    originals: list[Path] = field(default_factory=list)
    queries: dict[str, list[Path]] = field(default_factory=dict)
    positives: dict[str, list[list[int]]] = field(default_factory=dict)

    @classmethod
    def from_directory(
        cls,
        root: str | os.PathLike[str],
        blocks: Sequence[str] | None = None,
        prefix_len: int = 4,
    ) -> CopydaysBenchmark:
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"Copydays directory not found: {root}")
        originals = list_images(root / "original", (".jpg", ".jpeg"))
        if not originals:
            raise ValueError(f"{root / 'original'} holds no .jpg image")
        if blocks is None:
            blocks = [b for b in COPYDAYS_BLOCKS if (root / b).is_dir()]
        bench = cls(root=root, blocks=list(blocks), originals=originals)
        for block in bench.blocks:
            files = list_images(root / block, (".jpg", ".jpeg"))
            if not files:
                raise ValueError(f"query block {root / block} holds no .jpg image")
            if block == "strong":
                pos = [
                    [j for j, o in enumerate(originals) if o.name[:prefix_len] == q.name[:prefix_len]]
                    for q in files
                ]
                lonely = [q.name for q, p in zip(files, pos) if not p]
                if lonely:
                    raise ValueError(
                        f"strong images without an original sharing their first {prefix_len} "
                        f"characters: {lonely[:5]}"
                    )
            else:
                if len(files) != len(originals):
                    raise ValueError(
                        f"block {block!r} has {len(files)} images but there are "
                        f"{len(originals)} originals (expected one attack per original)"
                    )
                pos = [[j] for j in range(len(files))]
            bench.queries[block] = files
            bench.positives[block] = pos
        return bench


class ImageListDataset(torch.utils.data.Dataset):
    """Images from a list of paths, each resized to ``imsize x imsize`` (bicubic) and normalised."""

    def __init__(self, paths: Sequence[str | os.PathLike[str]], imsize: int) -> None:
        if not isinstance(imsize, int) or imsize <= 0:
            raise ValueError(f"imsize must be a positive int, got {imsize!r}")
        self.paths = [Path(p) for p in paths]
        self.imsize = imsize

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        from pwself_reference.evaluation.features import to_normalized_tensor

        with Image.open(self.paths[i]) as im:
            img = im.convert("RGB").resize((self.imsize, self.imsize), Image.Resampling.BICUBIC)
        return to_normalized_tensor(img), i


def score_copy_detection(
    queries: torch.Tensor,
    database: torch.Tensor,
    positives: Sequence[Sequence[int]],
    topk: int = 20,
) -> tuple[float, list[float]]:
    """Mean AP over the top-``topk`` results of cosine search.

    Parameters
    ----------
    queries : Tensor, shape ``(Q, D)``
    database : Tensor, shape ``(N, D)``
    positives : sequence of Q sequences of int
        Database indices that are copies of each query (non-empty).
    topk : int
        Length of the result list scored (DINO: 20).

    Returns
    -------
    mAP : float
        In ``[0, 1]``.
    aps : list of float
        AP per query.

    Examples
    --------
    >>> db = torch.eye(3)
    >>> score_copy_detection(torch.tensor([[1.0, 0.1, 0.0], [0.0, 0.5, 1.0]]), db, [[0], [1]])[1]
    [1.0, 0.25]
    """
    feature_matrix(queries, "queries")
    feature_matrix(database, "database")
    if queries.shape[1] != database.shape[1]:
        raise ValueError(
            f"queries (Q, D) and database (N, D) must share D, got {tuple(queries.shape)} "
            f"and {tuple(database.shape)}"
        )
    if len(positives) != queries.shape[0]:
        raise ValueError(f"{len(positives)} positive lists for {queries.shape[0]} queries")
    if not isinstance(topk, int) or topk < 1:
        raise ValueError(f"topk must be a positive int, got {topk!r}")
    q = F.normalize(queries.double(), dim=1)
    db = F.normalize(database.double(), dim=1)
    sim = q @ db.T
    order = torch.sort(-sim, dim=1, stable=True).indices[:, : min(topk, db.shape[0])]
    aps = []
    for i, pos in enumerate(positives):
        if len(pos) == 0:
            raise ValueError(f"query {i} has no positive")
        if min(pos) < 0 or max(pos) >= db.shape[0]:
            raise ValueError(f"positives[{i}] holds indices outside the database [0, {db.shape[0]}): "
                             f"{list(pos)}")
        hits = torch.isin(order[i], torch.as_tensor(list(pos), dtype=order.dtype))
        aps.append(average_precision(torch.nonzero(hits).flatten().tolist(), len(pos)))
    return sum(aps) / len(aps), aps


def _features(backbone, paths, imsize, batch_size, device, num_workers, gem_p):
    from pwself_reference.evaluation.features import extract_features, gem_features

    loader = torch.utils.data.DataLoader(
        ImageListDataset(paths, imsize), batch_size=batch_size, num_workers=num_workers
    )
    feats, _ = extract_features(backbone, loader, device,
                                features=partial(gem_features, p=gem_p))
    return feats


def evaluate_copy_detection(
    backbone: nn.Module,
    root: str | os.PathLike[str],
    imsize: int = 320,
    distractors_path: str | os.PathLike[str] | None = None,
    whitening_path: str | os.PathLike[str] | None = None,
    blocks: Sequence[str] | None = None,
    batch_size: int = 16,
    device: str | torch.device | None = None,
    num_workers: int = 0,
    topk: int = 20,
    gem_p: float = 4.0,
    centered_whitening: bool = False,
) -> dict[str, Any]:
    """Run DINO's Copydays copy-detection evaluation on a backbone.

    Parameters
    ----------
    backbone : nn.Module
        A timm ViT.
    root : path
        Copydays-layout directory (see the module docstring).
    imsize : int
        Square input size (DINO: 320).
    distractors_path, whitening_path : path or None
        Directories of images added to the database / used to learn the
        whitening (DINO: 10k and 20k YFCC100M images). ``None`` skips them.
    blocks : sequence of str or None
        Query blocks (default: every Copydays block present).
    topk : int
        Results scored per query (DINO: 20).
    gem_p : float
        GeM power for the patch tokens (DINO: 4).
    centered_whitening : bool
        Use the centred covariance instead of DINO's uncentred one.

    Returns
    -------
    dict
        ``mAP``: block name -> mAP in percent; ``strong_mAP`` (percent, when the
        ``strong`` block exists); counts and settings.

    Examples
    --------
    Needs the Copydays images on disk::

        from pwself_reference.models import build_backbone
        net = build_backbone("vit_tiny", patch_size=16, img_size=224)
        evaluate_copy_detection(net, "copydays/")["strong_mAP"]
    """
    if isinstance(gem_p, bool) or not isinstance(gem_p, (int, float)) or not gem_p > 0:
        raise ValueError(f"gem_p must be a positive number, got {gem_p!r}")
    bench = CopydaysBenchmark.from_directory(root, blocks)
    args = (imsize, batch_size, device, num_workers, gem_p)
    database = [_features(backbone, bench.originals, *args)]
    n_distractors = 0
    if distractors_path is not None:
        distractors = list_images(distractors_path)
        if not distractors:
            raise ValueError(f"no distractor image in {distractors_path}")
        n_distractors = len(distractors)
        database.append(_features(backbone, distractors, *args))
    db = torch.cat(database)
    queries = {b: _features(backbone, bench.queries[b], *args) for b in bench.blocks}
    whitening_info = None
    if whitening_path is not None:
        whit_files = list_images(whitening_path)
        if len(whit_files) < 2:
            raise ValueError(f"need at least 2 whitening images in {whitening_path}")
        whit = learn_whitening(
            _features(backbone, whit_files, *args), power=0.5, centered=centered_whitening
        )
        db = whit.apply(db)
        queries = {b: whit.apply(q) for b, q in queries.items()}
        whitening_info = {"n_images": len(whit_files), "energy_kept": whit.energy,
                          "centered": centered_whitening}
    results = {}
    for block in bench.blocks:
        m, _ = score_copy_detection(queries[block], db, bench.positives[block], topk)
        results[block] = 100.0 * m
    out: dict[str, Any] = {
        "mAP": results,
        "n_originals": len(bench.originals),
        "n_distractors": n_distractors,
        "n_queries": {b: len(bench.queries[b]) for b in bench.blocks},
        "imsize": imsize,
        "topk": topk,
        "gem_p": gem_p,
        "whitening": whitening_info,
    }
    if "strong" in results:
        out["strong_mAP"] = results["strong"]
    return out
