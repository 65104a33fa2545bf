"""Zip archives and the model formats that are zips: PyTorch, NumPy ``.npz``, skops, Keras.

The layout is checked against the bytes before any member is read, because zip parsers
disagree: a local header whose name differs from the central directory's, two members sharing
bytes (the overlapping-file zip bomb), bytes that belong to no member (where a second archive
can hide from a scanner that reads the central directory only), data after the end record.
Then the declared sizes are checked against ``max_total_bytes``, so a bomb is refused before it
is inflated; reading stops at the declared size.

A member is read the way each loader would read it (``_zip_readers``): by ``zipfile`` (CRC-32
checked), and when ``zipfile`` refuses it (a wrong CRC-32, an unusual flag bit), the way
PyTorch's reader and lenient unzip tools do; when the local header disagrees with the central
directory on method or sizes, what a streaming reader gets is analysed too, and so are the
members a streaming reader finds in bytes the central directory leaves out. Only a member no
reader can load is an error.

The archive is read through a seekable file (``scan_zip_file``): the layout checks read a few
bytes at each header, a stored member is analysed in place and a deflated one inflated as its
analyser reads it (within ``max_total_bytes``), so a large archive that is not in memory (a
sealed copy decrypted as it is read) is never held whole.
"""

from __future__ import annotations

import posixpath
import struct
import zipfile
from collections.abc import Callable
from typing import IO, cast

from modelkeep.scanning._archive import Member, check_members, scan_members
from modelkeep.scanning._context import Buffer, FileBytes, MemoryReader, Scan, join
from modelkeep.scanning._keras import scan_keras_zip
from modelkeep.scanning._pickle import UNSAFE_PICKLE, scan_torch_pickle
from modelkeep.scanning._pickle_policy import TORCH_STORAGE_SIZES
from modelkeep.scanning._skops import scan_skops
from modelkeep.scanning._zip_archive import OpenZip, read_json, short_error
from modelkeep.scanning._zip_readers import local_header, scan_hidden
from modelkeep.scanning.report import Severity

__all__ = ["OpenZip", "read_json", "scan_zip", "scan_zip_file"]

_LOCAL = b"PK\x03\x04"
_DESCRIPTOR = b"PK\x07\x08"
_END = b"PK\x05\x06"
_END64_LOCATOR = b"PK\x06\x07"


def scan_zip(scan: Scan, data: Buffer, location: str, depth: int) -> str:
    """Check a zip's layout, names and sizes, then scan it as the format its members make it."""
    return scan_zip_file(scan, cast(IO[bytes], MemoryReader(data)), len(data), location, depth)


def scan_zip_file(scan: Scan, reader: IO[bytes], size: int, location: str, depth: int) -> str:
    """:func:`scan_zip` for a seekable file of ``size`` bytes, read only where the checks and
    each member's analyser need it."""
    view = FileBytes(reader, 0, size)
    try:
        zf = zipfile.ZipFile(reader)
    except (
        zipfile.BadZipFile,
        zipfile.LargeZipFile,
        NotImplementedError,
        OSError,
        ValueError,
        EOFError,
    ) as exc:
        scan.high(location, f"not a readable zip archive ({short_error(exc)})")
        return "zip"
    with zf:
        archive = OpenZip(scan, zf, location, reader, view)
        # 1. Member count, before anything else is looked at.
        if len(archive.infos) > scan.limits.max_members:
            scan.critical(
                location,
                f"{len(archive.infos)} members, more than "
                f"{scan.limits.max_members} (max_members): an archive bomb",
            )
            return "zip"
        # 2. The bytes: every member where the central directory says, nothing shared, nothing
        #    hidden between them or after the end.
        gaps: list[tuple[int, int, str]] = []
        layout_ok = _check_layout(scan, view, archive.infos, location, gaps)
        scan_hidden(scan, view, gaps, depth)
        # 3. Sizes as declared, before inflating anything.
        sizes_ok = _check_sizes(scan, archive.infos, location)
        # 4. Names, duplicates, links, encryption.
        members = archive.members()
        names_ok = check_members(scan, members, location)
        for info in archive.infos:
            local = local_header(view, info.header_offset)
            if info.flag_bits & 0x1 and (local is None or local.flags & 0x1):
                scan.high(
                    join(location, info.filename), "the member is encrypted; it cannot be analysed"
                )
        if not (layout_ok and sizes_ok and names_ok):
            return "zip"
        # 5. Every member, by the family the archive belongs to.
        family = _family(archive)
        scanner = _FAMILIES.get(family)
        if scanner is None:
            scan_members(scan, members, location, depth)
        else:
            scanner(scan, archive, members, view, depth)
        # 6. What streaming readers get where a local header disagrees with the directory.
        for info, content in archive.local_readings():
            where = f"{join(location, info.filename)} (as its local header reads)"
            scan.add(
                Severity.LOW,
                where,
                "the local header disagrees with the central directory on method, sizes or "
                "flags: streaming unzip tools read other bytes, which were searched for attacks",
            )
            scan.record_file(where)
            scan.probe(content, where, depth + 1)
        if scanner is None:
            return "npz" if family == "npz" else "zip"
        return family


