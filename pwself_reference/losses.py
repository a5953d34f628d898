"""The DINO and PW-Self self-distillation losses, vectorised over the batch.

For a teacher view ``i`` and a student view ``j != i`` of the same images, the
matched token pairs come from :func:`patchaug.match_patches` as padded index
tensors ``idx_a`` (teacher tokens), ``idx_b`` (student tokens) and a ``valid``
mask, all ``(B, M)``. The per-token cross-entropy is

    H(t, s) = -sum_k softmax((t - C) / tau_t)_k * log_softmax(s / tau_s)_k

computed for all ``M`` slots with one :func:`torch.gather` per side, masked,
and reduced per sample by the chosen rule (paper, Sec. 3.5):

``dino`` (Eq. 7)
    the CLS pair only;
``mean`` (Eq. 8)
    the mean over the matched pairs, CLS included;
``sum`` (Eq. 9)
    the sum over the matched pairs, CLS included;
``lambda`` (Eq. 10)
    ``lambda * H_cls + (1 - lambda) * mean over the matched patch pairs``; a
    sample with no matched patch keeps its CLS term with weight 1.

The loss is averaged over the batch and over the ``n_teacher x n_student``
view pairs with ``i != j`` (18 for 2 + 8 crops).

Centering: ``global`` keeps one ``(K,)`` centre (DINO); with patch tokens it is
the mean over every teacher token. ``per-token`` keeps one centre per teacher
token position, a ``(T, K)`` buffer (the authors' code). Both are updated with
an EMA (momentum 0.9 by default) of the batch mean, averaged over processes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = ["LOSSES", "CENTERS", "token_cross_entropy", "reduce_tokens", "PWSelfLoss"]

LOSSES = ("dino", "mean", "sum", "lambda")
CENTERS = ("global", "per-token")


def token_cross_entropy(
    teacher_probs: torch.Tensor,
    student_log_probs: torch.Tensor,
    idx_teacher: torch.Tensor,
    idx_student: torch.Tensor,
    valid: torch.Tensor,
) -> torch.Tensor:
    """Cross-entropy of every matched token pair, zero in the padding slots.

    Parameters
    ----------
    teacher_probs : torch.Tensor
        ``(B, T_t, K)`` teacher probabilities.
    student_log_probs : torch.Tensor
        ``(B, T_s, K)`` student log-probabilities.
    idx_teacher, idx_student : torch.Tensor
        ``(B, M)`` int64 token indices of each pair.
    valid : torch.Tensor
        ``(B, M)`` bool, which slots hold a pair.

    Returns
    -------
    torch.Tensor
        ``(B, M)`` ``-sum_k p_t log p_s`` per slot (0 where not valid).

    Examples
    --------
    >>> p = torch.full((1, 2, 4), 0.25)
    >>> lp = torch.log(p)
    >>> idx = torch.tensor([[0, 1]])
    >>> token_cross_entropy(p, lp, idx, idx, torch.tensor([[True, False]]))
    tensor([[1.3863, 0.0000]])
    """
    k = teacher_probs.shape[-1]
    if student_log_probs.shape[-1] != k:
        raise ValueError(
            f"teacher and student outputs must have the same last dim, got {k} and "
            f"{student_log_probs.shape[-1]}"
        )
    t = teacher_probs.gather(1, idx_teacher.unsqueeze(-1).expand(-1, -1, k))
    s = student_log_probs.gather(1, idx_student.unsqueeze(-1).expand(-1, -1, k))
    ce = -(t * s).sum(-1)
    return ce * valid.to(ce.dtype)


def reduce_tokens(
    ce: torch.Tensor, valid: torch.Tensor, loss: str = "mean", lam: float = 0.5
) -> torch.Tensor:
    """Per-sample loss from the per-pair cross-entropies.

    Parameters
    ----------
    ce : torch.Tensor
        ``(B, M)`` from :func:`token_cross_entropy`; slot 0 is the (CLS, CLS) pair.
    valid : torch.Tensor
        ``(B, M)`` bool; ``valid[:, 0]`` must be True.
    loss : {"dino", "mean", "sum", "lambda"}
        Reduction (see the module docstring).
    lam : float
        Weight of the CLS term for ``loss="lambda"``, in ``[0, 1]``.

    Returns
    -------
    torch.Tensor
        ``(B,)``.

    Examples
    --------
    >>> ce = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    >>> valid = torch.tensor([[True, True, True, False]])
    >>> [float(reduce_tokens(ce, valid, r, 0.5)) for r in ("dino", "mean", "sum", "lambda")]
    [1.0, 2.0, 6.0, 1.75]
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lambda must be in [0, 1], got {lam!r}")
    cls = ce[:, 0]
    if loss == "dino":
        return cls
    if loss == "sum":
        return ce.sum(1)
    if loss == "mean":
        return ce.sum(1) / valid.sum(1).clamp(min=1).to(ce.dtype)
    n_patch = valid[:, 1:].sum(1)
    patch = ce[:, 1:].sum(1) / n_patch.clamp(min=1).to(ce.dtype)
    return torch.where(n_patch > 0, lam * cls + (1.0 - lam) * patch, cls)


