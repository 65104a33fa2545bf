"""safetensors: the header parsed here, not by the library, and every offset checked.

The format is an 8-byte little-endian header length, a JSON header mapping tensor names to
``dtype``, ``shape`` and ``data_offsets`` (relative to the end of the header), then the data.
Only the header is read, so a file of any size scans in milliseconds. A loader trusts those
offsets to slice the buffer: out-of-bounds offsets read outside it, overlapping tensors alias
each other's bytes, a header length past the file makes a naive reader allocate whatever it
says. Those are malicious; inconsistencies an honest bug could make are errors.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from typing import IO, Any

from modelkeep.scanning._context import Buffer, Scan, show

__all__ = ["scan_safetensors", "scan_safetensors_file"]

# Bytes per element of each dtype the format defines (sub-byte types by their packed size).
_DTYPE_BITS = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "F64": 64,
    "I64": 64,
    "U64": 64,
    "C64": 64,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
}
# The reference implementation refuses headers over 100 MB.
_MAX_HEADER = 100_000_000


def scan_safetensors(scan: Scan, data: Buffer, location: str, depth: int) -> str:
    """Check a safetensors file's header and layout; SAFE when every tensor is consistent."""
    view = memoryview(data)
    return _check(scan, lambda start, end: bytes(view[start:end]), len(view), location)


def scan_safetensors_file(
    scan: Scan, reader: IO[bytes], size: int, location: str, depth: int
) -> str:
    """:func:`scan_safetensors` for a seekable file of ``size`` bytes: reads only the header."""

    def read(start: int, end: int) -> bytes:
        reader.seek(start)
        return reader.read(end - start)

    return _check(scan, read, size, location)


def _check(scan: Scan, read: Callable[[int, int], bytes], size: int, location: str) -> str:
    # 1. The header length fits in the file and under the reference implementation's limit.
    (length,) = struct.unpack("<Q", read(0, 8))
    if length > _MAX_HEADER:
        scan.critical(
            location,
            f"the header claims {length} bytes, over the 100 MB every reader allows: a reader "
            "that trusts it allocates that much (a resource bomb)",
        )
        return "safetensors"
    if 8 + length > size:
        scan.high(
            location,
            f"the header claims {length} bytes but the file has {size - 8}: truncated or corrupt",
        )
        return "safetensors"
    # 2. The header is one JSON object with unique keys.
    header = _parse_header(scan, read(8, 8 + length), location)
    if header is None:
        return "safetensors"
    data_size = size - 8 - length
    before = scan.finding_count
    # 3. Each tensor: a known dtype, a shape, offsets that match the shape and lie in the file.
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in entry.items()
            ):
                scan.high(location, "__metadata__ must map text to text")
            continue
        span = _check_tensor(scan, name, entry, data_size, location)
        if span is not None:
            spans.append(span)
    # 4. Tensors tile the data area exactly: no shared bytes, no holes, nothing after.
    _check_layout(scan, sorted(spans), data_size, location)
    if scan.finding_count == before:
        scan.info(location, f"{len(spans)} tensors, header and offsets consistent")
    return "safetensors"


def _parse_header(scan: Scan, raw: bytes, location: str) -> dict[str, Any] | None:
    duplicates: list[str] = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for key, value in items:
            if key in result:
                duplicates.append(key)
            result[key] = value
        return result

    try:
        header = json.loads(raw.decode("utf-8").rstrip(" "), object_pairs_hook=pairs)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        scan.high(location, f"the header is not valid JSON ({type(exc).__name__})")
        return None
    if not isinstance(header, dict):
        scan.high(location, "the header is not a JSON object")
        return None
    if duplicates:
        scan.critical(
            location,
            f"the header names {show(duplicates[0], 60)!r} twice: readers disagree on which "
            "entry wins, a way to show a scanner one tensor and load another",
        )
        return None
    return header


def _check_tensor(
    scan: Scan, name: str, entry: Any, data_size: int, location: str
) -> tuple[int, int, str] | None:
    where = f"{location} @ {show(name, 80)}"
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        scan.high(where, "the tensor entry must have exactly dtype, shape and data_offsets")
        return None
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    bits = _DTYPE_BITS.get(dtype) if isinstance(dtype, str) else None
    if bits is None:
        scan.high(where, f"unknown dtype {show(dtype, 20)!r}")
        return None
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        scan.high(where, "the shape must be a list of non-negative integers")
        return None
    count = math.prod(shape)
    if count > scan.limits.max_tensor_elements:
        scan.critical(
            where,
            f"the tensor declares {count} elements, over the limit of "
            f"{scan.limits.max_tensor_elements} (a resource bomb for readers that allocate it)",
        )
        return None
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        scan.high(where, "data_offsets must be two increasing non-negative integers")
        return None
    begin, end = offsets
    if end > data_size:
        scan.critical(
            where,
            f"the tensor's bytes [{begin}, {end}) lie past the end of the data ({data_size} "
            "bytes): a reader that trusts the offsets reads memory outside the file",
        )
        return None
    if (end - begin) * 8 != count * bits:
        scan.high(
            where,
            f"the tensor should take {count * bits // 8} bytes but its offsets span {end - begin}",
        )
        return None
    return begin, end, name


def _check_layout(
    scan: Scan, spans: list[tuple[int, int, str]], data_size: int, location: str
) -> None:
    position = 0
    for begin, end, name in spans:
        if begin < position:
            scan.critical(
                f"{location} @ {show(name, 80)}",
                "this tensor's bytes overlap another tensor's: readers alias them, and "
                "writing one changes the other",
            )
        elif begin > position:
            scan.high(
                f"{location} @ {show(name, 80)}",
                f"{begin - position} bytes before this tensor belong to no tensor",
            )
        position = max(position, end)
    if position < data_size:
        scan.high(
            location,
            f"{data_size - position} bytes after the last tensor belong to no "
            "tensor: hidden data that was not analysed",
        )
