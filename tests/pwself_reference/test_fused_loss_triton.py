"""The fused loss's Triton row pass against its torch specification, and the fused loss with
``engine="triton"`` against the reference.

Without a GPU the kernel runs in Triton's interpreter on CPU tensors (tests/conftest.py sets
``TRITON_INTERPRET=1``); a subprocess compiles it for a CUDA target (sm_90) as well. On a
GPU machine tests/device runs the compiled kernel through the fused loss.
"""

from __future__ import annotations

import textwrap

import pytest
import torch
import torch.nn.functional as F

from pwself_reference.fused_loss import fused_head_loss, reference_head_loss
from pwself_reference.fused_loss_triton import (
    student_rows_torch,
    student_rows_triton,
    triton_available,
)
from tests.patchaug.triton_compile import assert_compiles
from tests.pwself_reference.test_fused_loss import (
    TAU_S,
    TAU_T,
    centre,
    close,
    grads,
    matched_pairs,
    random_matches,
    setup,
)

interpreted = pytest.mark.skipif(not triton_available(torch.device("cpu")),
                                 reason="needs Triton's interpreter (TRITON_INTERPRET=1)")


def rows_case(n: int, k: int, spread: float, seed: int):
    gen = torch.Generator().manual_seed(seed)
    z = spread * torch.randn(n, k, generator=gen)
    q = torch.softmax(torch.randn(n, k, generator=gen), -1) * torch.rand(n, 1, generator=gen)
    scale = torch.rand(n, generator=gen) + 0.5
    return z, q, scale


@interpreted
@pytest.mark.parametrize("k", [5, 48, 3000])           # one partial tile, one, several tiles
@pytest.mark.parametrize("spread", [1.0, 300.0])       # exp(300) overflows without the shift
@pytest.mark.parametrize("need_grad", [True, False])
def test_kernel_equals_torch_rows(k, spread, need_grad):
    z, q, scale = rows_case(3, k, spread, seed=k)
    z_ref = z.clone()
    lse_ref, qz_ref = student_rows_torch(z_ref, q, scale, TAU_S, need_grad)
    z_tri = z.clone()
    lse, qz = student_rows_triton(z_tri, q, scale, TAU_S, need_grad)
    assert torch.isfinite(lse).all()
    torch.testing.assert_close(lse, lse_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(qz, qz_ref, rtol=1e-5, atol=1e-4)
    # G when asked for (else the logits are left as they were)
    # G when asked for (else the logits are left as they were); exp(z - lse) carries the
    # rounding of lse, which grows with the logits' size
    torch.testing.assert_close(z_tri, z_ref if need_grad else z, rtol=1e-4, atol=1e-5)


@interpreted
def test_kernel_with_no_rows():
    z = torch.zeros(0, 7)
    lse, qz = student_rows_triton(z, z.clone(), torch.zeros(0), TAU_S, True)
    assert lse.shape == (0,) and float(qz) == 0.0


@interpreted
def test_kernel_rejects_bad_buffers():
    z, q, scale = rows_case(2, 8, 1.0, seed=0)
    with pytest.raises(ValueError, match="contiguous float32"):
        student_rows_triton(z.t(), q.t(), scale, TAU_S, True)
    with pytest.raises(ValueError, match="contiguous float32"):
        student_rows_triton(z.double(), q.double(), scale, TAU_S, True)
    with pytest.raises(ValueError, match="scale"):
        student_rows_triton(z, q, scale[:1], TAU_S, True)


@interpreted
@pytest.mark.parametrize("loss", ["dino", "lambda"])
@pytest.mark.parametrize("mode", ["global", "per-token"])
@pytest.mark.parametrize("chunk", [3, None])
def test_fused_triton_engine_equals_reference(loss, mode, chunk):
    gen, xs, v, g, xt, wt = setup(11)
    xs.requires_grad_()
    c, index = centre(gen, mode)
    pairs = matched_pairs(random_matches(gen), loss)
    args = (xt, wt, c, pairs, TAU_S, TAU_T)
    ref = reference_head_loss(xs, g * F.normalize(v, dim=-1), *args, center_index=index)
    fused = fused_head_loss(xs, g * F.normalize(v, dim=-1), *args, center_index=index,
                            chunk_size=chunk, engine="triton")
    assert torch.allclose(fused, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads(fused, [xs, v]), grads(ref, [xs, v])):
        close(a, b, 1e-5)


def test_engine_is_checked():
    gen, xs, v, g, xt, wt = setup(12)
    pairs = matched_pairs(random_matches(gen), "mean")
    with pytest.raises(ValueError, match="engine"):
        fused_head_loss(xs, wt, xt, wt, torch.zeros(1, wt.shape[0]), pairs, TAU_S, TAU_T,
                        engine="cuda")


# ---------------------------------------------------------------------- compiled (no GPU)
# The kernel through Triton's CUDA pipeline down to a cubin for sm_90 (Triton ships ptxas):
# what the interpreter does not check (types, the -inf lanes, constexpr branches). In a
# subprocess, because triton.language is built in one mode per process.
_COMPILE_SCRIPT = textwrap.dedent("""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    import triton

    from pwself_reference.fused_loss_triton import _student_rows_kernel as kernel
    from patchaug.triton_engine import _interpreting

    assert not _interpreting()
    n = 0
    for need_grad in (True, False):
        constexprs = dict(NEED_GRAD=need_grad, BLOCK_K=2048)
        types = {"K": "i32", "inv_tau": "fp32"}
        signature = {a: "constexpr" if a in constexprs else types.get(a, "*fp32")
                     for a in kernel.arg_names}
        try:
            compiled = triton.compile(ASTSource(kernel, signature, constexprs=constexprs),
                                      target=GPUTarget("cuda", 90, 32),
                                      options={"num_warps": 8})
        except RuntimeError as error:
            if "ptxas" in str(error).lower():
                raise SystemExit("SKIP " + str(error)) from None
            raise
        assert compiled.asm["cubin"]
        n += 1
    print("compiled", n)
""")


def test_kernel_compiles_for_a_cuda_target() -> None:
    assert_compiles(_COMPILE_SCRIPT, 2)
