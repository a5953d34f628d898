"""The DINO and PW-Self self-distillation losses, vectorised over the batch.

For a teacher view ``i`` and a student view ``j != i`` of the same images, the
matched token pairs come from :func:`patchaug.match_patches` as padded index
tensors ``idx_a`` (teacher tokens), ``idx_b`` (student tokens) and a ``valid``
mask, all ``(B, M)``. The per-token cross-entropy is

    H(t, s) = -sum_k softmax((t - C) / tau_t)_k * log_softmax(s / tau_s)_k

and the per-sample loss of a pair is a weighted sum of the ``H`` of its matched
slots, with the weights of the chosen rule (paper, Sec. 3.5; see
:func:`pair_weights`):

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

:meth:`PWSelfLoss.forward` is that sum written once for all pairs: every
weighted slot becomes a :class:`LossSlots` entry (student row, teacher row,
weight) into the stacked head outputs (:class:`~pwself_reference.network.HeadOutput`),
and the loss is ``-sum_p w_p <P[t_p], log_softmax(S[s_p] / tau_s)>``.
:func:`matched_cross_entropy_reference` computes that sum with gathers, as
written; :func:`matched_cross_entropy` is the engine the training uses, tested
against it. The engine holds the weights as a sparse ``(R_s, R_t)`` matrix ``A``,
evaluates ``sum(A * (log_softmax(S / tau_s) @ P^T))`` at the entries of ``A``
only (:func:`torch.sparse.sampled_addmm`) and, when a gradient is needed, writes
it in the forward pass into the buffer of the log-probabilities,
``(c * softmax(S / tau_s) - A @ P) / tau_s`` with ``c`` the row sums of ``A``
(a teacher row sums to 1): no ``(P, K)`` gather is made and the loss allocates
one ``(R_s, K)`` buffer. :func:`token_cross_entropy` and :func:`reduce_tokens`
are the per-pair formulas, slot by slot.

Centering: ``global`` keeps one ``(K,)`` centre (DINO); with patch tokens it is
the mean over the teacher tokens the head ran on. ``per-token`` keeps one centre
per teacher token position, a ``(T, K)`` buffer (the authors' code), each the
mean over the samples and global views. Both are updated with an EMA (momentum
0.9 by default) of the batch mean, averaged over processes. When the head ran
on the matched tokens only (``--head-tokens matched``), the batch mean is over
those tokens: CLS of every global view and every patch token in at least one
weighted pair; a ``per-token`` position no sample kept keeps its centre.

The loss is computed in float32 with autocast disabled, whatever the dtype of
the network outputs (the gradient is returned in the outputs' dtype). For
bfloat16 outputs (bf16 autocast) the float32 work runs on chunks of rows and
the gradient buffer is kept in bfloat16, which halves the loss's memory.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pwself_reference.network import HeadOutput

if TYPE_CHECKING:
    from patchaug import PatchMatch

__all__ = [
    "LOSSES", "CENTERS", "SOFTMAX_LABEL", "CENTER_LABEL", "Matches", "LossSlots",
    "token_cross_entropy", "reduce_tokens", "pair_weights", "matched_cross_entropy",
    "matched_cross_entropy_reference", "matched_token_masks", "PWSelfLoss",
]

#: Token matches of view pairs: ``(teacher view i, student view j)`` -> ``(B, M)`` match.
Matches = Mapping[tuple[int, int], "PatchMatch"]

LOSSES = ("dino", "mean", "sum", "lambda")
#: torch.profiler label of the (log-)softmax of every token, with the scaled logits and
#: softmax-gradient passes around it (the work a per-token DINO loss would do as well);
#: the rest of the loss's time is the matched pairs, the weights and the centre update
SOFTMAX_LABEL = "PWSelfLoss.softmax_every_token"
#: torch.profiler label of the centre update (a read of every teacher output, tokens x K)
CENTER_LABEL = "PWSelfLoss.update_center"
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


def pair_weights(valid: torch.Tensor, loss: str = "mean", lam: float = 0.5) -> torch.Tensor:
    """Weight of every slot in the per-sample loss of one (teacher, student) view pair.

    ``reduce_tokens(ce, valid, loss, lam)`` equals ``(pair_weights(valid, loss, lam) * ce).sum(1)``
    for the cross-entropies ``ce`` of :func:`token_cross_entropy`.

    Parameters
    ----------
    valid : torch.Tensor
        ``(B, M)`` bool, which slots hold a pair; slot 0 is the (CLS, CLS) pair.
    loss : {"dino", "mean", "sum", "lambda"}
        Reduction (see the module docstring).
    lam : float
        Weight of the CLS term for ``loss="lambda"``, in ``[0, 1]``.

    Returns
    -------
    torch.Tensor
        ``(B, M)`` float32, 0 in the slots that hold no pair.

    Examples
    --------
    >>> valid = torch.tensor([[True, True, True, False]])
    >>> pair_weights(valid, "lambda", 0.5)
    tensor([[0.5000, 0.2500, 0.2500, 0.0000]])
    >>> pair_weights(valid, "mean")
    tensor([[0.3333, 0.3333, 0.3333, 0.0000]])
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lambda must be in [0, 1], got {lam!r}")
    if not torch.is_tensor(valid) or valid.dim() != 2 or valid.shape[1] == 0:
        got = tuple(valid.shape) if torch.is_tensor(valid) else type(valid).__name__
        raise ValueError(f"valid must be a (B, M) bool tensor with M >= 1, got {got}")
    v = valid.to(torch.float32)
    if loss == "sum":
        return v
    if loss == "mean":
        return v / v.sum(1, keepdim=True).clamp(min=1)
    w = torch.zeros_like(v)
    if loss == "dino":
        w[:, 0] = v[:, 0]
        return w
    n_patch = v[:, 1:].sum(1, keepdim=True)
    has_patch = n_patch > 0
    w[:, :1] = v[:, :1] * torch.where(has_patch, lam, 1.0)
    w[:, 1:] = v[:, 1:] * torch.where(has_patch, (1.0 - lam) / n_patch.clamp(min=1), 0.0)
    return w


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """A context that turns autocast off on ``device`` (the loss runs in float32)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _in_place(device: torch.device) -> bool:
    """Whether to overwrite fresh buffers with (log-)softmax: on the CPU a new large
    tensor costs page faults, on other devices the caching allocator makes it free."""
    return device.type == "cpu"


@contextlib.contextmanager
def _quiet_sparse():
    """Silence torch's one-off notices about sparse tensors: CSR support "in beta", and
    (torch 2.11 on CUDA) invariant checks "implicitly disabled". The sparse matrices here
    are built from valid indices and checked by the tests."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]parse CSR tensor support is in beta.*")
        warnings.filterwarnings("ignore", message=".*[Ss]parse invariant checks are implicitly.*")
        yield


