"""patchaug.triton_engine: the fused kernel against patch_ops, Kornia and a per-patch reference.

Everything runs on the CPU under Triton's interpreter, which is slow: a few patches per call.
One test compiles the kernel for a CUDA target in a subprocess, which needs no GPU.
"""

# tests/conftest.py sets TRITON_INTERPRET=1 where there is no GPU, before triton is imported
import math
import textwrap

import kornia
import pytest
import torch

from patchaug import patch_ops as po
from patchaug.triton_engine import OP_CODES, apply_patch_chain, triton_available
from tests.patchaug.triton_compile import assert_compiles

needs_interpreter = pytest.mark.skipif(
    not triton_available(torch.device("cpu")),
    reason="needs triton's interpreter: TRITON_INTERPRET=1 before triton is first imported",
)

TOL = 1e-5
NAMES = tuple(OP_CODES)
# parameter ranges: the presets' (hue over a whole turn, to reach every sextant shift)
RANGES = {
    "brightness": (0.6, 1.4),
    "contrast": (0.6, 1.4),
    "saturation": (0.0, 2.0),
    "hue": (-0.5, 0.5),
    "grayscale": (0.0, 0.0),
    "posterize": (0.0, 8.0),
    "solarize": (0.0, 1.0),
    "sharpness": (0.0, 2.0),
    "blur": (0.1, 2.0),
    "noise": (0.0, 0.1),
}
_SIMPLE = {
    "brightness": po.brightness,
    "contrast": po.contrast,
    "saturation": po.saturation,
    "hue": po.hue,
    "solarize": po.solarize,
    "sharpness": po.sharpness,
}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _values(names: tuple[str, ...], rows: int, g: torch.Generator) -> torch.Tensor:
    """``(rows, K)`` float32 parameters drawn uniformly from each operator's range."""
    cols = []
    for name in names:
        lo, hi = RANGES[name]
        v = lo + (hi - lo) * torch.rand(rows, generator=g)
        cols.append(v.round() if name == "posterize" else v)
    return torch.stack(cols, 1)


def _op(name: str, x: torch.Tensor, v: torch.Tensor, noise: torch.Tensor | None,
        kernel_size: tuple[int, int]) -> torch.Tensor:
    """The patch_ops function of operator ``name`` on the patch batch ``x``."""
    if name == "grayscale":
        return po.grayscale(x)
    if name == "posterize":
        return po.posterize(x, v.long())
    if name == "blur":
        return po.gaussian_blur(x, v, kernel_size)
    if name == "noise":
        return po.gaussian_noise(x, v, noise)
    return _SIMPLE[name](x, v)


def _reference_chain(images: torch.Tensor, p: int, names: tuple[str, ...],
                     values: torch.Tensor, gates: torch.Tensor, order: torch.Tensor | None,
                     noise: torch.Tensor, noise_row: torch.Tensor,
                     kernel_size: tuple[int, int]) -> torch.Tensor:
    """patch_ops applied patch by patch, each patch in its own order, in float32."""
    b, _, h, w = images.shape
    patches = po.patchify(images.float(), p)
    out = []
    for r in range(patches.shape[0]):
        x = patches[r : r + 1]
        for s in range(len(names)):
            k = int(order[r, s]) if order is not None else s
            if gates[r, k]:
                eps = noise[noise_row[r]].unsqueeze(0)
                x = _op(names[k], x, values[r : r + 1, k], eps, kernel_size)
        out.append(x)
    return po.unpatchify(torch.cat(out), b, h, w)


