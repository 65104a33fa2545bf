"""A bounded UBJSON reader, enough for XGBoost's binary model format (the scanner reads the
uploaded file with it, the XGBoost runtime the booster's own re-serialisation).

UBJSON is JSON with typed binary values (big-endian). Every count is compared with the bytes
left before anything is allocated, nesting is limited, and typed numeric arrays (most of an
XGBoost model) are NumPy arrays over the data itself (read only if the data is).
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

__all__ = ["UbjsonError", "load_ubjson"]

_MAX_DEPTH = 64
_INTS = {b"i": ">b", b"U": ">B", b"I": ">h", b"l": ">i", b"L": ">q"}
_FLOATS = {b"d": ">f", b"D": ">d"}
_NUMPY = {b"i": ">i1", b"U": ">u1", b"I": ">i2", b"l": ">i4", b"L": ">i8", b"d": ">f4", b"D": ">f8"}


class UbjsonError(ValueError):
    """The bytes are not UBJSON, or a count or length cannot fit in them."""


class _Reader:
    def __init__(self, view: memoryview) -> None:
        self.view = view
        self.pos = 0

    def skip(self, count: int) -> int:
        """Where the next ``count`` bytes start; moves past them."""
        if count < 0 or count > len(self.view) - self.pos:
            raise UbjsonError(f"a length of {count} bytes runs past the end of the data")
        self.pos += count
        return self.pos - count

    def take(self, count: int) -> bytes:
        start = self.skip(count)
        return bytes(self.view[start : start + count])

    def peek(self) -> bytes:
        return bytes(self.view[self.pos : self.pos + 1])

    def marker(self) -> bytes:
        while True:
            marker = self.take(1)
            if marker != b"N":  # no-op
                return marker

    def number(self, marker: bytes) -> Any:
        if marker in _INTS:
            fmt = _INTS[marker]
            return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]
        if marker in _FLOATS:
            fmt = _FLOATS[marker]
            return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]
        raise UbjsonError(f"expected a number, found marker {marker!r}")

    def length(self) -> int:
        value = self.number(self.marker())
        if type(value) is not int or value < 0:
            raise UbjsonError("a length is not a non-negative integer")
        return int(value)

    def value(self, marker: bytes, depth: int) -> Any:
        if depth > _MAX_DEPTH:
            raise UbjsonError("values are nested too deeply")
        if marker == b"Z":
            return None
        if marker == b"T":
            return True
        if marker == b"F":
            return False
        if marker in _INTS or marker in _FLOATS:
            return self.number(marker)
        if marker == b"C":
            return self.take(1).decode("latin-1")
        if marker in (b"S", b"H"):
            return self.take(self.length()).decode("utf-8")
        if marker == b"[":
            return self.array(depth)
        if marker == b"{":
            return self.object(depth)
        raise UbjsonError(f"unknown marker {marker!r}")

    def container_header(self) -> tuple[bytes | None, int | None]:
        kind: bytes | None = None
        count: int | None = None
        if self.peek() == b"$":
            self.pos += 1
            kind = self.take(1)
        if self.peek() == b"#":
            self.pos += 1
            count = self.length()
        elif kind is not None:
            raise UbjsonError("a typed container without a count")
        return kind, count

    def array(self, depth: int) -> Any:
        kind, count = self.container_header()
        if count is None:
            items = []
            while (marker := self.marker()) != b"]":
                items.append(self.value(marker, depth + 1))
            return items
        if kind in _NUMPY:
            # A view of the data, not a copy: the arrays are most of the model.
            dtype = np.dtype(_NUMPY[kind])
            start = self.skip(count * dtype.itemsize)
            return np.frombuffer(self.view, dtype=dtype, count=count, offset=start)
        if count > len(self.view) - self.pos:
            raise UbjsonError(f"an array claims {count} items, more than the bytes left")
        return [self.value(kind or self.marker(), depth + 1) for _ in range(count)]

    def object(self, depth: int) -> dict[str, Any]:
        kind, count = self.container_header()
        result: dict[str, Any] = {}
        if count is not None and count > len(self.view) - self.pos:
            raise UbjsonError(f"an object claims {count} entries, more than the bytes left")
        index = 0
        while True:
            if count is None:
                if self.peek() == b"}":
                    self.pos += 1
                    return result
            elif index == count:
                return result
            key = self.take(self.length()).decode("utf-8")
            if key in result:
                raise UbjsonError(f"the key {key[:40]!r} appears twice")
            result[key] = self.value(kind or self.marker(), depth + 1)
            index += 1


def load_ubjson(data: bytes | bytearray | memoryview) -> tuple[Any, int]:
    """The value the data starts with, and how many bytes it took; raises UbjsonError."""
    reader = _Reader(memoryview(data))
    try:
        value = reader.value(reader.marker(), 0)
    except (UnicodeDecodeError, struct.error) as exc:
        raise UbjsonError(str(exc)[:120]) from exc
    return value, reader.pos
