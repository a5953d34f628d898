"""Revisited Oxford / Paris image retrieval (Radenovic et al., CVPR 2018), as DINO runs it.

This module holds the scoring protocol (:func:`average_precision`,
:func:`compute_map`), the ground-truth helpers (:func:`load_gnd`,
:func:`gnd_easy`, :func:`gnd_medium`, :func:`gnd_hard`) and the end-to-end
evaluation of a backbone (:func:`evaluate_retrieval`).

The scoring follows the revisitop reference exactly:

* ``ranks`` is ``(db_size, n_queries)``: column ``q`` lists database indices from
  the most to the least similar;
* positions of *junk* images are removed from the ranking (every positive moves
  up by the number of junk images ranked before it);
* AP is the trapezoid rule over the precision-recall steps: the positive found
  at (junk-free, 0-based) rank ``r`` as the ``j``-th positive (0-based)
  contributes ``(p0 + p1) / (2 * n_ok)`` with ``p0 = j / r`` (``1`` when
  ``r == 0``) and ``p1 = (j + 1) / (r + 1)``;
* queries without positives are skipped (NaN in ``aps``);
* precision at ``kappa`` is measured at ``min(kappa, rank of the last retrieved
  positive)`` (1-based), as the reference does.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pwself_reference.evaluation._checks import feature_matrix
from pwself_reference.safe_pickle import RefusedGlobalError, load_plain_pickle

__all__ = [
    "average_precision",
    "compute_map",
    "load_gnd",
    "gnd_easy",
    "gnd_medium",
    "gnd_hard",
    "RevisitedDataset",
    "retrieval_ranks",
    "evaluate_retrieval",
]

DATASETS = ("roxford5k", "rparis6k")


# --------------------------------------------------------------------------- scoring
def average_precision(ranks: Sequence[int] | np.ndarray, nres: int) -> float:
    """Trapezoid-rule AP of one query from the sorted 0-based ranks of its positives.

    Parameters
    ----------
    ranks : sequence of int, shape ``(n_found,)``
        Increasing 0-based positions (junk already removed) at which positives
        were retrieved.
    nres : int
        Total number of positives of the query (``>= len(ranks)``).

    Returns
    -------
    float
        Average precision in ``[0, 1]``.

    Examples
    --------
    >>> average_precision([0, 2], 2)  # hits at ranks 1 and 3 (1-based)
    0.7916666666666666
    """
    if isinstance(nres, bool) or not isinstance(nres, (int, np.integer)) or nres <= 0:
        raise ValueError(f"nres must be a positive number of positives, got {nres!r}")
    r = _as_index_array(ranks, "ranks")
    if r.size == 0:
        return 0.0
    if r.size > nres:
        raise ValueError(f"ranks lists {r.size} retrieved positives but nres is {nres}")
    if r[0] < 0 or (r.size > 1 and not (np.diff(r) > 0).all()):
        raise ValueError(f"ranks must be increasing non-negative positions, got {r.tolist()}")
    r = r.astype(np.float64)
    j = np.arange(r.size, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        p0 = np.where(r == 0, 1.0, j / np.where(r == 0, 1.0, r))
    p1 = (j + 1.0) / (r + 1.0)
    # Summed in order (as the reference loop does) so that results agree to the last bit.
    ap = 0.0
    step = 1.0 / nres
    for a, b in zip(p0.tolist(), p1.tolist()):
        ap += (a + b) * step / 2.0
    return ap


def _as_index_array(value: Any, what: str) -> np.ndarray:
    arr = np.asarray(value)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        # float arrays holding whole numbers are accepted (matlab-converted files)
        if arr.ndim == 1 and np.issubdtype(arr.dtype, np.floating) and np.all(arr == np.round(arr)):
            return arr.astype(np.int64)
        raise TypeError(f"{what} must be a 1-D sequence of integer indices, got {arr.dtype} {arr.shape}")
    return arr.astype(np.int64)


def _in_database(value: Any, db_size: int, what: str) -> np.ndarray:
    arr = _as_index_array(value, what)
    if arr.size and (arr.min() < 0 or arr.max() >= db_size):
        raise ValueError(f"{what} holds indices outside the database [0, {db_size}): "
                         f"{arr[(arr < 0) | (arr >= db_size)].tolist()}")
    return arr


def _check_columns_distinct(ranks: np.ndarray) -> None:
    """A ranking lists each database image once; a repeat counts a positive twice."""
    if ranks.shape[0] < 2:
        return
    ordered = np.sort(ranks, axis=0)
    repeats = (ordered[1:] == ordered[:-1]).any(axis=0)
    if repeats.any():
        q = int(np.flatnonzero(repeats)[0])
        raise ValueError(
            f"ranks: column {q} lists a database index more than once; each column must rank "
            "each database image at most once (an array laid out (n_queries, db_size) must be "
            "passed as ranks.T)"
        )


def compute_map(
    ranks: np.ndarray | torch.Tensor,
    gnd: Sequence[Mapping[str, Any]],
    kappas: Sequence[int] = (),
    *,
    db_size: int | None = None,
) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """Mean average precision of the revisited Oxford/Paris protocol.

    Parameters
    ----------
    ranks : array of int, shape ``(n_ranked, n_queries)``
        Column ``q`` holds 0-based database indices sorted from the most to the
        least similar to query ``q``, each index at most once. The layout is
        revisitop's and is not guessed: rows are rank positions, columns are
        queries (``ranks.shape[1]`` must equal ``len(gnd)``). An array laid out
        ``(n_queries, db_size)`` must be passed as ``ranks.T``; given square and
        transposed, its columns repeat indices and it is refused.
    gnd : sequence of mappings, length ``n_queries``
        For each query, ``"ok"`` (positive database indices, no repeats) and
        optionally ``"junk"`` (indices removed from the ranking before scoring).
    kappas : sequence of int
        Positive cut-offs for the mean precision at k.
    db_size : int, optional
        Number of database images; every index must lie in ``[0, db_size)``.
        Default ``n_ranked``: every column ranks the whole database. Pass it for a
        truncated ranking (positives never ranked still count in the recall).

    Returns
    -------
    mAP : float
        Mean of ``aps`` over queries that have positives, in ``[0, 1]``.
    aps : ndarray, shape ``(n_queries,)``
        AP per query, NaN for queries without positives.
    pr : ndarray, shape ``(len(kappas),)``
        Mean precision at each kappa over the non-empty queries.
    prs : ndarray, shape ``(n_queries, len(kappas))``
        Precision at each kappa per query (NaN rows for empty queries).

    Raises
    ------
    ValueError
        If ``gnd`` is empty, its length differs from ``ranks.shape[1]``, a kappa
        is not positive, an index lies outside ``[0, db_size)``, a column of
        ``ranks`` or an ``"ok"`` list repeats an index, an image is both ``"ok"`` and
        ``"junk"``, or no query has positives.

    Examples
    --------
    >>> ranks = np.array([[0], [1], [2], [3]])          # one query, 4 images
    >>> m, aps, pr, prs = compute_map(ranks, [{"ok": [0, 3], "junk": [1]}], kappas=[1])
    >>> round(m, 4), pr.tolist()                      # junk removed: hits at 1 and 3
    (0.7917, [1.0])
    """
    if isinstance(ranks, torch.Tensor):
        ranks = ranks.detach().cpu().numpy()
    ranks = np.asarray(ranks)
    if ranks.ndim != 2:
        raise ValueError(f"ranks must be 2-D (db_size, n_queries), got shape {ranks.shape}")
    if ranks.size and not np.issubdtype(ranks.dtype, np.integer):
        raise TypeError(f"ranks must hold integer database indices, got dtype {ranks.dtype}")
    if isinstance(gnd, Mapping) or not isinstance(gnd, Sequence):
        raise TypeError(f"gnd must be a list of dicts with 'ok' and 'junk', got {type(gnd).__name__}")
    nq = len(gnd)
    if nq == 0:
        raise ValueError("gnd is empty: there is no query to evaluate")
    if ranks.shape[1] != nq:
        raise ValueError(
            f"ranks has {ranks.shape[1]} query columns but gnd describes {nq} queries"
        )
    kappas = [int(k) for k in kappas]
    if any(k <= 0 for k in kappas):
        raise ValueError(f"kappas must be positive integers, got {kappas}")
    if db_size is None:
        db_size = ranks.shape[0]
    elif not isinstance(db_size, (int, np.integer)) or isinstance(db_size, bool):
        raise TypeError(f"db_size must be an int, got {type(db_size).__name__}")
    elif db_size < ranks.shape[0]:
        raise ValueError(f"db_size ({db_size}) is smaller than the {ranks.shape[0]} ranked rows")
    if ranks.size and (ranks.min() < 0 or ranks.max() >= db_size):
        raise ValueError(f"ranks must hold non-negative database indices below {db_size}, got "
                         f"values in [{ranks.min()}, {ranks.max()}] (pass db_size= for a "
                         "truncated ranking)")
    _check_columns_distinct(ranks)

    aps = np.zeros(nq)
    prs = np.zeros((nq, len(kappas)))
    positions = np.arange(ranks.shape[0])
    n_used = 0
    total_ap = 0.0
    total_pr = np.zeros(len(kappas))
    for q, entry in enumerate(gnd):
        if not isinstance(entry, Mapping) or "ok" not in entry:
            raise TypeError(f"gnd[{q}] must be a dict with an 'ok' index list")
        ok = _in_database(entry["ok"], db_size, f"gnd[{q}]['ok']")
        if np.unique(ok).size != ok.size:
            raise ValueError(f"gnd[{q}]['ok'] lists a database index more than once: {ok.tolist()}")
        if ok.size == 0:
            aps[q] = np.nan
            prs[q, :] = np.nan
            continue
        junk = _in_database(entry.get("junk", ()), db_size, f"gnd[{q}]['junk']")
        both = np.intersect1d(ok, junk)
        if both.size:
            raise ValueError(f"gnd[{q}]: images {both.tolist()} are both 'ok' and 'junk'")
        column = ranks[:, q]
        pos = positions[np.isin(column, ok)]
        junk_pos = positions[np.isin(column, junk)]
        # every positive moves up by the number of junk images ranked strictly before it
        pos = pos - np.searchsorted(junk_pos, pos, side="left")
        ap = average_precision(pos, len(ok))
        aps[q] = ap
        total_ap += ap
        n_used += 1
        one_based = pos + 1
        for j, kappa in enumerate(kappas):
            if one_based.size == 0:
                prs[q, j] = 0.0  # no positive retrieved at all (the reference would crash)
                continue
            kq = min(int(one_based.max()), kappa)
            prs[q, j] = (one_based <= kq).sum() / kq
        total_pr += prs[q]
    if n_used == 0:
        raise ValueError("no query of gnd has a positive ('ok') image; mAP is undefined")
    return total_ap / n_used, aps, total_pr / n_used, prs


# --------------------------------------------------------------------------- ground truth
def _check_index_list(value: Any, n: int, what: str) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype == object:
        raise ValueError(f"{what} must be a list of integer indices")
    arr = _as_index_array(arr.reshape(-1) if arr.ndim > 1 and 1 in arr.shape else arr, what)
    if arr.size and (arr.min() < 0 or arr.max() >= n):
        raise ValueError(f"{what} holds indices outside the database [0, {n})")
    return arr


def _validate_gnd(cfg: Any, source: str) -> dict[str, Any]:
    if not isinstance(cfg, dict):
        raise ValueError(f"{source}: expected a dict with 'imlist', 'qimlist', 'gnd'")
    for key in ("imlist", "qimlist", "gnd"):
        if key not in cfg:
            raise ValueError(f"{source}: missing key {key!r}")
    imlist, qimlist, gnd = cfg["imlist"], cfg["qimlist"], cfg["gnd"]
    for key, names in (("imlist", imlist), ("qimlist", qimlist)):
        if not isinstance(names, (list, tuple)) or not all(isinstance(s, str) for s in names):
            raise ValueError(f"{source}: {key!r} must be a list of image names (str)")
    if not isinstance(gnd, (list, tuple)) or len(gnd) == 0:
        raise ValueError(f"{source}: 'gnd' must be a non-empty list")
    if len(gnd) != len(qimlist):
        raise ValueError(f"{source}: {len(gnd)} gnd entries for {len(qimlist)} queries")
    n = len(imlist)
    clean = []
    for i, g in enumerate(gnd):
        if not isinstance(g, dict):
            raise ValueError(f"{source}: gnd[{i}] must be a dict")
        entry: dict[str, Any] = {}
        for key in ("easy", "hard", "junk"):
            if key not in g:
                raise ValueError(f"{source}: gnd[{i}] lacks {key!r}")
            entry[key] = _check_index_list(g[key], n, f"{source}: gnd[{i}][{key!r}]")
        bbx = g.get("bbx")
        if bbx is not None:
            box = np.asarray(bbx, dtype=np.float64).reshape(-1)
            if box.size != 4 or not np.all(np.isfinite(box)):
                raise ValueError(f"{source}: gnd[{i}]['bbx'] must be 4 numbers (x1, y1, x2, y2)")
            entry["bbx"] = tuple(float(v) for v in box)
        else:
            entry["bbx"] = None
        clean.append(entry)
    return {"imlist": list(imlist), "qimlist": list(qimlist), "gnd": clean}


def load_gnd(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a revisitop ``gnd_<dataset>.pkl`` with a restricted unpickler.

    The file format is a pickle, so **only load files from a trusted source**
    (the revisitop download). As a second line of defence it is read with
    :func:`pwself_reference.safe_pickle.load_plain_pickle`, which refuses every
    global except numpy's array reconstruction (a
    :class:`~pwself_reference.safe_pickle.RefusedGlobalError`, both a
    :class:`pickle.UnpicklingError` and a :class:`ValueError`, naming the global),
    and the result must have the expected structure.

    Parameters
    ----------
    path : str or PathLike
        ``gnd_roxford5k.pkl`` or ``gnd_rparis6k.pkl``.

    Returns
    -------
    dict
        ``imlist`` and ``qimlist`` (image names without extension) and ``gnd``:
        one dict per query with ``easy``, ``hard``, ``junk`` (int64 arrays of
        database indices) and ``bbx`` (``(x1, y1, x2, y2)`` or ``None``).

    Examples
    --------
    Needs the revisitop ground truth file::

        cfg = load_gnd("data/roxford5k/gnd_roxford5k.pkl")
        len(cfg["imlist"]), len(cfg["qimlist"])  # (4993, 70)
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ground-truth file not found: {path}")
    try:
        cfg = load_plain_pickle(path, encoding="latin1")
    except RefusedGlobalError as exc:
        raise RefusedGlobalError(
            f"{path}: not a revisitop ground-truth file ({exc})", exc.module, exc.name
        ) from exc
    except (pickle.UnpicklingError, EOFError) as exc:
        raise ValueError(f"{path}: not a revisitop ground-truth file ({exc})") from exc
    return _validate_gnd(cfg, str(path))


def _concat(*parts: Any) -> np.ndarray:
    arrays = [np.asarray(p, dtype=np.int64).reshape(-1) for p in parts]
    return np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)


def _split(gnd: Sequence[Mapping[str, Any]], ok: tuple[str, ...], junk: tuple[str, ...]):
    if isinstance(gnd, Mapping) or not isinstance(gnd, Sequence):
        raise TypeError(f"gnd must be a list of per-query dicts (cfg['gnd']), got {type(gnd).__name__}")
    if len(gnd) == 0:
        raise ValueError("gnd is empty")
    out = []
    for i, g in enumerate(gnd):
        missing = [k for k in ok + junk if k not in g]
        if missing:
            raise ValueError(f"gnd[{i}] lacks {missing}; expected keys easy, hard, junk")
        out.append({"ok": _concat(*(g[k] for k in ok)), "junk": _concat(*(g[k] for k in junk))})
    return out


def gnd_easy(gnd: Sequence[Mapping[str, Any]]) -> list[dict[str, np.ndarray]]:
    """Easy protocol: ``ok = easy``, ``junk = junk + hard``.

    Examples
    --------
    >>> gnd_easy([{"easy": [1], "hard": [2], "junk": [3]}])[0]["junk"].tolist()
    [3, 2]
    """
    return _split(gnd, ("easy",), ("junk", "hard"))


def gnd_medium(gnd: Sequence[Mapping[str, Any]]) -> list[dict[str, np.ndarray]]:
    """Medium protocol: ``ok = easy + hard``, ``junk = junk``.

    Examples
    --------
    >>> gnd_medium([{"easy": [1], "hard": [2], "junk": [3]}])[0]["ok"].tolist()
    [1, 2]
    """
    return _split(gnd, ("easy", "hard"), ("junk",))


def gnd_hard(gnd: Sequence[Mapping[str, Any]]) -> list[dict[str, np.ndarray]]:
    """Hard protocol: ``ok = hard``, ``junk = junk + easy``.

    Examples
    --------
    >>> gnd_hard([{"easy": [1], "hard": [2], "junk": [3]}])[0]["junk"].tolist()
    [3, 1]
    """
    return _split(gnd, ("hard",), ("junk", "easy"))


# --------------------------------------------------------------------------- features
class RevisitedDataset(torch.utils.data.Dataset):
    """Database or query images of rOxford5k / rParis6k.

    Layout: ``<root>/<dataset>/gnd_<dataset>.pkl`` and ``<root>/<dataset>/jpg/<name>.jpg``.
    Each image is shrunk (never enlarged) so that its longer side is at most
    ``imsize``, keeping its aspect ratio (DINO's ``thumbnail``), then converted
    to a normalised tensor. DINO feeds the **whole** query image and ignores the
    query boxes; ``crop_queries=True`` crops queries to their ``bbx`` first, as
    the original revisitop protocol does.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        dataset: str,
        split: str,
        imsize: int | None = 224,
        crop_queries: bool = False,
        cfg: dict[str, Any] | None = None,
    ) -> None:
        if dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
        if split not in ("database", "query"):
            raise ValueError(f"split must be 'database' or 'query', got {split!r}")
        if imsize is not None and (not isinstance(imsize, int) or imsize <= 0):
            raise ValueError(f"imsize must be a positive int or None, got {imsize!r}")
        self.dir = Path(root) / dataset
        self.cfg = cfg if cfg is not None else load_gnd(self.dir / f"gnd_{dataset}.pkl")
        self.split = split
        self.names = self.cfg["qimlist"] if split == "query" else self.cfg["imlist"]
        self.imsize = imsize
        self.crop_queries = crop_queries and split == "query"
        missing = [n for n in self.names if not (self.dir / "jpg" / f"{n}.jpg").is_file()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} {split} images missing under {self.dir / 'jpg'}, e.g. {missing[0]}.jpg"
            )

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        from pwself_reference.evaluation.features import to_normalized_tensor

        with Image.open(self.dir / "jpg" / f"{self.names[index]}.jpg") as im:
            img = im.convert("RGB")
        if self.crop_queries:
            bbx = self.cfg["gnd"][index]["bbx"]
            if bbx is not None:
                img = img.crop(tuple(int(round(v)) for v in bbx))
        if self.imsize is not None:
            img.thumbnail((self.imsize, self.imsize), Image.Resampling.LANCZOS)
        return to_normalized_tensor(img), index


