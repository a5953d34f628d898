"""DINO's linear evaluation: a linear layer trained on frozen backbone features.

Protocol (DINO ``eval_linear.py``): features are the CLS tokens of the last
``n`` blocks (each after the final norm) concatenated, optionally with the
average-pooled patch tokens of the last block; a ``nn.Linear`` (weights
``N(0, 0.01)``, zero bias) is trained with cross-entropy by SGD (momentum 0.9,
no weight decay, learning rate ``lr * batch_size / 256``) under a per-epoch
cosine schedule to 0 over ``epochs`` epochs; the validation accuracy is
measured every ``val_freq`` epochs and at the last one, and the **best** top-1
is reported. DINO extracts features of freshly augmented images
(RandomResizedCrop + flip) every epoch (:func:`linear_probe`); with
:func:`train_linear_classifier` the features are extracted once (centre crop)
and cached, which is much cheaper and usually a little lower.

DINO interleaves the CLS and pooled-patch vectors element-wise (and only
supports the pooled patches with ``n = 1``); we concatenate them, which is the
same set of inputs in another order, so a linear classifier is unaffected.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pwself_reference.evaluation._checks import feature_matrix

__all__ = ["LinearClassifier", "train_linear_classifier", "linear_probe"]


class LinearClassifier(nn.Module):
    """``nn.Linear(dim, num_labels)`` initialised as DINO does (std 0.01, zero bias).

    Examples
    --------
    >>> LinearClassifier(8, 3)(torch.zeros(2, 8)).shape
    torch.Size([2, 3])
    """

    def __init__(self, dim: int, num_labels: int) -> None:
        super().__init__()
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if not isinstance(num_labels, int) or num_labels < 1:
            raise ValueError(f"num_labels must be a positive int, got {num_labels!r}")
        self.num_labels = num_labels
        self.linear = nn.Linear(dim, num_labels)
        nn.init.normal_(self.linear.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.reshape(x.shape[0], -1))


Batches = Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]]


def _accuracy(
    classifier: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], num_classes: int
) -> tuple[float, float | None, float]:
    classifier.eval()
    n = top1 = top5 = 0
    loss_sum = 0.0
    with torch.no_grad():
        for feats, labels in batches:
            logits = classifier(feats)
            loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
            ranked = logits.topk(min(5, num_classes), dim=1).indices
            hits = ranked == labels[:, None]
            top1 += int(hits[:, 0].sum())
            top5 += int(hits.sum())
            n += labels.numel()
    if n == 0:
        raise ValueError("the validation set is empty")
    return 100.0 * top1 / n, (100.0 * top5 / n if num_classes >= 5 else None), loss_sum / n


def _fit(
    classifier: nn.Module,
    train_batches: Batches,
    val_batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]],
    epochs: int,
    lr: float,
    batch_size: int,
    val_freq: int,
    num_classes: int,
    log: Callable[[str], None] | None,
) -> dict[str, Any]:
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    if not isinstance(val_freq, int) or val_freq < 1:
        raise ValueError(f"val_freq must be a positive int, got {val_freq!r}")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be positive, got {lr!r}")
    optimizer = torch.optim.SGD(
        classifier.parameters(), lr=lr * batch_size / 256.0, momentum=0.9, weight_decay=0.0
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs, eta_min=0.0)
    history: list[dict[str, Any]] = []
    best_top1, best_top5 = -1.0, None
    for epoch in range(epochs):
        classifier.train()
        loss_sum, seen = 0.0, 0
        for feats, labels in train_batches(epoch):
            loss = F.cross_entropy(classifier(feats), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += float(loss.detach()) * labels.numel()
            seen += labels.numel()
        if seen == 0:
            raise ValueError("the training set is empty")
        scheduler.step()
        record: dict[str, Any] = {"epoch": epoch, "train_loss": loss_sum / seen}
        if epoch % val_freq == 0 or epoch == epochs - 1:
            top1, top5, val_loss = _accuracy(classifier, val_batches(), num_classes)
            record.update(top1=top1, top5=top5, val_loss=val_loss)
            if top1 > best_top1:
                best_top1, best_top5 = top1, top5
            if log is not None:
                log(f"epoch {epoch}: loss {record['train_loss']:.4f} top1 {top1:.2f} "
                    f"(best {best_top1:.2f})")
        history.append(record)
    last = history[-1]
    return {
        "best_top1": best_top1,
        "top5_at_best": best_top5,
        "final_top1": last["top1"],
        "final_top5": last["top5"],
        "epochs": epochs,
        "history": history,
    }


def _check_features(features: Any, labels: Any, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(features, torch.Tensor) or features.ndim != 2:
        raise ValueError(f"{what}_features must be a 2-D tensor (N, D)")
    labels = torch.as_tensor(labels)
    if labels.ndim != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"{what}_labels must be a 1-D integer tensor")
    if labels.numel() != features.shape[0]:
        raise ValueError(
            f"{what}_labels has {labels.numel()} labels but {what}_features has "
            f"{features.shape[0]} rows"
        )
    if features.shape[0] == 0:
        raise ValueError(f"{what}_features is empty")
    feature_matrix(features, f"{what}_features")
    if int(labels.min()) < 0:
        raise ValueError(f"{what}_labels must be non-negative class ids")
    return features.float(), labels.long()


def train_linear_classifier(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    num_classes: int | None = None,
    epochs: int = 100,
    lr: float = 1e-3,
    batch_size: int = 256,
    val_freq: int = 1,
    seed: int = 0,
    device: str | torch.device | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train DINO's linear classifier on cached (frozen) features.

    Parameters
    ----------
    train_features, test_features : Tensor, shapes ``(N_train, D)``, ``(N_test, D)``
    train_labels, test_labels : Tensor of int, shapes ``(N_train,)``, ``(N_test,)``
    num_classes : int or None
        Inferred as ``max label + 1`` when ``None``.
    epochs, lr, batch_size, val_freq
        DINO: 100 epochs, ``lr = 1e-3`` for a batch of 256 (scaled linearly).
    seed : int
        Seeds the classifier initialisation and the shuffling.
    device : str, torch.device or None
        Where to train (default: the device of ``train_features``).

    Returns
    -------
    dict
        ``best_top1`` (percent, the reported number), ``top5_at_best``,
        ``final_top1``, ``final_top5`` (``None`` with fewer than 5 classes) and
        ``history`` (per-epoch loss and accuracies).

    Examples
    --------
    >>> x = torch.randn(64, 4); y = (x[:, 0] > 0).long()
    >>> train_linear_classifier(x, y, x, y, epochs=20, lr=1.0)["best_top1"] > 90
    True
    """
    train_features, train_labels = _check_features(train_features, train_labels, "train")
    test_features, test_labels = _check_features(test_features, test_labels, "test")
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(
            f"train_features have D={train_features.shape[1]} but test_features have "
            f"D={test_features.shape[1]}"
        )
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    max_label = int(max(train_labels.max(), test_labels.max()))
    num_classes = _resolve_classes(num_classes, max_label)
    device = torch.device(device) if device is not None else train_features.device
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        classifier = LinearClassifier(train_features.shape[1], num_classes).to(device)
    xtr, ytr = train_features.to(device), train_labels.to(device)
    xte, yte = test_features.to(device), test_labels.to(device)
    n = xtr.shape[0]

    def train_batches(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        perm = torch.randperm(n, generator=gen).to(device)
        for i in range(0, n, batch_size):
            idx = perm[i : i + batch_size]
            yield xtr[idx], ytr[idx]

    def val_batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(0, xte.shape[0], 4096):
            yield xte[i : i + 4096], yte[i : i + 4096]

    result = _fit(classifier, train_batches, val_batches, epochs, lr, batch_size, val_freq,
                  num_classes, log)
    result["classifier"] = classifier
    return result


def _resolve_classes(num_classes: int | None, max_label: int) -> int:
    if num_classes is None:
        return max_label + 1
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int or None, got {num_classes!r}")
    if max_label >= num_classes:
        raise ValueError(f"labels go up to {max_label} but num_classes={num_classes}")
    return num_classes


def linear_probe(
    backbone: nn.Module,
    train_loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    val_loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    num_classes: int,
    *,
    n_last_blocks: int = 4,
    avgpool_patchtokens: bool = False,
    epochs: int = 100,
    lr: float = 1e-3,
    val_freq: int = 1,
    seed: int = 0,
    device: str | torch.device | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """DINO's linear evaluation with features of freshly augmented images every epoch.

    ``train_loader`` should apply DINO's training transform
    (RandomResizedCrop + horizontal flip) so every epoch sees new views; the
    frozen backbone runs in eval mode without gradients. The learning rate is
    scaled by the loader's ``batch_size``.

    Parameters
    ----------
    backbone : nn.Module
        A timm ViT (frozen: its parameters are not updated).
    train_loader, val_loader : iterables of ``(images (B, 3, H, W), labels (B,))``
    num_classes : int
    n_last_blocks, avgpool_patchtokens
        Feature choice (DINO: 4 and False for ViT-S, 1 and True for ViT-B).
    epochs, lr, val_freq, seed, device, log
        As in :func:`train_linear_classifier`.

    Returns
    -------
    dict
        As :func:`train_linear_classifier`.
    """
    from pwself_reference.evaluation.features import last_blocks_features

    num_classes = _resolve_classes(num_classes, -1)
    if device is None:
        device = next(backbone.parameters()).device
    device = torch.device(device)
    backbone.to(device)
    was_training = backbone.training
    backbone.eval()
    def featurise(loader):
        for images, labels in loader:
            feats = last_blocks_features(backbone, images.to(device), n_last_blocks,
                                         avgpool_patchtokens).float()
            labels = torch.as_tensor(labels).to(device).long()
            if labels.numel() and int(labels.max()) >= num_classes:
                raise ValueError(f"label {int(labels.max())} >= num_classes={num_classes}")
            yield feats, labels

    try:
        first = next(iter(featurise(val_loader)), None)
        if first is None:
            raise ValueError("val_loader is empty")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            classifier = LinearClassifier(first[0].shape[1], num_classes).to(device)
        batch_size = getattr(train_loader, "batch_size", None) or 256
        result = _fit(classifier, lambda epoch: featurise(train_loader),
                      lambda: featurise(val_loader), epochs, lr, batch_size, val_freq,
                      num_classes, log)
    finally:
        backbone.train(was_training)
    result["classifier"] = classifier
    return result
