"""Input checks shared by the evaluations: each raises early, naming the argument."""

from __future__ import annotations

from typing import Any

import torch


def feature_matrix(value: Any, name: str) -> torch.Tensor:
    """A ``(N, D)`` tensor of finite real numbers, or a TypeError/ValueError naming ``name``.

    One NaN or inf row would win or lose every similarity it takes part in (k-NN votes,
    rankings, whitening statistics) and change the result silently.
    """
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N, D), got shape {tuple(value.shape)}")
    if value.dtype.is_complex or value.dtype == torch.bool:
        raise TypeError(f"{name} must hold real numbers, got dtype {value.dtype}")
    if value.dtype.is_floating_point:
        bad = ~torch.isfinite(value).all(dim=1)
        if bool(bad.any()):
            rows = bad.nonzero().flatten()
            raise ValueError(f"{name} has {rows.numel()} rows with NaN or inf values (first: row "
                             f"{int(rows[0])}); features must be finite")
    return value