def _check_layout(
    scan: Scan,
    view: FileBytes,
    infos: list[zipfile.ZipInfo],
    location: str,
    gaps: list[tuple[int, int, str]],
) -> bool:
    """Report layout problems; False when members must not be read (shared bytes, names that
    differ between headers, a broken header). Bytes no member claims are added to ``gaps``
    (start, end, location), and the members are still scanned."""
    ok = True
    end_record = _end_record(view)
    if end_record is None:
        scan.high(location, "the zip end record is missing or damaged")
        return False
    cd_start, end_of_archive = end_record
    expected = 0
    for info in sorted(infos, key=lambda i: i.header_offset):
        where = join(location, info.filename)
        offset = info.header_offset
        if offset < expected:
            scan.critical(
                where,
                "this member's bytes overlap another member's: the "
                "overlapping-files zip bomb, or a parser confusion attack",
            )
            return False
        if offset > expected:
            gaps.append((expected, offset, where))
        header = bytes(view[offset : offset + 30])
        if len(header) < 30 or not header.startswith(_LOCAL):
            scan.high(where, "the member's local header is missing or damaged")
            return False
        (flags,) = struct.unpack("<H", header[6:8])
        name_len, extra_len = struct.unpack("<HH", header[26:30])
        local_raw = bytes(view[offset + 30 : offset + 30 + name_len])
        local_name = local_raw.decode("utf-8" if flags & 0x800 else "cp437", "replace")
        if local_name != info.orig_filename:
            scan.critical(
                where,
                f"the local header names this member {local_name[:80]!r}: tools "
                "that read local headers extract a different file than those that "
                "read the central directory",
            )
            ok = False
        data_end = offset + 30 + name_len + extra_len + info.compress_size
        if data_end > len(view):
            scan.high(where, "the member runs past the end of the file (truncated)")
            return False
        if info.flag_bits & 0x8:
            zip64 = info.file_size >= 0xFFFFFFFF or info.compress_size >= 0xFFFFFFFF
            signed = bytes(view[data_end : data_end + 4]) == _DESCRIPTOR
            data_end += (4 if signed else 0) + (20 if zip64 else 12)
        expected = data_end
    if cd_start < expected:
        scan.critical(location, "member data overlaps the central directory")
        return False
    if cd_start > expected:
        gaps.append((expected, cd_start, location))
    if end_of_archive != len(view):
        scan.high(
            location,
            f"{len(view) - end_of_archive} bytes after the end of the archive "
            "were not analysed (another file appended to this one?)",
        )
    return ok


def _end_record(view: FileBytes) -> tuple[int, int] | None:
    """(where the central directory starts, where the end record and its comment end).

    The start is computed back from the end record (``start = end record - directory size``),
    as zipfile does, so bytes prepended to the archive show up as a gap before the first member.
    """
    tail_start = max(0, len(view) - (22 + 65535))
    tail = bytes(view[tail_start:])
    index = tail.rfind(_END)
    if index < 0 or len(tail) - index < 22:
        return None
    position = tail_start + index
    fields = struct.unpack("<HHHHIIH", tail[index + 4 : index + 22])
    cd_size, comment_len = fields[4], fields[6]
    end_of_archive = position + 22 + comment_len
    directory_end = position
    locator = bytes(view[position - 20 : position]) if position >= 20 else b""
    if locator.startswith(_END64_LOCATOR):
        directory_end = position - 20 - 56
        head = bytes(view[directory_end : directory_end + 56]) if directory_end >= 0 else b""
        if len(head) < 56 or not head.startswith(b"PK\x06\x06"):
            return None
        (cd_size,) = struct.unpack("<Q", head[40:48])
    return directory_end - cd_size, end_of_archive


