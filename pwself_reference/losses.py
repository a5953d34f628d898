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

How it is computed: the weight of every matched slot of every pair ending in
student view ``j`` is an entry of one sparse ``(B * T_j, sum_i B * T_i)`` matrix
``A_j`` from student rows to teacher rows, so the loss is
``-sum_j sum(A_j * (log_softmax(s_j / tau_s) @ P^T))`` where ``P`` stacks the
teacher probabilities of all teacher views (computed once per view). The
forward pass evaluates that product only at the entries of ``A_j``
(:func:`torch.sparse.sampled_addmm`) and, when a gradient is needed, writes it
at once into the buffer of the log-probabilities,
``(c * softmax(s_j / tau_s) - A_j @ P) / tau_s`` with ``c`` the row sums of
``A_j`` (a teacher row sums to 1), which the backward pass hands back. No
``(B, M, K)`` copy of teacher or student rows is made and one ``(B * T_j, K)``
buffer is allocated per student view. When the student outputs are row blocks
of one tensor (the head output of
:class:`~pwself_reference.network.MultiCropNetwork`), all views are handled at
once on that tensor (see ``fuse_views``). :func:`token_cross_entropy` and
:func:`reduce_tokens` are the same arithmetic written slot by slot with gathers
(simpler, much slower at large ``K``); they are kept as the reference.

