"""Training plots: loss and k-NN curves, and the matched patches of one training pair."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["plot_curves", "plot_matches"]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(log_path: str | os.PathLike[str], out_path: str | os.PathLike[str]) -> Path:
    """Plot the step losses and the k-NN accuracies of a ``log.jsonl`` to a PNG.

    Parameters
    ----------
    log_path : str or PathLike
        JSON lines: ``{"type": "step", "step", "loss", ...}`` and
        ``{"type": "knn", "epoch", "top1", ...}`` records.
    out_path : str or PathLike
        PNG to write.

    Returns
    -------
    Path
        ``out_path``.
    """
    steps, losses, knn_epochs, knn_top1 = [], [], [], []
    for line in Path(log_path).read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        if rec.get("type") == "step":
            steps.append(rec["step"])
            losses.append(rec["loss"])
        elif rec.get("type") == "knn":
            knn_epochs.append(rec["epoch"])
            knn_top1.append(rec["top1"])
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax1.plot(steps, losses, lw=1)
    ax1.set_xlabel("step")
    ax1.set_ylabel("training loss")
    ax1.set_title("loss")
    ax1.grid(alpha=0.3)
    ax2.plot(knn_epochs, knn_top1, "o-")
    ax2.set_xlabel("epoch (0 = initialisation)")
    ax2.set_ylabel("k-NN top-1 (%)")
    ax2.set_title("k-NN accuracy")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    out_path = Path(out_path)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


def plot_matches(
    view_a: torch.Tensor,
    view_b: torch.Tensor,
    box_a: torch.Tensor,
    box_b: torch.Tensor,
    flip_a: bool,
    flip_b: bool,
    patch_size: int,
    out_path: str | os.PathLike[str],
    rule: str = "half",
    source: torch.Tensor | None = None,
) -> Path:
    """Draw the matched patches of two views of one image (as the paper's Fig. 3).

    Parameters
    ----------
    view_a, view_b : torch.Tensor
        ``(3, H, W)`` views in ``[0, 1]`` (teacher global view, student view).
    box_a, box_b : torch.Tensor
        ``(4,)`` crop boxes in source pixels.
    flip_a, flip_b : bool
        Whether each view was mirrored.
    patch_size : int
        ViT patch size.
    out_path : str or PathLike
        PNG to write.
    rule : str
        Matching rule.
    source : torch.Tensor, optional
        ``(3, H, W)`` source image, drawn with both boxes when given.
    """
    from patchaug import match_patches

    grid_a = (view_a.shape[-2] // patch_size, view_a.shape[-1] // patch_size)
    grid_b = (view_b.shape[-2] // patch_size, view_b.shape[-1] // patch_size)
    m = match_patches(box_a.float(), box_b.float(), grid_a, grid_b, bool(flip_a), bool(flip_b),
                      rule=rule)
    plt = _pyplot()
    try:
        from patchaug import draw_matches  # type: ignore[attr-defined]
    except ImportError:
        try:
            from patchaug.visualize import draw_matches
        except ImportError:
            draw_matches = None
    if draw_matches is not None:
        fig = draw_matches(view_a, view_b, grid_a, grid_b, m,
                           titles=("teacher view", "student view"), connect=True)
    else:  # pragma: no cover - fallback when patchaug has no visualiser
        fig, axes = plt.subplots(1, 2)
        for ax, v in zip(axes, (view_a, view_b)):
            ax.imshow(v.permute(1, 2, 0).clamp(0, 1).numpy())
    if source is not None:  # a third panel on the left: the source image and both boxes
        w, h = fig.get_size_inches()
        fig.set_size_inches(w * 1.3, h)
        for other in fig.axes:
            x0, y0, x1, y1 = other.get_position().extents
            other.set_position((0.23 + x0 * 0.77, y0, (x1 - x0) * 0.77, y1 - y0))
        ax = fig.add_axes((0.01, 0.25, 0.2, 0.5))
        ax.set_title("source (red: teacher, blue: student)", fontsize=8)
        ax.imshow(source.permute(1, 2, 0).clamp(0, 1).cpu().numpy())
        for box, colour in ((box_a, "tab:red"), (box_b, "tab:blue")):
            x0, y0, x1, y1 = (float(v) for v in box)
            ax.add_patch(plt.Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False,
                                       color=colour, lw=1.5))
        ax.set_axis_off()
    out_path = Path(out_path)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path