def _check_sizes(scan: Scan, infos: list[zipfile.ZipInfo], location: str) -> bool:
    ok = True
    total = 0
    for info in infos:
        where = join(location, info.filename)
        if info.compress_type == zipfile.ZIP_STORED:
            if info.file_size != info.compress_size:
                scan.high(where, "a stored member whose sizes disagree")
                ok = False
            continue
        total += info.file_size
    remaining = scan.limits.max_total_bytes - scan.unpacked
    if total > remaining:
        scan.critical(
            location,
            f"the members unpack to {total} bytes, past max_total_bytes "
            f"({scan.limits.max_total_bytes}): a zip bomb, or a model too big to scan",
        )
        ok = False
    return ok


# -- families ---------------------------------------------------------------------------------


def _family(archive: OpenZip) -> str:
    names = [info.filename for info in archive.infos if not info.is_dir()]
    if not names:
        return "zip"
    if "schema.json" in names:
        # Any zip with a root schema.json is judged as skops: skops.io.load would read it so,
        # and a schema that is not valid skops is an error, never a generic (safe) zip.
        return "skops"
    if "config.json" in names and ("metadata.json" in names or "model.weights.h5" in names):
        return "keras"
    if any(posixpath.basename(name) in ("data.pkl", "constants.pkl") for name in names):
        return "pytorch-zip"
    if all(name.endswith(".npy") for name in names):
        return "npz"
    return "zip"


def _scan_pytorch(
    scan: Scan, archive: OpenZip, members: list[Member], data: FileBytes, depth: int
) -> None:
    scan.medium(archive.location, UNSAFE_PICKLE)
    by_name = {info.filename: info for info in archive.infos}
    pickles = {name for name in by_name if name.endswith((".pkl", ".debug_pkl"))}
    storages: list[tuple[str, str, int, str]] = []
    # 1. Every pickle member, persistent ids allowed: they name the raw storages.
    for name in sorted(pickles):
        where = join(archive.location, name)
        scan.record_file(where)
        content = archive.read(by_name[name])
        if content is None:
            continue
        prefix = posixpath.dirname(name)
        for ref in scan_torch_pickle(scan, content, where, depth + 1):
            path = posixpath.join(prefix, "data", ref.key)
            storages.append((path, ref.storage, ref.numel, where))
    # 2. Each named storage is a member big enough for the tensor data read from it.
    referenced = {path for path, _, _, _ in storages}
    for path, storage, numel, where in storages:
        member_info = by_name.get(path)
        if member_info is None:
            scan.high(
                where, f"the checkpoint names storage {path[-60:]!r}, which is not in the archive"
            )
        elif member_info.file_size < numel * TORCH_STORAGE_SIZES[storage]:
            scan.high(
                join(archive.location, path),
                "the storage is smaller than the tensor data the checkpoint reads from it",
            )
    # 3. Named storages are raw bytes torch never unpickles: verified (CRC) and not kept.
    #    Everything else, unreferenced "storages" included, is scanned by content.
    for member in members:
        if member.kind == "file" and member.name in referenced:
            scan.record_file(join(archive.location, member.name))
            member.read(False)

    def skip(member: Member) -> bool:
        return member.name in referenced or member.name in pickles

    scan_members(scan, members, archive.location, depth, skip=skip)


def _scan_skops(
    scan: Scan, archive: OpenZip, members: list[Member], data: FileBytes, depth: int
) -> None:
    scan_skops(scan, bytes(data), archive, depth)


def _scan_keras(
    scan: Scan, archive: OpenZip, members: list[Member], data: FileBytes, depth: int
) -> None:
    scan_keras_zip(scan, archive, members, depth)


_FAMILIES: dict[str, Callable[[Scan, OpenZip, list[Member], FileBytes, int], None]] = {
    "pytorch-zip": _scan_pytorch,
    "skops": _scan_skops,
    "keras": _scan_keras,
}
