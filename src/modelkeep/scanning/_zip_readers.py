"""How loaders other than Python's ``zipfile`` read a zip member, so that the scanner analyses
what each of them would get from a damaged or unusual archive.

Python's ``zipfile`` (used by ``numpy.load``, skops and Keras) is strict: it checks every
member's CRC-32, refuses flag bits it cannot honour (compressed patched data, strong
encryption) and a local header whose name differs from the central directory's. Other loaders
are not. PyTorch's reader (miniz) finds a member through the central directory, skips the
local header by that header's own lengths, decompresses by the central directory's method and
sizes and does not check the CRC-32 (:func:`read_central`). Streaming unzip tools walk the
local headers and trust the method and sizes written there (:func:`read_local`). A member
either of them can read is a member that can hurt when loaded, so the scanner analyses it.

Hand-written because no library reads zips the way those loaders do: the point is to follow
their leniency, not a correct reading. Both readers decompress in pieces and stop at a cap, so
a member declaring little and inflating to much costs bounded work.
"""

from __future__ import annotations

import struct
import zipfile
import zlib
from dataclasses import dataclass

from modelkeep.scanning._archive import unsafe_name
from modelkeep.scanning._context import FileBytes, Scan, show
from modelkeep.scanning.report import Severity

__all__ = [
    "LocalHeader",
    "TooLarge",
    "Unreadable",
    "decode_local",
    "hidden_members",
    "local_header",
    "read_central",
    "read_local",
    "scan_hidden",
]

_LOCAL = b"PK\x03\x04"
_CHUNK = 1 << 20
# Flag bits no reader decodes without more than the archive holds: encryption (0), compressed
# patched data (5), strong encryption (6).
_UNDECODABLE = 0x1 | 0x20 | 0x40
_DESCRIPTOR = 0x8


class Unreadable(Exception):
    """This reader cannot produce the member's bytes; the message says why."""


class TooLarge(Exception):
    """The member inflates past the cap it was read under."""


@dataclass(frozen=True)
class LocalHeader:
    """The fields of a member's local header that a streaming reader trusts."""

    flags: int
    method: int
    compress_size: int
    file_size: int
    name: bytes
    data_start: int


def local_header(view: FileBytes, offset: int) -> LocalHeader | None:
    """The local header at ``offset``, or None when there is none."""
    header = bytes(view[offset : offset + 30])
    if len(header) < 30 or not header.startswith(_LOCAL):
        return None
    flags, method = struct.unpack("<HH", header[6:10])
    compress_size, file_size, name_len, extra_len = struct.unpack("<IIHH", header[18:30])
    name = bytes(view[offset + 30 : offset + 30 + name_len])
    return LocalHeader(
        flags, method, compress_size, file_size, name, offset + 30 + name_len + extra_len
    )


def read_central(view: FileBytes, info: zipfile.ZipInfo) -> bytes:
    """What PyTorch's reader gets: the central directory's method, sizes and flags, the data
    found past the local header, no CRC-32 check; never more than the declared size (already
    counted against the scan's budget). Raises ``Unreadable``."""
    if info.flag_bits & _UNDECODABLE:
        raise Unreadable("its central directory entry marks it encrypted or patched")
    header = local_header(view, info.header_offset)
    if header is None:
        raise Unreadable("its local header is missing")
    raw = view[header.data_start : header.data_start + info.compress_size]
    if len(raw) != info.compress_size:
        raise Unreadable("its data runs past the end of the file")
    content = _decode(raw, info.compress_type, info.file_size + 1, until_end=False)
    if len(content) != info.file_size:
        raise Unreadable(
            f"it decompresses to {len(content)} bytes, not the {info.file_size} declared"
        )
    return content


def read_local(view: FileBytes, info: zipfile.ZipInfo, cap: int) -> bytes | None:
    """What a streaming reader gets from the member's local header, when that differs from the
    central directory's reading (method, sizes, flags); None when both readings are the same.
    Raises ``Unreadable`` when the local header leads nowhere, ``TooLarge`` past ``cap``."""
    header = local_header(view, info.header_offset)
    if header is None:
        return None
    described = header.flags & _DESCRIPTOR
    same = (
        header.method == info.compress_type and (header.flags ^ info.flag_bits) & _UNDECODABLE == 0
    )
    if same and (
        described
        or (header.compress_size, header.file_size) == (info.compress_size, info.file_size)
    ):
        return None
    if header.flags & _UNDECODABLE:
        raise Unreadable("its local header marks it encrypted or patched")
    if described:
        # Sizes follow the data: a streaming reader inflates until the deflate stream ends.
        if header.method != zipfile.ZIP_DEFLATED:
            raise Unreadable("its local header gives no size and the data is not deflated")
        return _decode(view[header.data_start :], header.method, cap + 1, until_end=True, cap=cap)
    if header.file_size > cap:
        raise TooLarge(f"its local header declares {header.file_size} bytes")
    raw = view[header.data_start : header.data_start + header.compress_size]
    if len(raw) != header.compress_size:
        raise Unreadable("its local header's size runs past the end of the file")
    return _decode(raw, header.method, header.file_size + 1, until_end=False, cap=cap)


