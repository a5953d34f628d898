"""The restricted unpickler: plain data loads, anything that could run code is refused."""

from __future__ import annotations

import builtins
import io
import os
import pickle
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pwself_reference.evaluation.retrieval import load_gnd
from pwself_reference.safe_pickle import RefusedGlobalError, load_plain_pickle, loads_plain_pickle

PROTOCOLS = range(pickle.HIGHEST_PROTOCOL + 1)

_leaves = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
    | st.complex_numbers(allow_nan=False, allow_infinity=False) | st.text(max_size=8)
    | st.binary(max_size=300)
)
_keys = st.text(max_size=4) | st.binary(max_size=4) | st.integers()
_plain = st.recursive(
    _leaves,
    lambda inner: (
        st.lists(inner, max_size=4) | st.tuples(inner, inner)
        | st.dictionaries(_keys, inner, max_size=4)
        | st.frozensets(st.integers() | st.text(max_size=3), max_size=4)
        | st.sets(st.binary(max_size=3), max_size=3)
    ),
    max_leaves=12,
)


@settings(max_examples=40)
@given(obj=_plain, protocol=st.sampled_from(PROTOCOLS))
def test_plain_data_round_trips(obj, protocol):
    assert loads_plain_pickle(pickle.dumps(obj, protocol=protocol)) == obj


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("dtype", ["uint8", "int64", "float32", "bool", "complex128", "<U3"])
def test_numeric_arrays_and_scalars_round_trip(protocol, dtype):
    rng = np.random.default_rng(0)
    arr = (rng.integers(0, 200, (3, 5)) * 1.5).astype(dtype)
    obj = {b"data": arr, "fortran": np.asfortranarray(arr), "scalar": arr.reshape(-1)[7],
           "empty": np.zeros((0, 2), dtype), "labels": [1, 2, 3]}
    out = loads_plain_pickle(pickle.dumps(obj, protocol=protocol))
    for key in (b"data", "fortran", "empty"):
        assert out[key].dtype == np.dtype(dtype) and out[key].shape == obj[key].shape
        np.testing.assert_array_equal(out[key], obj[key])
    assert out["scalar"] == obj["scalar"] and type(out["scalar"]) is type(obj["scalar"])
    assert out["labels"] == [1, 2, 3]


def test_reads_paths_and_file_objects(tmp_path):
    obj = {"a": np.arange(4.0), "b": (1, "x")}
    path = tmp_path / "x.pkl"
    path.write_bytes(pickle.dumps(obj, protocol=2))
    for source in (path, str(path), io.BytesIO(path.read_bytes())):
        out = load_plain_pickle(source)
        assert out["b"] == (1, "x") and out["a"].tolist() == [0.0, 1.0, 2.0, 3.0]
    with open(path, "rb") as f:
        assert load_plain_pickle(f)["b"] == (1, "x")
    with pytest.raises(TypeError, match="path_or_file"):
        load_plain_pickle(123)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="encoding"):
        load_plain_pickle(path, encoding=None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="data must be bytes"):
        loads_plain_pickle("not bytes")  # type: ignore[arg-type]


def test_python2_strings_decode_as_latin1_or_stay_bytes():
    # a Python 2 str: SHORT_BINSTRING, as in the CIFAR files written by Python 2
    blob = b"\x80\x02}q\x00U\x04dataq\x01U\x03\xe9t\xe9q\x02s."
    assert loads_plain_pickle(blob) == {"data": "\xe9t\xe9"}
    assert loads_plain_pickle(blob, encoding="bytes") == {b"data": b"\xe9t\xe9"}


class SystemCall:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class EvalCall:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (builtins.eval, (f"open({str(self.marker)!r}, 'w').close()",))


