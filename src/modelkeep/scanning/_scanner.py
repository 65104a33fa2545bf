"""The entry points: bytes, a path or a seekable file in, a report out; and the dispatcher.

The dispatcher identifies content with :func:`detect_format` and hands it to the scanner of its
family. A family scanner that fails unexpectedly turns into an ``error`` finding for that part,
never an exception out of the scan and never a silent pass: a part not analysed is refused.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import mmap
import os
import posixpath
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TypeVar

from modelkeep.errors import InvalidInput, ModelkeepError
from modelkeep.scanning._archive import scan_7z, scan_7z_file, scan_tar, scan_tar_file
from modelkeep.scanning._compressed import COMPRESSED_KINDS, scan_compressed, scan_compressed_file
from modelkeep.scanning._context import Buffer, Scan, Sibling, Siblings, show
from modelkeep.scanning._gguf import scan_gguf, scan_gguf_file
from modelkeep.scanning._keras import scan_hdf5, scan_hdf5_file
from modelkeep.scanning._pickle import (
    scan_numpy,
    scan_numpy_file,
    scan_pickle,
    scan_pickle_file,
)
from modelkeep.scanning._safetensors import scan_safetensors, scan_safetensors_file
from modelkeep.scanning._xgb_lgbm import scan_lightgbm, scan_xgboost
from modelkeep.scanning._zip import scan_zip, scan_zip_file
from modelkeep.scanning.detect import detect_format
from modelkeep.scanning.report import ScanLimits, ScanReport

__all__ = ["scan_bytes", "scan_path", "scan_reader"]

log = logging.getLogger(__name__)

#: The limits a scan uses unless told otherwise (``ScanLimits()``: frozen, so one is enough).
DEFAULT_LIMITS = ScanLimits()

_PEEK = 64 * 1024
# Enough of a file's start for detect_format to decide exactly as on the whole file: its
# 64 KiB peek, and the HDF5 superblock probe at offsets up to 1 MiB.
_DETECT = (1 << 20) + 8
_PYTHON = re.compile(
    r"^\s*(import\s+\w|from\s+[\w.]+\s+import\s|def\s+\w+\s*\(|class\s+\w+\s*[(:])", re.MULTILINE
)
_REMOTE_CODE = re.compile(r'"auto_map"\s*:|"trust_remote_code"\s*:\s*true')

_T = TypeVar("_T")
# A file being scanned through a reader fails on its own (a sealed copy that stops verifying,
# an I/O error): that is not a verdict on the content.
_READ_ERRORS = (ModelkeepError, OSError)

# Formats whose analysers read through a file, only the parts they check: their headers, an
# archive's directory and members, an HDF5 file's attributes and links, a compressed stream's
# output as it is decompressed. (scan, reader, size, location, depth) -> format.
_FILE_SCANNERS: dict[str, Callable[[Scan, IO[bytes], int, str, int], str]] = {
    "safetensors": scan_safetensors_file,
    "gguf": scan_gguf_file,
    "numpy": scan_numpy_file,
    "zip": scan_zip_file,
    "tar": scan_tar_file,
    "7z": scan_7z_file,
    "hdf5": scan_hdf5_file,
    **{kind: functools.partial(scan_compressed_file, kind=kind) for kind in COMPRESSED_KINDS},
}

Handler = Callable[[Scan, Buffer, str, int], str]

_HANDLERS: dict[str, Handler] = {
    "zip": scan_zip,
    "tar": scan_tar,
    "7z": scan_7z,
    "pickle": scan_pickle,
    "numpy": scan_numpy,
    "safetensors": scan_safetensors,
    "gguf": scan_gguf,
    "hdf5": scan_hdf5,
    "lightgbm-text": scan_lightgbm,
}


def scan_bytes(
    data: bytes, name: str = "model", *, limits: ScanLimits = DEFAULT_LIMITS
) -> ScanReport:
    """Scan ``data`` by content and return the report; never loads the model, never raises
    for hostile input (every problem is a finding). ``name`` only labels locations."""
    scan = Scan(limits, _dispatch, _dispatch_file)
    location = show(name, 200) or "model"
    scan.record_file(location)
    fmt = scan.nested(data, location, 0)
    return scan.report(fmt)


def scan_reader(
    reader: IO[bytes],
    name: str = "model",
    *,
    limits: ScanLimits = DEFAULT_LIMITS,
    spool_dir: Path | None = None,
) -> ScanReport:
    """Scan a seekable binary file by content, reading only what its analyser needs.

    The report is the one :func:`scan_bytes` gives for the same bytes. The file is identified
    from its first MiB; safetensors, GGUF and NumPy files (their headers), pickles (opcode by
    opcode, storages skipped over), HDF5 files (attributes and links), zip, tar and 7z
    archives (their directories, and each member the same way; see :func:`_dispatch_file`),
    compressed streams (decompressed as they are read), text and unidentifiable files are
    then analysed through ``reader`` without holding the file, so a large one costs a few
    MiB. The other formats' analysers (ONNX, XGBoost, LightGBM) take a whole buffer: those
    files are read whole, as ``scan_bytes`` would hold them. Content that cannot be read in
    place (7z members, a member or stream re-read many times from its start) is spooled, sealed
    under a one-time key, into a nameless file in ``spool_dir`` (None: the system's temporary
    directory). ``reader`` is the whole file (``seek(0, 2)`` gives its size) and its
    ``read(n)`` returns ``n`` bytes unless at the end, as buffered files do; its own errors
    propagate.
    """
    scan = Scan(limits, _dispatch, _dispatch_file, spool_dir)
    location = show(name, 200) or "model"
    scan.record_file(location)
    size = reader.seek(0, os.SEEK_END)
    reader.seek(0)
    fmt = scan.nested_file(reader, size, location, 0)
    return scan.report(fmt)


def scan_path(path: Path, *, limits: ScanLimits = DEFAULT_LIMITS) -> ScanReport:
    """Scan a file, or every file in a directory, by content.

    A file is mapped into memory, not read, so a large safetensors or GGUF file costs only its
    header. In a directory, symlinks are findings (``malicious`` when they point outside it,
    ``unsafe-format`` otherwise) and are not followed; devices and fifos are not opened.
    Raises ``InvalidInput`` when ``path`` does not exist or cannot be read.
    """
    path = Path(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise InvalidInput("no such file or directory") from None
    except OSError as exc:
        raise InvalidInput(f"cannot read it: {exc.strerror or 'I/O error'}") from None
    if stat.S_ISDIR(info.st_mode):
        return _scan_directory(path, limits)
    if not stat.S_ISREG(info.st_mode):
        raise InvalidInput("not a regular file or a directory")
    scan = Scan(limits, _dispatch, _dispatch_file)
    location = show(path.name, 200) or "model"
    scan.record_file(location)
    fmt = _scan_file(scan, path, location, None, "")
    return scan.report(fmt)


def _scan_file(scan: Scan, path: Path, location: str, siblings: Siblings | None, base: str) -> str:
    try:
        handle = path.open("rb")
    except OSError as exc:
        scan.high(location, f"cannot read this file ({exc.strerror or 'I/O error'})")
        return "unknown"
    with handle:
        try:
            size = os.fstat(handle.fileno()).st_size
            if size == 0:
                return scan.nested(b"", location, 0, siblings, base)
            mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as exc:
            scan.high(location, f"cannot read this file ({exc.strerror or 'I/O error'})")
            return "unknown"
        view = memoryview(mapped)
        try:
            return scan.nested(view, location, 0, siblings, base)
        finally:
            # A slice still alive keeps the mapping open until it is collected; that is fine.
            for close in (view.release, mapped.close):
                with contextlib.suppress(BufferError):
                    close()


def _dispatch_file(
    scan: Scan,
    reader: IO[bytes],
    size: int,
    location: str,
    depth: int,
    siblings: Siblings | None,
    base: str,
) -> str:
    """:func:`_dispatch` for a seekable file of ``size`` bytes: identified from its first MiB,
    then analysed through the file when its format's analyser reads one, else read whole."""
    reader.seek(0)
    head = reader.read(min(size, _DETECT))
    reader.seek(0)
    kind = detect_format(head)
    if kind in _FILE_SCANNERS:
        scanner = _FILE_SCANNERS[kind]
        return _guarded(
            scan,
            kind,
            location,
            lambda: scanner(scan, reader, size, location, depth),
            _READ_ERRORS,
        )
    if kind == "pickle":
        return _guarded(
            scan,
            kind,
            location,
            lambda: scan_pickle_file(scan, reader, location, depth),
            _READ_ERRORS,
        )
    if len(head) == size or kind in ("text", "unknown"):
        # The whole file, or a head that identifies it the same way (see _DETECT); text is
        # judged on its first MiB and an unidentifiable file is refused without reading on.
        return _dispatch_as(scan, head, kind, location, depth, siblings, base)
    del head
    return _dispatch_as(scan, reader.read(size), kind, location, depth, siblings, base)