def hidden_members(view: FileBytes, start: int, end: int) -> tuple[list[LocalHeader], int]:
    """The members a streaming reader finds in ``view[start:end]``, bytes the central
    directory does not account for (an archive prepended to this one, a member left out of the
    directory), and where the walk stopped: at ``end`` when every byte was accounted for.

    The walk follows local headers that give their sizes, and steps over another archive's
    central directory and end record (a streaming reader stops there, and the next archive's
    members follow).
    """
    found: list[LocalHeader] = []
    position = start
    while position < end:
        signature = bytes(view[position : position + 4])
        skip = 0
        if signature == b"PK\x01\x02" and position + 46 <= end:
            skip = 46 + sum(struct.unpack("<HHH", bytes(view[position + 28 : position + 34])))
        elif signature == b"PK\x05\x06" and position + 22 <= end:
            skip = 22 + struct.unpack("<H", bytes(view[position + 20 : position + 22]))[0]
        if skip:
            if position + skip > end:
                break
            position += skip
            continue
        header = local_header(view, position)
        if header is None or header.flags & _DESCRIPTOR:
            break
        data_end = header.data_start + header.compress_size
        if data_end > end:
            break
        found.append(header)
        position = data_end
    return found, position


def decode_local(view: FileBytes, header: LocalHeader, cap: int) -> bytes:
    """A member's bytes as its local header describes them. Raises ``Unreadable``, or
    ``TooLarge`` past ``cap``."""
    if header.flags & _UNDECODABLE:
        raise Unreadable("its local header marks it encrypted or patched")
    if header.file_size > cap:
        raise TooLarge(f"its local header declares {header.file_size} bytes")
    raw = view[header.data_start : header.data_start + header.compress_size]
    return _decode(raw, header.method, header.file_size + 1, until_end=False, cap=cap)


def _decode(
    raw: FileBytes, method: int, limit: int, *, until_end: bool, cap: int | None = None
) -> bytes:
    """Stored or deflated bytes (the methods miniz and streaming readers share), at most
    ``limit`` bytes of output; ``TooLarge`` when the output passes ``cap``."""
    if method == zipfile.ZIP_STORED:
        return bytes(raw[:limit])
    if method != zipfile.ZIP_DEFLATED:
        raise Unreadable(f"compression method {method} is not one this reader decodes")
    inflater = zlib.decompressobj(-15)
    out = bytearray()
    position = 0
    pending = b""
    try:
        while not inflater.eof and len(out) < limit:
            if not pending:
                if position >= len(raw):
                    break
                pending = bytes(raw[position : position + _CHUNK])
                position += len(pending)
            out += inflater.decompress(pending, min(_CHUNK, limit - len(out)))
            pending = inflater.unconsumed_tail
            if cap is not None and len(out) > cap:
                raise TooLarge(f"it inflates past {cap} bytes")
    except zlib.error as exc:
        raise Unreadable(f"its deflate data is corrupt ({exc})") from None
    if until_end and not inflater.eof:
        raise Unreadable("its deflate data ends before the stream does")
    return bytes(out)


def scan_hidden(scan: Scan, view: FileBytes, gaps: list[tuple[int, int, str]], depth: int) -> None:
    """Bytes the central directory does not account for: what streaming readers find there
    (members of a prepended archive, members left out of the directory) is scanned like any
    member; bytes no reader would take for a member are an error."""
    for start, end, where in gaps:
        headers, stopped = hidden_members(view, start, end)
        for header in headers:
            name = header.name.decode("utf-8" if header.flags & 0x800 else "cp437", "replace")
            member = f"{where} > {show(name, 200)} (hidden: only streaming readers see it)"
            problem = unsafe_name(name)
            if problem is not None:
                scan.critical(member, f"the member name {problem}: extracting it writes outside")
                continue
            scan.record_file(member)
            cap = scan.limits.max_total_bytes - scan.unpacked
            try:
                content = decode_local(view, header, cap)
            except TooLarge as exc:
                scan.critical(member, f"unpacks past max_total_bytes ({exc}): a bomb")
                continue
            except Unreadable as exc:
                scan.add(Severity.LOW, member, f"no reader can decode this hidden member ({exc})")
                continue
            if scan.charge(len(content) if header.method else 0, member):
                scan.nested(content, member, depth + 1)
        if stopped < end:
            scan.high(
                where,
                f"{end - stopped} bytes here belong to no member: hidden data that tools "
                "reading the archive differently would see, and that was not analysed",
            )
        else:
            scan.add(
                Severity.LOW,
                where,
                f"{end - start} bytes here are not in the central directory; streaming unzip "
                f"tools read {len(headers)} more members from them, which were analysed",
            )
