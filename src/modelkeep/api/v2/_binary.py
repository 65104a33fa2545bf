"""Binary side of the V2 tensor codec (the binary tensor data extension).

Fixed-size tensors are little-endian, row-major, ``elements * itemsize`` bytes. ``BYTES`` tensors
are a sequence of items, each a 4-byte little-endian length followed by that many bytes. Every
function here is handed a slice whose size was already checked against the declared shape.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

from modelkeep.api.v2._json import shown
from modelkeep.errors import InvalidInput

_LENGTH = struct.Struct("<I")


def binary_size(datatype: str, dtype: np.dtype[Any], count: int) -> int | None:
    """The exact byte size of a fixed-size tensor, or ``None`` for ``BYTES`` (variable)."""
    return None if datatype == "BYTES" else count * dtype.itemsize


def binary_array(
    name: str,
    chunk: memoryview,
    datatype: str,
    dtype: np.dtype[Any],
    shape: tuple[int, ...],
    count: int,
) -> np.ndarray:
    """Build the tensor from its binary ``chunk`` (zero-copy for fixed-size types)."""
    if datatype == "BYTES":
        return _binary_strings(name, chunk, count).reshape(shape)
    array = np.frombuffer(chunk, dtype=dtype.newbyteorder("<"), count=count)
    if datatype == "BOOL" and count and array.view(np.uint8).max() > 1:
        raise InvalidInput(f"input {shown(name)} has BOOL bytes other than 0 and 1")
    return array.reshape(shape)


def _binary_strings(name: str, chunk: memoryview, count: int) -> np.ndarray:
    items: list[str] = []
    end = len(chunk)
    position = 0
    try:
        for _ in range(count):
            if end - position < _LENGTH.size:
                raise InvalidInput(f"input {shown(name)} has fewer BYTES items than its shape")
            (length,) = _LENGTH.unpack_from(chunk, position)
            position += _LENGTH.size
            if length > end - position:
                raise InvalidInput(f"input {shown(name)} has a BYTES item longer than its data")
            items.append(str(chunk[position : position + length], "utf-8"))
            position += length
    except UnicodeDecodeError:
        # ONNX strings are UTF-8 and the runtime only takes text.
        raise InvalidInput(f"input {shown(name)} holds bytes that are not UTF-8 text") from None
    if position != end:
        raise InvalidInput(f"input {shown(name)} has more binary data than its shape needs")
    array = np.empty(count, dtype=object)
    array[:] = items
    return array


def binary_bytes(array: np.ndarray, datatype: str) -> bytes:
    """Serialise an output tensor for the binary extension."""
    if datatype == "BYTES":
        parts: list[bytes] = []
        for value in array.ravel().tolist():
            raw = value.encode("utf-8") if isinstance(value, str) else bytes(value)
            parts.append(_LENGTH.pack(len(raw)))
            parts.append(raw)
        return b"".join(parts)
    little = array.dtype.newbyteorder("<")
    return np.ascontiguousarray(array, dtype=little).tobytes()
