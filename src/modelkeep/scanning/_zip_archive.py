"""An opened, layout-checked zip archive: what the zip family scanners read members through.

``_zip`` checks the layout and picks the family; the family scanners (``_skops``, ``_keras``
and ``_zip``'s own PyTorch one) read members and JSON through :class:`OpenZip`. It lives apart
from both so that each imports it and neither imports the other's caller.
"""

from __future__ import annotations

import functools
import io
import json
import stat
import zipfile
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import IO, cast

from modelkeep.scanning._archive import Member, in_memory
from modelkeep.scanning._context import FileBytes, FileSlice, Rereadable, Scan, join, show
from modelkeep.scanning._zip_readers import (
    TooLarge,
    Unreadable,
    local_header,
    read_central,
    read_local,
)
from modelkeep.scanning.report import Severity

__all__ = ["OpenZip", "read_json", "short_error"]

_PEEK = 64 * 1024
_CHUNK = 1 << 20
# A member's analyser reads headers, mostly small: the archive's file below is buffered already.
_BUFFER = 64 * 1024


class OpenZip:
    """An opened, layout-checked zip; the family scanners read members through it."""

    def __init__(
        self, scan: Scan, zf: zipfile.ZipFile, location: str, file: IO[bytes], view: FileBytes
    ) -> None:
        self.scan = scan
        self.zf = zf
        self.location = location
        self.file = file
        self.view = view
        self.infos = list(zf.infolist())
        # Members only a streaming reader could read, analysed that way already.
        self.read_locally: set[str] = set()

    def read(self, info: zipfile.ZipInfo, keep: bool = True) -> bytes | None:
        """The member's bytes as loaders read them, or None after a finding. ``keep=False``
        only verifies it, in pieces, and returns b""."""
        where = join(self.location, info.filename)
        if info.compress_type != zipfile.ZIP_STORED and not self.scan.charge(info.file_size, where):
            return None
        # 1. As Python's zipfile reads it (numpy, skops, Keras): CRC-32 and headers checked.
        try:
            if keep:
                with self.zf.open(info) as handle:
                    return handle.read()
            for _ in self._pieces(info):
                pass
            return b""
        except Exception as exc:  # BadZipFile, NotImplementedError, RuntimeError, zlib.error...
            refused = show(short_error(exc), 160)  # zipfile's message quotes the member's name
        content = self._read_leniently(info, refused)
        return content if keep or content is None else b""

    @contextmanager
    def open(self, info: zipfile.ZipInfo) -> Iterator[IO[bytes] | None]:
        """The member as a seekable file, with the findings ``read`` gives on the way.

        A member that Python's zipfile reads (its CRC-32 checked as the bytes stream past) is
        then read without being held: a stored one in place, from the archive's own file; a
        deflated one inflated again as its analyser reads it (``Rereadable``). One that
        zipfile refuses is read whole, as ``read`` reads it, the way readers that check less do.
        """
        header = local_header(self.view, info.header_offset)
        if header is None:
            with in_memory(self.read(info)) as content:
                yield content
            return
        stored = info.compress_type == zipfile.ZIP_STORED
        if not stored and not self.scan.charge(info.file_size, join(self.location, info.filename)):
            yield None
            return
        refused: str | None = None
        size = 0
        try:
            for piece in self._pieces(info):
                size += len(piece)
        except Exception as exc:  # as in read
            refused = show(short_error(exc), 160)
        if refused is not None:
            with in_memory(self._read_leniently(info, refused)) as content:
                yield content
            return
        raw: io.RawIOBase
        if stored:
            # zipfile read exactly these bytes: stored, right after the local header.
            raw = FileSlice(self.file, header.data_start, size)
        else:
            raw = Rereadable(
                functools.partial(self._pieces, info), size, spool_dir=self.scan.spool_dir
            )
        with io.BufferedReader(raw, _BUFFER) as inside:
            yield cast(IO[bytes], inside)

    def _pieces(self, info: zipfile.ZipInfo) -> Iterator[bytes]:
        """The member as Python's zipfile reads it, in pieces; its errors propagate."""
        with self.zf.open(info) as handle:
            while piece := handle.read(_CHUNK):
                yield piece

    def _read_leniently(self, info: zipfile.ZipInfo, refused: str) -> bytes | None:
        """The member as readers that check less than zipfile read it (zipfile ``refused`` it),
        with a finding saying which; None after a finding when none can."""
        where = join(self.location, info.filename)
        # 2. As PyTorch's reader and lenient unzip tools read it: no CRC-32, central sizes.
        try:
            content = read_central(self.view, info)
        except Unreadable as exc:
            lenient = str(exc)
        else:
            self.scan.add(
                Severity.LOW,
                where,
                f"Python's zipfile (numpy, skops, Keras) refuses this member ({refused}), but "
                "PyTorch's reader and lenient unzip tools read it: what they read was analysed",
            )
            return content
        # 3. As streaming unzip tools read it: the local header's method, sizes and flags.
        self.read_locally.add(info.filename)
        try:
            local = read_local(
                self.view, info, self.scan.limits.max_total_bytes - self.scan.unpacked
            )
        except (Unreadable, TooLarge):
            local = None
        if local is None:
            self.scan.high(
                where,
                f"no reader can load this member: Python's zipfile refuses it ({refused}) and "
                f"readers that check less cannot decode it ({lenient}); it was not analysed",
            )
            return None
        self.scan.add(
            Severity.LOW,
            where,
            f"only streaming unzip tools, which trust the local header, can read this member "
            f"(Python's zipfile: {refused}; PyTorch's reader: {lenient}): what they read was "
            "analysed",
        )
        return local

    def local_readings(self) -> list[tuple[zipfile.ZipInfo, bytes]]:
        """What streaming readers get from local headers that disagree with the central
        directory (method, sizes, flags): each such member with the bytes read its local way."""
        readings: list[tuple[zipfile.ZipInfo, bytes]] = []
        for info in self.infos:
            if info.filename in self.read_locally:
                continue
            where = join(self.location, info.filename)
            cap = self.scan.limits.max_total_bytes - self.scan.unpacked
            try:
                content = read_local(self.view, info, cap)
            except Unreadable:
                continue  # that reader fails on it; nothing it could load
            except TooLarge as exc:
                self.scan.critical(
                    where,
                    f"read by its local header, the member unpacks past max_total_bytes "
                    f"({exc}): a decompression bomb for streaming unzip tools",
                )
                continue
            if content is not None and self.scan.charge(len(content), where):
                readings.append((info, content))
        return readings

    def peek(self, info: zipfile.ZipInfo) -> bytes:
        try:
            with self.zf.open(info) as handle:
                return handle.read(_PEEK)
        except Exception:  # reported when the member is read in full
            return b""

    def members(self) -> list[Member]:
        return [self._member(info) for info in self.infos]

    def _member(self, info: zipfile.ZipInfo) -> Member:
        mode = (info.external_attr >> 16) & 0o170000 if info.create_system == 3 else 0
        if info.is_dir():
            kind = "dir"
        elif stat.S_ISLNK(mode):
            kind = "symlink"
        elif mode and not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
            kind = "special"
        else:
            kind = "file"
        link = ""
        if kind == "symlink":
            target = self.read(info) if info.file_size <= 4096 else None
            link = target.decode("utf-8", "replace") if target is not None else "/"

        def read(keep: bool) -> bytes | None:
            return self.read(info, keep)

        def peek() -> bytes:
            return self.peek(info)

        def opener() -> AbstractContextManager[IO[bytes] | None]:
            return self.open(info)

        return Member(
            info.filename, info.file_size, kind, read, link=link, peek=peek, opener=opener
        )


def short_error(exc: BaseException) -> str:
    """An exception's text on one line, at most 120 characters, without NULs."""
    text = " ".join(str(exc).split())
    return (text[:120] if text else type(exc).__name__).replace("\x00", "")


def read_json(scan: Scan, archive: OpenZip, name: str) -> object | None:
    """A JSON member, parsed; None after a finding when it is missing or not JSON."""
    info = next((i for i in archive.infos if i.filename == name), None)
    where = join(archive.location, name)
    if info is None:
        scan.high(where, "this member is missing")
        return None
    content = archive.read(info)
    if content is None:
        return None
    try:
        parsed: object = json.loads(content)
    except (ValueError, RecursionError) as exc:
        scan.high(where, f"not valid JSON ({type(exc).__name__})")
        return None
    return parsed