class Point:
    def __init__(self, x):
        self.x = x


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("make, name", [
    (SystemCall, "system"), (EvalCall, "eval"),
    (lambda marker: Point(3), "Point"), (lambda marker: print, "print"),
])
def test_code_is_refused_naming_the_global(tmp_path, protocol, make, name):
    marker = tmp_path / "marker"
    blob = pickle.dumps({"data": [1, make(marker)]}, protocol=protocol)
    with pytest.raises(pickle.UnpicklingError, match=rf"refusing to load global \S*\.{name}\b"
                       ) as info:
        loads_plain_pickle(blob)
    assert isinstance(info.value, RefusedGlobalError) and isinstance(info.value, ValueError)
    assert info.value.name == name
    assert not marker.exists()
    # the unrestricted unpickler would have run it: the test's payload is live
    if make is SystemCall or make is EvalCall:
        pickle.loads(blob)
        assert marker.exists()


def test_gnd_loader_refuses_code(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "gnd_roxford5k.pkl"
    path.write_bytes(pickle.dumps(
        {"imlist": ["a"], "qimlist": ["q"], "gnd": [SystemCall(marker)]}, protocol=2))
    with pytest.raises(pickle.UnpicklingError, match=r"gnd_roxford5k\.pkl.*global posix\.system"
                       ) as info:
        load_gnd(path)
    assert isinstance(info.value, ValueError) and info.value.module == "posix"
    assert not marker.exists()
    path.write_bytes(pickle.dumps({"imlist": ["a"], "qimlist": ["q"], "gnd": [EvalCall(marker)]}))
    with pytest.raises(pickle.UnpicklingError, match=r"global builtins\.eval"):
        load_gnd(path)
    assert not marker.exists()


def _global_call(module, name, *args):
    """A protocol-2 pickle calling ``module.name(*args)`` (str and int arguments)."""
    out = b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"("
    for a in args:
        if isinstance(a, str):
            out += b"X" + struct.pack("<I", len(a.encode())) + a.encode()
        else:
            out += b"J" + struct.pack("<i", a)
    return out + b"tR."


def test_allowed_globals_are_only_used_as_plain_data():
    assert loads_plain_pickle(_global_call("_codecs", "encode", "ab\xe9", "latin1")) == b"ab\xe9"
    assert loads_plain_pickle(_global_call("_codecs", "encode", "ab", "latin-1")) == b"ab"
    with pytest.raises(pickle.UnpicklingError, match="latin-1 codec"):
        loads_plain_pickle(_global_call("_codecs", "encode", "ab", "rot13"))
    assert loads_plain_pickle(_global_call("__builtin__", "bytes")) == b""
    with pytest.raises(pickle.UnpicklingError, match="bytes"):  # bytes(n) would allocate n bytes
        loads_plain_pickle(_global_call("__builtin__", "bytes", 2**31 - 1))
    for module, name in [("os", "system"), ("subprocess", "Popen"), ("numpy", "load"),
                         ("numpy.core.multiarray", "frombuffer"), ("torch", "load")]:
        with pytest.raises(RefusedGlobalError, match=rf"global {module}\.{name}:"):
            loads_plain_pickle(_global_call(module, name, "x"))


def test_object_arrays_and_persistent_ids_are_refused():
    for arr in (np.array([1, "a"], dtype=object), np.zeros(2, dtype=[("a", "O"), ("b", "i4")])):
        with pytest.raises(pickle.UnpicklingError, match="object"):
            loads_plain_pickle(pickle.dumps({"x": arr}, protocol=2))

    class WithPid(pickle.Pickler):
        def persistent_id(self, obj):
            return "ext" if obj == "secret" else None

    buf = io.BytesIO()
    WithPid(buf, protocol=2).dump(["secret"])
    with pytest.raises(pickle.UnpicklingError, match="persistent id"):
        loads_plain_pickle(buf.getvalue())


def test_truncated_data_is_an_unpickling_error_not_a_crash():
    blob = pickle.dumps({"a": np.arange(10)}, protocol=2)
    with pytest.raises((pickle.UnpicklingError, EOFError)):
        loads_plain_pickle(blob[: len(blob) // 2])