Centering: ``global`` keeps one ``(K,)`` centre (DINO); with patch tokens it is
the mean over every teacher token. ``per-token`` keeps one centre per teacher
token position, a ``(T, K)`` buffer (the authors' code). Both are updated with
an EMA (momentum 0.9 by default) of the batch mean, averaged over processes.

The loss is computed in float32 with autocast disabled, whatever the dtype of
the network outputs (the gradient is returned in the outputs' dtype). For
bfloat16 outputs (bf16 autocast) the float32 work runs on chunks of rows and
the gradient buffer is kept in bfloat16, which halves the loss's memory.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = [
    "LOSSES", "CENTERS", "SOFTMAX_LABEL", "CENTER_LABEL", "token_cross_entropy", "reduce_tokens",
    "pair_weights", "PWSelfLoss",
]

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


def _common_base_rows(student_out: Sequence[torch.Tensor], tokens: Sequence[int]
                      ) -> tuple[torch.Tensor, list[int]] | None:
    """``(base as (R, K), first row of every view)`` when the student outputs are
    contiguous ``(B, tokens[j], K)`` row blocks that tile one tensor exactly (as
    :class:`~pwself_reference.network.MultiCropNetwork` returns them), else None."""
    base = student_out[0]._base
    if base is None or not base.is_contiguous() or base.dim() < 2:
        return None
    k = base.shape[-1]
    spans = []
    for s, t in zip(student_out, tokens):
        if (s._base is not base or s.shape[1] != t or not s.is_contiguous()
                or s.requires_grad != base.requires_grad or s.shape[-1] != k):
            return None
        offset = s.storage_offset() - base.storage_offset()
        if offset % k:
            return None
        spans.append((offset // k, s.shape[0] * t))
    end = 0
    for start, n in sorted(spans):
        if start != end:
            return None
        end += n
    if end * k != base.numel():
        return None
    return base.view(end, k), [start for start, _ in spans]


class _MatchedCrossEntropy(torch.autograd.Function):
    """``-sum(A * (log_softmax(s / tau) @ P^T))``, differentiable in ``s``.

    ``s``: ``(B, T, K)`` student outputs (any float dtype), whose rows ``b * T + t``
    are the rows of ``A``. Either ``weights``, a coalesced sparse COO ``(B * T, R)``
    float32 matrix with ``probs`` the ``(R, K)`` float32 teacher probabilities, or
    ``weights=None`` and ``probs`` the dense ``(B * T, K)`` targets ``A @ P`` with
    ``row_sum`` their ``(B * T,)`` weight sums.

    The gradient ``(c * softmax(s / tau) - A @ P) / tau`` (``c``: the row sums of
    ``A``; a teacher row sums to 1) is computed in the forward pass, in the buffer
    of the log-probabilities, so that the whole loss allocates one ``(B * T, K)``
    buffer per student view.

    bfloat16 outputs (bf16 autocast) with sparse weights take another route: the
    float32 work runs on chunks of rows and the gradient is kept in bfloat16, the
    dtype it is returned in anyway (the same rounding of the same float32 values).
    That keeps 2 instead of 4 bytes per output value during the step, and saves the
    conversion copy in the backward pass: on a GPU, where the head on every token
    makes these buffers the largest tensors of the step, the peak memory of a
    ViT-S/16 step (batch 64, out_dim 65536) fell from 56 to 32 GiB. (float16 keeps
    the float32 buffer: its gradient is multiplied by the loss scale before any
    rounding.)
    """

    @staticmethod
    def forward(ctx, student: torch.Tensor, temp: float, probs: torch.Tensor,
                weights: torch.Tensor | None, row_sum: torch.Tensor | None,
                need_grad: bool) -> torch.Tensor:
        k = student.shape[-1]
        ctx.student_shape = student.shape
        ctx.student_dtype = student.dtype
        if weights is not None and student.dtype == torch.bfloat16:
            loss, grad = _chunked_cross_entropy(student.reshape(-1, k), temp, probs, weights,
                                                need_grad)
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
            z = z.view(-1, k)
            log_p = (torch.log_softmax(z, -1, out=z) if _in_place(z.device)
                     else torch.log_softmax(z, -1))
        if weights is None:
            loss = -torch.dot(probs.reshape(-1), log_p.reshape(-1))
        else:
            loss = -_matched_dot(weights, log_p, probs)
            row_sum = torch.zeros(log_p.shape[0], dtype=torch.float32, device=log_p.device)
            row_sum.index_add_(0, weights.indices()[0], weights.values())
        if need_grad:  # (ctx.needs_input_grad is True under no_grad too)
            with torch.profiler.record_function(SOFTMAX_LABEL):
                grad = log_p.exp_()  # softmax(s / tau), in place: log_p is not needed any more
                grad.mul_((row_sum / temp).unsqueeze(-1))
            if weights is None:
                grad.sub_(probs, alpha=1.0 / temp)
            else:
                _subtract_targets(grad, weights, probs, temp)
            ctx.save_for_backward(grad)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None,
                                                       None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        (grad,) = ctx.saved_tensors
        # skip a (B * T, K) copy in the usual case of a unit output gradient (the saved buffer
        # is handed out as is: a retained graph gives the same buffer again); on the CPU, and
        # for the bfloat16 buffer on any device, where the one host sync of reading grad_out
        # costs far less than the copy
        if grad.device.type == "cpu" or grad.dtype == torch.bfloat16:
            scale = float(grad_out)
            if scale != 1.0:
                grad = grad * scale  # a Python float: kept in float32 by the bfloat16 kernel
        else:
            grad = grad * grad_out.to(grad.dtype)
        return grad.view(ctx.student_shape).to(ctx.student_dtype), None, None, None, None, None


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
    fuse_views : bool
        When the student outputs are consecutive row blocks of one tensor (views
        of a ``(sum_j B * T_j, K)`` head output, as
        :class:`~pwself_reference.network.MultiCropNetwork` returns them), compute
        the loss on that tensor at once, so that its gradient is written there
        directly rather than routed back through the views (each a zero-filled
        full-size copy). The gradient is then found on that tensor, not on the
        views: ``torch.autograd.grad(loss, student_out)`` needs ``fuse_views=False``.

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
        fuse_views: bool = True,
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
        self.fuse_views = bool(fuse_views)
        n_center = n_teacher_tokens if center == "per-token" else 1
        self.register_buffer("center", torch.zeros(1, n_center, out_dim))
        self.last_stats: dict[str, float] = {}

    def teacher_temp(self, epoch: int) -> float:
        """Teacher temperature of ``epoch`` (the last value after the schedule)."""
        return float(self.teacher_temps[min(int(epoch), self.teacher_temps.size - 1)])

    def _check_center(self, teacher_out: torch.Tensor) -> None:
        center = self.center
        if self.center_mode == "per-token" and center.shape[1] != teacher_out.shape[1]:
            raise ValueError(
                f"per-token centre holds {center.shape[1]} tokens, teacher output has "
                f"{teacher_out.shape[1]}"
            )

    def teacher_probs(self, teacher_out: torch.Tensor, epoch: int) -> torch.Tensor:
        """``softmax((t - C) / tau_t)`` of ``(B, T, K)`` teacher outputs."""
        self._check_center(teacher_out)
        return F.softmax((teacher_out.float() - self.center) / self.teacher_temp(epoch), dim=-1)

    @torch.no_grad()
    def _stacked_teacher_probs(self, teacher_out: Sequence[torch.Tensor], rows: Sequence[int],
                               epoch: int) -> torch.Tensor:
        """``teacher_probs`` of the first ``rows[i]`` tokens of every view, stacked as
        ``(sum_i B * rows[i], K)`` (one buffer, no concatenation)."""
        first = teacher_out[0]
        k = first.shape[-1]
        n = sum(t.shape[0] * r for t, r in zip(teacher_out, rows))
        with torch.profiler.record_function(SOFTMAX_LABEL):
            out = torch.empty(n, k, dtype=torch.float32, device=first.device)
            start = 0
            for t, r in zip(teacher_out, rows):
                self._check_center(t)
                stop = start + t.shape[0] * r
                torch.sub(t[:, :r].detach(), self.center[:, :r],
                          out=out[start:stop].view(t.shape[0], r, k))
                start = stop
            out.div_(self.teacher_temp(epoch))
            if _in_place(out.device):
                return torch.softmax(out, -1, out=out)
            return torch.softmax(out, -1)

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
            Scalar float32 loss.
        """
        if not teacher_out or not student_out:
            raise ValueError("need at least one teacher and one student view")
        pairs = [(i, j) for j in range(len(student_out)) for i in range(len(teacher_out))
                 if i != j]
        if not pairs:
            raise ValueError("no (teacher, student) view pair with different views")
        batch, k = teacher_out[0].shape[0], teacher_out[0].shape[-1]
        for name, outs in (("teacher_out", teacher_out), ("student_out", student_out)):
            for v, x in enumerate(outs):
                if x.dim() != 3 or x.shape[0] != batch or x.shape[-1] != k:
                    raise ValueError(
                        f"{name}[{v}] must be (B={batch}, T, K={k}) like teacher_out[0] (teacher "
                        f"and student outputs must have the same last dim), got {tuple(x.shape)}"
                    )
        patch_level = self.loss != "dino"
        if patch_level:
            for i, j in pairs:
                if matches is None or (i, j) not in matches:
                    raise ValueError(f"loss {self.loss!r} needs matches[({i}, {j})]")
        device = student_out[0].device
        temp = self.student_temp
        grad_on = torch.is_grad_enabled()
        with _no_autocast(device):
            t_rows = [t.shape[1] if patch_level else 1 for t in teacher_out]
            s_rows = [s.shape[1] if patch_level else 1 for s in student_out]
            probs = self._stacked_teacher_probs(teacher_out, t_rows, epoch)
            # the tensors differentiated: one per view, or their common base; the first row
            # of every view in its tensor
            fused = _common_base_rows(student_out, s_rows) if self.fuse_views else None
            if fused is not None:
                groups = [(fused[0], list(range(len(student_out))))]
                row0 = fused[1]
            else:
                groups = [(s if patch_level else s[:, :1], [j]) for j, s in enumerate(student_out)]
                row0 = [0] * len(student_out)
            total = torch.zeros((), device=device)
            if patch_level:
                entries, bad, matched = self._pair_weights(pairs, matches, batch, t_rows, s_rows,
                                                           device)
                bad_any, matched_sum = torch.stack([bad.float(), matched.float()]).tolist()
                if bad_any:
                    raise ValueError("matches hold token indices outside the teacher or student "
                                     "outputs")
            else:
                matched_sum = float(len(pairs))
                scale = 1.0 / (batch * len(pairs))
                cls_probs = probs.view(len(teacher_out), batch, k)
            for x, views in groups:
                n_rows = x.numel() // k
                need_grad = grad_on and x.requires_grad
                if patch_level:
                    rows, cols, vals = [], [], []
                    for j in views:
                        for r, c, v in entries.get(j, ()):
                            rows.append(r + row0[j])
                            cols.append(c)
                            vals.append(v)
                    if not rows:  # a view without a teacher view to pair with
                        continue
                    with _quiet_sparse():
                        a = torch.sparse_coo_tensor(
                            torch.stack([torch.cat(rows), torch.cat(cols)]), torch.cat(vals),
                            (n_rows, probs.shape[0]), check_invariants=False,
                        ).coalesce()
                    total = total + _MatchedCrossEntropy.apply(x, temp, probs, a, None,
                                                               need_grad)
                else:  # CLS rows only, dense targets: the other views' teacher CLS
                    target = torch.zeros(n_rows, k, device=device)
                    row_sum = torch.zeros(n_rows, device=device)
                    for j in views:
                        others = [i for i in range(len(teacher_out)) if i != j]
                        if others:
                            target[row0[j]:row0[j] + batch] = cls_probs[others].sum(0).mul_(scale)
                            row_sum[row0[j]:row0[j] + batch] = scale * len(others)
                    total = total + _MatchedCrossEntropy.apply(x, temp, target, None, row_sum,
                                                               need_grad)
        self.last_stats = {"matched_tokens": matched_sum / len(pairs)}
        if update_center:
            self.update_center(teacher_out)
        return total

    def _pair_weights(
        self, pairs: Sequence[tuple[int, int]], matches: Mapping[tuple[int, int], object],
        batch: int, t_rows: Sequence[int], s_rows: Sequence[int], device: torch.device,
    ) -> tuple[dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]], torch.Tensor,
               torch.Tensor]:
        """Per student view, the (student row in the view, stacked teacher row, weight) of every
        weighted slot, one triple per pair; whether a valid slot indexes outside the outputs; the sum over pairs of the mean
        number of matched tokens."""
        scale = 1.0 / (batch * len(pairs))
        offsets = np.cumsum([0] + [batch * r for r in t_rows]).tolist()
        base = torch.arange(batch, device=device).unsqueeze(1)
        out: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
        bad = torch.zeros((), dtype=torch.bool, device=device)
        matched = torch.zeros((), device=device)
        for i, j in pairs:
            m = matches[(i, j)]
            idx_a, idx_b, valid = (x.to(device) for x in (m.idx_a, m.idx_b, m.valid))
            if not (idx_a.dim() == 2 and idx_a.shape[0] == batch
                    and idx_a.shape == idx_b.shape == valid.shape):
                raise ValueError(
                    f"matches[({i}, {j})] must hold (B={batch}, M) idx_a, idx_b and valid, got "
                    f"{tuple(idx_a.shape)}, {tuple(idx_b.shape)} and {tuple(valid.shape)}"
                )
            w = pair_weights(valid, self.loss, self.lam) * scale
            matched = matched + valid.sum(1).float().mean()
            bad = bad | (valid & ((idx_a < 0) | (idx_a >= t_rows[i]) | (idx_b < 0)
                                  | (idx_b >= s_rows[j]))).any()
            keep = w != 0
            out.setdefault(j, []).append(((base * s_rows[j] + idx_b)[keep],
                                          (base * t_rows[i] + idx_a + offsets[i])[keep], w[keep]))
        return out, bad, matched

    @torch.no_grad()
    def update_center(self, teacher_out: Sequence[torch.Tensor]) -> None:
        """EMA update of the centre with the batch mean of the teacher outputs."""
        with torch.profiler.record_function(CENTER_LABEL):
            batch_sum, count = self._batch_sum(teacher_out)
            count_t = torch.tensor(float(count), device=batch_sum.device)
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(batch_sum)
                dist.all_reduce(count_t)
            batch_center = batch_sum.div_(count_t)  # in place: no more (1, T, K) buffers
            self.center.mul_(self.center_momentum).add_(batch_center,
                                                        alpha=1 - self.center_momentum)

    def _batch_sum(self, teacher_out: Sequence[torch.Tensor]) -> tuple[torch.Tensor, int]:
        """Float32 sum of the teacher outputs over the batch and the views (and the tokens
        for the global centre), and the number of rows summed."""
        if not teacher_out:
            raise ValueError("update_center needs at least one teacher output")
        outs = list(teacher_out)
        tokens = outs[0].shape[1]
        per_token = self.center_mode == "per-token"
        # outputs that tile one tensor (the teacher head's output) are summed in one pass
        fused = (_common_base_rows(outs, [x.shape[1] for x in outs])
                 if all(x.shape[1] == tokens for x in outs) else None)
        if fused is not None:
            rows = fused[0].detach()
            if per_token:
                flat = rows.view(-1, tokens, rows.shape[-1])
                return flat.sum(0, keepdim=True, dtype=torch.float32), flat.shape[0]
            return rows.sum(0, dtype=torch.float32).view(1, 1, -1), rows.shape[0]
        batch_sum = None  # a running sum over the views, no concatenation
        count = 0
        for x in outs:
            x = x.detach()
            if per_token:
                view_sum = x.sum(0, keepdim=True, dtype=torch.float32)  # (1, T, K)
                count += x.shape[0]
            else:
                view_sum = x.sum((0, 1), dtype=torch.float32).view(1, 1, -1)
                count += x.shape[0] * x.shape[1]
            batch_sum = view_sum if batch_sum is None else batch_sum.add_(view_sum)
        return batch_sum, count
