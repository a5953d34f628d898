"""The blocked torch engine equals the reference engine, for any blocking; its scratch memory."""

from __future__ import annotations

import copy
import pickle
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import patchaug.blocked_engine as be
import patchaug.blocked_ops as po
from patchaug.patch_jitter import PatchJitter, PatchJitterParams, apply_reference

from .jitter_cases import CONFIGS, everything, images, to_patches


def run_in_blocks(
    jitter: PatchJitter, x: torch.Tensor, params: PatchJitterParams, patches_per_block: int
) -> torch.Tensor:
    """``jitter(x, params=params)`` on the torch engine with blocks of ``patches_per_block``."""
    pixels = patches_per_block * jitter.patch_size**2
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(be, "_CPU_BLOCK_PIXELS", pixels)
        mp.setattr(be, "_CPU_LARGE_BLOCK_PIXELS", pixels)
        # and hue rotated two patches at a time (several chunks per block)
        mp.setattr(po, "_CPU_BLOCK_PIXELS", 2 * jitter.patch_size**2)
        mp.setattr(po, "_CPU_LARGE_BLOCK_PIXELS", 2 * jitter.patch_size**2)
        return jitter(x, params=params)


@settings(max_examples=12, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    config=st.sampled_from(sorted(CONFIGS)),
    c=st.sampled_from([1, 3]),
)
def test_any_blocking_equals_the_reference_engine(seed: int, config: str, c: int) -> None:
    # 4 images of 3 x 2 patches: blocks of one patch row, of two rows (4 + 2 patches: blocks of
    # unequal size), of whole images, of several images, and a single block
    jitter = CONFIGS[config](backend="torch")
    x = images(seed, b=4, c=c, gh=3, gw=2)
    params = jitter.sample_params(4, 24, 16, generator=torch.Generator().manual_seed(seed))
    want = apply_reference(x, jitter.operators, params)
    for per_block in (1, 4, 6, 13, 10**6):
        got = run_in_blocks(jitter, x, params, per_block)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_blocks_keep_the_dtype_and_untouched_patches(dtype: torch.dtype) -> None:
    jitter = everything(p_patch=0.5)
    x = images(3, b=3).to(dtype)
    params = jitter.sample_params(3, 16, 24, generator=torch.Generator().manual_seed(3))
    got = run_in_blocks(jitter, x, params, 2)
    assert got.dtype == dtype and got.is_contiguous()
    want = apply_reference(x, jitter.operators, params)
    torch.testing.assert_close(got, want, atol=1e-3 if dtype == torch.float16 else 1e-12, rtol=0)
    untouched = ~params.applied.flatten()
    assert untouched.any()
    assert torch.equal(to_patches(got, 8)[untouched], to_patches(x, 8)[untouched])


@pytest.mark.parametrize(
    ("batch", "rows", "cols", "target"),
    [(1, 1, 1, 1), (3, 2, 3, 1), (3, 2, 3, 4), (3, 2, 3, 6), (5, 2, 3, 13), (2, 7, 5, 11),
     (4, 3, 3, None)],
)
def test_blocks_cover_every_patch_once_in_order(
    batch: int, rows: int, cols: int, target: int | None
) -> None:
    p = 4
    blocks = be._blocks(batch, rows, cols, p, target)
    x = torch.arange(batch * rows * p * cols * p, dtype=torch.float64).reshape(
        batch, 1, rows * p, cols * p
    )
    patches = to_patches(x, p)
    assert blocks[0][0] == 0 and blocks[-1][1] == batch * rows * cols
    for (start, stop, images_, pixel_rows), nxt in zip(blocks, blocks[1:] + [None]):
        assert stop > start and (nxt is None or nxt[0] == stop)
        assert stop - start <= blocks[0][1] - blocks[0][0]
        if target is not None and stop - start > target:
            assert stop - start == cols  # never more than one patch row above the target
        assert torch.equal(to_patches(x[images_, :, pixel_rows], p), patches[start:stop])


def test_block_size_depends_on_device_and_threads() -> None:
    assert be._block_patches(torch.device("cuda"), 16) is None
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = be._block_patches(torch.device("cpu"), 16)
        torch.set_num_threads(2)
        two = be._block_patches(torch.device("cpu"), 16)
    finally:
        torch.set_num_threads(threads)
    assert one is not None and two is not None and 1 <= one <= two


# ------------------------------------------------------------------ scratch between calls
def test_cpu_scratch_is_kept_and_reused_between_calls() -> None:
    jitter = PatchJitter.paper(8)
    x = images(0, b=3)
    params = jitter.sample_params(3, 16, 24, generator=torch.Generator().manual_seed(0))
    first = jitter(x, params=params)
    (ws,) = jitter._blocked._free
    arena = ws._buffers["arena"].data_ptr()
    assert torch.equal(jitter(x, params=params), first)
    assert jitter._blocked._free == [ws] and ws._buffers["arena"].data_ptr() == arena


def test_scratch_is_neither_pickled_nor_deep_copied() -> None:
    jitter = PatchJitter.paper(8)
    x = images(1)
    params = jitter.sample_params(2, 16, 24, generator=torch.Generator().manual_seed(1))
    out = jitter(x, params=params)
    assert jitter._blocked._free  # filled by the call
    for clone in (pickle.loads(pickle.dumps(jitter)), copy.deepcopy(jitter)):
        assert clone._blocked._free == []
        assert torch.equal(clone(x, params=params), out)


def test_concurrent_calls_from_threads_do_not_share_scratch() -> None:
    jitter = PatchJitter.authors(8)  # random order: the most scratch in use
    cases = []
    for seed in range(8):
        x = images(seed, b=3)
        params = jitter.sample_params(3, 16, 24, generator=torch.Generator().manual_seed(seed))
        cases.append((x, params, jitter(x, params=params)))
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda case: jitter(case[0], params=case[1]), cases * 4))
    for (_, _, want), got in zip(cases * 4, outs):
        assert torch.equal(got, want)
