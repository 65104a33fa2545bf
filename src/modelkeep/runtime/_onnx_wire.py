"""ONNX bytes split into a small graph and its large weights, without parsing the weights.

Parsing a serialized ``ModelProto`` copies every tensor's bytes into the parsed message, so a
model held as bytes and parsed is in memory twice (three times inside ONNX Runtime, which copies
the bytes into a string of its own first). :func:`split_weights` reads the protobuf wire format
itself (the ``onnx`` and ``protobuf`` packages have no parser that leaves a field's bytes where
they lie) and returns:

- the *skeleton*: the model with the ``raw_data`` of each large top-level initializer left out,
  every other byte as it was, so that it parses to the same model with those tensors hollow
  (name, type and dims, no data);
- the *weights*: each left-out tensor as a NumPy array over the original bytes (a view: no
  copy), shaped and typed as its TensorProto says, and where its bytes start in the original
  (so that a runtime can map them from a file holding the original bytes).

Only plain tensors are left out: an initializer of the main graph whose fields are exactly a
name, a data type NumPy holds, dims and one ``raw_data`` of the size they
declare. Anything else (data in ``float_data`` and the other typed fields, external data,
segments, initializers of subgraphs or training graphs) stays in the skeleton
byte for byte, where the usual parse sees it and the usual checks refuse what they refuse.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from dataclasses import dataclass
from math import prod

import numpy as np

__all__ = ["MIN_SPLIT_BYTES", "MalformedModel", "Split", "split_weights"]

# Smaller tensors stay in the skeleton: they cost little there, and ONNX shape inference and
# graph optimisers read small constants (Reshape's shape, Clip's bounds) from the graph itself.
MIN_SPLIT_BYTES = 16 * 1024

# Field numbers from onnx.proto.
_MODEL_GRAPH = 7
_GRAPH_INITIALIZER = 5
_TENSOR_DIMS = 1
_TENSOR_DATA_TYPE = 2
_TENSOR_NAME = 8
_TENSOR_RAW_DATA = 9
_TENSOR_DOC_STRING = 12
_PLAIN_TENSOR_FIELDS = frozenset(
    {_TENSOR_DIMS, _TENSOR_DATA_TYPE, _TENSOR_NAME, _TENSOR_RAW_DATA, _TENSOR_DOC_STRING}
)
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5

# TensorProto.DataType -> the little-endian NumPy type of its raw_data. BOOL is left out (a
# byte other than 0 or 1 is not a NumPy bool), as are the types NumPy has no dtype for.
_DTYPES: dict[int, np.dtype[np.generic]] = {
    1: np.dtype("<f4"),
    2: np.dtype("u1"),
    3: np.dtype("i1"),
    4: np.dtype("<u2"),
    5: np.dtype("<i2"),
    6: np.dtype("<i4"),
    7: np.dtype("<i8"),
    10: np.dtype("<f2"),
    11: np.dtype("<f8"),
    12: np.dtype("<u4"),
    13: np.dtype("<u8"),
}


class MalformedModel(ValueError):
    """The bytes are not a well-formed protobuf message (truncated, or a bad tag or length), or
    two initializers of the graph share a name."""


@dataclass(frozen=True, slots=True)
class Split:
    """A model's skeleton and the weights left out of it (views over the original bytes, and
    the offset in those bytes where each begins)."""

    skeleton: bytes
    weights: dict[str, np.ndarray]
    offsets: dict[str, int]


@dataclass(frozen=True, slots=True)
class _Field:
    number: int
    wire_type: int
    start: int  # where the field's tag begins
    value: int  # where its value (after any length) begins
    end: int  # where the field ends


def split_weights(data: bytes | mmap.mmap, *, min_bytes: int = MIN_SPLIT_BYTES) -> Split:
    """Split serialized ONNX ``data`` into a skeleton and the raw weights of at least
    ``min_bytes`` each; raises :class:`MalformedModel` when the wire format is broken."""
    view = memoryview(data)
    split = Split(b"", {}, {})
    seen: set[bytes] = set()
    skeleton = bytearray()
    for field in _fields(view, 0, len(view)):
        if field.number == _MODEL_GRAPH and field.wire_type == _LEN:
            graph = _split_graph(data, view, field, split, seen, min_bytes)
            skeleton += _length_delimited(_MODEL_GRAPH, graph)
        else:
            skeleton += view[field.start : field.end]
    return Split(bytes(skeleton), split.weights, split.offsets)


def _split_graph(
    data: bytes | mmap.mmap,
    view: memoryview,
    graph: _Field,
    split: Split,
    seen: set[bytes],
    min_bytes: int,
) -> bytearray:
    out = bytearray()
    for field in _fields(view, graph.value, graph.end):
        if field.number == _GRAPH_INITIALIZER and field.wire_type == _LEN:
            hollow = _hollow_tensor(data, view, field, split, seen, min_bytes)
            if hollow is not None:
                out += _length_delimited(_GRAPH_INITIALIZER, hollow)
                continue
        out += view[field.start : field.end]
    return out


def _hollow_tensor(
    data: bytes | mmap.mmap,
    view: memoryview,
    tensor: _Field,
    split: Split,
    seen: set[bytes],
    min_bytes: int,
) -> bytearray | None:
    """The tensor without its raw_data (which goes into ``weights``), or None to keep it whole."""
    fields = list(_fields(view, tensor.value, tensor.end))
    names = [bytes(view[f.value : f.end]) for f in fields if f.number == _TENSOR_NAME]
    name = names[-1] if names else b""  # protobuf: the last occurrence of a field wins
    if name in seen:
        # Which of the two a runtime would take is its own affair; a valid model has one.
        raise MalformedModel("two initializers of the graph share a name")
    seen.add(name)
    raws = [f for f in fields if f.number == _TENSOR_RAW_DATA]
    if (
        not name
        or len(raws) != 1
        or raws[0].wire_type != _LEN
        or raws[0].end - raws[0].value < min_bytes
        or any(f.number not in _PLAIN_TENSOR_FIELDS for f in fields)
    ):
        return None
    dtype = _DTYPES.get(_last_varint(view, fields, _TENSOR_DATA_TYPE))
    dims = list(_dims(view, fields))
    raw = raws[0]
    if (
        dtype is None
        or any(dim < 0 for dim in dims)
        or prod(dims) * dtype.itemsize != raw.end - raw.value
    ):
        return None
    try:
        text = name.decode("utf-8")
    except UnicodeDecodeError:
        return None
    split.weights[text] = np.frombuffer(
        data, dtype=dtype, count=prod(dims), offset=raw.value
    ).reshape(dims)
    split.offsets[text] = raw.value
    out = bytearray()
    for field in fields:
        if field is not raw:
            out += view[field.start : field.end]
    return out


def _dims(view: memoryview, fields: list[_Field]) -> Iterator[int]:
    for field in fields:
        if field.number != _TENSOR_DIMS:
            continue
        if field.wire_type == _VARINT:
            yield _signed(_varint(view, field.value)[0])
        elif field.wire_type == _LEN:  # packed
            position = field.value
            while position < field.end:
                value, position = _varint(view, position)
                yield _signed(value)
        else:
            yield -1  # not a dim at all: keep the tensor whole


def _last_varint(view: memoryview, fields: list[_Field], number: int) -> int:
    values = [
        _varint(view, f.value)[0] for f in fields if f.number == number and f.wire_type == _VARINT
    ]
    return values[-1] if values else 0


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _fields(view: memoryview, start: int, end: int) -> Iterator[_Field]:
    position = start
    while position < end:
        tag, value = _varint(view, position)
        number, wire_type = tag >> 3, tag & 7
        if wire_type == _VARINT:
            after = _varint(view, value)[1]
        elif wire_type == _LEN:
            length, value = _varint(view, value)
            after = value + length
        elif wire_type == _I64:
            after = value + 8
        elif wire_type == _I32:
            after = value + 4
        else:  # groups (3, 4) are not used by ONNX; 6 and 7 do not exist
            raise MalformedModel(f"unsupported wire type {wire_type}")
        if number == 0 or after > end:
            raise MalformedModel("a field runs past the end of its message")
        yield _Field(number, wire_type, position, value, after)
        position = after


def _varint(view: memoryview, position: int) -> tuple[int, int]:
    """The varint at ``position`` and the position after it."""
    result = 0
    for shift in range(0, 70, 7):
        if position >= len(view):
            raise MalformedModel("truncated")
        byte = view[position]
        position += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, position
    raise MalformedModel("a varint longer than ten bytes")


def _length_delimited(number: int, payload: bytes | bytearray) -> bytes:
    return _encode_varint(number << 3 | _LEN) + _encode_varint(len(payload)) + payload


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)
