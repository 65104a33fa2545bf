"""The state one scan carries through every format scanner, and small shared helpers.

A :class:`Scan` holds the limits, the findings so far, the files analysed, the unpack budget
and the way back to the dispatcher, so that an archive scanner can hand a member to whatever
scanner its content calls for without importing them all (the dispatcher injects itself).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol

from modelkeep._positioned import PositionedReader
from modelkeep.registry.upload import Upload
from modelkeep.scanning.report import Finding, ScanLimits, ScanReport, Severity

__all__ = [
    "Buffer",
    "FileBytes",
    "FileSlice",
    "MemoryReader",
    "Rereadable",
    "Scan",
    "Sibling",
    "Siblings",
    "join",
    "show",
]

Buffer = bytes | bytearray | memoryview

# Past this many findings in one report, further ones are counted, not listed.
_MAX_FINDINGS = 200


def show(text: object, limit: int = 120) -> str:
    """``text`` as one printable line of at most ``limit`` characters, for locations and messages.

    Names inside a file belong to whoever made it: control characters are escaped so that a
    member called ``"a\\n[OK] safe"`` cannot forge a line of the report.
    """
    value = str(text)
    if not value.isprintable():
        value = "".join(
            ch if ch.isprintable() else ch.encode("unicode_escape").decode() for ch in value
        )
    return value if len(value) <= limit else value[: limit - 3] + "..."


def join(location: str, member: str) -> str:
    """The location of ``member`` inside the container at ``location``."""
    return f"{location} > {show(member, 200)}"


@dataclass(frozen=True)
class Sibling:
    """What a reference from one file to another in the same directory or archive points at.

    ``kind`` is ``file`` (a regular file of ``size`` bytes), ``symlink``, ``hardlink`` (a
    regular file with other names too), ``special`` (device, fifo, directory) or ``missing``.
    """

    kind: str
    size: int = 0


class Siblings(Protocol):
    """The other files next to the one being scanned (a directory or an archive's members)."""

    def lookup(self, base: str, reference: str) -> Sibling:
        """The file ``reference`` (relative, no ``..``) names from the directory of ``base``."""
        ...

    def mark_data(self, base: str, reference: str) -> None:
        """``reference`` is raw data read by ``base`` (ONNX external data): not a model itself."""
        ...


Dispatch = Callable[["Scan", Buffer, str, int, "Siblings | None", str], str]
DispatchFile = Callable[["Scan", IO[bytes], int, str, int, "Siblings | None", str], str]


class Scan:
    """One scan in progress. Not thread safe; one per call of ``scan_bytes``/``scan_path``."""

    def __init__(
        self,
        limits: ScanLimits,
        dispatch: Dispatch,
        dispatch_file: DispatchFile,
        spool_dir: Path | None = None,
    ) -> None:
        self.limits = limits
        # Where content is spooled, sealed, when it cannot be read in place (None: the system's
        # temporary directory); a server passes its staging directory.
        self.spool_dir = spool_dir
        self._dispatch = dispatch
        self._dispatch_file = dispatch_file
        self._findings: list[Finding] = []
        self._seen: set[Finding] = set()
        self._omitted: dict[Severity, int] = {}
        self._files: list[str] = []
        self._trusted_types: list[str] = []
        self.unpacked = 0

    # -- findings ---------------------------------------------------------------------------

    def add(self, severity: Severity, location: str, message: str) -> None:
        """Record a finding; identical ones are kept once, and past a cap they are counted."""
        finding = Finding(severity, location, message)
        if finding in self._seen:
            return
        self._seen.add(finding)
        if len(self._findings) >= _MAX_FINDINGS:
            self._omitted[severity] = self._omitted.get(severity, 0) + 1
            return
        self._findings.append(finding)

    def critical(self, location: str, message: str) -> None:
        self.add(Severity.CRITICAL, location, message)

    def high(self, location: str, message: str) -> None:
        self.add(Severity.HIGH, location, message)

    def medium(self, location: str, message: str) -> None:
        self.add(Severity.MEDIUM, location, message)

    def info(self, location: str, message: str) -> None:
        self.add(Severity.INFO, location, message)

    @property
    def finding_count(self) -> int:
        """How many findings were recorded so far (listed or not)."""
        return len(self._findings) + sum(self._omitted.values())

    def worst(self) -> Severity | None:
        """The most severe finding so far (omitted ones included)."""
        severities = [f.severity for f in self._findings] + list(self._omitted)
        order = list(Severity)
        return max(severities, key=order.index, default=None)

    # -- files, types, budget ---------------------------------------------------------------

    def record_file(self, location: str) -> None:
        self._files.append(location)

    def approve_types(self, types: Iterable[str]) -> None:
        """Types the skops scan approved beyond skops' defaults (see ``ScanReport``)."""
        for name in types:
            if name not in self._trusted_types:
                self._trusted_types.append(name)

    def charge(self, nbytes: int, location: str) -> bool:
        """Count ``nbytes`` against ``max_total_bytes``; False (and a finding) past it."""
        if self.unpacked + nbytes > self.limits.max_total_bytes:
            self.critical(
                location,
                f"unpacking this would bring the total past {self.limits.max_total_bytes} bytes "
                "(max_total_bytes): a decompression bomb, or a model too big to scan; "
                "store the files uncompressed",
            )
            return False
        self.unpacked += nbytes
        return True

    # -- recursion --------------------------------------------------------------------------

    def nested(
        self,
        data: Buffer,
        location: str,
        depth: int,
        siblings: Siblings | None = None,
        base: str = "",
    ) -> str:
        """Scan ``data`` found inside another file at nesting ``depth``; returns its format.

        ``base`` is the member's name relative to ``siblings`` (for references such as ONNX
        external data). Nesting deeper than ``max_depth`` is a finding and is not opened.
        """
        if self._too_deep(location, depth):
            return "unknown"
        return self._dispatch(self, data, location, depth, siblings, base)

    def nested_file(
        self,
        reader: IO[bytes],
        size: int,
        location: str,
        depth: int,
        siblings: Siblings | None = None,
        base: str = "",
    ) -> str:
        """:meth:`nested` for content read through a seekable file of ``size`` bytes: the
        analyser of its format reads only what it needs, so a large member is not held whole
        unless its format's analyser takes a whole buffer. The same findings as ``nested``."""
        if self._too_deep(location, depth):
            return "unknown"
        return self._dispatch_file(self, reader, size, location, depth, siblings, base)

    def _too_deep(self, location: str, depth: int) -> bool:
        if depth <= self.limits.max_depth:
            return False
        self.critical(
            location,
            f"containers nested more than {self.limits.max_depth} levels deep (max_depth): "
            "a recursive bomb or a zip quine; do not unpack this file",
        )
        return True

    def probe(self, data: Buffer, location: str, depth: int) -> None:
        """Scan ``data``, another loader's reading of a part already scanned, for evidence of an
        attack only: its critical findings join this scan, the rest is dropped (a lenient
        reader that gets garbage from a part another reader loads fine changes nothing)."""
        side = Scan(self.limits, self._dispatch, self._dispatch_file)
        side.unpacked = self.unpacked
        side.nested(data, location, depth)
        self.unpacked = side.unpacked
        for finding in side._findings:
            if finding.severity is Severity.CRITICAL:
                self.add(finding.severity, finding.location, finding.message)
        if side._omitted.get(Severity.CRITICAL):
            self.critical(location, "more evidence of an attack was found than is listed")

    def report(self, fmt: str) -> ScanReport:
        findings = list(self._findings)
        if self._omitted:
            order = list(Severity)
            worst = max(self._omitted, key=order.index)
            count = sum(self._omitted.values())
            findings.append(
                Finding(
                    worst,
                    "(report)",
                    f"{count} more findings are not listed (at most "
                    f"{_MAX_FINDINGS} are); the worst of them is {worst.value}",
                )
            )
        return ScanReport.from_findings(fmt, findings, self._files, self._trusted_types)


class MemoryReader(io.RawIOBase):
    """A read-only, seekable file over a buffer, without copying it (zipfile, tarfile, h5py)."""

    def __init__(self, data: Buffer) -> None:
        super().__init__()
        self._view = memoryview(data).cast("B")
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        target = memoryview(buffer).cast("B")
        count = max(0, min(len(target), len(self._view) - self._pos))
        target[:count] = self._view[self._pos : self._pos + count]
        self._pos += count
        return count

    def read(self, size: int | None = -1) -> bytes:
        end = (
            len(self._view) if size is None or size < 0 else min(len(self._view), self._pos + size)
        )
        start = min(self._pos, end)
        self._pos = max(self._pos, end)
        return bytes(self._view[start:end])

    def readall(self) -> bytes:
        return self.read(-1)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            position = offset
        elif whence == io.SEEK_CUR:
            position = self._pos + offset
        elif whence == io.SEEK_END:
            position = len(self._view) + offset
        else:
            raise ValueError("invalid whence")
        if position < 0:
            raise ValueError("negative seek position")
        self._pos = position
        return position

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        with contextlib.suppress(BufferError):  # a slice is alive; the view goes with it
            self._view.release()
        super().close()


class Readable(Protocol):
    """What :class:`FileSlice` needs of the file it views (raw and buffered files have it)."""

    def seek(self, offset: int, whence: int = ..., /) -> int: ...

    def read(self, size: int = ..., /) -> bytes | None: ...


_READ_PIECE = 1 << 20


class FileSlice(PositionedReader):
    """``size`` bytes of a seekable file from ``start`` on, as a file of their own (a member
    of a tar, the pickle after a NumPy header); reads go to the file, nothing is copied."""

    def __init__(self, whole: Readable, start: int, size: int) -> None:
        super().__init__(size)
        self._whole = whole
        self._start = start

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        target = memoryview(buffer).cast("B")
        count = max(0, min(len(target), self._size - self._pos))
        if count == 0:
            return 0
        self._whole.seek(self._start + self._pos)
        # In pieces: one read of the whole count would hold the bytes twice (read, then copied
        # into ``buffer``), and a caller reading a large file whole asks for all of it at once.
        filled = 0
        while filled < count:
            chunk = self._whole.read(min(count - filled, _READ_PIECE)) or b""
            if not chunk:
                break
            target[filled : filled + len(chunk)] = chunk
            filled += len(chunk)
        self._pos += filled
        return filled


# Steps back a Rereadable takes by producing its content again before it holds it instead.
_MAX_REREADS = 8
# Reads of a spooled content go through a buffer this large (a sealed segment is 1 MiB).
_SPOOL_READ = 64 * 1024


class Rereadable(PositionedReader):
    """A seekable file of ``size`` bytes whose content can only be produced from its start (a
    decompressed stream, a deflated zip member): ``pieces()`` produces it anew each time it is
    called, in pieces. Reading on consumes pieces and a step back starts over, so only a piece
    is held. After ``_MAX_REREADS`` steps back (an analyser that jumps about: h5py reading an
    HDF5 file, an archive directory listed backwards) the content is spooled once into a sealed
    file that has no name (``registry.upload.Upload``: sealed under a one-time key held in
    memory, so no plaintext reaches the disk) and read from there, decrypting only what is
    read: at most that many passes, and never the content held in memory."""

    def __init__(
        self, pieces: Callable[[], Iterator[bytes]], size: int, *, spool_dir: Path | None = None
    ) -> None:
        super().__init__(size)
        self._pieces = pieces
        self._spool_dir = spool_dir
        self._source: Iterator[bytes] | None = None
        self._piece = b""
        self._at = 0  # where self._piece starts in the content
        self._rereads = 0
        self._spool: Upload | None = None
        self._spooled: io.BufferedReader | None = None

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        target = memoryview(buffer).cast("B")
        count = max(0, min(len(target), self._size - self._pos))
        if count and (self._source is None or self._pos < self._at) and self._spooled is None:
            self._start_over()
        if self._spooled is not None:
            self._spooled.seek(self._pos)
            filled = self._spooled.readinto(target[:count])
            self._pos += filled
            return filled
        filled = 0
        while filled < count:
            offset = self._pos - self._at
            if offset >= len(self._piece):
                assert self._source is not None
                self._at += len(self._piece)
                self._piece = next(self._source, b"")
                if not self._piece:
                    break
                continue
            step = min(count - filled, len(self._piece) - offset)
            target[filled : filled + step] = self._piece[offset : offset + step]
            filled += step
            self._pos += step
        return filled

    def _start_over(self) -> None:
        if self._source is not None:
            self._rereads += 1
            self._drop_source()
        if self._rereads > _MAX_REREADS:
            self._spool = Upload(self._spool_dir)
            for piece in self._pieces():
                self._spool.write(piece)
            self._spool.finish()
            self._spooled = io.BufferedReader(self._spool.seekable_reader(), _SPOOL_READ)
            return
        self._source = self._pieces()
        self._piece, self._at = b"", 0

    def _drop_source(self) -> None:
        close = getattr(self._source, "close", None)
        if close is not None:
            close()  # a generator's own cleanup (a zip member's handle) runs now
        self._source, self._piece = None, b""

    def close(self) -> None:
        self._drop_source()
        if self._spooled is not None:
            self._spooled.close()
            self._spooled = None
        if self._spool is not None:
            self._spool.close()
            self._spool = None
        super().close()


class FileBytes:
    """Part of a seekable file, sliced like a buffer without being read: ``len()`` and slices
    cost nothing, ``bytes()`` reads that part. Archive layout checks read a few bytes at many
    offsets of an archive that is not in memory (a sealed copy decrypted as it is read)."""

    def __init__(self, file: Readable, start: int = 0, size: int | None = None) -> None:
        self._file = file
        self._start = start
        self._size = file.seek(0, io.SEEK_END) - start if size is None else size

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, index: slice) -> FileBytes:
        start, stop, step = index.indices(self._size)
        if step != 1:
            raise ValueError("only contiguous slices")
        return FileBytes(self._file, self._start + start, max(0, stop - start))

    def __bytes__(self) -> bytes:
        self._file.seek(self._start)
        return self._file.read(self._size) or b""
