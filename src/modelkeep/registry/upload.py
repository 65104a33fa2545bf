"""An upload on its way in: hashed and sealed segment by segment, never held whole in memory.

The bytes of a push are sealed as they arrive under a one-time key that lives only in this
object, into a temporary file that has no name (``O_TMPFILE``, or created and unlinked at once
where the file system lacks it). So the plaintext never reaches disk, nothing a crash leaves
can be read, and the kernel frees the space when the file is closed or the process dies: a
killed push leaves no temporary data behind. The push checks then read the sealed copy back,
decrypting as they read (``reader`` from the start, ``seekable_reader`` for the parts a scan
needs), and the registry re-seals it under the version's own key.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import IO, BinaryIO, cast

from modelkeep.crypto.sealed import (
    Sealer,
    SeekableUnsealingReader,
    Source,
    UnsealingReader,
    new_data_key,
)

__all__ = ["UPLOAD_DIR", "Upload", "clear_staging", "staging_dir"]

#: Where uploads are staged, under the data directory (local to each replica).
UPLOAD_DIR = "uploads"

# Any fixed value works: the key is used for exactly one upload and never leaves memory.
_UPLOAD_CONTEXT = b"modelkeep/upload/v1"


class Upload:
    """The sealed, hashed copy of one upload. Write, ``finish``, read back, ``close``."""

    def __init__(self, staging_dir: Path | None = None) -> None:
        # No context manager: the file lives as long as this object (closed by close()).
        self.staging_dir = staging_dir
        self._file: IO[bytes] = tempfile.TemporaryFile(dir=staging_dir)  # noqa: SIM115
        self._key = new_data_key()
        self._sealer: Sealer | None = Sealer(self._key, _UPLOAD_CONTEXT, cast(BinaryIO, self._file))
        self._hash = hashlib.sha256()
        self.size = 0

    @classmethod
    def of(cls, data: bytes, staging_dir: Path | None = None) -> Upload:
        """A finished upload holding ``data`` (for callers that already have the bytes)."""
        upload = cls(staging_dir)
        try:
            upload.write(data)
            upload.finish()
        except BaseException:
            upload.close()
            raise
        return upload

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append ``data`` (the caller enforces the size limit as it reads)."""
        if self._sealer is None:
            raise ValueError("the upload is already finished")
        self.size += len(data)
        self._hash.update(data)
        self._sealer.update(data)

    def write_all(self, chunks: Iterable[bytes]) -> None:
        for chunk in chunks:
            self.write(chunk)

    def finish(self) -> None:
        """Seal the last segment; the upload is then complete and can be read back."""
        if self._sealer is None:
            raise ValueError("the upload is already finished")
        self._sealer.finish()
        self._sealer = None
        self._file.flush()

    @property
    def sha256(self) -> str:
        """The SHA-256 (hex) of everything written; only meaningful once finished."""
        return self._hash.hexdigest()

    def reader(self) -> UnsealingReader:
        """The upload's bytes from the start, verified segment by segment as they are read.

        One reader at a time: a new one rewinds the shared file.
        """
        if self._sealer is not None:
            raise ValueError("the upload is not finished")
        self._file.seek(0)
        return UnsealingReader(
            cast(Source, self._file), self._key, _UPLOAD_CONTEXT, expected_size=self.size
        )

    def seekable_reader(self) -> SeekableUnsealingReader:
        """The upload's bytes as a seekable file that decrypts only the segments it reads.

        For checks that need a few parts of a large file, not all of it. One reader at a time,
        as for ``reader``.
        """
        if self._sealer is not None:
            raise ValueError("the upload is not finished")
        self._file.seek(0)
        return SeekableUnsealingReader(
            cast(Source, self._file), self._key, _UPLOAD_CONTEXT, expected_size=self.size
        )

    def close(self) -> None:
        """Drop the sealed copy; its space is freed at once (the file has no name)."""
        self._file.close()

    def __enter__(self) -> Upload:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def staging_dir(data_dir: Path) -> Path:
    """The staging directory of ``data_dir`` (mode 0700), created if missing."""
    path = data_dir / UPLOAD_DIR
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def clear_staging(path: Path) -> int:
    """Remove everything in a staging directory; returns how many entries.

    Staged files have no name where ``O_TMPFILE`` works, so this finds something only where
    the file system lacked it and a process died between creating and unlinking a file. Call
    it only when no push can be in flight (before workers start).
    """
    removed = 0
    for entry in path.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed += 1
    return removed
