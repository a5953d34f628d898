"""DINO's weighted k-nearest-neighbour classifier on frozen features."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pwself_reference.evaluation._checks import feature_matrix

__all__ = ["knn_classify"]

_DEFAULT_MEMORY = 256 * 2**20  # bytes of temporaries per chunk of test images


def _check_labels(labels: torch.Tensor, n: int, what: str, features: str) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor):
        labels = torch.as_tensor(labels)
    if labels.ndim != 1:
        raise ValueError(f"{what} must be 1-D (N,), got shape {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"{what} must hold integer class ids, got dtype {labels.dtype}")
    if labels.numel() != n:
        raise ValueError(f"{what} has {labels.numel()} labels but {features} has {n} rows")
    if n and int(labels.min()) < 0:
        raise ValueError(f"{what} must be non-negative class ids")
    return labels.long()


@torch.no_grad()
def knn_classify(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    k: int = 20,
    T: float = 0.07,
    num_classes: int | None = None,
    *,
    memory_budget: int = _DEFAULT_MEMORY,
) -> tuple[float, float]:
    """Top-1 / top-5 accuracy (percent) of DINO's temperature-weighted k-NN vote.

    Features are L2-normalised; each test image takes its ``k`` train images of
    highest cosine similarity ``s``, each votes for its class with weight
    ``exp(s / T)``, and classes are ranked by total vote (ties go to the lower
    class id, so classes without a vote follow in id order). Top-5 counts a hit
    in the first ``min(5, k)`` ranked classes, as DINO does. Test images are
    processed in chunks sized so that temporaries stay within
    ``memory_budget`` bytes, on the device of ``train_features``.

    Parameters
    ----------
    train_features : Tensor, shape ``(N_train, D)``
    train_labels : Tensor of int, shape ``(N_train,)``
    test_features : Tensor, shape ``(N_test, D)``
    test_labels : Tensor of int, shape ``(N_test,)``
    k : int
        Number of neighbours, ``1 <= k <= N_train``.
    T : float
        Temperature of the vote weights (DINO: 0.07).
    num_classes : int or None
        Number of classes; inferred as ``max label + 1`` when ``None``.
    memory_budget : int
        Bytes of temporaries allowed per chunk of test images.

    Returns
    -------
    top1, top5 : float
        Accuracies in percent.

    Examples
    --------
    >>> train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    >>> labels = torch.tensor([0, 0, 1, 1])
    >>> knn_classify(train, labels, torch.tensor([[1.0, 0.2], [0.2, 1.0]]),
    ...              torch.tensor([0, 1]), k=2)
    (100.0, 100.0)
    """
    feature_matrix(train_features, "train_features")
    feature_matrix(test_features, "test_features")
    n_train, dim = train_features.shape
    n_test = test_features.shape[0]
    if test_features.shape[1] != dim:
        raise ValueError(
            f"train_features have D={dim} but test_features have D={test_features.shape[1]}"
        )
    if n_train == 0 or n_test == 0:
        raise ValueError(f"need at least one train and one test image, got {n_train} and {n_test}")
    train_labels = _check_labels(train_labels, n_train, "train_labels", "train_features")
    test_labels = _check_labels(test_labels, n_test, "test_labels", "test_features")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if k > n_train:
        raise ValueError(f"k={k} is larger than the number of train images ({n_train})")
    if not (isinstance(T, (int, float)) and math.isfinite(T) and T > 0):
        raise ValueError(f"T must be a positive finite temperature, got {T!r}")
    max_label = int(max(train_labels.max(), test_labels.max()))
    if num_classes is None:
        num_classes = max_label + 1
    elif isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int or None, got {num_classes!r}")
    elif max_label >= num_classes:
        raise ValueError(f"labels go up to {max_label} but num_classes={num_classes}")

    device = train_features.device
    train = F.normalize(train_features.float(), dim=1)
    train_t = train.t().contiguous()
    train_labels = train_labels.to(device)
    test_labels = test_labels.to(device)
    n_top5 = min(5, k, num_classes)
    # temporaries per test image: a similarity row, the vote row and sort buffers
    per_image = 4 * n_train + 16 * num_classes + 24 * k
    chunk = int(max(1, min(n_test, memory_budget // per_image)))

    top1 = top5 = 0
    for start in range(0, n_test, chunk):
        stop = min(start + chunk, n_test)
        queries = F.normalize(test_features[start:stop].to(device).float(), dim=1)
        sims, idx = (queries @ train_t).topk(k, dim=1, largest=True, sorted=True)
        weights = (sims / T).exp()
        votes = torch.zeros(stop - start, num_classes, device=device, dtype=weights.dtype)
        votes.scatter_add_(1, train_labels[idx], weights)
        ranked = torch.sort(votes, dim=1, descending=True, stable=True).indices[:, :n_top5]
        hits = ranked == test_labels[start:stop, None]
        top1 += int(hits[:, 0].sum())
        top5 += int(hits.sum())
    return 100.0 * top1 / n_test, 100.0 * top5 / n_test