def _chain_inputs(b: int, c: int, h: int, w: int, p: int, names: tuple[str, ...],
                  random_order: bool, seed: int) -> dict:
    """Images and random gated tables for a chain of ``names``, as apply_patch_chain's kwargs."""
    g = _gen(seed)
    rows = b * (h // p) * (w // p)
    k = len(names)
    gates = torch.rand(rows, k, generator=g) < 0.6
    order = torch.rand(rows, k, generator=g).argsort(1).to(torch.uint8) if random_order else None
    # one noise row per noise-gated patch, as PatchJitter draws them
    noisy = gates[:, names.index("noise")] if "noise" in names else torch.zeros(rows, dtype=bool)
    noise_row = torch.where(noisy, noisy.long().cumsum(0) - 1, torch.full((rows,), 7))
    return dict(
        images=torch.rand(b, c, h, w, generator=g),
        patch_size=p,
        op_codes=[OP_CODES[name] for name in names],
        values=_values(names, rows, g),
        gates=gates,
        order=order,
        noise=torch.randn(int(noisy.sum()), c, p, p, generator=g),
        noise_row=noise_row,
    )


def _reference(kw: dict, names: tuple[str, ...], kernel_size: tuple[int, int]) -> torch.Tensor:
    noise = kw["noise"] if kw["noise"].shape[0] else torch.zeros(1, *kw["noise"].shape[1:])
    return _reference_chain(kw["images"], kw["patch_size"], names, kw["values"], kw["gates"],
                            kw["order"], noise, kw["noise_row"].clamp(max=noise.shape[0] - 1),
                            kernel_size)


# ------------------------------------------------------------------------- single operators
@needs_interpreter
@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("name", NAMES)
def test_each_operator_alone_equals_patch_ops(name: str, c: int) -> None:
    g = _gen(OP_CODES[name] + 10 * c)
    b, h, w, p = 1, 16, 32, 8
    images = torch.rand(b, c, h, w, generator=g)
    rows = b * (h // p) * (w // p)
    values = _values((name,), rows, g)
    if name == "posterize":
        values[:3, 0] = torch.tensor([0.0, 8.0, 1.0])  # zeros, the input, one bit
    noise = torch.randn(rows, c, p, p, generator=g)
    out = apply_patch_chain(images, p, [OP_CODES[name]], values,
                            torch.ones(rows, 1, dtype=torch.bool), None,
                            noise=noise, noise_row=torch.arange(rows).flip(0),
                            blur_kernel_size=(5, 5))
    ref = _op(name, po.patchify(images, p), values[:, 0], noise.flip(0), (5, 5))
    torch.testing.assert_close(out, po.unpatchify(ref, b, h, w), atol=TOL, rtol=0)


def _kornia_hue(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return kornia.enhance.adjust_hue(x, 2 * math.pi * v)


def _kornia_blur(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return kornia.filters.gaussian_blur2d(x, (7, 3), torch.stack([v, v], 1), border_type="reflect")


@needs_interpreter
@pytest.mark.parametrize(
    ("name", "reference"),
    [("hue", _kornia_hue), ("blur", _kornia_blur), ("sharpness", kornia.enhance.sharpness)],
)
def test_operators_equal_kornia_per_patch(name: str, reference) -> None:
    g = _gen(3)
    b, h, w, p = 2, 16, 16, 8
    # quantised values: channels often tie (hue's sextant choice) or sit at 0 and 1
    images = (torch.rand(b, 3, h, w, generator=g) * 4).round() / 4
    images[0] = torch.rand(3, h, w, generator=g)
    rows = b * (h // p) * (w // p)
    values = _values((name,), rows, g)
    out = apply_patch_chain(images, p, [OP_CODES[name]], values,
                            torch.ones(rows, 1, dtype=torch.bool), None, blur_kernel_size=(7, 3))
    ref = po.unpatchify(reference(po.patchify(images, p), values[:, 0]), b, h, w)
    torch.testing.assert_close(out, ref, atol=TOL, rtol=0)


# ----------------------------------------------------------------------------------- chains
# Posterize and solarize are discontinuous: a last-bit difference upstream could move a pixel
# across a level or the threshold. The seeds are fixed, so the comparisons are deterministic.
@needs_interpreter
@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("random_order", [False, True])
def test_gated_chain_of_all_operators_equals_per_patch_reference(c: int,
                                                                 random_order: bool) -> None:
    kw = _chain_inputs(2, c, 16, 16, 8, NAMES, random_order, seed=c + 2 * random_order)
    out = apply_patch_chain(**kw, blur_kernel_size=(5, 5))
    torch.testing.assert_close(out, _reference(kw, NAMES, (5, 5)), atol=TOL, rtol=0)


@needs_interpreter
@pytest.mark.parametrize(
    ("p", "h", "w", "kernel_size"),
    [(16, 16, 32, (13, 13)), (8, 16, 16, (5, 1)), (8, 16, 16, (1, 5)), (14, 28, 28, (5, 5))],
)
def test_patch_sizes_and_blur_kernels(p: int, h: int, w: int,
                                      kernel_size: tuple[int, int]) -> None:
    kw = _chain_inputs(1, 3, h, w, p, NAMES, True, seed=p + kernel_size[0])
    out = apply_patch_chain(**kw, blur_kernel_size=kernel_size)
    torch.testing.assert_close(out, _reference(kw, NAMES, kernel_size), atol=TOL, rtol=0)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_are_computed_in_float32_and_rounded_once(dtype: torch.dtype) -> None:
    kw = _chain_inputs(2, 3, 16, 16, 8, NAMES, True, seed=5)
    kw["images"] = kw["images"].to(dtype)
    out = apply_patch_chain(**kw, blur_kernel_size=(5, 5))
    assert out.dtype == dtype
    ref = _reference(kw, NAMES, (5, 5)).to(dtype)
    # The kernel's float32 results equal the reference's to ~1e-7, but two float32 values that
    # differ by rounding can straddle a rounding boundary of the half type and round to
    # neighbouring values: allow one ulp of the output dtype (eps * |value|).
    torch.testing.assert_close(out.float(), ref.float(), atol=TOL,
                               rtol=torch.finfo(dtype).eps)


@needs_interpreter
def test_non_contiguous_input_and_no_gates() -> None:
    kw = _chain_inputs(2, 3, 16, 16, 8, NAMES, True, seed=9)
    images = kw["images"]
    expected = apply_patch_chain(**kw, blur_kernel_size=(3, 3))
    for view in (images.to(memory_format=torch.channels_last),
                 images.transpose(2, 3).contiguous().transpose(2, 3)):
        kw["images"] = view
        out = apply_patch_chain(**kw, blur_kernel_size=(3, 3))
        assert out.is_contiguous()
        torch.testing.assert_close(out, expected, atol=0, rtol=0)
    torch.testing.assert_close(kw["images"], images, atol=0, rtol=0)  # input untouched
    kw["gates"] = torch.zeros_like(kw["gates"])
    out = apply_patch_chain(**kw, blur_kernel_size=(3, 3))
    assert out.data_ptr() != images.data_ptr()
    torch.testing.assert_close(out, images, atol=0, rtol=0)
    empty = torch.empty(kw["values"].shape[0], 0)
    out = apply_patch_chain(images, 8, [], empty, empty.bool(), None)
    torch.testing.assert_close(out, images, atol=0, rtol=0)


# ------------------------------------------------------------------------------- arguments
def _good() -> dict:
    rows = 4
    return dict(images=torch.rand(1, 3, 16, 16), patch_size=8, op_codes=[0, 9],
                values=torch.rand(rows, 2), gates=torch.ones(rows, 2, dtype=torch.bool),
                order=None, noise=torch.randn(rows, 3, 8, 8), noise_row=torch.arange(rows))


@pytest.mark.parametrize(
    ("change", "error", "name"),
    [
        (dict(images=torch.rand(3, 16, 16)), ValueError, "images"),
        (dict(images=torch.rand(1, 2, 16, 16)), ValueError, "images"),
        (dict(images=torch.rand(1, 3, 16, 16, dtype=torch.float64)), TypeError, "images"),
        (dict(images=torch.rand(1, 3, 16, 12)), ValueError, "patch_size"),
        (dict(patch_size=0), ValueError, "patch_size"),
        (dict(op_codes=[0, 10]), ValueError, "op_codes"),
        (dict(op_codes=[0, 1.0]), TypeError, "op_codes"),
        (dict(values=torch.rand(4, 3)), ValueError, "values"),
        (dict(values=torch.rand(4, 2, dtype=torch.float64)), TypeError, "values"),
        (dict(gates=torch.ones(4, 2)), TypeError, "gates"),
        (dict(gates=torch.ones(3, 2, dtype=torch.bool)), ValueError, "gates"),
        (dict(order=torch.zeros(4, 2, dtype=torch.int64)), TypeError, "order"),
        (dict(order=torch.zeros(4, 1, dtype=torch.uint8)), ValueError, "order"),
        (dict(noise=None), ValueError, "noise"),
        (dict(noise=torch.randn(4, 1, 8, 8)), ValueError, "noise"),
        (dict(noise_row=None), ValueError, "noise_row"),
        (dict(noise_row=torch.arange(4).int()), TypeError, "noise_row"),
        (dict(blur_kernel_size=(4, 5)), ValueError, "blur_kernel_size"),
        (dict(blur_kernel_size=(17, 1)), ValueError, "blur_kernel_size"),
        (dict(blur_kernel_size=5), TypeError, "blur_kernel_size"),
        (dict(images=torch.rand(1, 3, 4, 4), patch_size=2, op_codes=[7], values=torch.rand(4, 1),
              gates=torch.ones(4, 1, dtype=torch.bool)), ValueError, "patch_size"),
    ],
)
def test_bad_arguments_are_rejected_by_name(change: dict, error: type, name: str) -> None:
    kw = _good()
    kw.update(change)
    with pytest.raises(error, match=f"^{name}:"):
        apply_patch_chain(**kw)


def test_unavailable_device_is_refused(monkeypatch) -> None:
    from patchaug import triton_engine

    monkeypatch.setattr(triton_engine, "_interpreting", lambda: False)
    assert not triton_available(torch.device("cpu"))
    with pytest.raises(RuntimeError, match="^images:"):
        apply_patch_chain(**_good())


# ---------------------------------------------------------------------- compiled (no GPU)
# Compiles the kernel (not the interpreter's version) through Triton's CUDA pipeline down to a
# cubin for sm_90: Triton ships ptxas, so no GPU is needed. This checks what the interpreter
# does not (types, constexpr branches, the lowering of every operator). In a subprocess,
# because triton.language is built in one mode per process.
_COMPILE_SCRIPT = textwrap.dedent("""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from patchaug.triton_engine import OP_CODES, _interpreting, _patch_chain_kernel as kernel

    assert not _interpreting()
    configs = [  # dtype, C, p, operators, random order, blur kernel
        ("fp32", 3, 16, tuple(OP_CODES), True, (13, 13)),
        ("fp16", 1, 8, tuple(OP_CODES)[::-1], False, (5, 1)),
        ("bf16", 3, 14, ("blur", "sharpness", "posterize"), False, (1, 5)),
    ]
    for dtype, c, p, names, random_order, (kh, kw) in configs:
        constexprs = dict(C=c, P=p, BLOCK=max(16, triton.next_power_of_2(p)), K=len(names),
                          CODES=sum(OP_CODES[n] << (4 * k) for k, n in enumerate(names)),
                          HAS_ORDER=random_order, KH=kh, KW=kw)
        pointers = {"in_ptr": "*" + dtype, "out_ptr": "*" + dtype, "values_ptr": "*fp32",
                    "gates_ptr": "*u8", "order_ptr": "*u8", "noise_ptr": "*fp32",
                    "noise_row_ptr": "*i64"}
        signature = {a: pointers.get(a, "constexpr" if a in constexprs else "i32")
                     for a in kernel.arg_names}
        try:
            compiled = triton.compile(ASTSource(kernel, signature, constexprs=constexprs),
                                      target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
        except RuntimeError as error:
            if "ptxas" in str(error).lower():
                raise SystemExit("SKIP " + str(error)) from None
            raise
        assert compiled.asm["cubin"], (dtype, c, p)
    print("compiled", len(configs))
""")


def test_kernel_compiles_for_a_cuda_target() -> None:
    pytest.importorskip("triton")
    assert_compiles(_COMPILE_SCRIPT, 3)