def _dispatch(
    scan: Scan, data: Buffer, location: str, depth: int, siblings: Siblings | None, base: str
) -> str:
    return _dispatch_as(scan, data, detect_format(data), location, depth, siblings, base)


def _dispatch_as(
    scan: Scan,
    data: Buffer,
    kind: str,
    location: str,
    depth: int,
    siblings: Siblings | None,
    base: str,
) -> str:
    """Scan ``data``, identified as ``kind``, with its family's scanner."""
    if len(data) == 0:
        scan.high(location, "the file is empty: cannot identify the format")
        return "unknown"
    handled = _guarded(
        scan, kind, location, lambda: _handle(scan, data, kind, location, depth, siblings, base)
    )
    if handled is not None:
        return handled
    scan.high(
        location,
        "cannot identify the format: not ONNX, safetensors, skops, XGBoost, LightGBM, GGUF, "
        "Keras, NumPy, pickle, or an archive of those; modelkeep refuses what it cannot check",
    )
    return "unknown"


def _handle(
    scan: Scan,
    data: Buffer,
    kind: str,
    location: str,
    depth: int,
    siblings: Siblings | None,
    base: str,
) -> str | None:
    """The family scanner's format for ``data`` of ``kind``; None when no scanner takes it."""
    if kind in _HANDLERS:
        return _HANDLERS[kind](scan, data, location, depth)
    if kind in COMPRESSED_KINDS:
        return scan_compressed(scan, data, location, depth, kind)
    if kind == "onnx":
        from modelkeep.scanning._onnx import scan_onnx

        return scan_onnx(scan, data, location, depth, siblings, base)
    if kind in ("xgboost-json", "xgboost-ubj"):
        return scan_xgboost(scan, data, location, depth, kind)
    if kind == "text":
        return _scan_text(scan, data, location, inside=depth > 0 or siblings is not None)
    return None


