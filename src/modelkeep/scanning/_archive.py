"""Archives: the checks every archive gets, the member walk, and the tar and 7z readers.

Each member name is checked before anything is read: absolute names and ``..`` climb out of
the extraction directory (zip slip), links can point anywhere, devices and fifos have no place
in a model, and two members with the same name are extracted differently by different tools.
Then every member is scanned by its content, at one more level of nesting. ONNX members go
first, so that the files they name as external data are known to be data, not models. A member
is handed to its analyser as a seekable file: a tar's members are read in place through the
archive's own file, so a large archive that is not in memory (a sealed copy, decrypted as it is
read) is scanned reading only what each member's analyser needs.
"""

from __future__ import annotations

import io
import posixpath
import re
import tarfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import IO, Any, cast

from modelkeep.registry.upload import Upload
from modelkeep.scanning._context import Buffer, MemoryReader, Scan, Sibling, join, show
from modelkeep.scanning.detect import detect_format

__all__ = [
    "ArchiveSiblings",
    "Member",
    "check_members",
    "in_memory",
    "scan_7z",
    "scan_7z_file",
    "scan_members",
    "scan_tar",
    "scan_tar_file",
    "unsafe_name",
]

_DRIVE = re.compile(r"^[A-Za-z]:")
_PEEK = 64 * 1024
_CHUNK = 1 << 20

Opener = Callable[[], AbstractContextManager[IO[bytes] | None]]


@dataclass
class Member:
    """One archive member. ``kind``: file, dir, symlink, hardlink or special. ``read(keep)``
    returns the content (``keep=False``: read and verify only, return b""), or None after
    reporting why it could not. ``opener``, where the archive has one, gives the content as a
    seekable file without holding it (see :meth:`open`)."""

    name: str
    size: int
    kind: str
    read: Callable[[bool], bytes | None]
    link: str = ""
    peek: Callable[[], bytes] | None = None
    opener: Opener | None = None

    def open(self) -> AbstractContextManager[IO[bytes] | None]:
        """The content as a seekable file whose ``read(n)`` returns ``n`` bytes unless at its
        end, or None after reporting why it could not be read; the same bytes ``read`` gives
        and the same findings on the way."""
        if self.opener is not None:
            return self.opener()
        return in_memory(self.read(True))


def in_memory(content: bytes | None) -> AbstractContextManager[IO[bytes] | None]:
    """``content`` as a seekable file, for :meth:`Member.open` (None stays None)."""
    return nullcontext(None if content is None else cast(IO[bytes], MemoryReader(content)))


def unsafe_name(name: str) -> str | None:
    """Why extracting a member called ``name`` would write outside its directory, or None."""
    if "\x00" in name:
        return "contains a NUL byte (tools disagree on where the name ends)"
    unified = name.replace("\\", "/")
    if unified.startswith("/") or _DRIVE.match(unified):
        return "is an absolute path"
    if ".." in unified.split("/"):
        return "climbs out of the archive with '..' (zip slip)"
    return None


def _normal(name: str) -> str:
    return posixpath.normpath(name.replace("\\", "/")).lstrip("/")


def _link_escapes(name: str, target: str) -> bool:
    unified = target.replace("\\", "/")
    if unified.startswith("/") or _DRIVE.match(unified):
        return True
    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(_normal(name)), unified))
    return resolved == ".." or resolved.startswith("../")


def check_members(scan: Scan, members: list[Member], location: str) -> bool:
    """Names, duplicates, links and special files; False when extraction would be unsafe."""
    safe = True
    seen: set[str] = set()
    links: set[str] = set()
    for member in members:
        where = join(location, member.name)
        problem = unsafe_name(member.name)
        if problem is not None:
            scan.critical(
                where,
                f"the member name {problem}: extracting it writes outside the "
                "target directory; do not unpack this archive",
            )
            safe = False
            continue
        normal = _normal(member.name)
        if member.kind != "dir":
            if normal in seen:
                scan.critical(
                    where,
                    "two members have this name: tools disagree on which one "
                    "is extracted, a way to show a scanner one file and load another",
                )
                safe = False
            seen.add(normal)
        if member.kind in ("symlink", "hardlink"):
            links.add(normal)
            target = show(member.link, 200)
            if _link_escapes(member.name, member.link):
                scan.critical(
                    where,
                    f"a {member.kind} to {target}, outside the archive: "
                    "extracting it exposes or overwrites files elsewhere",
                )
                safe = False
            else:
                scan.medium(
                    where,
                    f"a {member.kind} to {target}: loaders may follow it; "
                    "store the file itself instead of a link",
                )
        elif member.kind == "special":
            scan.critical(
                where,
                "a device, fifo or socket: no model needs one, and "
                "extracting it can hang or reach hardware",
            )
            safe = False
    for member in members:
        parts = _normal(member.name).split("/")
        for end in range(1, len(parts)):
            if "/".join(parts[:end]) in links:
                scan.critical(
                    join(location, member.name),
                    "this member is written through a "
                    "link: extracting it writes wherever the link points",
                )
                safe = False
                break
    return safe


