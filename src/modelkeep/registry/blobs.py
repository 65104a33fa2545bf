"""Blob stores for sealed artifacts: a directory (embedded default), S3 (scale-out, ``_s3.py``)
and memory (tests).

Blobs are already encrypted and authenticated when they arrive here; the store only provides
durability. A blob is either wholly present under its final name or absent.
"""

from __future__ import annotations

import io
import os
import queue
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import suppress
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol

from modelkeep.crypto.sealed import Source
from modelkeep.errors import IntegrityError

if TYPE_CHECKING:
    from modelkeep.settings import Settings

KEY_PATTERN = re.compile(r"[a-z0-9]{8,64}")

Writer = Callable[[BinaryIO], object]


def new_blob_key() -> str:
    """A fresh random name; blob names carry no model information."""
    return secrets.token_hex(16)


class BlobStore(Protocol):
    def put(self, key: str, write: Writer) -> None:
        """Store the bytes ``write`` produces under ``key``, atomically and durably."""

    def open(self, key: str) -> io.BufferedIOBase:
        """Open a stored blob for reading; IntegrityError if it is missing."""

    def delete(self, key: str) -> None:
        """Remove a blob if present."""

    def keys(self, *, older_than_s: float = 0.0) -> Iterator[str]:
        """Stored keys whose blobs are at least ``older_than_s`` seconds old."""


def blob_store_from(settings: Settings, local_dir: Path) -> BlobStore:
    """The blob store the settings name: ``blob_url`` (s3://bucket/prefix) or ``local_dir``."""
    if settings.blob_url is None:
        return FileBlobStore(local_dir)
    # Imported here: boto3 is loaded only by servers that use an object store.
    from modelkeep.registry._s3 import s3_blob_store

    return s3_blob_store(settings)


def check_key(key: str) -> str:
    if KEY_PATTERN.fullmatch(key) is None:
        raise ValueError("invalid blob key")
    return key


class FileBlobStore:
    """Blobs as files under ``root``: written to a temporary file, fsynced, then renamed."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._tmp = root / ".tmp"
        self._tmp.mkdir(mode=0o700, parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)[:2] / key

    def put(self, key: str, write: Writer) -> None:
        final = self._path(key)
        final.parent.mkdir(mode=0o700, exist_ok=True)
        tmp = self._tmp / f"{key}.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as out:
                write(out)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, final)
            _fsync_dir(final.parent)
        except BaseException:
            with suppress(FileNotFoundError):
                tmp.unlink()
            raise

    def open(self, key: str) -> io.BufferedIOBase:
        try:
            return self._path(key).open("rb")
        except FileNotFoundError as exc:
            raise IntegrityError("sealed artifact is missing") from exc

    def delete(self, key: str) -> None:
        with suppress(FileNotFoundError):
            self._path(key).unlink()

    def keys(self, *, older_than_s: float = 0.0) -> Iterator[str]:
        cutoff = time.time() - older_than_s
        for path in self.root.glob("??/*"):
            if KEY_PATTERN.fullmatch(path.name) and path.stat().st_mtime <= cutoff:
                yield path.name

    def sweep_temporary(self, *, older_than_s: float) -> int:
        """Delete temporary files left by a crash mid-write; returns how many."""
        cutoff = time.time() - older_than_s
        removed = 0
        for path in self._tmp.iterdir():
            with suppress(FileNotFoundError):
                if path.stat().st_mtime <= cutoff:
                    path.unlink()
                    removed += 1
        return removed


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class InMemoryBlobStore:
    """A BlobStore in a dict, for tests."""

    def __init__(self) -> None:
        self._blobs: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def put(self, key: str, write: Writer) -> None:
        buf = BytesIO()
        write(buf)
        with self._lock:
            self._blobs[check_key(key)] = buf.getvalue()

    def open(self, key: str) -> io.BufferedIOBase:
        with self._lock:
            data = self._blobs.get(key)
        if data is None:
            raise IntegrityError("sealed artifact is missing")
        return BytesIO(data)

    def delete(self, key: str) -> None:
        with self._lock:
            self._blobs.pop(key, None)

    def keys(self, *, older_than_s: float = 0.0) -> Iterator[str]:
        with self._lock:
            return iter(list(self._blobs))


class ReadAhead(io.RawIOBase):
    """A sequential reader over ``src`` that a thread keeps up to ``depth`` chunks ahead of.

    A load reads a blob once, start to end, and decrypts and hashes as it goes; reading the
    next bytes from the object store (a socket read, which lets go of the GIL) on a thread of
    its own overlaps the store's time with that work instead of adding to it. Errors reading
    ``src`` are raised to the reader where they occurred. ``close`` stops the thread (it
    finishes the read in progress first); it does not close ``src``.
    """

    def __init__(self, src: Source, *, chunk: int = 1 << 20, depth: int = 4) -> None:
        super().__init__()
        self._chunks: queue.Queue[bytes | BaseException] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._pending = memoryview(b"")
        self._ended = False
        self._thread = threading.Thread(
            target=self._fill, args=(src, chunk), name="modelkeep-read-ahead", daemon=True
        )
        self._thread.start()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        while not self._pending and not self._ended:
            item = self._chunks.get()
            if isinstance(item, BaseException):
                self._ended = True
                raise item
            self._ended = not item  # b"" is the end
            self._pending = memoryview(item)
        count = min(len(buffer), len(self._pending))
        buffer[:count] = self._pending[:count]
        self._pending = self._pending[count:]
        return count

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        super().close()

    def _fill(self, src: Source, chunk: int) -> None:
        try:
            while not self._stop.is_set():
                data = src.read(chunk) or b""
                self._put(data)
                if not data:
                    return
        except BaseException as exc:
            self._put(exc)

    def _put(self, item: bytes | BaseException) -> None:
        while not self._stop.is_set():
            with suppress(queue.Full):
                self._chunks.put(item, timeout=0.1)
                return
