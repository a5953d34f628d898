"""The DINO head's last layer and the PW-Self loss fused, one chunk of tokens at a time.

:class:`~pwself_reference.losses.PWSelfLoss` takes the head outputs, one row of
``K`` (out_dim) logits per token, so the step holds several ``(tokens, K)``
tensors: the logits, the teacher probabilities, the student log-probabilities
and their gradient. Here the loss starts one layer earlier, from the
L2-normalised bottleneck features ``x`` (``(tokens, D)``, ``D`` = 256) and the
weight-normalised last layer ``W = g * v / ||v||`` (``(K, D)``), and no
``(tokens, K)`` tensor is ever made.

Dimension legend: ``N_s`` / ``N_t`` student / teacher rows (tokens of every
view, stacked), ``D`` bottleneck width, ``K`` out_dim, ``C`` centre rows (1 for
the global centre, the teacher tokens per view for the per-token centre), ``P``
matched pairs.

The loss, for the matched pairs ``p = (s_p, t_p, w_p)``, is

    L = -sum_p w_p * sum_k softmax((x_t W_t^T - c_t) / tau_t)_k * log_softmax(x_s W_s^T / tau_s)_k

(``t = t_p``, ``s = s_p``, ``c_t`` the centre row of teacher row ``t``). Every
reduction of :mod:`pwself_reference.losses` (dino, mean, sum, lambda) is a choice
of the weights ``w_p``, the :class:`~pwself_reference.losses.LossSlots` that
:meth:`PWSelfLoss.loss_slots <pwself_reference.losses.PWSelfLoss.loss_slots>`
builds from the matches; ``PWSelfLoss`` calls this loss when the network returns
the bottleneck features (``MultiCropNetwork(..., features=True)``). With ``Q = A P`` (``A`` the ``(N_s, N_t)`` matrix of the
weights, ``P`` the teacher probabilities) and ``c`` the row sums of ``A``, the
gradient to the student logits is ``G = (c * softmax(x_s W_s^T / tau_s) - Q) /
tau_s``, so

    dL/dx_s = G W_s,        dL/dW_s = G^T x_s.

How it is computed (:class:`FusedHeadLoss`): the student rows that take part in a
pair are cut into chunks of at most ``chunk_size`` rows, whole images together
where they fit (a pair never links two images, so the teacher rows a chunk needs
are those of its images: each teacher row is computed about once). For every
chunk, the teacher probabilities of its teacher rows (in pieces of at most
``chunk_size`` rows) are formed and multiplied into the chunk's targets ``Q``;
then the chunk's student logits, their log-sum-exp, the loss and ``G`` (the row
pass: torch operators, :func:`~pwself_reference.fused_loss_triton.student_rows_torch`,
or on CUDA one Triton kernel, :mod:`pwself_reference.fused_loss_triton`); then
``G W_s`` and ``G^T x_s`` are added to the gradients. Everything of size ``K``
is one of two ``(chunk_size, K)`` float32 buffers allocated once and reused (the
teacher probabilities ``P`` and the student logits, then ``G``; the targets ``Q`` of
a block of rows are gathered from ``P`` while the block is in cache), so the memory
the loss needs beyond its inputs is

    2 * chunk_size * K * 4 bytes     (the two buffers)
    + K * D * 4 bytes                (the weight gradient)
    + (b + pairs of b rows) * K * 4  (a block's targets and gathered teacher rows)
    [+ chunk_size * K * 2 bytes      (bfloat16: one low-precision product at a time)]

with ``b = min(chunk_size, 2**18 / K)`` rows per block on the CPU (about 2 MiB),
plus ``(tokens, D)`` index-sized tensors. The gradient is computed in the forward
pass (as ``PWSelfLoss`` does), so the backward pass saves only ``dL/dx_s``
(``(N_s, D)``) and ``dL/dW_s`` (``(K, D)``). Student rows without a pair get a
zero gradient and no logits at all. The centre statistic, the sum of the teacher
logits of every teacher row per centre row, is ``(sum of x_t per centre row)
W_t^T`` (the logits are linear in ``x_t``): a ``(C, D) x (D, K)`` product, not a
pass over every teacher logit
(:meth:`PWSelfLoss.update_center <pwself_reference.losses.PWSelfLoss.update_center>`).

The arithmetic runs in float32 with autocast disabled; for bfloat16 inputs (or
under bfloat16 autocast) the three matrix products run in bfloat16 and the rest
in float32, as the unfused head under autocast followed by ``PWSelfLoss`` does.

The readable version of the same loss, every logit at once, is
:func:`reference_head_loss`; the tests check the fused one against it and
against ``PWSelfLoss``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pwself_reference.fused_loss_triton import (
    student_rows_torch,
    student_rows_triton,
    triton_available,
)
from pwself_reference.losses import LossSlots

__all__ = [
    "LAST_LAYER_LABEL", "FUSED_LOSS_LABEL", "DEFAULT_CHUNK_VALUES",
    "reference_head_loss", "FusedHeadLoss", "fused_head_loss", "fused_memory_bytes",
]

#: torch.profiler label of the last layer's matrix products inside the fused loss (the work
#: the head's last layer does in the unfused step); the rest of the fused loss is the loss
LAST_LAYER_LABEL = "FusedHeadLoss.last_layer"
#: torch.profiler label of the whole fused loss (forward, which computes the gradient too)
FUSED_LOSS_LABEL = "FusedHeadLoss.chunks"
#: float32 values per ``(chunk, K)`` buffer by default: 2**25 (128 MiB), i.e. 512 rows at
#: K = 65536 and every row at K = 1000 up to 33554 rows
DEFAULT_CHUNK_VALUES = 1 << 25


def _check_inputs(student_features, student_weight, teacher_features, teacher_weight, center,
                  center_index, pairs, student_temp, teacher_temp) -> None:
    for name, x in (("student_features", student_features), ("student_weight", student_weight),
                    ("teacher_features", teacher_features), ("teacher_weight", teacher_weight),
                    ("center", center)):
        if not torch.is_tensor(x) or x.dim() != 2:
            got = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f"{name} must be a 2-d tensor, got {got}")
    k, d = student_weight.shape
    if teacher_weight.shape != (k, d):
        raise ValueError(f"teacher_weight must be (K={k}, D={d}) like student_weight, got "
                         f"{tuple(teacher_weight.shape)}")
    for name, x in (("student_features", student_features),
                    ("teacher_features", teacher_features)):
        if x.shape[1] != d:
            raise ValueError(f"{name} must be (rows, D={d}), got {tuple(x.shape)}")
    if center.shape[1] != k:
        raise ValueError(f"center must be (C, K={k}), got {tuple(center.shape)}")
    if center_index is None:
        if center.shape[0] != 1:
            raise ValueError(f"center_index=None needs a (1, K) center, got {tuple(center.shape)}")
    elif center_index.shape != (teacher_features.shape[0],) or center_index.dtype != torch.long:
        raise ValueError(f"center_index must be an int64 ({teacher_features.shape[0]},) tensor, "
                         f"got {center_index.dtype} {tuple(center_index.shape)}")
    if not isinstance(pairs, LossSlots):
        raise TypeError(f"pairs must be a LossSlots, got {type(pairs).__name__}")
    p = pairs.student_row.shape
    if (pairs.student_row.dim() != 1 or pairs.teacher_row.shape != p
            or pairs.weight.shape != p or pairs.student_row.dtype != torch.long
            or pairs.teacher_row.dtype != torch.long):
        raise ValueError("pairs.student_row and pairs.teacher_row must be int64 (P,) tensors "
                         "and pairs.weight a (P,) tensor")
    if not (student_temp > 0 and teacher_temp > 0):
        raise ValueError(f"temperatures must be > 0, got {student_temp!r} and {teacher_temp!r}")


def reference_head_loss(
    student_features: torch.Tensor, student_weight: torch.Tensor,
    teacher_features: torch.Tensor, teacher_weight: torch.Tensor,
    center: torch.Tensor, pairs: LossSlots, student_temp: float, teacher_temp: float,
    center_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """The loss of :func:`fused_head_loss` written with every logit at once (the specification).

    ``(N, K)`` logits, softmax and log-softmax in full; differentiable by autograd.
    """
    _check_inputs(student_features, student_weight, teacher_features, teacher_weight, center,
                  center_index, pairs, student_temp, teacher_temp)
    device = student_features.device
    with torch.autocast(device.type, enabled=False):
        s_logits = (student_features @ student_weight.t()).float()              # (N_s, K)
        t_logits = (teacher_features @ teacher_weight.t()).detach().float()     # (N_t, K)
        c = center if center_index is None else center[center_index]           # (N_t or 1, K)
        teacher_probs = F.softmax((t_logits - c.float()) / teacher_temp, dim=-1)
        student_log_probs = F.log_softmax(s_logits / student_temp, dim=-1)
        ce = -(teacher_probs[pairs.teacher_row]
               * student_log_probs[pairs.student_row]).sum(-1)                  # (P,)
        return (pairs.weight.float() * ce).sum()


@dataclass
class _Chunk:
    student: torch.Tensor                                # (n,) student rows
    row_weight: torch.Tensor                             # (n,) c: weight sum per row
    teacher: list[tuple[torch.Tensor, torch.Tensor]]     # (teacher rows, sparse (n, m) A)
    # with one piece of teacher rows: per block of ``block`` student rows, the teacher rows
    # of its pairs (indices into the piece, concatenated; block_bounds[b] is where block b's
    # start) and the (blocks, block, most pairs of a block) weights from pairs to rows
    pair_teacher: torch.Tensor | None = None
    block_bounds: list[int] | None = None
    block_weights: torch.Tensor | None = None


def _pack_groups(bounds: np.ndarray, chunk_rows: int) -> list[tuple[int, int]]:
    """Greedy packing of consecutive groups into chunks of at most ``chunk_rows`` rows.

    ``bounds`` are the groups' start offsets followed by the total (sorted, from 0). A chunk
    takes whole groups while they fit; a group larger than a chunk is cut into pieces of
    ``chunk_rows`` rows, and its remainder starts the next chunk. Returns ``(start, end)``
    row ranges; one search per chunk rather than a Python step per group (a step of a
    batch of 64 images can have thousands of groups).
    """
    total, out, pos = int(bounds[-1]), [], 0
    while pos < total:
        end = int(bounds[np.searchsorted(bounds, pos + chunk_rows, side="right") - 1])
        if end <= pos:                  # the group at ``pos`` is larger than a chunk: cut it
            end = pos + chunk_rows
        out.append((pos, end))
        pos = end
    return out


def _plan(pairs: LossSlots, n_student: int, n_teacher: int, chunk_rows: int,
          device: torch.device, block: int | None = None) -> list[_Chunk]:
    """Chunks of the student rows with a pair: whole connected groups of rows (images)
    together where they fit in ``chunk_rows``; per chunk, its teacher rows in pieces of at
    most ``chunk_rows`` with the pair weights as a sparse matrix. One host sync."""
    s = pairs.student_row.detach().cpu().numpy()
    t = pairs.teacher_row.detach().cpu().numpy()
    w = pairs.weight.detach().float().cpu().numpy()
    if s.size and (s.min() < 0 or s.max() >= n_student or t.min() < 0 or t.max() >= n_teacher):
        raise ValueError(f"pairs index rows outside the {n_student} student / {n_teacher} "
                         "teacher rows")
    keep = w != 0
    s, t, w = s[keep], t[keep], w[keep]
    if s.size == 0:
        return []
    # connected groups of the bipartite pair graph (the images): min-label propagation
    lab_s = np.arange(n_student)
    lab_t = np.full(n_teacher, n_student)
    while True:
        np.minimum.at(lab_t, t, lab_s[s])
        new_s = lab_s.copy()
        np.minimum.at(new_s, s, lab_t[t])
        if np.array_equal(new_s, lab_s):
            break
        lab_s = new_s
    rows = np.flatnonzero(np.bincount(s, minlength=n_student))    # student rows with a pair
    first_t = np.full(n_student, n_teacher)
    np.minimum.at(first_t, s, t)
    rows = rows[np.lexsort((rows, first_t[rows], lab_s[rows]))]   # by group, then teacher row
    group_bounds = np.concatenate([[0], np.flatnonzero(np.diff(lab_s[rows])) + 1, [rows.size]])
    chunks_rows = [rows[a:b] for a, b in _pack_groups(group_bounds, chunk_rows)]
    chunk_of = np.full(n_student, -1)
    local_of = np.zeros(n_student, dtype=np.int64)
    for c, r in enumerate(chunks_rows):
        chunk_of[r] = c
        local_of[r] = np.arange(r.size)
    order = np.lexsort((t, chunk_of[s]))
    s, t, w = s[order], t[order], w[order]
    bounds = np.searchsorted(chunk_of[s], np.arange(len(chunks_rows) + 1))
    plan = []
    for c, r in enumerate(chunks_rows):
        cs, ct, cw = s[bounds[c]:bounds[c + 1]], t[bounds[c]:bounds[c + 1]], w[bounds[c]:bounds[c + 1]]
        row_weight = np.zeros(r.size, dtype=np.float32)
        np.add.at(row_weight, local_of[cs], cw)
        t_rows, t_local = np.unique(ct, return_inverse=True)
        pieces = []
        for a in range(0, t_rows.size, chunk_rows):
            sel = (t_local >= a) & (t_local < a + chunk_rows)
            m = min(chunk_rows, t_rows.size - a)
            index = torch.from_numpy(np.stack([local_of[cs[sel]], t_local[sel] - a]))
            mat = torch.sparse_coo_tensor(index, torch.from_numpy(cw[sel]), (r.size, m),
                                          check_invariants=False).coalesce().to(device)
            pieces.append((torch.from_numpy(t_rows[a:a + m]).to(device), mat))
        chunk = _Chunk(torch.from_numpy(r).to(device), torch.from_numpy(row_weight).to(device),
                       pieces)
        if block is not None and len(pieces) == 1:
            ls = local_of[cs]
            order = np.argsort(ls, kind="stable")
            ls, lt, lw = ls[order], t_local[order], cw[order]
            bounds_b = np.searchsorted(ls, np.arange(0, r.size + block, block))
            n_blocks = bounds_b.size - 1
            per_block = np.diff(bounds_b)
            weights = np.zeros((n_blocks, block, max(1, int(per_block.max()))), np.float32)
            blk = ls // block
            weights[blk, ls % block, np.arange(ls.size) - bounds_b[blk]] = lw
            chunk.pair_teacher = torch.from_numpy(lt).to(device)
            chunk.block_bounds = bounds_b.tolist()
            chunk.block_weights = torch.from_numpy(weights).to(device)
        plan.append(chunk)
    return plan


def _matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """dtype of the fused loss's matrix products: autocast's when it is on, else the input's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class FusedHeadLoss(torch.autograd.Function):
    """``L`` of the module docstring from the bottleneck features and the last layer.

    ``forward(ctx, student_features, student_weight, teacher_features, teacher_weight,
    center, center_index, plan, student_temp, teacher_temp, block, engine, need_grad)``;
    differentiable in ``student_features`` and ``student_weight`` (the teacher side and
    the centre are constants). ``plan`` comes from the pairs (see :func:`fused_head_loss`,
    which is the function to call).
    """

    @staticmethod
    def forward(ctx, xs: torch.Tensor, ws: torch.Tensor, xt: torch.Tensor, wt: torch.Tensor,
                center: torch.Tensor, center_index: torch.Tensor | None, plan: list[_Chunk],
                student_temp: float, teacher_temp: float, block: int | None, engine: str,
                need_grad: bool) -> torch.Tensor:
        """The loss; with ``need_grad``, its gradients too, saved for :meth:`backward`."""
        device = xs.device
        dtype = _matmul_dtype(xs)
        ctx.dtypes = (xs.dtype, ws.dtype)
        k, d = ws.shape
        loss = torch.zeros((), dtype=torch.float32, device=device)
        grad_x = torch.zeros(xs.shape, dtype=torch.float32, device=device) if need_grad else None
        grad_w = torch.zeros((k, d), dtype=torch.float32, device=device) if need_grad else None
        if plan:
            with torch.autocast(device.type, enabled=False), \
                    torch.profiler.record_function(FUSED_LOSS_LABEL):
                _fused_chunks(plan, xs.detach(), ws.detach(), xt.detach(), wt.detach(),
                              center.detach().float(), center_index, student_temp,
                              teacher_temp, block, engine, dtype, loss, grad_x, grad_w)
        if need_grad:
            ctx.save_for_backward(grad_x, grad_w)
        ctx.need_grad = need_grad
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        """The saved gradients times ``grad_out``, in the inputs' dtypes."""
        none = (None,) * 10
        if not ctx.need_grad:
            return (None, None) + none
        grad_x, grad_w = ctx.saved_tensors
        # a unit output gradient (the usual case) hands the saved gradients back without a
        # copy; on the CPU reading it costs no device sync
        if grad_out.device.type == "cpu" and float(grad_out) == 1.0:
            scale = None
        else:
            scale = grad_out.to(torch.float32)
        gx = gw = None
        if ctx.needs_input_grad[0]:
            gx = (grad_x if scale is None else grad_x * scale).to(ctx.dtypes[0])
        if ctx.needs_input_grad[1]:
            gw = (grad_w if scale is None else grad_w * scale).to(ctx.dtypes[1])
        return (gx, gw) + none


