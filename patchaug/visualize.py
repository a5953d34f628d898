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
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise TypeError(f"{name} must be an int or a (rows, cols) pair of ints, got {value!r}")
    if value[0] < 1 or value[1] < 1:
        raise ValueError(f"{name} must be positive, got {tuple(value)}")
    return int(value[0]), int(value[1])


def _check_match_fits_grids(match: PatchMatch, grids: list[tuple[int, int]]) -> bool:
    """Whether the match has a CLS slot; raises if it was computed for other grids.

    ``match_patches`` gives ``M = cls + min(rows) * min(cols)`` slots, which tells both
    whether slot 0 is CLS and whether the grids are the ones the match was made for.
    """
    (rows_a, cols_a), (rows_b, cols_b) = grids
    slots = min(rows_a, rows_b) * min(cols_a, cols_b)
    m = match.valid.shape[0]
    if m not in (slots, slots + 1):
        raise ValueError(
            f"match has {m} slots but grids {grids[0]} and {grids[1]} give {slots} (+1 with "
            "CLS): was it computed for other grids? Pass the grids given to match_patches")
    has_cls = m == slots + 1
    for name, idx, (rows, cols) in (("grid_a", match.idx_a, grids[0]), ("grid_b", match.idx_b, grids[1])):
        tokens = idx[match.valid]
        if tokens.numel() and int(tokens.max()) >= rows * cols + has_cls:
            raise ValueError(f"match holds token {int(tokens.max())}, outside the {rows} x {cols} "
                             f"{name}: was it computed for other grids?")
    return has_cls


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
        # a Figure of its own, not pyplot's: nothing stays open in pyplot's registry, and
        # no backend is switched; savefig works, and notebooks display the returned figure
        from matplotlib import colormaps
        from matplotlib.figure import Figure
        from matplotlib.patches import ConnectionPatch, Rectangle
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("draw_matches needs matplotlib: pip install matplotlib") from err

    if not isinstance(match, PatchMatch):
        raise TypeError(f"match must be a PatchMatch, got {type(match).__name__}")
    if match.valid.dim() != 1:
        raise ValueError("match must be unbatched (valid of shape (M,)); index one sample first")
    imgs = [_to_hwc(image_a, "image_a"), _to_hwc(image_b, "image_b")]
    grids = [_grid(grid_a, "grid_a"), _grid(grid_b, "grid_b")]
    if not isinstance(max_labels, int) or isinstance(max_labels, bool) or max_labels < 1:
        raise ValueError(f"max_labels must be a positive int, got {max_labels!r}")
    has_cls = _check_match_fits_grids(match, grids)
    keep = match.valid.clone()
    if has_cls:
        keep[0] = False
    tokens = [match.idx_a[keep].tolist(), match.idx_b[keep].tolist()]
    offset = 1 if has_cls else 0
    n = len(tokens[0])
    shown = np.unique(np.linspace(0, n - 1, min(n, max_labels)).round().astype(int)) if n else []

    heights = [im.shape[0] for im in imgs]
    fig = Figure(figsize=(10, 5))
    axes = fig.subplots(1, 2, gridspec_kw={"width_ratios": [im.shape[1] / h for im, h in zip(imgs, heights)]})
    cmap = colormaps["hsv"]
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
            ax.add_patch(Rectangle((c * w / cols, r * h / rows), w / cols, h / rows,
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
