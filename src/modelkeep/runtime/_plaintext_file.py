"""A model's plaintext in a private file on tmpfs, for runtimes that map their weights.

ONNX Runtime maps a model's external data from a file and, for the weights it does not
pre-pack, uses the mapping as the tensor (measured with ORT 1.32: no copy). Decrypting the
plaintext into a tmpfs file, instead of into process memory, lets the bytes the checks read and
the weights the runtime serves be the same pages, so a model is in memory once while it loads.

The plaintext must never reach a disk, so only a directory on tmpfs (or ramfs) is used; without
one, :func:`plaintext_file` yields None and the caller loads from memory as before. Files live
in a per-process directory (mode 0700, files 0600) removed with everything in it at exit and,
should the process die first, by the next server to start (:func:`remove_stale`); each file is
unlinked as soon as the ``with`` block ends, error or not, and its pages are freed when the last
mapping of it goes.

A directory is known to be in use by the lock its process holds on the ``.lock`` file in it for
as long as it lives (``flock``), not by its pid: servers in containers that share one /dev/shm
have pid namespaces of their own, where two live servers may have the same pid and a dead one's
pid may be a live process's.
"""

from __future__ import annotations

import atexit
import fcntl
import logging
import mmap
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass

__all__ = ["DEFAULT_BASE", "PlaintextFile", "is_tmpfs", "plaintext_file", "remove_stale"]

log = logging.getLogger(__name__)

# A fixed, shared place, made safe by a private 0700 directory and O_EXCL files in it.
DEFAULT_BASE = "/dev/shm"  # noqa: S108
_PREFIX = "modelkeep-plaintext-"
_LOCK = ".lock"
# A directory younger than this may be one a live process has made and not yet locked.
_SETTLE_S = 10.0
_MEMORY_FILESYSTEMS = frozenset({"tmpfs", "ramfs"})

_dirs: dict[tuple[int, str], str | None] = {}  # (pid, base) -> this process's directory
_locks: list[int] = []  # the lock files' descriptors, open (and so locked) for the process's life


@dataclass(frozen=True, slots=True)
class PlaintextFile:
    """A file of ``size`` bytes in the process's private tmpfs directory, mapped writable as
    ``buffer``; ``directory`` is where a runtime may put files that refer to it by ``name``."""

    directory: str
    name: str
    size: int
    buffer: mmap.mmap
    fd: int

    @property
    def path(self) -> str:
        return os.path.join(self.directory, self.name)

    def writer(self) -> FileWriter:
        """A writer that fills the file from its start."""
        return FileWriter(self.fd)


class FileWriter:
    """Writes a file in order from its start with ``pwrite``: a copy into the page cache that
    lets go of the GIL, where a write through the mapping page-faults while holding it (a load
    writes from a thread of its own while another decrypts)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._offset = 0

    def write(self, data: memoryview | bytes, /) -> int:
        view = memoryview(data).cast("B")
        total = len(view)
        while view:
            count = os.pwrite(self._fd, view, self._offset)
            self._offset += count
            view = view[count:]
        return total


@contextmanager
def plaintext_file(
    size: int, *, base: str = DEFAULT_BASE, enabled: bool = True
) -> Iterator[PlaintextFile | None]:
    """A new private file of ``size`` bytes (> 0) on tmpfs under ``base``, or None when not
    ``enabled`` or when ``base`` is not a memory filesystem or cannot be used; the file is
    unlinked when the block ends."""
    directory = _private_dir(base) if enabled else None
    if directory is None:
        yield None
        return
    name = f"plaintext-{os.urandom(8).hex()}"
    path = os.path.join(directory, name)
    # O_EXCL and O_NOFOLLOW: the name is new and ours; 0600 on top of the directory's 0700.
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    buffer: mmap.mmap | None = None
    try:
        try:
            # Reserve every page now: a write through the mapping to a tmpfs that is full (a
            # container's /dev/shm is 64 MiB unless made larger) would kill the process (SIGBUS).
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            log.warning(
                "no room for a %d MiB model in %s (%s): it loads from process memory",
                size >> 20,
                base,
                exc.strerror,
            )
            yield None
            return
        buffer = mmap.mmap(fd, size)
        yield PlaintextFile(directory, name, size, buffer, fd)
    finally:
        os.close(fd)
        os.unlink(path)
        if buffer is not None:
            # A view over it may still be alive: the mapping then goes when the view does.
            with suppress(BufferError):
                buffer.close()


def is_tmpfs(path: str) -> bool:
    """Whether ``path`` lies on a memory filesystem, by the longest mount point above it."""
    real = os.path.realpath(path)
    best, fstype = "", ""
    try:
        with open("/proc/mounts", encoding="utf-8") as mounts:
            for line in mounts:
                fields = line.split()
                if len(fields) < 3:
                    continue
                point = _unescape(fields[1])
                inside = real == point or real.startswith(point.rstrip("/") + "/")
                if inside and len(point) >= len(best):
                    best, fstype = point, fields[2]
    except OSError:
        return False
    return fstype in _MEMORY_FILESYSTEMS


def _private_dir(base: str) -> str | None:
    key = (os.getpid(), base)  # a forked worker makes its own
    if key not in _dirs:
        _dirs[key] = _make_private_dir(base)
    return _dirs[key]


def _make_private_dir(base: str) -> str | None:
    if not is_tmpfs(base):
        log.warning(
            "%s is not a memory filesystem (tmpfs): ONNX models load from process memory, "
            "which takes about twice the model's size while they load",
            base,
        )
        return None
    remove_stale(base)
    try:
        # A new name of mode 0700; the pid in it only tells a person whose it is.
        directory = tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-", dir=base)
        lock = os.open(
            os.path.join(directory, _LOCK),
            os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
        )
        fcntl.flock(lock, fcntl.LOCK_EX)  # held until the process ends: the directory is in use
    except OSError as exc:
        log.warning(
            "cannot make a private directory in %s (%s): ONNX models load from process memory",
            base,
            exc.strerror,
        )
        return None
    _locks.append(lock)
    atexit.register(shutil.rmtree, directory, True)
    return directory


def remove_stale(base: str = DEFAULT_BASE) -> None:
    """Remove the private directories under ``base`` that no live process holds the lock of (a
    process killed while loading leaves its plaintext there); the server calls it at start."""
    if not is_tmpfs(base):
        return
    try:
        entries = list(os.scandir(base))
    except OSError:
        return
    own = set(_dirs.values())
    for entry in entries:
        if not entry.name.startswith(_PREFIX) or entry.path in own:
            continue
        try:
            info = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if (
            stat.S_ISDIR(info.st_mode)
            and info.st_uid == os.getuid()
            and time.time() - info.st_mtime > _SETTLE_S
            and not _in_use(entry.path)
        ):
            shutil.rmtree(entry.path, ignore_errors=True)


def _in_use(directory: str) -> bool:
    """Whether a live process holds the lock of ``directory`` (one that never made its lock
    file died before it could; one that cannot be opened is left alone)."""
    try:
        fd = os.open(os.path.join(directory, _LOCK), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _unescape(field: str) -> str:
    # /proc/mounts writes space, tab, newline and backslash in octal.
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field