def _fused_chunks(plan, xs, ws, xt, wt, center, center_index, student_temp, teacher_temp,
                  block, engine, dtype, loss, grad_x, grad_w) -> None:
    """The chunk loop of :class:`FusedHeadLoss`; adds into ``loss``, ``grad_x``, ``grad_w``."""
    device = xs.device
    k = ws.shape[0]
    # the temperatures are folded into the features and the centre:
    # (x W^T - c) / tau = (x / tau) W^T - c / tau
    ws_m = ws.to(dtype)
    wt_m = wt.to(dtype)
    rows = max(c.student.numel() for c in plan)
    t_rows = max(t.numel() for c in plan for t, _ in c.teacher)
    # two (chunk, K) float32 buffers, allocated once. With one piece of teacher rows (the
    # usual case), the teacher probabilities P and the student logits (then G); each block's
    # targets Q are gathered from P in cache. Otherwise the targets Q of the chunk (summed
    # piece by piece), and P then the student logits (then G).
    buf_a = torch.empty(max(rows, t_rows) * k, dtype=torch.float32, device=device)
    buf_b = torch.empty(rows * k, dtype=torch.float32, device=device)
    # the element-wise passes run on blocks of rows that stay in cache (on the CPU: between
    # the passes a whole chunk would go to memory and back)
    if block is None:  # one block: the whole chunk
        block = max(rows, t_rows)
    gathers = [c.block_weights.shape[2] for c in plan if c.block_weights is not None]
    if gathers:
        q_block = torch.empty(block * k, dtype=torch.float32, device=device)
        gathered = torch.empty(max(gathers) * k, dtype=torch.float32, device=device)
    qz = torch.zeros((), dtype=torch.float32, device=device)
    for chunk in plan:
        n = chunk.student.numel()
        in_blocks = chunk.block_weights is not None
        if not in_blocks:
            q = buf_b[: n * k].view(n, k)
            q.zero_()
        for t_idx, a in chunk.teacher:
            m = t_idx.numel()
            p = buf_a[: m * k].view(m, k)
            # P = softmax((x_t / tau_t) W_t^T - c / tau_t): the centre rows are written
            # first and the product's epilogue scales them by -1 / tau_t (no separate pass
            # for the centring); the softmax works row by row, each row in cache
            if center_index is None:
                p.copy_(center.expand(m, k))
            else:
                torch.index_select(center, 0, center_index.index_select(0, t_idx), out=p)
            x_t = (xt.index_select(0, t_idx).float() / teacher_temp).to(dtype)
            with torch.profiler.record_function(LAST_LAYER_LABEL):
                _addmm_into(p, x_t, wt_m.t(), beta=-1.0 / teacher_temp)
            torch.softmax(p, -1, out=p)
            if not in_blocks:
                q.addmm_(a, p)                                          # Q += A P
        x_c = xs.index_select(0, chunk.student)
        z = (buf_b if in_blocks else buf_a)[: n * k].view(n, k)
        with torch.profiler.record_function(LAST_LAYER_LABEL):
            _addmm_into(z, (x_c.float() / student_temp).to(dtype), ws_m.t(), beta=0.0)
        # per row: -sum_k Q log_softmax(z) = c * lse - Q . z   (a teacher row sums to 1);
        # then G = (c * softmax(z) - Q) / tau_s in the logits' buffer
        scale = chunk.row_weight / student_temp
        need_grad = grad_x is not None
        if not in_blocks and engine == "triton":
            lse, qz_chunk = student_rows_triton(z, q, scale, student_temp, need_grad)
            qz.add_(qz_chunk)
        else:
            lse = torch.empty(n, dtype=torch.float32, device=device)
            for b, r0 in enumerate(range(0, n, block)):
                r1 = min(n, r0 + block)
                if in_blocks:  # Q of the block's rows: sum_p w_p P[t_p], gathered here
                    qb = q_block[: (r1 - r0) * k].view(r1 - r0, k)
                    lo, hi = chunk.block_bounds[b], chunk.block_bounds[b + 1]
                    g = gathered[: (hi - lo) * k].view(hi - lo, k)
                    torch.index_select(p, 0, chunk.pair_teacher[lo:hi], out=g)
                    torch.mm(chunk.block_weights[b, : r1 - r0, : hi - lo], g, out=qb)
                else:
                    qb = q[r0:r1]
                lse[r0:r1], qz_block = student_rows_torch(z[r0:r1], qb, scale[r0:r1],
                                                          student_temp, need_grad)
                qz.add_(qz_block)
        loss.add_(torch.dot(chunk.row_weight, lse))
        if not need_grad:
            continue
        g_m = z.to(dtype)
        with torch.profiler.record_function(LAST_LAYER_LABEL):
            grad_x.index_copy_(0, chunk.student, (g_m @ ws_m).float())       # G W
            if dtype == torch.float32:
                grad_w.addmm_(g_m.t(), x_c.float())                          # += G^T x
            else:
                grad_w.add_(g_m.t() @ x_c.to(dtype))
    loss.sub_(qz)


