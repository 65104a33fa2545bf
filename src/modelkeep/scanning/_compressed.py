"""Compressed streams (gzip, zlib, bz2, xz, lzma): opened with a cap, then scanned by content.

joblib writes compressed pickles in all of these; a ``.tar.gz`` is a tar in gzip. A bomb is
judged by the absolute size it expands to: the stream is decompressed in pieces and stopped as
soon as the output passes the scan's remaining ``max_total_bytes``, so it costs bounded work
and memory. How well it compresses says nothing: a zero-initialised tensor compresses a
thousand times and is no bomb.
"""

from __future__ import annotations

import bz2
import lzma
import zlib
from typing import Protocol

from modelkeep.scanning._context import Buffer, Scan

__all__ = ["COMPRESSED_KINDS", "scan_compressed"]

COMPRESSED_KINDS = frozenset({"gzip", "zlib", "bz2", "xz", "lzma", "lz4", "zstd"})

_CHUNK = 1 << 20
_MAGIC = {"gzip": b"\x1f\x8b", "bz2": b"BZh", "xz": b"\xfd7zXZ\x00"}


class _Decompressor(Protocol):
    @property
    def eof(self) -> bool: ...
    @property
    def unused_data(self) -> bytes: ...
    def decompress(self, data: bytes, max_length: int = ..., /) -> bytes: ...


class _Bomb(Exception):
    pass


def scan_compressed(scan: Scan, data: Buffer, location: str, depth: int, kind: str) -> str:
    """Decompress ``data`` (a ``kind`` stream) and scan what it holds; returns the format.

    A pickle inside is reported as ``joblib`` (that is how joblib compresses); anything else
    keeps its own format (a gzip of a tar is ``tar``). A stream that cannot be opened is
    reported under its compression's name.
    """
    if kind in ("lz4", "zstd"):
        scan.high(
            location,
            f"{kind}-compressed data cannot be analysed by this scanner; store the file "
            "uncompressed or with gzip",
        )
        return kind
    output = _decompress(scan, memoryview(data), location, kind)
    if output is None:
        return kind
    inner = scan.nested(output, f"{location} > {kind} stream", depth + 1)
    return "joblib" if inner in ("pickle", "joblib") else inner


def _new(kind: str) -> _Decompressor:
    if kind == "gzip":
        return zlib.decompressobj(wbits=31)
    if kind == "zlib":
        return zlib.decompressobj()
    if kind == "bz2":
        return bz2.BZ2Decompressor()
    return lzma.LZMADecompressor(format=lzma.FORMAT_XZ if kind == "xz" else lzma.FORMAT_ALONE)


def _decompress(scan: Scan, view: memoryview, location: str, kind: str) -> bytearray | None:
    cap = scan.limits.max_total_bytes - scan.unpacked
    out = bytearray()
    position = 0
    streams = 0
    try:
        while True:
            streams += 1
            position = _one_stream(view, position, out, cap, kind)
            rest = bytes(view[position : position + 8])
            if kind == "xz":
                # xz allows zero padding (in 4-byte units) between and after streams.
                while position < len(view) and rest[:4] == b"\x00\x00\x00\x00":
                    position += 4
                    rest = bytes(view[position : position + 8])
            if position >= len(view):
                break
            magic = _MAGIC.get(kind)
            if magic is None or not rest.startswith(magic):
                scan.high(
                    f"{location} @ byte {position}",
                    f"{len(view) - position} bytes after the {kind} stream were not analysed",
                )
                break
    except _Bomb as exc:
        scan.critical(location, str(exc))
        return None
    except (zlib.error, OSError, EOFError, lzma.LZMAError, ValueError) as exc:
        scan.high(location, f"the {kind} stream is corrupt or truncated ({_short(exc)})")
        return None
    if not scan.charge(len(out), location):
        return None
    return out


def _one_stream(view: memoryview, position: int, out: bytearray, cap: int, kind: str) -> int:
    """Decompress one stream starting at ``position`` into ``out``; returns where it ended."""
    decompressor = _new(kind)
    zlib_style = kind in ("gzip", "zlib")
    pending = b""
    while not decompressor.eof:
        if zlib_style:
            # zlib keeps the input it has not used yet in unconsumed_tail.
            if not pending and position < len(view):
                pending = bytes(view[position : position + _CHUNK])
                position += len(pending)
            piece = decompressor.decompress(pending, min(_CHUNK, cap + 1 - len(out)))
            pending = getattr(decompressor, "unconsumed_tail", b"")
        else:
            # bz2 and lzma buffer unused input themselves and say when they need more.
            chunk = b""
            if getattr(decompressor, "needs_input", True) and position < len(view):
                chunk = bytes(view[position : position + _CHUNK])
                position += len(chunk)
            piece = decompressor.decompress(chunk, min(_CHUNK, cap + 1 - len(out)))
        if not piece and not pending and position >= len(view) and not decompressor.eof:
            raise EOFError("the stream ends before its end marker")
        out += piece
        if len(out) > cap:
            raise _Bomb(
                f"the {kind} stream unpacks to more than {cap} bytes, past max_total_bytes: "
                "a decompression bomb, or a model too big to scan"
            )
    return position - len(decompressor.unused_data) - len(pending)


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:120] if text else type(exc).__name__