def _to_csr(weights: torch.Tensor) -> torch.Tensor:
    with _quiet_sparse():
        return weights.to_sparse_csr()



def _rows(out: HeadOutput | Sequence[torch.Tensor]) -> HeadOutput:
    return out if isinstance(out, HeadOutput) else HeadOutput.from_views(out)


@dataclass
class LossSlots:
    """The weighted (student row, teacher row) slots of every view pair, ``(P,)`` each.

    Rows index :attr:`HeadOutput.rows` of the student and the teacher; ``weight``
    includes the average over the batch and the view pairs.
    """

    student_row: torch.Tensor
    teacher_row: torch.Tensor
    weight: torch.Tensor


def matched_cross_entropy_reference(student_rows: torch.Tensor, teacher_probs: torch.Tensor,
                                    slots: LossSlots, student_temp: float) -> torch.Tensor:
    """``-sum_p w_p <P[t_p], log_softmax(S[s_p] / tau_s)>``, with gathers, as written.

    Parameters
    ----------
    student_rows : torch.Tensor
        ``(R_s, K)`` student head outputs ``S``.
    teacher_probs : torch.Tensor
        ``(R_t, K)`` centred, sharpened teacher probabilities ``P``.
    slots : LossSlots
        ``(P,)`` student rows ``s_p``, teacher rows ``t_p`` and weights ``w_p``.
    student_temp : float
        ``tau_s``.

    Examples
    --------
    >>> s, p = torch.zeros(2, 4), torch.full((1, 4), 0.25)
    >>> slots = LossSlots(torch.tensor([0, 1]), torch.tensor([0, 0]), torch.tensor([0.5, 0.5]))
    >>> matched_cross_entropy_reference(s, p, slots, 0.1)
    tensor(1.3863)
    """
    log_p = F.log_softmax(student_rows.float() / student_temp, dim=-1)   # (R_s, K)
    ce = -(teacher_probs[slots.teacher_row] * log_p[slots.student_row]).sum(-1)  # (P,)
    return (slots.weight * ce).sum()


