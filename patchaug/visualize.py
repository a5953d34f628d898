"""Pictures of matched patches (as the paper's Fig. 3). Needs matplotlib."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .matching import PatchMatch

__all__ = ["draw_matches"]


def _to_hwc(image: Any, name: str) -> np.ndarray:
    if isinstance(image, torch.Tensor):
        if image.dim() != 3:
            raise ValueError(f"{name} must be a (C, H, W) tensor, got shape {tuple(image.shape)}")
        arr = image.detach().float().cpu().permute(1, 2, 0).numpy()
    else:
        arr = np.asarray(image)
        if arr.dtype == np.uint8:
            arr = arr.astype(np.float32) / 255.0
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3):
        raise ValueError(f"{name} must be an RGB or grayscale image, got shape {arr.shape}")
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return np.clip(arr, 0.0, 1.0)


def _grid(value: Any, name: str) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return int(value[0]), int(value[1])
    raise TypeError(f"{name} must be an int or a (rows, cols) pair of ints, got {value!r}")


def draw_matches(
    image_a: Any,
    image_b: Any,
    grid_a: tuple[int, int] | int,
    grid_b: tuple[int, int] | int,
    match: PatchMatch,
    *,
    titles: tuple[str, str] = ("view a", "view b"),
    max_labels: int = 64,
    connect: bool = False,
):
    """Draw two views side by side with their patch grids and matched pairs numbered.

    Pair ``k`` (CLS excluded) gets the label ``k`` and the same colour in both
    views, at the centre of its patch, as in the paper's Fig. 3.

    Parameters
    ----------
    image_a, image_b : torch.Tensor, numpy.ndarray or PIL.Image.Image
        The views as the network sees them: ``(C, H, W)`` tensors in [0, 1] or
        ``(H, W, C)`` arrays / PIL images.
    grid_a, grid_b : (int, int) or int
        ``(rows, cols)`` of each view's patch grid.
    match : PatchMatch
        Unbatched result of :func:`patchaug.match_patches` for these views.
    titles : (str, str)
        Panel titles.
    max_labels : int
        Draw at most this many pairs (evenly spread) to keep the figure readable.
    connect : bool
        Also draw a line between the two patches of each pair.

    Returns
    -------
    matplotlib.figure.Figure

    Examples
    --------
    >>> import torch
    >>> from patchaug import match_patches
    >>> m = match_patches((0, 0, 32, 32), (8, 8, 24, 24), 4, 2)
    >>> fig = draw_matches(torch.rand(3, 64, 64), torch.rand(3, 32, 32), 4, 2, m)
    """
    try:
        import matplotlib

        if matplotlib.get_backend().lower() not in ("agg", "pdf", "svg", "module://matplotlib_inline.backend_inline"):
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
        from matplotlib.patches import ConnectionPatch
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("draw_matches needs matplotlib: pip install matplotlib") from err

    if not isinstance(match, PatchMatch):
        raise TypeError(f"match must be a PatchMatch, got {type(match).__name__}")
    if match.valid.dim() != 1:
        raise ValueError("match must be unbatched (valid of shape (M,)); index one sample first")
    imgs = [_to_hwc(image_a, "image_a"), _to_hwc(image_b, "image_b")]
    grids = [_grid(grid_a, "grid_a"), _grid(grid_b, "grid_b")]
    has_cls = bool(match.valid[0]) and int(match.idx_a[0]) == 0 and int(match.idx_b[0]) == 0
    keep = match.valid.clone()
    if has_cls:
        keep[0] = False
    tokens = [match.idx_a[keep].tolist(), match.idx_b[keep].tolist()]
    offset = 1 if has_cls else 0
    n = len(tokens[0])
    shown = np.unique(np.linspace(0, n - 1, min(n, max_labels)).round().astype(int)) if n else []

    heights = [im.shape[0] for im in imgs]
    fig, axes = plt.subplots(1, 2, figsize=(10, 5), gridspec_kw={"width_ratios": [im.shape[1] / h for im, h in zip(imgs, heights)]})
    cmap = plt.get_cmap("hsv")
    for view, ax in enumerate(axes):
        im, (rows, cols) = imgs[view], grids[view]
        h, w = im.shape[:2]
        ax.imshow(im, extent=(0, w, h, 0), interpolation="nearest")
        for r in range(1, rows):
            ax.axhline(r * h / rows, color="white", lw=0.6, alpha=0.8)
        for c in range(1, cols):
            ax.axvline(c * w / cols, color="white", lw=0.6, alpha=0.8)
        ax.set_xlim(0, w)
        ax.set_ylim(h, 0)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"{titles[view]} ({rows}x{cols} patches, {n} matched)")
        for k in shown:
            t = tokens[view][k] - offset
            r, c = divmod(t, cols)
            x, y = (c + 0.5) * w / cols, (r + 0.5) * h / rows
            colour = cmap(k / max(n, 1))
            ax.add_patch(plt.Rectangle((c * w / cols, r * h / rows), w / cols, h / rows,
                                       fill=False, edgecolor=colour, lw=1.5))
            ax.text(x, y, str(k + 1), color="white", ha="center", va="center", fontsize=7,
                    bbox={"facecolor": colour, "alpha": 0.7, "pad": 1, "edgecolor": "none"})
    if connect:
        for k in shown:
            pts = []
            for view in range(2):
                (rows, cols), im = grids[view], imgs[view]
                r, c = divmod(tokens[view][k] - offset, cols)
                pts.append(((c + 0.5) * im.shape[1] / cols, (r + 0.5) * im.shape[0] / rows))
            fig.add_artist(ConnectionPatch(pts[0], pts[1], "data", "data", axesA=axes[0], axesB=axes[1],
                                           color=cmap(k / max(n, 1)), lw=0.6, alpha=0.6))
    fig.tight_layout()
    return fig
