"""Compressed streams (gzip, zlib, bz2, xz, lzma): opened with a cap, then scanned by content.

joblib writes compressed pickles in all of these; a ``.tar.gz`` is a tar in gzip. A bomb is
judged by the absolute size it expands to: the stream is decompressed in pieces and stopped as
soon as the output passes the scan's remaining ``max_total_bytes``, so it costs bounded work
and memory. How well it compresses says nothing: a zero-initialised tensor compresses a
thousand times and is no bomb.

The output is never held: a first pass decompresses it counting, not keeping (a bomb or a
corrupt stream is found before anything is analysed), then the content is handed to its
analyser as a file that decompresses again as it is read (``Rereadable``), so a large
``.tar.gz`` or joblib ``.gz`` read through a sealed copy costs a few MiB.
"""

from __future__ import annotations

import bz2
import io
import lzma
import zlib
from collections.abc import Generator, Iterator
from typing import IO, Protocol, cast

from modelkeep.scanning._context import Buffer, MemoryReader, Rereadable, Scan

__all__ = ["COMPRESSED_KINDS", "scan_compressed", "scan_compressed_file"]

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


class _Corrupt(Exception):
    """The stream cannot be decompressed; the message says why."""


def scan_compressed(scan: Scan, data: Buffer, location: str, depth: int, kind: str) -> str:
    """Decompress ``data`` (a ``kind`` stream) and scan what it holds; returns the format.

    A pickle inside is reported as ``joblib`` (that is how joblib compresses); anything else
    keeps its own format (a gzip of a tar is ``tar``). A stream that cannot be opened is
    reported under its compression's name.
    """
    return scan_compressed_file(
        scan, cast(IO[bytes], MemoryReader(data)), len(data), location, depth, kind
    )


def scan_compressed_file(
    scan: Scan, reader: IO[bytes], size: int, location: str, depth: int, kind: str
) -> str:
    """:func:`scan_compressed` for a seekable file of ``size`` bytes, its output never held."""
    if kind in ("lz4", "zstd"):
        scan.high(
            location,
            f"{kind}-compressed data cannot be analysed by this scanner; store the file "
            "uncompressed or with gzip",
        )
        return kind
    streams = _Streams(reader, size, kind, scan.limits.max_total_bytes - scan.unpacked)
    # 1. Decompressed once through, counted and not kept: a bomb or a corrupt stream refuses
    #    the file before anything inside is analysed.
    try:
        total = sum(len(piece) for piece in streams.pieces())
    except _Bomb as exc:
        scan.critical(location, str(exc))
        return kind
    except _Corrupt as exc:
        scan.high(location, f"the {kind} stream is corrupt or truncated ({exc})")
        return kind
    if streams.end < size:
        scan.high(
            f"{location} @ byte {streams.end}",
            f"{size - streams.end} bytes after the {kind} stream were not analysed",
        )
    if not scan.charge(total, location):
        return kind
    # 2. What it holds, decompressed again as its analyser reads it.
    with io.BufferedReader(
        Rereadable(streams.pieces, total, spool_dir=scan.spool_dir), _CHUNK
    ) as output:
        inner = scan.nested_file(
            cast(IO[bytes], output), total, f"{location} > {kind} stream", depth + 1
        )
    return "joblib" if inner in ("pickle", "joblib") else inner


def _new(kind: str) -> _Decompressor:
    if kind == "gzip":
        return zlib.decompressobj(wbits=31)
    if kind == "zlib":
        return zlib.decompressobj()
    if kind == "bz2":
        return bz2.BZ2Decompressor()
    return lzma.LZMADecompressor(format=lzma.FORMAT_XZ if kind == "xz" else lzma.FORMAT_ALONE)


class _Streams:
    """The ``kind`` streams at the start of a file, decompressed in pieces. After a pass,
    ``end`` is where they end: bytes past it follow no stream and are not part of the output."""

    def __init__(self, reader: IO[bytes], size: int, kind: str, cap: int) -> None:
        self._reader = reader
        self._size = size
        self._kind = kind
        self._cap = cap
        self.end = size

    def pieces(self) -> Iterator[bytes]:
        """The output, stream after stream; raises ``_Bomb`` past the cap and ``_Corrupt``
        on a corrupt or truncated stream."""
        position, produced = 0, 0
        while True:
            position, produced = yield from self._one_stream(position, produced)
            rest = self._read(position, 8)
            if self._kind == "xz":
                # xz allows zero padding (in 4-byte units) between and after streams.
                while position < self._size and rest[:4] == b"\x00\x00\x00\x00":
                    position += 4
                    rest = self._read(position, 8)
            magic = _MAGIC.get(self._kind)
            if position >= self._size or magic is None or not rest.startswith(magic):
                self.end = min(position, self._size)
                return

    def _read(self, position: int, count: int) -> bytes:
        self._reader.seek(position)
        return self._reader.read(max(0, min(count, self._size - position))) or b""

    def _one_stream(self, position: int, produced: int) -> Generator[bytes, None, tuple[int, int]]:
        """One stream from ``position``; returns where it ended and the output so far."""
        decompressor = _new(self._kind)
        zlib_style = self._kind in ("gzip", "zlib")
        pending = b""
        while not decompressor.eof:
            if zlib_style:
                # zlib keeps the input it has not used yet in unconsumed_tail.
                if not pending and position < self._size:
                    pending = self._read(position, _CHUNK)
                    position += len(pending)
                chunk = pending
            else:
                # bz2 and lzma buffer unused input themselves and say when they need more.
                chunk = b""
                if getattr(decompressor, "needs_input", True) and position < self._size:
                    chunk = self._read(position, _CHUNK)
                    position += len(chunk)
            try:
                piece = decompressor.decompress(chunk, min(_CHUNK, self._cap + 1 - produced))
            except (zlib.error, OSError, EOFError, lzma.LZMAError, ValueError) as exc:
                # Only the decompressor's errors: the file's own read errors propagate.
                raise _Corrupt(_short(exc)) from exc
            if zlib_style:
                pending = getattr(decompressor, "unconsumed_tail", b"")
            if not piece and not pending and position >= self._size and not decompressor.eof:
                raise _Corrupt("the stream ends before its end marker")
            produced += len(piece)
            if produced > self._cap:
                raise _Bomb(
                    f"the {self._kind} stream unpacks to more than {self._cap} bytes, past "
                    "max_total_bytes: a decompression bomb, or a model too big to scan"
                )
            if piece:
                yield piece
        return position - len(decompressor.unused_data) - len(pending), produced


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:120] if text else type(exc).__name__