def matched_cross_entropy(student_rows: torch.Tensor, teacher_probs: torch.Tensor,
                          slots: LossSlots, student_temp: float) -> torch.Tensor:
    """:func:`matched_cross_entropy_reference` without a ``(P, K)`` gather (the engine).

    The slots become a sparse ``(R_s, R_t)`` matrix (duplicate slots add up); see
    the module docstring. Same arguments and value; the gradient w.r.t.
    ``student_rows`` is computed in the forward pass (float32, or bfloat16 for
    bfloat16 rows) and handed back by the backward pass.
    """
    if slots.weight.numel() == 0:
        return torch.zeros((), device=student_rows.device)
    with _quiet_sparse():
        a = torch.sparse_coo_tensor(
            torch.stack([slots.student_row, slots.teacher_row]), slots.weight,
            (student_rows.shape[0], teacher_probs.shape[0]), check_invariants=False,
        ).coalesce()
    need_grad = torch.is_grad_enabled() and student_rows.requires_grad
    return _MatchedCrossEntropy.apply(student_rows, student_temp, teacher_probs, a, need_grad)


class _MatchedCrossEntropy(torch.autograd.Function):
    """``-sum(A * (log_softmax(s / tau) @ P^T))``, differentiable in ``s``.

    ``s``: ``(N, K)`` student rows (any float dtype), the rows of ``A``, a
    coalesced sparse COO ``(N, R)`` float32 matrix; ``probs``: the ``(R, K)``
    float32 teacher probabilities.

    The gradient ``(c * softmax(s / tau) - A @ P) / tau`` (``c``: the row sums of
    ``A``) is computed in the forward pass, in the buffer of the log-probabilities.
    bfloat16 rows take :func:`_chunked_cross_entropy`: float32 work on chunks of
    rows and a bfloat16 gradient, the dtype it is returned in anyway (the same
    rounding of the same float32 values), so 2 instead of 4 bytes per output value
    are kept during the step. float16 keeps the float32 buffer: its gradient is
    multiplied by the loss scale before any rounding.
    """

    @staticmethod
    def forward(ctx, student: torch.Tensor, temp: float, probs: torch.Tensor,
                weights: torch.Tensor, need_grad: bool) -> torch.Tensor:
        ctx.student_dtype = student.dtype
        if student.dtype == torch.bfloat16:
            loss, grad = _chunked_cross_entropy(student, temp, probs, weights, need_grad)
            if grad is not None:
                ctx.save_for_backward(grad)
            return loss
        with torch.profiler.record_function(SOFTMAX_LABEL):
            z = torch.empty(student.shape, dtype=torch.float32, device=student.device)
            if student.dtype == torch.float32:
                torch.div(student, temp, out=z)
            else:
                z.copy_(student)
                z.div_(temp)
            log_p = (torch.log_softmax(z, -1, out=z) if _in_place(z.device)
                     else torch.log_softmax(z, -1))
        loss = -_matched_dot(weights, log_p, probs)
        if need_grad:  # (ctx.needs_input_grad is True under no_grad too)
            row_sum = torch.zeros(log_p.shape[0], dtype=torch.float32, device=log_p.device)
            row_sum.index_add_(0, weights.indices()[0], weights.values())
            with torch.profiler.record_function(SOFTMAX_LABEL):
                grad = log_p.exp_()  # softmax(s / tau), in place: log_p is not needed any more
                grad.mul_((row_sum / temp).unsqueeze(-1))
            _subtract_targets(grad, weights, probs, temp)
            ctx.save_for_backward(grad)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None,
                                                       None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        (grad,) = ctx.saved_tensors
        # skip a (N, K) copy in the usual case of a unit output gradient (the saved buffer
        # is handed out as is: a retained graph gives the same buffer again); on the CPU, and
        # for the bfloat16 buffer on any device, where the one host sync of reading grad_out
        # costs far less than the copy
        if grad.device.type == "cpu" or grad.dtype == torch.bfloat16:
            scale = float(grad_out)
            if scale != 1.0:
                grad = grad * scale  # a Python float: kept in float32 by the bfloat16 kernel
        else:
            grad = grad * grad_out.to(grad.dtype)
        return grad.to(ctx.student_dtype), None, None, None, None