def retrieval_ranks(database: torch.Tensor, queries: torch.Tensor) -> np.ndarray:
    """Rank the database for each query by cosine similarity.

    Parameters
    ----------
    database : Tensor, shape ``(N, D)``
    queries : Tensor, shape ``(Q, D)``

    Returns
    -------
    ndarray of int64, shape ``(N, Q)``
        Column ``q``: database indices by decreasing similarity (ties: lower index first).

    Examples
    --------
    >>> retrieval_ranks(torch.eye(3), torch.tensor([[0.0, 1.0, 0.1]]))[:, 0].tolist()
    [1, 2, 0]
    """
    feature_matrix(database, "database")
    feature_matrix(queries, "queries")
    if database.shape[1] != queries.shape[1]:
        raise ValueError(
            f"database (N, D) and queries (Q, D) must share D, got {tuple(database.shape)} "
            f"and {tuple(queries.shape)}"
        )
    sim = F.normalize(database.float(), dim=1) @ F.normalize(queries.float(), dim=1).T
    return torch.sort(-sim, dim=0, stable=True).indices.cpu().numpy()


def evaluate_retrieval(
    backbone: nn.Module,
    root: str | os.PathLike[str],
    dataset: str,
    imsize: int | None = 224,
    multiscale: bool = False,
    crop_queries: bool = False,
    device: str | torch.device | None = None,
    num_workers: int = 0,
    kappas: Sequence[int] = (1, 5, 10),
) -> dict[str, Any]:
    """DINO's retrieval evaluation of a backbone on rOxford5k or rParis6k.

    Features are the CLS token of the last block (after the final norm), one
    image at a time at its own aspect ratio; with ``multiscale`` the CLS of the
    image at scales 1, 1/sqrt(2), 1/2 are averaged and L2-normalised. The
    database is ranked by cosine similarity and scored with :func:`compute_map`
    under the Medium and Hard protocols.

    Returns
    -------
    dict
        ``mAP_medium``, ``mAP_hard`` (percent), ``mP@k_medium``, ``mP@k_hard``
        (percent, one value per kappa), ``kappas``, ``n_database``, ``n_queries``.
    """
    from pwself_reference.evaluation.features import (
        cls_features,
        extract_features,
        multiscale_features,
    )

    cfg = load_gnd(Path(root) / dataset / f"gnd_{dataset}.pkl") if dataset in DATASETS else None
    db = RevisitedDataset(root, dataset, "database", imsize, cfg=cfg)
    qs = RevisitedDataset(root, dataset, "query", imsize, crop_queries, cfg=cfg)
    feats = {}
    for name, ds in (("database", db), ("query", qs)):
        loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=num_workers)
        feats[name], _ = extract_features(
            backbone, loader, device, features=multiscale_features if multiscale else cls_features
        )
    ranks = retrieval_ranks(feats["database"], feats["query"])
    out: dict[str, Any] = {
        "dataset": dataset,
        "n_database": len(db),
        "n_queries": len(qs),
        "kappas": list(kappas),
    }
    for label, split in (("medium", gnd_medium), ("hard", gnd_hard)):
        m, _, pr, _ = compute_map(ranks, split(db.cfg["gnd"]), kappas)
        out[f"mAP_{label}"] = 100.0 * m
        out[f"mP@k_{label}"] = [100.0 * float(v) for v in pr]
    return out