def _guarded(
    scan: Scan,
    kind: str,
    location: str,
    run: Callable[[], _T],
    passing: tuple[type[Exception], ...] = (),
) -> _T | str:
    """``run()``, with a family scanner's failure turned into a finding that refuses the part.

    ``passing`` errors are not the scanner's (a file's own read errors): they propagate.
    """
    try:
        return run()
    except passing:
        raise
    except (RecursionError, MemoryError) as exc:
        scan.high(location, f"too complex to analyse ({type(exc).__name__}); refused")
        return kind
    except Exception as exc:  # a scanner bug must refuse the part, not pass it or crash
        log.warning("scanner failed on a %s part", kind, exc_info=True)
        scan.high(location, f"the scanner could not analyse this part ({type(exc).__name__})")
        return kind


def _scan_text(scan: Scan, data: Buffer, location: str, *, inside: bool) -> str:
    if not inside:
        scan.high(location, "cannot identify the format: this is a text file, not a model")
        return "unknown"
    text = bytes(data[: 1 << 20]).decode("utf-8", "replace")
    if _PYTHON.search(text):
        scan.medium(
            location,
            "Python source code: a loader that trusts a model's own code "
            "(trust_remote_code, TorchScript) runs it; ship the model without code",
        )
    elif _REMOTE_CODE.search(text):
        scan.medium(
            location,
            "this configuration asks loaders to run the model's own Python "
            "code (auto_map / trust_remote_code)",
        )
    else:
        scan.info(location, "a text file, not a model: nothing that reads it runs code")
    return "text"


