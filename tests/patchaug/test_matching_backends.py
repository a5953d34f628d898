"""The numpy engine of :func:`patchaug.match_patches` against its torch engine.

On CPU the per-line and per-slot stages run on numpy arrays (``matching._match_numpy``);
every other device runs the same code on torch tensors (``matching._match_torch``). Both
engines take the arguments of ``match_patches`` and can run on CPU, so the two are
compared bit for bit here (test_matching_reference.py checks both against the
specification, test_matching.py the public function).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from patchaug import match_patches
from patchaug import matching as M

RULES = ["half", "official", "centre"]


def both(*args, **kwargs):
    """(numpy engine, torch engine) results of the same call."""
    return M._match_numpy(*args, **kwargs), M._match_torch(*args, **kwargs)


def assert_identical(fast, ref):
    for name in ("idx_a", "idx_b", "valid"):
        a, b = getattr(fast, name), getattr(ref, name)
        assert a.dtype == b.dtype and a.device == b.device and a.shape == b.shape, name
        assert torch.equal(a, b), name
    assert fast.idx_a.dtype == torch.int64 and fast.valid.dtype == torch.bool


def test_match_patches_runs_the_numpy_engine_for_cpu_boxes(monkeypatch):
    seen = []
    for name in ("numpy", "torch"):
        real = M._ENGINES[name]

        def spy(*args, _name=name, _real=real, **kwargs):
            seen.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setitem(M._ENGINES, name, spy)
    box = torch.tensor([2.0, 2.0, 10.0, 10.0])
    for args in (((0, 0, 8, 8), (2, 2, 10, 10)), ((0, 0, 8, 8), box), (box, (0, 0, 8, 8)),
                 (box, box.to(torch.int64))):
        seen.clear()
        m = match_patches(*args, 4, 4, rule="centre", cls=False)
        assert seen == ["numpy"]
        assert m.pairs() == M._match_torch(*args, 4, 4, rule="centre", cls=False).pairs()
    assert M._pick_engine("auto", (0, 0, 1, 1), box) == M._pick_engine("auto", box, (0, 0, 1, 1)) == "numpy"
    assert M._pick_engine("auto", box.to("meta"), (0, 0, 1, 1)) == "torch"
    assert M._pick_engine("auto", (0, 0, 1, 1), box.to("meta")) == "torch"


def test_the_engines_keep_the_device_of_their_arrays():
    fast, ref = both((0, 0, 8, 8), torch.tensor([2.0, 2.0, 10.0, 10.0]), 4, 4)
    for m in (fast, ref):
        assert m.idx_a.device.type == "cpu" and m.valid.dtype == torch.bool


# --------------------------------------------------------------------------- random batches


@st.composite
def batches(draw):
    """A batch of B box pairs on a source frame, integer or float, with flips and grids."""
    size = draw(st.integers(1, 6))
    src = draw(st.sampled_from([12, 64, 256]))
    floats = draw(st.booleans())

    def box():
        if floats:
            # quarter pixels make exact half-coverage ties frequent
            x0, y0 = (draw(st.integers(0, 4 * src - 2)) / 4 for _ in range(2))
            x1 = draw(st.integers(int(4 * x0) + 1, 4 * src)) / 4
            y1 = draw(st.integers(int(4 * y0) + 1, 4 * src)) / 4
        else:
            x0, y0 = draw(st.integers(0, src - 1)), draw(st.integers(0, src - 1))
            x1, y1 = draw(st.integers(x0 + 1, src)), draw(st.integers(y0 + 1, src))
        return [x0, y0, x1, y1]

    dtype = torch.float32 if floats else draw(st.sampled_from([torch.int64, torch.float64]))
    box_a = torch.tensor([box() for _ in range(size)], dtype=dtype)
    box_b = torch.tensor([box() for _ in range(size)], dtype=dtype)
    flip_a = torch.tensor(draw(st.lists(st.booleans(), min_size=size, max_size=size)))
    flip_b = torch.tensor(draw(st.lists(st.booleans(), min_size=size, max_size=size)))
    grid = st.tuples(st.integers(1, 16), st.integers(1, 16))
    return box_a, box_b, draw(grid), draw(grid), flip_a, flip_b


@settings(max_examples=50)
@given(batches(), st.sampled_from(RULES), st.booleans())
def test_numpy_and_torch_paths_are_bit_identical(case, rule, cls):
    fast, ref = both(*case, rule=rule, cls=cls)
    assert_identical(fast, ref)
    box_a = case[0]
    assert fast.idx_a.shape == (box_a.shape[0], cls + min(case[2][0], case[3][0]) * min(case[2][1], case[3][1]))


@settings(max_examples=20)
@given(st.integers(0, 2**31 - 1), st.sampled_from(RULES))
def test_identical_on_benchmark_shapes_with_broadcasting(seed, rule):
    """The training step layout: global views (2, 1, B) against local views (1, 8, B)."""
    from patchaug import sample_crop_boxes

    g = torch.Generator().manual_seed(seed)
    glob = torch.stack([sample_crop_boxes(16, 96, 96, (0.4, 1.0), generator=g) for _ in range(2)])
    local = torch.stack([sample_crop_boxes(16, 96, 96, (0.05, 0.4), generator=g) for _ in range(8)])
    fg = torch.rand(2, 16, generator=g) < 0.5
    fl = torch.rand(8, 16, generator=g) < 0.5
    for args in (
        (glob, glob.flip(0), (14, 14), (14, 14), fg, fg.flip(0)),
        (glob[:, None], local[None], (14, 14), (6, 6), fg[:, None], fl[None]),
        (glob[:, None], local[None], (12, 14), (6, 5), fg[:, None], fl[None]),
        (glob[0, 0], local, (7, 9), (4, 3), True, fl),  # one box against many
    ):
        fast, ref = both(*args, rule=rule)
        assert_identical(fast, ref)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize(("grid_a", "grid_b"), [((200, 200), (6, 7)), ((190, 200), (185, 190))])
def test_identical_on_grids_whose_tokens_pass_int16(rule, grid_a, grid_b):
    # the numpy path keeps token parts in the smallest integer dtype that holds them
    g = torch.Generator().manual_seed(5)
    box_a = torch.tensor([[0.0, 0.0, 400.0, 380.0]]).expand(3, 4) + torch.rand(3, 1, generator=g)
    box_b = torch.tensor([[5.0, 3.0, 390.0, 377.0]]).expand(3, 4) - torch.rand(3, 1, generator=g)
    flips = torch.tensor([False, True, True])
    fast, ref = both(box_a, box_b, grid_a, grid_b, flips, flips.flip(0), rule=rule)
    assert_identical(fast, ref)
    assert int(fast.idx_a.max()) > 2**15  # tokens past int16 came through intact
    assert fast.num_valid.min() > 40


def _clear_caches():
    for cached in (M._grid_consts, M._slot_tables, M._slot_tables_numpy):
        cached.cache_clear()


@settings(max_examples=30)
@given(batches(), st.sampled_from(RULES))
def test_without_cached_tables_the_pairs_are_the_same(case, rule):
    # grids too large for the cached subsample and slot tables compute them per call instead
    want = match_patches(*case, rule=rule)
    _clear_caches()
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(M, "_MAX_TABLE_ENTRIES", 0)
            mp.setattr(M, "_MAX_CACHED_OFFSETS", 0)  # slot tables kept, but nothing per batch
            fast_unscaled = match_patches(*case, rule=rule)
            assert M._slot_tables_numpy(3, 3, True, 5)[1::2] == (None, None)
            _clear_caches()
            mp.setattr(M, "_MAX_SLOT_TABLE_ENTRIES", 0)
            fast, ref = both(*case, rule=rule)
            assert M._slot_tables(3, 3, True, torch.device("cpu")) is None
    finally:
        _clear_caches()
    assert_identical(fast_unscaled, want)
    assert_identical(fast, want)
    assert_identical(ref, want)


def test_token_dtype_is_the_smallest_that_holds_the_bound():
    assert M._token_dtype(32767) == np.int16
    assert M._token_dtype(32768) == np.int32
    assert M._token_dtype(2**31) == np.int64


@pytest.mark.parametrize("rule", RULES)
def test_identical_for_unbatched_tuples_and_mixed_inputs(rule):
    cases = [
        ((0, 0, 224, 224), (0, 0, 112, 112), (14, 14), (7, 7), False, True),
        ((0.5, 1.25, 30.75, 17.0), torch.tensor([3.0, 2.0, 20.0, 40.0]), 5, (3, 8), np.bool_(True), False),
        (torch.tensor([0, 0, 8, 8], dtype=torch.int32), (0, 0, 8, 8), 2, 2, torch.tensor(True), False),
        (torch.tensor([1, 2, 30, 20], dtype=torch.uint8), torch.tensor([4.0, 0.0, 25.0, 9.5]).half(), (6, 4),
         (3, 3), False, False),
        (torch.tensor([1.0, 2.0, 30.0, 20.0], dtype=torch.bfloat16), (0, 0, 16, 16), 4, 4, False, True),
        (torch.tensor([0.0, 0.0, 10.0, 10.0], requires_grad=True), (5, 5, 15, 15), 5, 5, False, False),
        ((0, 0, 10, 10), (10, 0, 20, 10), 3, 3, False, False),  # touching: only CLS
        (torch.tensor([1e15, 0, 1e15 + 64, 64], dtype=torch.float64),  # far from the origin
         torch.tensor([1e15 + 32, 16, 1e15 + 96, 80], dtype=torch.float64), 4, 4, True, False),
    ]
    for args in cases:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            fast, ref = both(*args, rule=rule)
        assert_identical(fast, ref)
        assert fast.idx_a.shape == (1 + min(M._as_grid(args[2], "g")[0], M._as_grid(args[3], "g")[0])
                                    * min(M._as_grid(args[2], "g")[1], M._as_grid(args[3], "g")[1]),)


def test_outputs_have_the_layout_of_the_batch():
    box_a = torch.tensor([[0.0, 0.0, 32.0, 32.0]]).expand(3, 5, 4)
    box_b = torch.rand(5, 4) * 16 + torch.tensor([0.0, 0.0, 16.0, 16.0])
    fast, ref = both(box_a, box_b, (8, 8), (4, 4), False, torch.rand(3, 1) < 0.5)
    assert_identical(fast, ref)
    assert fast.idx_a.shape == (3, 5, 17) and fast.valid.shape == (3, 5, 17)
    assert fast.num_valid.shape == (3, 5)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("shape", [(0, 4), (3, 0, 4)])
def test_an_empty_batch_gives_empty_outputs(rule, shape):
    fast, ref = both(torch.zeros(shape), (0, 0, 4, 4), 2, (2, 3), rule=rule)
    assert_identical(fast, ref)
    assert fast.idx_a.shape == shape[:-1] + (5,) and fast.valid.shape == shape[:-1] + (5,)


# --------------------------------------------------------------------------- pieces


@settings(max_examples=30)
@given(st.lists(st.tuples(st.integers(0, 40), st.integers(0, 40)), min_size=1, max_size=8),
       st.booleans())
def test_subsample_is_the_same_on_numpy_and_torch(pairs, official):
    n_big = np.array([max(a, b) for a, b in pairs], dtype=np.float64)
    n_small = np.array([min(a, b) for a, b in pairs], dtype=np.float64)
    i = np.arange(41, dtype=np.float64)[:, None]
    got = M._subsample(i, n_big, n_small, official)
    want = M._subsample(torch.from_numpy(i), torch.from_numpy(n_big), torch.from_numpy(n_small), official)
    assert isinstance(got, np.ndarray) and isinstance(want, torch.Tensor)
    np.testing.assert_array_equal(got, want.numpy())
    # the slots that are used: floor(i (n_big - 1) / (n_small - 1)), or numpy's linspace
    for col, (big, small) in enumerate(zip(n_big.astype(int), n_small.astype(int))):
        if official:
            ref = np.floor(np.linspace(0, big - 1, small)).tolist()
        else:
            ref = [0 if small == 1 else (k * (big - 1)) // (small - 1) for k in range(small)]
        assert got[:small, col].tolist() == ref


@pytest.mark.parametrize("rule", RULES)
def test_line_stage_is_the_same_on_numpy_and_torch(rule):
    g = torch.Generator().manual_seed(3)
    lo = torch.rand(2, 2, 50, generator=g, dtype=torch.float64) * 40
    hi = lo + 1 + torch.rand(2, 2, 50, generator=g, dtype=torch.float64) * 40
    lo[..., :10] = lo[..., :10].round()  # integer boxes too
    hi[..., :10] = hi[..., :10].round() + 1
    cpu = torch.device("cpu")
    c_np = M._grid_consts(7, 5, 3, 4, cpu, torch.float64, True)
    c_t = M._grid_consts(7, 5, 3, 4, cpu, torch.float64, False)
    got = M._lines(M._NumpyOps, lo.numpy(), hi.numpy(), (hi - lo).numpy(), c_np, rule)
    want = M._lines(M._TorchOps, lo, hi, hi - lo, c_t, rule)
    for k in got._fields:
        g, w = getattr(got, k), getattr(want, k)
        assert (g is None) == (w is None) == (rule != "centre" and k in ("query", "step", "offset",
                                                                          "den")), k
        if w is not None:
            np.testing.assert_array_equal(np.asarray(g), w.numpy(), err_msg=k)
    if rule == "centre":  # exactly one query line per axis
        assert bool((want.query[0] ^ want.query[1]).all())


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"box_a": (1, 0, 1, 4)}, ValueError, "box_a must satisfy"),
        ({"box_b": torch.tensor([[0.0, 0, 4, 4], [0, 5, 4, 4]])}, ValueError, "box_b must satisfy"),
        ({"box_a": (0, 0, math.nan, 4)}, ValueError, "box_a must be finite"),
        ({"box_b": torch.tensor([0, 0, math.inf, 4])}, ValueError, "box_b must be finite"),
        ({"box_a": torch.zeros(3)}, ValueError, r"box_a must have shape \(\.\.\., 4\)"),
        ({"box_a": torch.tensor(1.0)}, ValueError, "box_a must have shape"),
        ({"box_b": torch.ones(4, dtype=torch.bool)}, TypeError, "box_b must hold real numbers"),
        ({"box_a": torch.ones(4, dtype=torch.complex64)}, TypeError, "box_a must hold real numbers"),
        ({"box_a": "abcd"}, TypeError, "box_a must be a tensor or sequence"),
        ({"box_a": (True, False, True, True)}, TypeError, "box_a must hold real numbers"),
        ({"flip_a": 1}, TypeError, "flip_a must be a bool"),
        ({"flip_b": torch.tensor([0, 1])}, TypeError, "flip_b must be a bool tensor"),
        ({"box_a": torch.zeros(3, 4) + torch.tensor([0, 0, 1, 1]),
          "box_b": torch.zeros(2, 4) + torch.tensor([0, 0, 1, 1])}, ValueError, "broadcastable leading shapes"),
        ({"flip_b": torch.zeros(3, dtype=torch.bool), "box_a": torch.zeros(2, 4) + torch.tensor([0, 0, 1, 1])},
         ValueError, "broadcastable leading shapes"),
    ],
)
@pytest.mark.parametrize("engine", ["_match_numpy", "_match_torch", "match_patches"])
def test_both_engines_raise_the_same_errors(kwargs, exc, match, engine):
    args = {"box_a": (0, 0, 4, 4), "box_b": (0, 0, 4, 4), "grid_a": (2, 2), "grid_b": (2, 2)}
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        getattr(M, engine)(**args)


def test_cached_numpy_constants_are_read_only():
    consts = M._grid_consts(14, 14, 6, 6, torch.device("cpu"), torch.float64, True)
    assert consts.sub_half is not None and consts.sub_official is not None
    for v in consts:
        assert isinstance(v, np.ndarray) and not v.flags.writeable
