"""``application/x-npy`` bodies, read without ever letting numpy unpickle or over-allocate.

``np.load`` is not used: it would trust the header. The checklist below reads the header with
numpy's own literal-only parser (``numpy.lib.format``, which never evaluates code), refuses
object and structured dtypes (the only way an .npy file can carry a pickle), checks the
declared shape against the signature and ``max_elements`` and the byte count against the body,
and only then wraps the data, zero-copy, in an array.
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
from numpy.lib import format as npy_format

from modelkeep.errors import InvalidInput
from modelkeep.runtime.signature import MAX_RANK, ModelSignature, numpy_dtype

from .._rows import RowRequest, checked_shape, only_input, shown

__all__ = ["NPY_CONTENT_TYPE", "read_npy", "write_npy"]

NPY_CONTENT_TYPE = "application/x-npy"
# numpy's own default: a header longer than this is refused before it is parsed.
_MAX_HEADER = 10_000
_NUMERIC_KINDS = "biuf"


def read_npy(body: bytes, signature: ModelSignature, max_elements: int) -> RowRequest:
    """The one input of ``signature`` from an .npy body; InvalidInput or TooLarge otherwise."""
    spec = only_input(signature, NPY_CONTENT_TYPE)
    stream = io.BytesIO(body)
    # 1. Magic and a format version whose header numpy parses as a literal (1.0 and 2.0).
    try:
        version = npy_format.read_magic(stream)
    except ValueError:
        raise InvalidInput("the body is not an .npy array (bad magic string)") from None
    try:
        if version == (1, 0):
            shape, fortran, dtype = npy_format.read_array_header_1_0(stream, _MAX_HEADER)
        elif version == (2, 0):
            shape, fortran, dtype = npy_format.read_array_header_2_0(stream, _MAX_HEADER)
        else:
            raise InvalidInput(f"npy format version {version[0]}.{version[1]} is not supported")
    except (ValueError, SyntaxError, TypeError, OverflowError, RecursionError, MemoryError):
        raise InvalidInput("the .npy header is malformed") from None
    # 2. Plain numbers only: object and structured dtypes are how pickles get in.
    if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None:
        raise InvalidInput("the .npy array must hold plain numbers (object arrays are refused)")
    if dtype.kind not in _NUMERIC_KINDS:
        raise InvalidInput(f"the .npy array has dtype {dtype.str}; send numbers")
    # 3. The declared shape fits the signature and the element limit, before any data is read.
    if len(shape) > MAX_RANK:
        raise InvalidInput(f"the .npy array has more than {MAX_RANK} dimensions")
    if spec.datatype == "BYTES":
        raise InvalidInput(f"input {shown(spec.name)} takes text; send JSON")
    declared, count = checked_shape(spec, shape, max_elements)
    # 4. The data is exactly as long as the header says.
    offset = stream.tell()
    size = math.prod(declared) * dtype.itemsize
    if len(body) - offset != size:
        raise InvalidInput(
            f"the .npy data holds {len(body) - offset} bytes; its header declares {size}"
        )
    # 5. Only now an array: a view of the body, cast to the input's dtype when they differ.
    array: np.ndarray[Any, Any] = np.frombuffer(body, dtype=dtype, count=count, offset=offset)
    array = array.reshape(declared, order="F" if fortran else "C")
    return RowRequest(
        inputs={spec.name: _as_datatype(spec.name, array, numpy_dtype(spec.datatype))},
        form="npy",
    )


def _as_datatype(name: str, array: np.ndarray, target: np.dtype[Any]) -> np.ndarray:
    """``array`` as ``target``: exact, or a cast that keeps the kind of number (float64 to
    float32 is fine; float to int or a wrapping int cast is refused)."""
    if array.dtype == target:
        return array
    source = array.dtype
    if target.kind == "b":
        if source.kind != "b":
            raise InvalidInput(f"input {shown(name)} needs booleans")
        return array.astype(target)
    if target.kind in "iu":
        if source.kind not in "biu":
            raise InvalidInput(f"input {shown(name)} needs integers, not {source.str}")
        if array.size and not np.can_cast(source, target, "safe"):
            info = np.iinfo(target)
            if array.min() < info.min or array.max() > info.max:
                raise InvalidInput(f"input {shown(name)} has values out of range")
        return array.astype(target)
    # A float target takes any number; overflow to inf is the IEEE answer, as for JSON.
    with np.errstate(over="ignore"):
        return array.astype(target)


def write_npy(array: np.ndarray) -> bytes:
    """``array`` as .npy bytes, never pickled (``allow_pickle=False``)."""
    if array.dtype.hasobject:
        raise InvalidInput("this output holds text, which .npy cannot carry without pickle")
    stream = io.BytesIO()
    np.save(stream, np.ascontiguousarray(array), allow_pickle=False)
    return stream.getvalue()