class PWSelfLoss(nn.Module):
    """Self-distillation loss over every (teacher view, student view) pair.

    Parameters
    ----------
    out_dim : int
        Number of prototypes ``K``.
    n_teacher_tokens : int
        Tokens per teacher output (``1 + rows * cols`` of a global crop, or 1
        when only CLS is used); the size of the ``per-token`` centre.
    loss : {"dino", "mean", "sum", "lambda"}
        Token reduction.
    lam : float
        CLS weight of ``loss="lambda"``.
    center : {"global", "per-token"}
        Centering mode.
    teacher_temps : sequence of float
        Teacher temperature per epoch (see
        :func:`pwself_reference.schedules.teacher_temp_schedule`).
    student_temp : float
        Student temperature (0.1).
    center_momentum : float
        EMA momentum of the centre (0.9).

    Examples
    --------
    >>> crit = PWSelfLoss(8, n_teacher_tokens=1, loss="dino", teacher_temps=[0.04])
    >>> teacher = [torch.randn(4, 1, 8), torch.randn(4, 1, 8)]
    >>> student = [torch.randn(4, 1, 8) for _ in range(3)]
    >>> crit(student, teacher, None, epoch=0).shape
    torch.Size([])
    """

    center: torch.Tensor

    def __init__(
        self,
        out_dim: int,
        n_teacher_tokens: int,
        loss: str = "mean",
        lam: float = 0.5,
        center: str = "global",
        teacher_temps: Sequence[float] | np.ndarray = (0.04,),
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
    ) -> None:
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        if center not in CENTERS:
            raise ValueError(f"center must be one of {CENTERS}, got {center!r}")
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"lambda must be in [0, 1], got {lam!r}")
        if not 0.0 <= center_momentum < 1.0:
            raise ValueError(f"center_momentum must be in [0, 1), got {center_momentum!r}")
        if student_temp <= 0:
            raise ValueError(f"student_temp must be > 0, got {student_temp!r}")
        temps = np.asarray(teacher_temps, dtype=np.float64)
        if temps.ndim != 1 or temps.size == 0 or (temps <= 0).any():
            raise ValueError("teacher_temps must be a non-empty sequence of positive numbers")
        self.loss = loss
        self.lam = float(lam)
        self.center_mode = center
        self.teacher_temps = temps
        self.student_temp = float(student_temp)
        self.center_momentum = float(center_momentum)
        n_center = n_teacher_tokens if center == "per-token" else 1
        self.register_buffer("center", torch.zeros(1, n_center, out_dim))
        self.last_stats: dict[str, float] = {}

    def teacher_temp(self, epoch: int) -> float:
        """Teacher temperature of ``epoch`` (the last value after the schedule)."""
        return float(self.teacher_temps[min(int(epoch), self.teacher_temps.size - 1)])

    def teacher_probs(self, teacher_out: torch.Tensor, epoch: int) -> torch.Tensor:
        """``softmax((t - C) / tau_t)`` of ``(B, T, K)`` teacher outputs."""
        center = self.center
        if self.center_mode == "per-token" and center.shape[1] != teacher_out.shape[1]:
            raise ValueError(
                f"per-token centre holds {center.shape[1]} tokens, teacher output has "
                f"{teacher_out.shape[1]}"
            )
        return F.softmax((teacher_out.float() - center) / self.teacher_temp(epoch), dim=-1)

    def forward(
        self,
        student_out: Sequence[torch.Tensor],
        teacher_out: Sequence[torch.Tensor],
        matches: Mapping[tuple[int, int], object] | None,
        epoch: int,
        update_center: bool = True,
    ) -> torch.Tensor:
        """Loss averaged over the batch and the view pairs.

        Parameters
        ----------
        student_out : sequence of torch.Tensor
            One ``(B, T_j, K)`` tensor per student view; the first views are the
            teacher's global views in the same order. ``T_j = 1`` (CLS only) is
            enough for ``loss="dino"``.
        teacher_out : sequence of torch.Tensor
            One ``(B, T, K)`` tensor per global view (no gradient needed).
        matches : mapping or None
            ``matches[(i, j)]`` is the :class:`patchaug.PatchMatch` between teacher
            view ``i`` (``idx_a``) and student view ``j`` (``idx_b``), ``(B, M)``.
            Not used (may be None) for ``loss="dino"``.
        epoch : int
            Selects the teacher temperature.
        update_center : bool
            Update the centre with these teacher outputs afterwards.

        Returns
        -------
        torch.Tensor
            Scalar loss.
        """
        if not teacher_out or not student_out:
            raise ValueError("need at least one teacher and one student view")
        t_probs = [self.teacher_probs(t.detach(), epoch) for t in teacher_out]
        s_logp = [F.log_softmax(s.float() / self.student_temp, dim=-1) for s in student_out]
        total = torch.zeros((), device=s_logp[0].device)
        n_pairs = 0
        matched = 0.0
        for i, tp in enumerate(t_probs):
            for j, sl in enumerate(s_logp):
                if i == j:
                    continue
                if self.loss == "dino":
                    ce = -(tp[:, 0] * sl[:, 0]).sum(-1)
                    per_sample = ce
                    matched += 1.0
                else:
                    if matches is None or (i, j) not in matches:
                        raise ValueError(f"loss {self.loss!r} needs matches[({i}, {j})]")
                    m = matches[(i, j)]
                    ce = token_cross_entropy(tp, sl, m.idx_a, m.idx_b, m.valid)
                    per_sample = reduce_tokens(ce, m.valid, self.loss, self.lam)
                    matched += float(m.valid.sum(1).float().mean())
                total = total + per_sample.mean()
                n_pairs += 1
        if n_pairs == 0:
            raise ValueError("no (teacher, student) view pair with different views")
        self.last_stats = {"matched_tokens": matched / n_pairs}
        if update_center:
            self.update_center(teacher_out)
        return total / n_pairs

    @torch.no_grad()
    def update_center(self, teacher_out: Sequence[torch.Tensor]) -> None:
        """EMA update of the centre with the batch mean of the teacher outputs."""
        t = torch.cat([x.detach().float() for x in teacher_out], dim=0)  # (V*B, T, K)
        if self.center_mode == "per-token":
            batch_sum = t.sum(0, keepdim=True)  # (1, T, K)
            count = torch.tensor(float(t.shape[0]), device=t.device)
        else:
            batch_sum = t.sum((0, 1)).view(1, 1, -1)
            count = torch.tensor(float(t.shape[0] * t.shape[1]), device=t.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_sum)
            dist.all_reduce(count)
        batch_center = batch_sum / count
        self.center.mul_(self.center_momentum).add_(batch_center * (1 - self.center_momentum))
