"""Load pickles that hold plain data only (no code runs while loading).

Some public datasets ship as pickles: the python version of CIFAR-10/100
(written by Python 2) and the revisitop ground-truth files of Oxford/Paris.
:func:`load_plain_pickle` reads them with an unpickler that resolves only a
short allow-list of globals, enough to rebuild

* dicts, lists, tuples, sets, ``str``, ``bytes``, ``int``, ``float``,
  ``complex``, ``bool`` and ``None`` (these need no global at all, except the
  protocol-2 spelling of ``bytes``, ``set``, ``frozenset`` and ``complex``);
* numpy arrays and scalars of a numeric, boolean or string dtype.

Any other global (``os.system``, ``builtins.eval``, a class of some module, ...)
is refused with :class:`RefusedGlobalError`, a :class:`pickle.UnpicklingError`,
*before* it is looked up, so nothing is imported or called. Object arrays are
refused after loading (their elements went through the same allow-list, so
nothing ran, but they are not plain numeric data).
"""

from __future__ import annotations

import builtins
import codecs
import io
import os
import pickle
from typing import IO, Any

import numpy as np

__all__ = ["RefusedGlobalError", "load_plain_pickle", "loads_plain_pickle"]


class RefusedGlobalError(pickle.UnpicklingError, ValueError):
    """A pickle names a global outside the allow-list of :func:`load_plain_pickle`.

    Subclasses both :class:`pickle.UnpicklingError` and :class:`ValueError` (bad
    input). ``module`` and ``name`` hold the refused global (empty for a refused
    object array).
    """

    def __init__(self, message: str, module: str = "", name: str = "") -> None:
        super().__init__(message)
        self.module = module
        self.name = name


try:  # numpy >= 2
    from numpy._core import multiarray as _multiarray
    from numpy._core import numeric as _numeric
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as _multiarray  # type: ignore[no-redef]
    from numpy.core import numeric as _numeric  # type: ignore[no-redef]


