"""Per-iteration (and per-epoch) schedules as plain numpy arrays, as in DINO.

Examples
--------
>>> lr = cosine_schedule(1.0, 0.0, epochs=3, niter_per_ep=2, warmup_epochs=1)
>>> [round(float(v), 3) for v in lr]
[0.0, 1.0, 1.0, 0.854, 0.5, 0.146]
"""

from __future__ import annotations

import numpy as np

__all__ = ["cosine_schedule", "teacher_temp_schedule"]


def cosine_schedule(
    base_value: float,
    final_value: float,
    epochs: int,
    niter_per_ep: int,
    warmup_epochs: float = 0,
    start_warmup_value: float = 0.0,
) -> np.ndarray:
    """Linear warm-up then half-cosine decay, one value per iteration.

    Parameters
    ----------
    base_value : float
        Value reached at the end of the warm-up (start of the cosine).
    final_value : float
        Value at the last iteration's limit (the cosine's end).
    epochs, niter_per_ep : int
        Length of the schedule: ``epochs * niter_per_ep`` values.
    warmup_epochs : float
        Warm-up length in epochs (clipped to the schedule's length).
    start_warmup_value : float
        First value of the warm-up.

    Returns
    -------
    np.ndarray
        ``(epochs * niter_per_ep,)`` float64.
    """
    for name, value in [("epochs", epochs), ("niter_per_ep", niter_per_ep)]:
        if not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if warmup_epochs < 0:
        raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs!r}")
    total = int(epochs * niter_per_ep)
    warmup_iters = min(int(round(warmup_epochs * niter_per_ep)), total)
    # as DINO: the warm-up's last iteration already holds base_value
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters) if warmup_iters else np.array([])
    iters = np.arange(total - warmup_iters)
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / max(len(iters), 1)))
    out = np.concatenate([warmup, cosine]).astype(np.float64)
    assert out.shape == (total,)
    return out


def teacher_temp_schedule(
    warmup_teacher_temp: float, teacher_temp: float, warmup_epochs: int, epochs: int
) -> np.ndarray:
    """Teacher temperature per epoch: linear warm-up, then constant (DINO).

    Returns
    -------
    np.ndarray
        ``(epochs,)``: ``linspace(warmup_teacher_temp, teacher_temp, warmup_epochs)``
        followed by ``teacher_temp``.

    Examples
    --------
    >>> teacher_temp_schedule(0.04, 0.07, 3, 5).round(3).tolist()
    [0.04, 0.055, 0.07, 0.07, 0.07]
    """
    if warmup_teacher_temp <= 0 or teacher_temp <= 0:
        raise ValueError("teacher temperatures must be > 0")
    if epochs <= 0 or warmup_epochs < 0:
        raise ValueError(f"need epochs > 0 and warmup_epochs >= 0, got {epochs}, {warmup_epochs}")
    warm = min(int(warmup_epochs), int(epochs))
    return np.concatenate(
        [np.linspace(warmup_teacher_temp, teacher_temp, warm), np.full(epochs - warm, teacher_temp)]
    )