@dataclass
class ArchiveSiblings:
    """The members of one archive, as ``Siblings`` for references such as ONNX external data."""

    members: dict[str, Member]
    data: set[str] = field(default_factory=set)

    def lookup(self, base: str, reference: str) -> Sibling:
        name = _normal(posixpath.join(posixpath.dirname(_normal(base)), reference))
        member = self.members.get(name)
        if member is None:
            return Sibling("missing")
        kind = {"file": "file", "symlink": "symlink", "hardlink": "hardlink"}.get(
            member.kind, "special"
        )
        return Sibling(kind, member.size)

    def mark_data(self, base: str, reference: str) -> None:
        self.data.add(_normal(posixpath.join(posixpath.dirname(_normal(base)), reference)))


def scan_members(
    scan: Scan,
    members: list[Member],
    location: str,
    depth: int,
    skip: Callable[[Member], bool] | None = None,
) -> None:
    """Scan every regular member by content (ONNX first, then the rest), one level deeper."""
    files = [m for m in members if m.kind == "file" and (skip is None or not skip(m))]
    siblings = ArchiveSiblings({_normal(m.name): m for m in members if m.kind != "dir"})
    first: list[Member] = []
    rest: list[Member] = []
    for member in files:
        head = member.peek() if member.peek is not None else member.read(True)
        (first if head is not None and detect_format(head[:_PEEK]) == "onnx" else rest).append(
            member
        )
    for member in first + rest:
        if _normal(member.name) in siblings.data:
            scan.record_file(join(location, member.name))
            continue  # raw tensor data an ONNX member reads; checked by that member's scan
        with member.open() as content:
            where = join(location, member.name)
            scan.record_file(where)
            if content is not None:
                size = content.seek(0, io.SEEK_END)
                content.seek(0)
                scan.nested_file(content, size, where, depth + 1, siblings, _normal(member.name))


# -- tar --------------------------------------------------------------------------------------


def scan_tar(scan: Scan, data: Buffer, location: str, depth: int) -> str:
    """Check a tar archive's members and scan each one by content."""
    return scan_tar_file(scan, cast(IO[bytes], MemoryReader(data)), len(data), location, depth)


def scan_tar_file(scan: Scan, reader: IO[bytes], size: int, location: str, depth: int) -> str:
    """:func:`scan_tar` for a seekable file of ``size`` bytes: headers and members are read
    through it, each member only as far as its analyser needs."""
    members: list[Member] = []
    reader.seek(0)
    try:
        archive = tarfile.open(fileobj=reader, mode="r:")  # noqa: SIM115
    except (tarfile.TarError, OSError, ValueError) as exc:
        scan.high(location, f"not a readable tar archive ({type(exc).__name__})")
        return "tar"
    total = 0
    with archive:
        try:
            while (info := archive.next()) is not None:
                if len(members) >= scan.limits.max_members:
                    scan.critical(
                        location,
                        f"more than {scan.limits.max_members} members "
                        "(max_members): an archive bomb",
                    )
                    return "tar"
                total += info.size
                members.append(_tar_member(scan, archive, info, location, size))
        except (tarfile.TarError, OSError, ValueError, EOFError) as exc:
            scan.high(
                location,
                f"the tar archive is corrupt after {len(members)} members "
                f"({type(exc).__name__}); the rest was not analysed",
            )
        end = archive.offset
        # Tar stores members as they are: they cannot hold more than the archive itself.
        if total > size:
            scan.high(
                location,
                f"the members declare {total} bytes but the archive holds {size}: "
                "truncated or corrupt",
            )
            return "tar"
        if not _zeros(reader, end, size):
            scan.high(
                f"{location} @ byte {end}",
                f"{size - end} bytes after the end of "
                "the archive are not zero padding: hidden data that was not analysed",
            )
        if check_members(scan, members, location):
            scan_members(scan, members, location, depth)
    return "tar"


