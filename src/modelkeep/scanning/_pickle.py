"""Pickle files and the formats built on them: plain and multi-stream pickles, joblib, legacy
PyTorch checkpoints and NumPy ``.npy`` files.

Every pickle stream in a file is analysed, not only the first: a loader such as
``torch.load`` reads several in a row, and a benign first stream followed by a malicious one is
a known way past scanners. Bytes after the last stream that are not a pickle are reported, as
nothing can be said about what they hold. A file whose pickles only use allowlisted, harmless
constructors, or those of well-known ML libraries (a scikit-learn pipeline), is
``unsafe-format``, not malicious: pickle runs code on load by design, so modelkeep refuses it
by format and says how to convert it.
"""

from __future__ import annotations

import ast
import io
import struct
from collections.abc import Callable
from typing import IO, Any, cast

import numpy as np

from modelkeep.scanning._context import Buffer, FileSlice, MemoryReader, Scan
from modelkeep.scanning._pickle_policy import TORCH_STORAGE_SIZES
from modelkeep.scanning._pickle_vm import StorageRef, StreamResult, run_stream

__all__ = ["UNSAFE_PICKLE", "scan_numpy", "scan_pickle", "scan_torch_pickle"]

#: The finding every pickle-based file gets, malicious or not.
UNSAFE_PICKLE = (
    "this is a pickle-based format: loading it can run arbitrary code, so modelkeep refuses it "
    "even when no malicious content is found. Convert it: scikit-learn models to skops "
    "(skops.io.dump) or ONNX (skl2onnx); PyTorch weights to safetensors "
    "(safetensors.torch.save_file) or ONNX (torch.onnx.export); NumPy arrays to .npy/.npz "
    "without object arrays, or safetensors"
)

_TORCH_MAGIC = 0x1950A86A20F9469CFC6C
_PICKLE_STARTS = frozenset(b"\x80(]})NIJKLMFGSTUVXBCPcghj\x8c\x95")
_MAX_NPY_HEADER = 10_000  # numpy.load refuses longer headers by default


def scan_pickle(scan: Scan, data: Buffer, location: str, depth: int) -> str:
    """Analyse every pickle stream in ``data``; returns ``pickle``, ``joblib`` or
    ``pytorch-legacy``."""
    return scan_pickle_file(scan, cast(IO[bytes], MemoryReader(data)), location, depth)


def scan_pickle_file(scan: Scan, reader: IO[bytes], location: str, depth: int) -> str:
    """:func:`scan_pickle` for a seekable file whose ``read(n)`` returns ``n`` bytes unless at
    its end (a buffered file): opcodes are read one by one, storages are skipped, so only the
    largest single value of the pickle is ever held."""
    scan.medium(location, UNSAFE_PICKLE)
    first = run_stream(scan, reader, location, depth)
    if first.complete and type(first.value) is int and first.value == _TORCH_MAGIC:
        _torch_legacy(scan, reader, location, depth)
        return "pytorch-legacy"
    results = [first, *_more_streams(scan, reader, first, location, depth)]
    return "joblib" if any(r.joblib for r in results) else "pickle"


def scan_torch_pickle(scan: Scan, data: Buffer, location: str, depth: int) -> list[StorageRef]:
    """Analyse a pickle member of a PyTorch zip (``data.pkl``...), persistent ids allowed;
    returns the storages it names."""
    reader = cast(IO[bytes], MemoryReader(data))
    first = run_stream(scan, reader, location, depth, torch=True)
    storages = list(first.storages)
    for result in _more_streams(scan, reader, first, location, depth, torch=True):
        storages.extend(result.storages)
    return storages


def _more_streams(
    scan: Scan,
    reader: IO[bytes],
    previous: StreamResult,
    location: str,
    depth: int,
    *,
    torch: bool = False,
) -> list[StreamResult]:
    results: list[StreamResult] = []
    size = reader.seek(0, 2)
    reader.seek(previous.end)
    number = 1
    while previous.complete and previous.end < size:
        number += 1
        start = reader.tell()
        head = reader.read(1)
        reader.seek(start)
        if not head or head[0] not in _PICKLE_STARTS:
            scan.high(
                f"{location} @ byte {start}",
                f"{size - start} bytes after the last pickle stream are not a pickle; nothing "
                "can be said about them (a second loader may read them)",
            )
            break
        previous = run_stream(scan, reader, f"{location} > pickle #{number}", depth, torch=torch)
        reader.seek(previous.end)
        results.append(previous)
    return results