# -- directories ------------------------------------------------------------------------------


@dataclass
class _DirectorySiblings:
    root: Path
    data: set[str] = field(default_factory=set)

    def lookup(self, base: str, reference: str) -> Sibling:
        relative = posixpath.normpath(posixpath.join(posixpath.dirname(base), reference))
        if relative == ".." or relative.startswith("../") or relative.startswith("/"):
            return Sibling("special")
        current = self.root
        parts = relative.split("/")
        for index, part in enumerate(parts):
            current = current / part
            try:
                info = current.lstat()
            except OSError:
                return Sibling("missing")
            if stat.S_ISLNK(info.st_mode):
                return Sibling("symlink")
            if index < len(parts) - 1 and not stat.S_ISDIR(info.st_mode):
                return Sibling("missing")
        if not stat.S_ISREG(info.st_mode):
            return Sibling("special")
        return Sibling("hardlink" if info.st_nlink > 1 else "file", info.st_size)

    def mark_data(self, base: str, reference: str) -> None:
        self.data.add(posixpath.normpath(posixpath.join(posixpath.dirname(base), reference)))


def _scan_directory(root: Path, limits: ScanLimits) -> ScanReport:
    scan = Scan(limits, _dispatch, _dispatch_file)
    label = show(root.resolve().name or "directory", 200)
    files = _walk(scan, root, label)
    if files is None:
        return scan.report("directory")
    siblings = _DirectorySiblings(root)
    onnx: list[str] = []
    rest: list[str] = []
    for relative in files:
        (onnx if _peek_kind(root / relative) == "onnx" else rest).append(relative)
    formats: list[str] = []
    for relative in onnx + rest:
        location = f"{label}/{show(relative, 200)}"
        scan.record_file(location)
        if relative in siblings.data:
            continue  # external data of an ONNX model, checked by that model's scan
        formats.append(_scan_file(scan, root / relative, location, siblings, relative))
    if not files:
        scan.high(label, "the directory holds no files")
    distinct = set(formats) - {"text"}
    fmt = distinct.pop() if len(distinct) == 1 else ("unknown" if not formats else "directory")
    return scan.report(fmt)


def _walk(scan: Scan, root: Path, label: str) -> list[str] | None:
    """Relative paths of the regular files under ``root``; links and special files reported."""
    resolved_root = root.resolve()
    files: list[str] = []
    pending = [""]
    while pending:
        relative_dir = pending.pop()
        try:
            entries = sorted(os.scandir(root / relative_dir), key=lambda e: e.name)
        except OSError as exc:
            scan.high(f"{label}/{show(relative_dir)}", f"cannot list ({exc.strerror or 'error'})")
            continue
        for entry in entries:
            relative = posixpath.join(relative_dir, entry.name) if relative_dir else entry.name
            where = f"{label}/{show(relative, 200)}"
            if len(files) >= scan.limits.max_members:
                scan.critical(label, f"more than {scan.limits.max_members} files (max_members)")
                return None
            if entry.is_symlink():
                _symlink(scan, root / relative, resolved_root, where)
            elif entry.is_dir(follow_symlinks=False):
                pending.append(relative)
            elif entry.is_file(follow_symlinks=False):
                files.append(relative)
            else:
                scan.high(where, "a device, fifo or socket: not opened")
    return sorted(files)


def _symlink(scan: Scan, link: Path, root: Path, where: str) -> None:
    target = os.readlink(link)
    resolved = (link.parent / target).resolve()
    if resolved != root and root not in resolved.parents:
        scan.critical(
            where,
            f"a symlink to {show(target, 120)!r}, outside the directory: a "
            "loader following it reads files the model's author chose",
        )
    else:
        scan.medium(
            where,
            f"a symlink to {show(target, 120)!r}: loaders may follow links "
            "differently; store the file itself (it was not scanned through the link)",
        )


def _peek_kind(path: Path) -> str:
    try:
        with path.open("rb") as handle:
            return detect_format(handle.read(_PEEK))
    except OSError:
        return "unknown"