def _zeros(reader: IO[bytes], start: int, end: int) -> bool:
    """Whether ``reader`` holds only zero bytes from ``start`` to ``end``, read in pieces."""
    reader.seek(start)
    return all(
        not reader.read(min(_CHUNK, end - at)).strip(b"\x00") for at in range(start, end, _CHUNK)
    )


def _tar_member(
    scan: Scan, archive: tarfile.TarFile, info: tarfile.TarInfo, location: str, archive_size: int
) -> Member:
    if info.isreg():
        kind = "file"
    elif info.isdir():
        kind = "dir"
    elif info.issym():
        kind = "symlink"
    elif info.islnk():
        kind = "hardlink"
    else:
        kind = "special"

    def read(keep: bool) -> bytes | None:
        try:
            handle = archive.extractfile(info)
            return handle.read() if handle is not None and keep else b""
        except (tarfile.TarError, OSError, ValueError, EOFError) as exc:
            scan.high(join(location, info.name), f"cannot read this member ({type(exc).__name__})")
            return None

    def peek() -> bytes:
        try:
            handle = archive.extractfile(info)
            return handle.read(_PEEK) if handle is not None else b""
        except (tarfile.TarError, OSError, ValueError, EOFError):
            return b""  # reported when the member is read in full

    @contextmanager
    def opener() -> Iterator[IO[bytes] | None]:
        # Tar stores a member's bytes as they are: one that lies wholly inside the archive is
        # read in place (tarfile's view seeks within it). A sparse member, or one cut short,
        # is read whole the usual way, which reports what is wrong with it.
        if info.issparse() or info.offset_data + info.size > archive_size:
            with in_memory(read(True)) as content:
                yield content
            return
        handle = archive.extractfile(info)
        assert handle is not None  # a regular member always has content
        with handle:
            yield handle

    return Member(info.name, info.size, kind, read, link=info.linkname, peek=peek, opener=opener)


# -- 7z ---------------------------------------------------------------------------------------


def scan_7z(scan: Scan, data: Buffer, location: str, depth: int) -> str:
    """Check a 7z archive's listing, unpack it within the budget, scan each member."""
    return scan_7z_file(scan, cast(IO[bytes], MemoryReader(data)), len(data), location, depth)