def _latin1_encode(text: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles of ``bytes`` use it: latin-1 text only."""
    if not isinstance(text, str):
        raise pickle.UnpicklingError(
            f"_codecs.encode: expected str, got {type(text).__name__}"
        )
    if codecs.lookup(encoding).name != "iso8859-1":
        raise pickle.UnpicklingError(
            f"_codecs.encode: only the latin-1 codec is allowed, got {encoding!r}"
        )
    return text.encode("latin-1", errors)


def _plain_bytes(*args: Any) -> bytes:
    """``bytes()`` / ``bytes(b)`` as pickles use it; no ``bytes(n)`` allocation by count."""
    if args and not isinstance(args[0], (bytes, bytearray, str)):
        raise pickle.UnpicklingError(
            f"bytes: expected no argument or a bytes/str value, got {type(args[0]).__name__}"
        )
    return builtins.bytes(*args)


def _plain_dtype(*args: Any) -> np.dtype:
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise RefusedGlobalError("refusing to build an object dtype: only numeric arrays load")
    return dtype


def _plain_frombuffer(buf: Any, dtype: Any, shape: Any, order: str, axis_order: Any = None) -> Any:
    """numpy's protocol-5 array rebuild, for dtypes built by :func:`_plain_dtype` only."""
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise RefusedGlobalError("refusing an array without a plain numeric dtype")
    return _numeric._frombuffer(buf, dtype, shape, order, axis_order)


_ALLOWED: dict[tuple[str, str], Any] = {}
for _module in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _ALLOWED[(_module, "_reconstruct")] = _multiarray._reconstruct
    _ALLOWED[(_module, "scalar")] = _multiarray.scalar
for _module in ("numpy.core.numeric", "numpy._core.numeric"):  # protocol 5
    _ALLOWED[(_module, "_frombuffer")] = _plain_frombuffer
_ALLOWED[("numpy", "ndarray")] = np.ndarray
_ALLOWED[("numpy", "dtype")] = _plain_dtype
# protocol-2 pickles write bytes as _codecs.encode(latin-1 text, "latin1") (or bytes() when
# empty), sets as set([...]) and complex numbers as complex(re, im)
_ALLOWED[("_codecs", "encode")] = _latin1_encode
for _module in ("builtins", "__builtin__"):
    _ALLOWED[(_module, "bytes")] = _plain_bytes
    _ALLOWED[(_module, "set")] = set
    _ALLOWED[(_module, "frozenset")] = frozenset
    _ALLOWED[(_module, "complex")] = complex
del _module


class _PlainUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals in ``_ALLOWED`` (never imports anything)."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise RefusedGlobalError(
                f"refusing to load global {module}.{name}: only plain containers, "
                "str/bytes/numbers and numeric numpy arrays may be unpickled",
                module,
                name,
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise RefusedGlobalError(f"refusing persistent id {pid!r}: not plain data")


def _refuse_object_arrays(obj: Any) -> None:
    stack = [obj]
    seen: set[int] = set()
    while stack:
        item = stack.pop()
        if isinstance(item, np.ndarray):
            if item.dtype.hasobject:
                raise RefusedGlobalError(
                    "refusing an object array: only numeric numpy arrays may be unpickled"
                )
        elif isinstance(item, (dict, list, tuple, set, frozenset)):
            if id(item) in seen:
                continue
            seen.add(id(item))
            if isinstance(item, dict):
                stack.extend(item.keys())
                stack.extend(item.values())
            else:
                stack.extend(item)


def loads_plain_pickle(data: bytes, encoding: str = "latin1") -> Any:
    """:func:`load_plain_pickle` from bytes already in memory."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    return load_plain_pickle(io.BytesIO(bytes(data)), encoding=encoding)


def load_plain_pickle(
    path_or_file: str | os.PathLike[str] | IO[bytes], encoding: str = "latin1"
) -> Any:
    """Load a pickle that may only hold plain containers, str/bytes/numbers and numeric arrays.

    Parameters
    ----------
    path_or_file : str, PathLike or binary file
        The pickle file, or an open binary file positioned at the pickle.
    encoding : str
        How Python 2 ``str`` objects are decoded (``"latin1"`` keeps the bytes of
        numpy arrays written by Python 2 intact, as numpy requires; ``"bytes"``
        keeps them as ``bytes``).

    Returns
    -------
    object
        The unpickled object.

    Raises
    ------
    RefusedGlobalError
        (a :class:`pickle.UnpicklingError`) when the pickle names any other global,
        e.g. ``os.system`` or ``builtins.eval``; its message names the global.
        Nothing of the refused global is imported or called.
    pickle.UnpicklingError, EOFError
        When the data is not a valid pickle.

    Examples
    --------
    >>> import pickle
    >>> blob = pickle.dumps({b"data": np.arange(3, dtype=np.uint8), b"labels": [1, 2]}, 2)
    >>> obj = loads_plain_pickle(blob)
    >>> obj[b"data"].tolist(), obj[b"labels"]
    ([0, 1, 2], [1, 2])
    >>> try:
    ...     loads_plain_pickle(pickle.dumps(print))
    ... except pickle.UnpicklingError as exc:
    ...     print(exc.module, exc.name)
    builtins print
    """
    if not isinstance(encoding, str):
        raise TypeError(f"encoding must be a str, got {type(encoding).__name__}")
    if isinstance(path_or_file, (str, os.PathLike)):
        with open(path_or_file, "rb") as f:
            obj = _PlainUnpickler(f, encoding=encoding).load()
    elif hasattr(path_or_file, "read") and hasattr(path_or_file, "readline"):
        obj = _PlainUnpickler(path_or_file, encoding=encoding).load()
    else:
        raise TypeError(
            "path_or_file must be a path or a binary file object, "
            f"got {type(path_or_file).__name__}"
        )
    _refuse_object_arrays(obj)
    return obj