def _matched_dot(weights: torch.Tensor, log_p: torch.Tensor, probs: torch.Tensor
                 ) -> torch.Tensor:
    """``sum(A * (log_p @ P^T))`` for coalesced sparse ``A``, evaluated at its entries only."""
    mask = _to_csr(weights)
    with _quiet_sparse():
        dots = torch.sparse.sampled_addmm(mask, log_p, probs.t(), beta=0.0)
    return (dots.values() * mask.values()).sum()


def _subtract_targets(grad: torch.Tensor, weights: torch.Tensor, probs: torch.Tensor,
                      temp: float) -> None:
    """``grad -= (A @ P) / temp`` in place, for coalesced sparse ``A``."""
    with _quiet_sparse():
        neg = torch.sparse_coo_tensor(weights.indices(), weights.values() / -temp,
                                      weights.shape, is_coalesced=True, check_invariants=False)
        grad.addmm_(neg, probs)


#: float32 values per chunk of the bfloat16 route of :class:`_MatchedCrossEntropy` (1 GiB)
_CHUNK_VALUES = 1 << 28


def _chunked_cross_entropy(student: torch.Tensor, temp: float, probs: torch.Tensor,
                           weights: torch.Tensor, need_grad: bool
                           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Loss and (optionally) gradient of :class:`_MatchedCrossEntropy` for ``(N, K)``
    bfloat16 ``student`` rows, in float32 chunks of rows; the gradient in bfloat16."""
    n, k = student.shape
    rows, cols = weights.indices()
    vals = weights.values()
    row_sum = torch.zeros(n, dtype=torch.float32, device=student.device)
    row_sum.index_add_(0, rows, vals)
    step = max(1, _CHUNK_VALUES // max(k, 1))
    starts = list(range(0, n, step))
    # first nonzero of every chunk (weights are coalesced: sorted by row); one host sync
    cuts = torch.tensor(starts + [n], device=rows.device)
    bounds = torch.searchsorted(rows, cuts).tolist()
    grad = torch.empty((n, k), dtype=student.dtype, device=student.device) if need_grad else None
    loss = torch.zeros((), dtype=torch.float32, device=student.device)
    for c, r0 in enumerate(starts):
        r1 = min(n, r0 + step)
        lo, hi = bounds[c], bounds[c + 1]
        with torch.profiler.record_function(SOFTMAX_LABEL):
            z = student[r0:r1].float()
            z.div_(temp)
            log_p = torch.log_softmax(z, -1, out=z) if _in_place(z.device) else z.log_softmax(-1)
        sub = None
        if hi > lo:
            index = torch.stack([rows[lo:hi] - r0, cols[lo:hi]])
            with _quiet_sparse():
                sub = torch.sparse_coo_tensor(index, vals[lo:hi], (r1 - r0, probs.shape[0]),
                                              is_coalesced=True, check_invariants=False)
            loss = loss - _matched_dot(sub, log_p, probs)
        if grad is None:
            continue
        with torch.profiler.record_function(SOFTMAX_LABEL):
            g = log_p.exp_()
            g.mul_((row_sum[r0:r1] / temp).unsqueeze(-1))
        if sub is not None:
            _subtract_targets(g, sub, probs, temp)
        grad[r0:r1].copy_(g)
    return loss, grad




def matched_token_masks(matches: Matches, teacher_tokens: Sequence[int],
                        student_tokens: Sequence[int], batch: int
                        ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Which tokens of every view take part in a matched pair, plus CLS.

    Parameters
    ----------
    matches : mapping
        ``matches[(i, j)]`` between teacher view ``i`` and student view ``j``.
    teacher_tokens, student_tokens : sequence of int
        Tokens per sample of every teacher / student view (``1 + rows * cols``).
    batch : int
        Samples per view.

    Returns
    -------
    (list of torch.Tensor, list of torch.Tensor)
        Per teacher view and per student view a ``(B, T)`` bool mask, on the
        matches' device: the keep masks of
        :class:`~pwself_reference.network.MultiCropNetwork` for ``--head-tokens matched``.

    Examples
    --------
    >>> from patchaug import PatchMatch
    >>> m = PatchMatch(torch.tensor([[0, 2]]), torch.tensor([[0, 1]]), torch.tensor([[True, True]]))
    >>> t, s = matched_token_masks({(0, 1): m}, [3], [3, 2], batch=1)
    >>> t[0].tolist(), s[0].tolist(), s[1].tolist()
    ([[True, False, True]], [[True, False, False]], [[True, True]])
    """
    if not matches:
        raise ValueError("matched_token_masks needs at least one view pair's matches")
    device = next(iter(matches.values())).valid.device
    masks = {}
    for side, tokens in (("t", teacher_tokens), ("s", student_tokens)):
        for v, t in enumerate(tokens):
            mask = torch.zeros(batch, t, dtype=torch.bool, device=device)
            mask[:, 0] = True  # CLS: in every pair, and the DINO term
            masks[side, v] = mask
    rows = torch.arange(batch, device=device).unsqueeze(1)
    for (i, j), m in matches.items():
        for side, v, idx in (("t", i, m.idx_a), ("s", j, m.idx_b)):
            if (side, v) not in masks:
                continue
            valid = m.valid.to(device)
            masks[side, v][rows.expand_as(idx)[valid], idx.to(device)[valid]] = True
    return ([masks["t", i] for i in range(len(teacher_tokens))],
            [masks["s", j] for j in range(len(student_tokens))])


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
        self._check_center(teacher_out.shape[1])
        return F.softmax((teacher_out.float() - self.center) / self.teacher_temp(epoch), dim=-1)

    def forward(
        self,
        student_out: HeadOutput | Sequence[torch.Tensor],
        teacher_out: HeadOutput | Sequence[torch.Tensor],
        matches: Matches | None,
        epoch: int,
        update_center: bool = True,
    ) -> torch.Tensor:
        """Loss averaged over the batch and the view pairs.

        Parameters
        ----------
        student_out : HeadOutput or sequence of torch.Tensor
            The student's head outputs (:class:`~pwself_reference.network.MultiCropNetwork`),
            or one ``(B, T_j, K)`` tensor per view; the first views are the
            teacher's global views in the same order. ``T_j = 1`` (CLS only) is
            enough for ``loss="dino"``.
        teacher_out : HeadOutput or sequence of torch.Tensor
            The teacher's, one view per global view (no gradient needed).
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
            Scalar float32 loss.
        """
        # B: batch, K: prototypes, R_s / R_t: rows of the stacked student / teacher
        # outputs (their kept tokens), P: weighted (teacher token, student token) slots
        student, teacher = _rows(student_out), _rows(teacher_out)   # rows (R_s, K), (R_t, K)
        slots = self.loss_slots(student, teacher, matches)          # (P,) rows and weights
        if student.last_layer is not None:  # bottleneck features: the head's last layer fused
            loss = self._fused_loss(student, teacher, slots, epoch)
            if update_center:
                self.update_center(teacher)
            return loss
        with _no_autocast(student.rows.device):
            # P_t = softmax((t - C) / tau_t)                                      (R_t, K)
            probs = self._teacher_row_probs(teacher, epoch)
            # L = -sum_p w_p <P_t[t_p], log_softmax(s[s_p] / tau_s)>
            loss = matched_cross_entropy(student.rows, probs, slots, self.student_temp)
        if update_center:
            self.update_center(teacher)
        return loss

    def loss_slots(self, student: HeadOutput, teacher: HeadOutput,
                   matches: Matches | None) -> LossSlots:
        """The weighted slots of every pair ``(i, j)``, ``i != j``, in rows of the outputs.

        Checks the outputs and the matches; sets ``last_stats["matched_tokens"]``, the
        mean number of matched token pairs (CLS included) per sample and view pair.
        """
        if student.batch != teacher.batch or student.rows.shape[-1] != teacher.rows.shape[-1]:
            raise ValueError(
                f"student and teacher outputs must have the same batch and last dim (K), got "
                f"{student.batch}, {student.rows.shape[-1]} and {teacher.batch}, "
                f"{teacher.rows.shape[-1]}"
            )
        pairs = [(i, j) for j in range(student.n_views) for i in range(teacher.n_views)
                 if i != j]
        if not pairs:
            raise ValueError("no (teacher, student) view pair with different views")
        batch, device = student.batch, student.rows.device
        scale = 1.0 / (batch * len(pairs))
        s_off, t_off = student.offsets, teacher.offsets
        b = torch.arange(batch, device=device).unsqueeze(1)  # (B, 1)
        s_flat, t_flat, weights = [], [], []
        if self.loss == "dino":  # the CLS pair of every view pair
            for i, j in pairs:
                s_flat.append(s_off[j] + b[:, 0] * student.tokens[j])
                t_flat.append(t_off[i] + b[:, 0] * teacher.tokens[i])
                weights.append(torch.full((batch,), scale, device=device))
            matched = float(len(pairs))
        else:
            bad = torch.zeros((), dtype=torch.bool, device=device)
            matched_t = torch.zeros((), device=device)
            for i, j in pairs:
                if matches is None or (i, j) not in matches:
                    raise ValueError(f"loss {self.loss!r} needs matches[({i}, {j})]")
                m = matches[(i, j)]
                idx_t, idx_s, valid = (x.to(device) for x in (m.idx_a, m.idx_b, m.valid))
                if not (idx_t.dim() == 2 and idx_t.shape[0] == batch
                        and idx_t.shape == idx_s.shape == valid.shape):
                    raise ValueError(
                        f"matches[({i}, {j})] must hold (B={batch}, M) idx_a, idx_b and valid, "
                        f"got {tuple(idx_t.shape)}, {tuple(idx_s.shape)} and {tuple(valid.shape)}"
                    )
                w = pair_weights(valid, self.loss, self.lam) * scale              # (B, M)
                matched_t = matched_t + valid.sum(1).float().mean()
                bad = bad | (valid & ((idx_t < 0) | (idx_t >= teacher.tokens[i]) | (idx_s < 0)
                                      | (idx_s >= student.tokens[j]))).any()
                keep = w != 0
                s_flat.append((s_off[j] + b * student.tokens[j] + idx_s)[keep])
                t_flat.append((t_off[i] + b * teacher.tokens[i] + idx_t)[keep])
                weights.append(w[keep])
            bad_any, matched = torch.stack([bad.float(), matched_t]).tolist()
            if bad_any:
                raise ValueError("matches hold token indices outside the teacher or student "
                                 "outputs")
        slots = LossSlots(student.row_of(torch.cat(s_flat)), teacher.row_of(torch.cat(t_flat)),
                          torch.cat(weights))
        if not (student.complete and teacher.complete) and bool(
                ((slots.student_row < 0) | (slots.teacher_row < 0)).any()):
            raise ValueError("a weighted pair holds a token the head did not run on (the "
                             "keep masks must cover the matches: matched_token_masks)")
        self.last_stats = {"matched_tokens": matched / len(pairs)}
        return slots

    def _fused_loss(self, student: HeadOutput, teacher: HeadOutput, slots: LossSlots,
                    epoch: int) -> torch.Tensor:
        """The same loss from the bottleneck features and the last layers, chunk by chunk
        (:func:`pwself_reference.fused_loss.fused_head_loss`)."""
        from pwself_reference.fused_loss import fused_head_loss

        if teacher.last_layer is None:
            raise ValueError("the student outputs are bottleneck features (last_layer set): "
                             "the teacher's must be too")
        for t in teacher.tokens:
            self._check_center(t)
        index = teacher.token_of_rows() if self.center_mode == "per-token" else None
        return fused_head_loss(student.rows, student.last_layer,
                               teacher.rows[: teacher.n_rows], teacher.last_layer,
                               self.center[0], slots, self.student_temp,
                               self.teacher_temp(epoch), center_index=index)

    def _check_center(self, tokens: int) -> None:
        if self.center_mode == "per-token" and self.center.shape[1] != tokens:
            raise ValueError(
                f"per-token centre holds {self.center.shape[1]} tokens, teacher output has "
                f"{tokens}"
            )

    @torch.no_grad()
    def _teacher_row_probs(self, teacher: HeadOutput, epoch: int) -> torch.Tensor:
        """:meth:`teacher_probs` of every teacher row that holds a token, ``(n_rows, K)``
        float32 (one buffer, written in place)."""
        for t in teacher.tokens:
            self._check_center(t)
        rows = teacher.rows[: teacher.n_rows].detach()
        k = rows.shape[-1]
        with torch.profiler.record_function(SOFTMAX_LABEL):
            out = torch.empty(rows.shape, dtype=torch.float32, device=rows.device)
            if self.center_mode == "global":
                torch.sub(rows, self.center[0], out=out)
            elif teacher.complete:  # every view (B, T, K): the centre broadcasts
                t = teacher.tokens[0]
                torch.sub(rows.view(-1, t, k), self.center, out=out.view(-1, t, k))
            else:  # one centre row per kept token, gathered in chunks of rows
                token = teacher.token_of_rows()
                step = max(1, _CHUNK_VALUES // 16 // max(k, 1))
                for r in range(0, rows.shape[0], step):
                    torch.sub(rows[r:r + step], self.center[0].index_select(0, token[r:r + step]),
                              out=out[r:r + step])
            out.div_(self.teacher_temp(epoch))
            if _in_place(out.device):
                return torch.softmax(out, -1, out=out)
            return torch.softmax(out, -1)

    @torch.no_grad()
    def update_center(self, teacher_out: HeadOutput | Sequence[torch.Tensor]) -> None:
        """EMA update of the centre with the batch mean of the teacher outputs."""
        teacher = _rows(teacher_out)
        with torch.profiler.record_function(CENTER_LABEL):
            batch_sum, count = self._batch_sum(teacher)
            if teacher.last_layer is not None:  # sums of features: the logits are linear in them
                from pwself_reference.fused_loss import LAST_LAYER_LABEL

                # the head's last layer applied to the summed features (profiled as the
                # last layer, as the fused loss's other products with it are)
                with torch.profiler.record_function(LAST_LAYER_LABEL):
                    batch_sum = batch_sum @ teacher.last_layer.detach().float().t()
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(batch_sum)
                dist.all_reduce(count)
            m = self.center_momentum
            if count.numel() == 1:
                batch_center = batch_sum.div_(count)  # in place: no more (1, T, K) buffers
                self.center.mul_(m).add_(batch_center, alpha=1 - m)
                return
            # per-token positions no sample kept stay: their momentum is 1, their batch
            # weight 0 (in place: no (1, T, K) temporaries)
            seen = (count > 0).view(1, -1, 1)
            batch_center = batch_sum.mul_(seen / count.clamp(min=1).view(1, -1, 1))
            self.center.mul_(torch.where(seen, m, 1.0)).add_(batch_center, alpha=1 - m)

    def _batch_sum(self, teacher: HeadOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """Float32 sum of the teacher outputs over the batch and the views (and the tokens
        for the global centre), and the number of rows summed (per position for a
        per-token centre of outputs that do not hold every token)."""
        rows = teacher.rows[: teacher.n_rows].detach()
        k = rows.shape[-1]
        device = rows.device
        if self.center_mode == "global":
            count = torch.tensor(float(rows.shape[0]), device=device)
            return rows.sum(0, dtype=torch.float32).view(1, 1, -1), count
        for t in teacher.tokens:
            self._check_center(t)
        tokens = teacher.tokens[0]
        if teacher.complete:
            flat = rows.view(-1, tokens, k)
            count = torch.tensor(float(flat.shape[0]), device=device)
            return flat.sum(0, keepdim=True, dtype=torch.float32), count
        token = teacher.token_of_rows()
        batch_sum = torch.zeros(tokens, k, dtype=torch.float32, device=device)
        batch_sum.index_add_(0, token, rows.float())
        count = torch.bincount(token, minlength=tokens).float()
        return batch_sum.unsqueeze(0), count