def scan_7z_file(scan: Scan, reader: IO[bytes], size: int, location: str, depth: int) -> str:
    """:func:`scan_7z` for a seekable file of ``size`` bytes: the archive is read through it,
    and its members (7z compresses them together, so they are unpacked in one pass) are each
    spooled, within ``max_total_bytes``, into a sealed file of their own that has no name
    (``registry.upload.Upload``: sealed under a one-time key held in memory, so no plaintext
    reaches the disk) and scanned from there as they are read."""
    import py7zr
    from py7zr.io import Py7zIO, WriterFactory

    cap = scan.limits.max_total_bytes - scan.unpacked

    class _Spooled(Py7zIO):
        def __init__(self, counter: list[int]) -> None:
            self.spool = Upload(scan.spool_dir)
            self.counter = counter

        def write(self, s: bytes | bytearray) -> int:
            self.counter[0] += len(s)
            if self.counter[0] > cap:
                raise _SevenZipBomb
            self.spool.write(s)
            return len(s)

        def read(self, size: int | None = None) -> bytes:
            return b""

        def seek(self, offset: int, whence: int = 0) -> int:
            return 0

        def flush(self) -> None:
            return None

        def size(self) -> int:
            return self.spool.size

    class _Factory(WriterFactory):
        def __init__(self) -> None:
            self.products: dict[str, _Spooled] = {}
            self.counter = [0]

        def create(self, filename: str) -> Py7zIO:
            product = _Spooled(self.counter)
            self.products[filename] = product
            return product

    factory = _Factory()
    try:
        try:
            reader.seek(0)
            with py7zr.SevenZipFile(reader, "r") as archive:
                if archive.needs_password():
                    scan.high(location, "the 7z archive is encrypted; it cannot be analysed")
                    return "7z"
                unbounded = sorted(_7z_methods(archive) - _BOUNDED_7Z_METHODS)
                if unbounded:
                    scan.high(
                        location,
                        f"the 7z archive is compressed with {show(unbounded[0])}, which cannot be"
                        " unpacked in bounded memory (a small archive could exhaust the"
                        " server's); repack it with LZMA2, 7-Zip's default, or store it",
                    )
                    return "7z"
                listing: list[Any] = list(archive.list())
                if len(listing) > scan.limits.max_members:
                    scan.critical(
                        location,
                        f"more than {scan.limits.max_members} members (max_members): an archive"
                        " bomb",
                    )
                    return "7z"
                declared = sum(int(entry.uncompressed or 0) for entry in listing)
                if declared > cap:
                    scan.critical(
                        location,
                        f"the members declare {declared} bytes, past max_total_bytes: an archive"
                        " bomb",
                    )
                    return "7z"
                # Names and links are judged from the listing, before anything is unpacked.
                if not check_members(scan, [_7z_member(e, {}) for e in listing], location):
                    return "7z"
                regular = [e.filename for e in listing if e.is_file and not e.is_symlink]
                if regular:
                    archive.extract(targets=regular, factory=factory)
        except _SevenZipBomb:
            scan.critical(
                location,
                "the 7z archive unpacks to more than it declares, past "
                "max_total_bytes: a decompression bomb",
            )
            return "7z"
        except Exception as exc:  # py7zr raises its own errors, CrcError, lzma and zlib errors...
            scan.high(location, f"the 7z archive is corrupt or unsupported ({type(exc).__name__})")
            return "7z"
        if not scan.charge(factory.counter[0], location):
            return "7z"
        spools = {name: product.spool for name, product in factory.products.items()}
        for spool in spools.values():
            spool.finish()
        members = [_7z_member(entry, spools) for entry in listing]
        scan_members(scan, members, location, depth)
        return "7z"
    finally:
        for product in factory.products.values():
            product.spool.close()


class _SevenZipBomb(Exception):
    pass


# The 7z methods, by py7zr's names, whose decoders honour an output limit per call (or cannot
# grow their input: the branch and delta filters). py7zr's Deflate, Deflate64, Zstandard and
# others ignore it, so one read of a few kilobytes can inflate to gigabytes before any write is
# counted (measured: 512 MiB of zeros as DEFLATE held 1.4 GiB; as LZMA2, 380 MiB whatever the
# size).
_BOUNDED_7Z_METHODS = frozenset(
    {"COPY", "LZMA", "LZMA2", "BCJ", "ARM", "ARMT", "PPC", "SPARC", "IA64", "delta"}
)


def _7z_methods(archive: Any) -> set[str]:
    """The compression methods of an open archive's folders, by py7zr's names (its own
    ``archiveinfo`` needs the archive's file name, which a stream has not)."""
    from py7zr.compressor import get_methods_names

    streams = archive.header.main_streams
    if streams is None or streams.unpackinfo is None:
        return set()
    return set(get_methods_names([folder.coders for folder in streams.unpackinfo.folders]))


def _7z_member(entry: Any, spools: dict[str, Upload]) -> Member:
    name = str(entry.filename)
    if entry.is_symlink:
        kind = "symlink"
    elif entry.is_directory:
        kind = "dir"
    else:
        kind = "file"
    spool = spools.get(name)

    @contextmanager
    def opener() -> Iterator[IO[bytes] | None]:
        if spool is None:
            yield cast(IO[bytes], MemoryReader(b""))
            return
        with io.BufferedReader(spool.seekable_reader(), _CHUNK) as content:
            yield content

    def read(keep: bool) -> bytes | None:
        with opener() as content:
            assert content is not None
            if not keep:
                while content.read(_CHUNK):
                    pass
                return b""
            return content.read()

    def peek() -> bytes:
        with opener() as content:
            assert content is not None
            return content.read(_PEEK)

    # py7zr does not hand out a symlink's target without writing it to disk; treat the
    # target as unknown and therefore escaping.
    return Member(
        name,
        spool.size if spool is not None else 0,
        kind,
        read,
        link="/unknown" if kind == "symlink" else "",
        peek=peek,
        opener=opener,
    )
