"""Triton engine of the fused loss's row pass: a chunk of student logits in two reads.

After the last layer's product, :func:`~pwself_reference.fused_loss.fused_head_loss` needs,
for every student row ``z`` (``K`` logits, temperature already applied) and its targets
``q`` (the weighted teacher probabilities of its pairs):

    lse = log sum_k exp(z_k),      qz = sum_k q_k z_k,
    G_k = scale * exp(z_k - lse) - q_k / tau_s     (in place of z; scale = c / tau_s)

With torch operators that is a maximum, a dot product, a softmax, a second maximum, a
multiplication and a subtraction: some ten passes over the ``(chunk, K)`` logits in the
GPU's memory, one kernel each. Here one Triton program per row reads ``z`` and ``q`` once
to get ``lse`` (a running maximum and a rescaled running sum, per lane) and ``qz``, and
once more to write ``G``: two reads of each and one write.

The torch route (:func:`student_rows_torch`) is the specification; the tests check the
kernel against it in Triton's interpreter (``TRITON_INTERPRET=1``, see
:mod:`patchaug.triton_engine`) and, on a GPU, in ``tests/device``.
"""

from __future__ import annotations  # annotations stay strings: no triton needed to import

import torch

from patchaug.triton_engine import _jit, tl, triton, triton_available

__all__ = ["student_rows_torch", "student_rows_triton", "triton_available"]


def student_rows_torch(z: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                       student_temp: float, need_grad: bool
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """``lse`` per row, ``qz`` summed over the rows, and ``G`` written into ``z`` when
    ``need_grad`` (see above).

    ``z``, ``q``: ``(n, K)`` float32; ``scale``: ``(n,)``; returns ``(n,)`` and a scalar.
    """
    z_max = torch.amax(z, 1)
    qz = torch.dot(q.reshape(-1), z.reshape(-1))
    torch.softmax(z, -1, out=z)
    lse = z_max - torch.amax(z, 1).log()          # max(softmax(z)) = exp(max(z) - lse)
    if need_grad:
        z.mul_(scale.unsqueeze(-1)).sub_(q, alpha=1.0 / student_temp)
    return lse, qz


@_jit
def _student_rows_kernel(z_ptr, q_ptr, scale_ptr, lse_ptr, qz_ptr, K, inv_tau,
                         NEED_GRAD: tl.constexpr, BLOCK_K: tl.constexpr):
    """One program per row of the contiguous ``(n, K)`` float32 ``z`` and ``q``."""
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * K
    q_row = q_ptr + row * K
    cols = tl.arange(0, BLOCK_K)
    # per lane: running maximum m (from the lowest finite float32, so that a lane that has
    # seen no logit yet, or only padding, keeps a zero sum without a NaN), sum of
    # exp(z - m), sum of q z
    m = tl.full([BLOCK_K], -3.0e38, tl.float32)
    s = tl.zeros([BLOCK_K], tl.float32)
    qz = tl.zeros([BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + cols
        mask = k < K
        z = tl.load(z_row + k, mask=mask, other=float("-inf"))
        q = tl.load(q_row + k, mask=mask, other=0.0)
        m_new = tl.maximum(m, z)
        s = s * tl.exp(m - m_new) + tl.exp(z - m_new)
        m = m_new
        qz += q * tl.where(mask, z, 0.0)
    m_row = tl.max(m, 0)
    lse = m_row + tl.log(tl.sum(s * tl.exp(m - m_row), 0))
    tl.store(lse_ptr + row, lse)
    tl.store(qz_ptr + row, tl.sum(qz, 0))
    if NEED_GRAD:
        scale = tl.load(scale_ptr + row)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + cols
            mask = k < K
            z = tl.load(z_row + k, mask=mask, other=0.0)
            q = tl.load(q_row + k, mask=mask, other=0.0)
            tl.store(z_row + k, scale * tl.exp(z - lse) - q * inv_tau, mask=mask)


def student_rows_triton(z: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                        student_temp: float, need_grad: bool
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`student_rows_torch` in one Triton kernel (same arguments and results).

    ``z`` and ``q`` must be contiguous float32 ``(n, K)`` tensors on a device that
    :func:`~patchaug.triton_engine.triton_available` accepts.
    """
    if triton is None:
        raise RuntimeError("student_rows_triton needs triton (pip install triton)")
    if not (z.is_contiguous() and q.is_contiguous() and z.dtype == q.dtype == torch.float32
            and z.shape == q.shape and z.dim() == 2):
        raise ValueError("z and q must be contiguous float32 (n, K) tensors of one shape, got "
                         f"{z.dtype} {tuple(z.shape)} and {q.dtype} {tuple(q.shape)}")
    n, k = z.shape
    if scale.shape != (n,):
        raise ValueError(f"scale must be a ({n},) tensor (one per row), got {tuple(scale.shape)}")
    lse = torch.empty(n, dtype=torch.float32, device=z.device)
    qz = torch.empty(n, dtype=torch.float32, device=z.device)
    if n == 0:
        return lse, qz.sum()
    block_k = min(2048, triton.next_power_of_2(max(k, 16)))
    _student_rows_kernel[(n,)](z, q, scale.float().contiguous(), lse, qz, k,
                               1.0 / student_temp, NEED_GRAD=need_grad, BLOCK_K=block_k,
                               num_warps=8 if block_k >= 1024 else 4)
    return lse, qz.sum()