def _torch_legacy(scan: Scan, reader: IO[bytes], location: str, depth: int) -> None:
    # torch.save(..., _use_new_zipfile_serialization=False): magic, protocol version, system
    # info, the object (storages by persistent id), the list of storage keys, then each
    # storage as an int64 element count and its raw bytes.
    streams: list[StreamResult] = []
    for number in range(2, 6):
        result = run_stream(
            scan, reader, f"{location} > pickle #{number}", depth, torch=number == 4
        )
        streams.append(result)
        if not result.complete:
            return
        reader.seek(result.end)
    storages = {ref.key: ref for ref in streams[2].storages}
    keys = streams[3].value
    if not isinstance(keys, list) or not all(isinstance(key, str) for key in keys):
        scan.high(f"{location} > pickle #5", "the storage key list is not a list of names")
        return
    for key in keys:
        where = f"{location} > storage {key[:40]!r}"
        ref = storages.get(key)
        raw = reader.read(8)
        if ref is None or len(raw) != 8:
            scan.high(where, "a storage the checkpoint does not describe, or a truncated file")
            return
        (numel,) = struct.unpack("<q", raw)
        if numel != ref.numel:
            scan.high(where, f"storage holds {numel} elements but is described with {ref.numel}")
            return
        start = reader.tell()
        end = start + numel * TORCH_STORAGE_SIZES[ref.storage]
        if end > reader.seek(0, 2):
            scan.high(where, "the storage runs past the end of the file (truncated)")
            return
        reader.seek(end)
    position = reader.tell()
    size = reader.seek(0, 2)
    if position != size:
        scan.high(location, f"{size - position} bytes after the last storage were not analysed")


def scan_numpy(scan: Scan, data: Buffer, location: str, depth: int) -> str:
    """Check a ``.npy`` file: its header, its size, and any pickle an object array holds."""
    view = memoryview(data)
    body = _check_npy(scan, lambda start, end: bytes(view[start:end]), len(view), location)
    if body is not None:
        scan_pickle(scan, view[body:], location, depth)
    return "numpy"


def scan_numpy_file(scan: Scan, reader: IO[bytes], size: int, location: str, depth: int) -> str:
    """:func:`scan_numpy` for a seekable file of ``size`` bytes: reads the header, and an
    object array's pickle opcode by opcode, never the array's data."""

    def read(start: int, end: int) -> bytes:
        reader.seek(start)
        return reader.read(end - start)

    body = _check_npy(scan, read, size, location)
    if body is not None:
        pickled = io.BufferedReader(FileSlice(reader, body, size - body), 64 * 1024)
        scan_pickle_file(scan, cast(IO[bytes], pickled), location, depth)
    return "numpy"


def _check_npy(
    scan: Scan, read: Callable[[int, int], bytes], size: int, location: str
) -> int | None:
    """Check the header and size; where an object array's pickle starts, if it has one."""
    if size < 10:
        scan.high(location, "the NumPy header is truncated")
        return None
    fixed = read(0, 12)
    major = fixed[6]
    if major == 1:
        (length,) = struct.unpack("<H", fixed[8:10])
        start = 10
    elif major in (2, 3) and size >= 12:
        (length,) = struct.unpack("<I", fixed[8:12])
        start = 12
    else:
        scan.high(location, f"unsupported NumPy format version {major}")
        return None
    if length > _MAX_NPY_HEADER or start + length > size:
        scan.high(location, f"the NumPy header claims {length} bytes: too long or truncated")
        return None
    header = _npy_header(scan, read(start, start + length), major, location)
    if header is None:
        return None
    dtype, shape = header
    count = 1
    for dim in shape:
        count *= dim
    if count > scan.limits.max_tensor_elements:
        scan.critical(
            location,
            f"the array declares {count} elements, over the limit of "
            f"{scan.limits.max_tensor_elements} (an allocation bomb)",
        )
        return None
    body = start + int(length)
    if dtype.hasobject:
        scan.medium(
            location,
            "an object array: its elements are a pickle that numpy.load(allow_pickle=True) "
            "runs; save numeric arrays only",
        )
        return body
    expected = count * dtype.itemsize
    if size - body != expected:
        scan.high(
            location,
            f"the array should hold {expected} bytes of data but {size - body} follow the header "
            "(truncated, or extra data hidden after it)",
        )
    else:
        scan.info(location, f"NumPy array {dtype.str} {tuple(shape)}, no pickled objects")
    return None


def _npy_header(
    scan: Scan, raw: bytes, major: int, location: str
) -> tuple[np.dtype[Any], tuple[int, ...]] | None:
    try:
        text = raw.decode("utf-8" if major == 3 else "latin-1")
        # literal_eval only builds Python literals; nothing is called or imported.
        header = ast.literal_eval(text)
        if not isinstance(header, dict) or set(header) != {"descr", "fortran_order", "shape"}:
            raise ValueError("unexpected header keys")
        shape = header["shape"]
        if not isinstance(shape, tuple) or not all(type(d) is int and d >= 0 for d in shape):
            raise ValueError("bad shape")
        dtype = np.lib.format.descr_to_dtype(header["descr"])
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError) as exc:
        scan.high(location, f"the NumPy header does not parse ({type(exc).__name__})")
        return None
    return dtype, shape