#: float32 values per block of rows of the element-wise passes on the CPU (1 MiB)
_BLOCK_VALUES = 1 << 18


def _addmm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, beta: float = 1.0) -> None:
    """``out = beta * out + a @ b`` into a float32 buffer (low-precision products are
    rounded to their dtype first, as the unfused head's output is)."""
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        out.addmm_(a, b, beta=beta)
    elif beta == 0.0:
        out.copy_(a @ b)
    else:
        out.mul_(beta).add_(a @ b)


def fused_memory_bytes(chunk_rows: int, out_dim: int, bottleneck_dim: int,
                       low_precision: bool = False) -> int:
    """Bytes of the out_dim-sized buffers :func:`fused_head_loss` holds (the formula of the
    module docstring, without the few MiB of one block of rows).

    Examples
    --------
    >>> fused_memory_bytes(512, 65536, 256) / 2**20   # MiB, at the default chunk
    320.0
    """
    per_row = 2 * 4 + (2 if low_precision else 0)
    return out_dim * (chunk_rows * per_row + bottleneck_dim * 4)


def fused_head_loss(
    student_features: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_features: torch.Tensor,
    teacher_weight: torch.Tensor,
    center: torch.Tensor,
    pairs: LossSlots,
    student_temp: float,
    teacher_temp: float,
    center_index: torch.Tensor | None = None,
    chunk_size: int | None = None,
    engine: str = "auto",
) -> torch.Tensor:
    """The PW-Self loss from the bottleneck features, chunk by chunk (see the module docstring).

    Parameters
    ----------
    student_features : torch.Tensor
        ``(N_s, D)`` student bottleneck features (``DINOHead.bottleneck``).
    student_weight : torch.Tensor
        ``(K, D)`` student last layer (``DINOHead.last_layer_weight()``).
    teacher_features, teacher_weight : torch.Tensor
        ``(N_t, D)`` and ``(K, D)``, the teacher's; no gradient flows to them.
    center : torch.Tensor
        ``(C, K)`` centre.
    pairs : LossSlots
        The matched pairs (student row, teacher row) and their weights
        (:meth:`PWSelfLoss.loss_slots <pwself_reference.losses.PWSelfLoss.loss_slots>`).
    student_temp, teacher_temp : float
        Temperatures.
    center_index : torch.Tensor, optional
        ``(N_t,)`` int64 centre row of every teacher row (per-token centre); None: the
        ``(1, K)`` global centre.
    chunk_size : int, optional
        Rows of the ``(chunk, K)`` buffers; default ``DEFAULT_CHUNK_VALUES // K``.
    engine : {"auto", "torch", "triton"}
        The row pass after the student logits (log-sum-exp, ``Q . z`` and ``G``):
        ``"torch"`` operators (on the CPU in blocks of rows that stay in cache), or one
        Triton kernel per chunk (:mod:`pwself_reference.fused_loss_triton`; CUDA, or any
        device under ``TRITON_INTERPRET=1``). ``"auto"``: Triton on CUDA where it is
        installed, else torch.

    Returns
    -------
    torch.Tensor
        Scalar float32 loss, differentiable in ``student_features`` and ``student_weight``.

    Examples
    --------
    >>> xs = F.normalize(torch.randn(5, 8), dim=-1).requires_grad_()
    >>> xt = F.normalize(torch.randn(3, 8), dim=-1)
    >>> w = torch.randn(16, 8)
    >>> pairs = LossSlots(torch.tensor([0, 4]), torch.tensor([2, 2]), torch.tensor([0.5, 0.5]))
    >>> args = (xs, w, xt, w, torch.zeros(1, 16), pairs, 0.1, 0.04)
    >>> fused = fused_head_loss(*args, chunk_size=1)
    >>> torch.allclose(fused, reference_head_loss(*args))
    True
    """
    _check_inputs(student_features, student_weight, teacher_features, teacher_weight, center,
                  center_index, pairs, student_temp, teacher_temp)
    k = student_weight.shape[0]
    if chunk_size is None:
        chunk_size = max(1, DEFAULT_CHUNK_VALUES // k)
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    device = student_features.device
    if engine not in ("auto", "torch", "triton"):
        raise ValueError(f"engine must be 'auto', 'torch' or 'triton', got {engine!r}")
    if engine == "auto":
        engine = "triton" if device.type == "cuda" and triton_available(device) else "torch"
    elif engine == "triton" and not triton_available(device):
        raise ValueError(f"engine='triton' needs triton and a CUDA device (or "
                         f"TRITON_INTERPRET=1), got a {device.type} tensor")
    # element-wise passes on blocks of rows that stay in cache: on the CPU, torch engine
    block = (min(chunk_size, max(1, _BLOCK_VALUES // k))
             if device.type == "cpu" and engine == "torch" else None)
    plan = _plan(pairs, student_features.shape[0], teacher_features.shape[0], chunk_size,
                 device, block)
    need_grad = torch.is_grad_enabled() and (student_features.requires_grad
                                             or student_weight.requires_grad)
    return FusedHeadLoss.apply(student_features, student_weight, teacher_features,
                               teacher_weight, center, center_index, plan, float(student_temp),
                               float(teacher_temp), block, engine, need_grad)

