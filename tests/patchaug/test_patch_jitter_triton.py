"""PatchJitter(backend="triton"): the fused kernel equals the reference engine.

Without a GPU the kernel runs in Triton's interpreter on CPU tensors (tests/conftest.py sets
``TRITON_INTERPRET=1``); on a GPU machine tests/device runs the compiled kernel.
"""

from __future__ import annotations

import pytest
import torch

from patchaug import operators as O
from patchaug.patch_jitter import PatchJitter, apply_reference
from patchaug.triton_engine import triton_available

from .jitter_cases import CONFIGS, images

pytestmark = pytest.mark.skipif(
    not triton_available(torch.device("cpu")), reason="needs Triton's interpreter (no GPU here)"
)


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("c", [1, 3])
def test_triton_backend_equals_the_reference_engine(config: str, c: int) -> None:
    jitter = CONFIGS[config](backend="triton")
    x = images(11, c=c)
    params = jitter.sample_params(2, 16, 24, generator=torch.Generator().manual_seed(c))
    assert jitter._engine(x) == "triton"
    got = jitter(x, params=params)
    want = apply_reference(x, jitter.operators, params)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_backend_rounds_the_float32_result_once(dtype: torch.dtype) -> None:
    jitter = CONFIGS["everything_random_order"](backend="triton")
    x = images(12).to(dtype)
    params = jitter.sample_params(2, 16, 24, generator=torch.Generator().manual_seed(0))
    got = jitter(x, params=params)
    assert got.dtype == dtype
    want = apply_reference(x, jitter.operators, params)  # float32 inside, rounded once
    # float32 results that differ by rounding can round to neighbouring half values
    ulp = torch.finfo(dtype).eps * want.float().abs().clamp(min=2**-6)
    assert bool(((got.float() - want.float()).abs() <= ulp + 1e-5).all())


def test_no_operator_and_nothing_gated_give_the_input_back() -> None:
    x = images(3)
    assert torch.equal(PatchJitter(8, [], backend="triton")(x), x)
    assert torch.equal(PatchJitter.paper(8, p_patch=0.0, backend="triton")(x), x)


def test_auto_keeps_the_torch_engine_off_cuda_and_for_unknown_operators() -> None:
    x = images(0)
    assert PatchJitter.paper(8)._engine(x) == "torch"

    class Custom(O.Brightness):
        name = "custom"
        triton_code = None

    with pytest.raises(ValueError, match="backend"):
        PatchJitter(8, [Custom(0.4)], backend="triton")(x)
    with pytest.raises(ValueError, match="backend"):
        PatchJitter.paper(8, backend="triton")(x.double())
