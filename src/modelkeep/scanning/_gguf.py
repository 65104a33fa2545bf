"""GGUF (llama.cpp) files: the header parsed here, every count and length checked first.

A GGUF header is a magic number, a version, a tensor count, a key/value count, the key/value
pairs, then one descriptor per tensor (name, dimensions, type, offset). Loaders have been
exploited through all of these (heap overflows in llama.cpp from counts, string lengths and
dimension products nobody checked), so every count and length is compared with the bytes left
in the file *before* anything is read or allocated, and dimension products are computed
exactly (Python integers) and compared with int64.

Chat templates are Jinja2 programs that servers render with each request; one that reaches
Python internals (``__class__``, ``__globals__``, ``__subclasses__``...) escapes the sandbox
some servers forget to use. Those are malicious.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable
from typing import IO

from modelkeep.scanning._context import Buffer, Scan, show

__all__ = ["scan_gguf", "scan_gguf_file"]

_INT64_MAX = 2**63 - 1
_MAX_DIMS = 4
_STRING, _ARRAY = 8, 9
_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_MIN_SIZE = {**_FIXED, _STRING: 8, _ARRAY: 12}
_TEMPLATE_ATTACKS = re.compile(
    r"__\w+__|\\x5f|\\u005f|\|\s*attr\b|\battr\s*\(|\bmro\b|\bos\s*\.|\bpopen\b|\bsubprocess\b"
    r"|\bimport\b|\beval\s*\(|\bexec\s*\(|\bgetattr\b|\bglobals\b|\bbuiltins\b|\blipsum\b"
    r"|\bcycler\b|\bjoiner\b|\b__self__\b|\bfunc_globals\b|\bgi_frame\b|\bf_back\b"
)


class _Hostile(Exception):
    """A count or length that cannot be right: malicious."""


class _Bad(Exception):
    """A value that is wrong but could be a bug or a truncation: an error."""


class _Cursor:
    """Reads a GGUF file front to back through ``read(start, end)``; only what is read is held."""

    def __init__(self, read: Callable[[int, int], bytes], size: int, endian: str) -> None:
        self.read = read
        self.size = size
        self.pos = 0
        self.endian = endian

    def need(self, count: int, what: str) -> None:
        if count > self.size - self.pos:
            raise _Hostile(
                f"{what} needs {count} bytes but only {self.size - self.pos} remain: a "
                "loader that allocates before checking is overrun or exhausted"
            )

    def unpack(self, fmt: str, what: str) -> int:
        size = struct.calcsize(fmt)
        self.need(size, what)
        (value,) = struct.unpack(self.endian + fmt, self.read(self.pos, self.pos + size))
        self.pos += size
        return int(value)

    def skip(self, count: int, what: str) -> None:
        self.need(count, what)
        self.pos += count

    def string(self, what: str) -> bytes:
        length = self.unpack("Q", what)
        self.need(length, f"{what} (a {length}-byte string)")
        raw = self.read(self.pos, self.pos + length)
        self.pos += length
        return raw

    def skip_string(self, what: str) -> None:
        length = self.unpack("Q", what)
        self.skip(length, f"{what} (a {length}-byte string)")


def scan_gguf(scan: Scan, data: Buffer, location: str, depth: int) -> str:
    """Check a GGUF header, key/values, chat templates and tensor layout."""
    view = memoryview(data)
    return _check(scan, lambda start, end: bytes(view[start:end]), len(view), location)


def scan_gguf_file(scan: Scan, reader: IO[bytes], size: int, location: str, depth: int) -> str:
    """:func:`scan_gguf` for a seekable file of ``size`` bytes: reads the header, key/values
    and tensor descriptors (values other than chat templates are skipped), not the data."""

    def read(start: int, end: int) -> bytes:
        reader.seek(start)
        return reader.read(end - start)

    return _check(scan, read, size, location)


def _check(scan: Scan, read: Callable[[int, int], bytes], size: int, location: str) -> str:
    before = scan.finding_count
    try:
        _scan(scan, _Cursor(read, size, "<"), location)
    except _Hostile as exc:
        scan.critical(location, str(exc))
    except _Bad as exc:
        scan.high(location, str(exc))
    if scan.finding_count == before:
        scan.info(location, "GGUF header, key/values and tensor layout consistent")
    return "gguf"


def _scan(scan: Scan, cursor: _Cursor, location: str) -> None:
    # 1. Magic and version, in either byte order.
    if cursor.size < 24:
        raise _Bad("the GGUF header is truncated")
    raw_version = cursor.read(4, 8)
    (version,) = struct.unpack("<I", raw_version)
    if version not in (2, 3) and struct.unpack(">I", raw_version)[0] in (2, 3):
        cursor.endian = ">"
        (version,) = struct.unpack(">I", raw_version)
    if version not in (2, 3):
        raise _Bad(f"GGUF version {version} is not supported (only 2 and 3 are)")
    cursor.pos = 8
    tensor_count = cursor.unpack("Q", "the tensor count")
    kv_count = cursor.unpack("Q", "the key/value count")
    # 2. The counts fit in the file at the smallest possible size of each entry.
    cursor.need(kv_count * (8 + 4 + 1), f"{kv_count} key/value pairs")
    cursor.need(tensor_count * (8 + 4 + 4 + 8), f"{tensor_count} tensor descriptors")
    # 3. Key/value pairs; alignment and chat templates are kept.
    alignment = 32
    keys: set[str] = set()
    for _ in range(kv_count):
        raw_key = cursor.string("a key")
        try:
            key = raw_key.decode("utf-8")
        except UnicodeDecodeError:
            raise _Bad(f"a key is not UTF-8 ({show(raw_key[:40])})") from None
        if key in keys:
            raise _Bad(f"the key {show(key, 60)!r} appears twice")
        keys.add(key)
        kind = cursor.unpack("I", f"the type of {show(key, 60)}")
        if key == "general.alignment":
            if kind != 4:
                raise _Bad("general.alignment must be a uint32")
            alignment = cursor.unpack("I", "general.alignment")
            if alignment == 0 or alignment & (alignment - 1):
                raise _Bad(f"general.alignment {alignment} is not a power of two")
            continue
        if key.startswith("tokenizer.chat_template") and kind == _STRING:
            _check_template(scan, cursor.string(key), f"{location} @ {show(key, 80)}")
            continue
        _skip_value(cursor, kind, key, 0)
    # 4. Tensor descriptors: dimensions, types, exact sizes.
    tensors = []
    names: set[bytes] = set()
    for _ in range(tensor_count):
        name = cursor.string("a tensor name")
        where = f"{location} @ tensor {show(name.decode('utf-8', 'replace'), 60)}"
        if name in names:
            scan.high(where, "two tensors have this name")
        names.add(name)
        dims = cursor.unpack("I", "a tensor's dimension count")
        if dims > _MAX_DIMS:
            scan.critical(
                where,
                f"{dims} dimensions, more than the {_MAX_DIMS} ggml supports: "
                "loaders that copy them into a fixed array overflow it",
            )
            return
        shape = [cursor.unpack("Q", "a tensor dimension") for _ in range(dims)]
        kind = cursor.unpack("I", "a tensor type")
        offset = cursor.unpack("Q", "a tensor offset")
        nbytes = _tensor_bytes(scan, shape, kind, where)
        if nbytes is None:
            return
        tensors.append((offset, nbytes, where))
    # 5. Data: aligned, inside the file, no two tensors sharing bytes.
    start = -(-cursor.pos // alignment) * alignment
    data_size = cursor.size - start
    end = 0
    for offset, nbytes, where in sorted(tensors):
        if offset % alignment:
            scan.high(where, f"offset {offset} is not a multiple of the alignment {alignment}")
        if offset + nbytes > data_size:
            scan.high(where, "the tensor's data runs past the end of the file (truncated)")
        if offset < end:
            scan.critical(where, "this tensor's data overlaps another tensor's")
        end = max(end, offset + nbytes)


def _skip_value(cursor: _Cursor, kind: int, key: str, depth: int) -> None:
    what = f"the value of {show(key, 60)}"
    if kind in _FIXED:
        cursor.skip(_FIXED[kind], what)
    elif kind == _STRING:
        cursor.skip_string(what)
    elif kind == _ARRAY:
        if depth >= 2:
            raise _Hostile(f"{what} nests arrays more than two deep")
        item = cursor.unpack("I", what)
        count = cursor.unpack("Q", what)
        if item not in _MIN_SIZE:
            raise _Bad(f"{what} is an array of unknown type {item}")
        cursor.need(count * _MIN_SIZE[item], f"{what} ({count} items)")
        if item in _FIXED:
            cursor.skip(count * _FIXED[item], what)
        else:
            for _ in range(count):
                _skip_value(cursor, item, key, depth + 1)
    else:
        raise _Bad(f"{what} has unknown type {kind}")


def _tensor_bytes(scan: Scan, shape: list[int], kind: int, where: str) -> int | None:
    import gguf

    count = 1
    for dim in shape:
        count *= dim
        if dim > _INT64_MAX or count > _INT64_MAX:
            scan.critical(
                where,
                f"dimensions {shape} multiply past int64: loaders that "
                "compute the size in 64 bits wrap around and under-allocate",
            )
            return None
    if count > scan.limits.max_tensor_elements:
        scan.critical(
            where,
            f"{count} elements, over the limit of "
            f"{scan.limits.max_tensor_elements} (a resource bomb)",
        )
        return None
    try:
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(kind)]
    except (ValueError, KeyError):
        scan.high(where, f"unknown tensor type {kind}")
        return None
    if shape and shape[0] % block:
        scan.high(
            where, f"the first dimension {shape[0]} is not a multiple of the block size {block}"
        )
        return None
    return count // block * size


def _check_template(scan: Scan, raw: bytes, where: str) -> None:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        scan.high(where, "the chat template is not UTF-8")
        return
    match = _TEMPLATE_ATTACKS.search(text)
    if match is not None:
        scan.critical(
            where,
            f"the chat template reaches into Python internals ({show(match.group(0), 40)!r}): "
            "rendering it can run code on the server (Jinja2 sandbox escape); replace it with "
            "a plain template",
        )
