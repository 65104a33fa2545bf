"""Sealed artifacts: a model's bytes encrypted and authenticated under a fresh data key.

The format is Tink's AES-GCM-HKDF streaming AEAD with the parameters of Tink's
``AES256_GCM_HKDF_1MB`` template, byte-compatible with the ``tink`` package in both directions,
written with pyca/cryptography for speed. The associated data binds a blob to
``(model, version, plaintext SHA-256)``: a blob moved to another version does not open.

Every way a blob can fail to open (wrong key, wrong associated data, damaged, truncated,
extended, reordered, unexpected size) raises the same :class:`~modelkeep.errors.IntegrityError`
with the same message, so a caller learns nothing about *why*.
"""

from __future__ import annotations

import io
import os
import re
from collections import OrderedDict
from collections.abc import Iterator
from typing import BinaryIO

from cryptography.exceptions import InvalidTag

from modelkeep._positioned import PositionedReader
from modelkeep.crypto import _streaming
from modelkeep.crypto._streaming import Source
from modelkeep.errors import IntegrityError

__all__ = [
    "KEY_SIZE",
    "SEGMENT_BUFFERS",
    "SEGMENT_SIZE",
    "Sealer",
    "SeekableUnsealingReader",
    "Source",
    "UnsealingReader",
    "associated_data_for",
    "model_and_version_of",
    "new_data_key",
    "seal",
    "sealed_size",
    "unseal",
    "unseal_segments",
]

KEY_SIZE = _streaming.KEY_SIZE
SEGMENT_SIZE = _streaming.SEGMENT_SIZE
SEGMENT_BUFFERS = _streaming.SEGMENT_BUFFERS

_DOMAIN = b"modelkeep/sealed/v1"
_FAILED = "sealed artifact failed verification"
_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")
_MAX_VERSION = (1 << 63) - 1


def new_data_key() -> bytes:
    """A fresh random 32-byte data key, for sealing exactly one artifact."""
    return os.urandom(KEY_SIZE)


def associated_data_for(model: str, version: int, sha256_hex: str) -> bytes:
    """The associated data that binds a blob to one model version and its plaintext digest.

    The encoding is unambiguous: the domain tag and every variable-length field are length
    prefixed, the version is a fixed-width integer and the digest is its 32 raw bytes (so the
    hex case does not matter). Two different triples never give the same bytes.
    """
    if not isinstance(version, int) or isinstance(version, bool):
        raise TypeError("version must be an int")
    if not 0 <= version <= _MAX_VERSION:
        raise ValueError("version out of range")
    if not _SHA256_HEX.fullmatch(sha256_hex):
        raise ValueError("sha256_hex must be 64 hexadecimal characters")
    return b"".join(
        (
            _length_prefixed(_DOMAIN),
            _length_prefixed(model.encode("utf-8")),
            version.to_bytes(8, "big"),
            _length_prefixed(bytes.fromhex(sha256_hex)),
        )
    )


def model_and_version_of(associated_data: bytes) -> tuple[str, int] | None:
    """The (model, version) that :func:`associated_data_for` encoded, or None for other bytes.

    For labelling only (e.g. a KMS encryption context an operator reads in CloudTrail); the
    bytes themselves stay the binding.
    """
    view = memoryview(associated_data)
    fields: list[bytes] = []
    for width in (None, None, 8, None):
        if width is None:
            if len(view) < 4:
                return None
            width, view = int.from_bytes(view[:4], "big"), view[4:]
            if len(view) < width:
                return None
        fields.append(bytes(view[:width]))
        view = view[width:]
    if view or fields[0] != _DOMAIN or len(fields[3]) != 32:
        return None
    try:
        model = fields[1].decode("utf-8")
    except UnicodeDecodeError:
        return None
    return model, int.from_bytes(fields[2], "big")


def sealed_size(plaintext_size: int) -> int:
    """The exact number of bytes :func:`seal` writes for ``plaintext_size`` bytes of plaintext."""
    return _streaming.ciphertext_size(plaintext_size)


def seal(plaintext: bytes | memoryview, key: bytes, associated_data: bytes, out: BinaryIO) -> int:
    """Encrypt and authenticate ``plaintext`` under ``key``, writing the blob to ``out``.

    Segments are encrypted and written one at a time, so no full copy of the ciphertext is ever
    held in memory. Returns the number of bytes written, always ``sealed_size(len(plaintext))``.
    A key of the wrong length is a programming error (ValueError).
    """
    _check_key(key)
    view = memoryview(plaintext)
    if not view.c_contiguous:
        raise ValueError("plaintext must be a contiguous buffer")
    return _streaming.encrypt(view.cast("B"), key, associated_data, out)


def unseal(
    src: Source, key: bytes, associated_data: bytes, *, expected_size: int | None = None
) -> bytes:
    """Read a blob from ``src`` and return its plaintext, only if every byte verifies.

    Segments are read and verified one at a time into one preallocated buffer.
    ``expected_size`` is the plaintext size the caller recorded at seal time; a blob of any
    other size is refused. Any verification failure raises ``IntegrityError`` with one opaque
    message; I/O errors of ``src`` propagate unchanged. A key of the wrong length is a
    programming error (ValueError).
    """
    _check_key(key)
    if expected_size is not None and expected_size < 0:
        raise ValueError("expected_size must not be negative")
    plaintext: bytearray | None
    try:
        plaintext = _open(src, key, associated_data, expected_size)
    except (_streaming.StreamError, InvalidTag):
        plaintext = None
    # Raised outside the except block: no cause, no context, no traceback frames that would
    # keep unverified plaintext alive.
    if plaintext is None:
        raise IntegrityError(_FAILED)
    return bytes(plaintext)


class Sealer:
    """Seals a stream whose length is not known in advance: ``update`` then ``finish``.

    The blob is the same as :func:`seal` writes for the concatenated data; at most one segment
    (1 MiB) of plaintext is held in memory at any time.
    """

    def __init__(self, key: bytes, associated_data: bytes, out: BinaryIO) -> None:
        _check_key(key)
        self._encryptor = _streaming.Encryptor(key, associated_data, out)

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self._encryptor.update(data)

    def finish(self) -> int:
        """Seal the last segment; returns the number of bytes written in all."""
        return self._encryptor.finish()


def unseal_segments(
    src: Source, key: bytes, associated_data: bytes, *, expected_size: int
) -> Iterator[memoryview]:
    """The plaintext of a blob, one verified segment at a time (each view is reused: copy it).

    Each segment is released only after its tag verified, but a truncated or extended blob is
    detected only at the end: nothing read may be trusted as *the whole* artifact until the
    iteration has finished. Any failure raises ``IntegrityError`` with the one opaque message.
    """
    _check_key(key)
    total = _remaining_length(src)
    failed = False
    try:
        segments = _streaming.segment_count(expected_size)
        if total is not None:
            plaintext_size, segments = _streaming.split_ciphertext_size(total)
            if plaintext_size != expected_size:
                raise _streaming.StreamError
        yield from _streaming.decrypt_segments(src, key, associated_data, expected_size, segments)
    except (_streaming.StreamError, InvalidTag):
        failed = True
    if failed:
        raise IntegrityError(_FAILED)


class UnsealingReader(io.RawIOBase):
    """A sequential, read-only file over a blob's verified plaintext (for ``tarfile`` "r|").

    Reading raises ``IntegrityError`` where the blob stops verifying, at the latest at its end.
    """

    def __init__(
        self, src: Source, key: bytes, associated_data: bytes, *, expected_size: int
    ) -> None:
        super().__init__()
        self._segments = unseal_segments(src, key, associated_data, expected_size=expected_size)
        self._current = memoryview(b"")
        self._done = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        target = memoryview(buffer).cast("B")
        while not self._current and not self._done:
            try:
                self._current = next(self._segments)
            except StopIteration:
                self._done = True
        count = min(len(target), len(self._current))
        target[:count] = self._current[:count]
        self._current = self._current[count:]
        return count


class SeekableUnsealingReader(PositionedReader):
    """A seekable, read-only file over a blob's plaintext that decrypts only what is read.

    Each segment is authenticated on its own (its index and whether it is the last are bound
    into its nonce), so any part of a blob can be verified without the rest: a read decrypts
    and verifies the segments it touches, and keeps the last few in a small cache for readers
    that jump back and forth (zip directories, headers, pickle opcodes). The blob's size must
    match ``expected_size`` before anything is read, so a truncated or extended blob fails at
    once. Any failure raises ``IntegrityError`` with the one opaque message. ``src`` must be
    seekable and not be read by anyone else while this reader is in use.
    """

    def __init__(
        self,
        src: Source,
        key: bytes,
        associated_data: bytes,
        *,
        expected_size: int,
        cached_segments: int = 4,
    ) -> None:
        super().__init__(expected_size)
        _check_key(key)
        self._src = src
        self._base = src.tell()
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._cached = max(1, cached_segments)
        failed = False
        try:
            total = _remaining_length(src)
            if total is None:
                raise _streaming.StreamError
            plaintext_size, count = _streaming.split_ciphertext_size(total)
            if plaintext_size != expected_size:
                raise _streaming.StreamError
            self._segments = list(_streaming.layout(plaintext_size, count))
            salt, self._nonce_prefix = _streaming.parse_header(
                _streaming.read_exactly(src, _streaming.HEADER_SIZE)
            )
            self._cipher = _streaming.segment_cipher(key, salt, associated_data)
        except _streaming.StreamError:
            failed = True
        if failed:
            raise IntegrityError(_FAILED)

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        target = memoryview(buffer).cast("B")
        filled = 0
        while filled < len(target) and self._pos < self._size:
            segment = self._segments[self._index_of(self._pos)]
            plaintext = self._segment(segment)
            offset = self._pos - segment.plaintext_start
            count = min(len(target) - filled, len(plaintext) - offset)
            target[filled : filled + count] = plaintext[offset : offset + count]
            filled += count
            self._pos += count
        return filled

    def _index_of(self, position: int) -> int:
        first = _streaming.FIRST_PLAINTEXT_SIZE
        return 0 if position < first else 1 + (position - first) // _streaming.PLAINTEXT_SIZE

    def _segment(self, segment: _streaming.Segment) -> bytes:
        cached = self._cache.get(segment.index)
        if cached is not None:
            self._cache.move_to_end(segment.index)
            return cached
        # Ciphertext before this segment: the header, then each earlier segment and its tag.
        start = (
            self._base
            + _streaming.HEADER_SIZE
            + segment.plaintext_start
            + segment.index * _streaming.TAG_SIZE
        )
        plaintext: bytes | None
        try:
            self._src.seek(start)
            ciphertext = _streaming.read_exactly(self._src, segment.ciphertext_size)
            nonce = _streaming.segment_nonce(self._nonce_prefix, segment.index, segment.last)
            plaintext = self._cipher.decrypt(nonce, ciphertext, None)
        except (_streaming.StreamError, InvalidTag):
            plaintext = None
        if plaintext is None:
            raise IntegrityError(_FAILED)
        self._cache[segment.index] = plaintext
        if len(self._cache) > self._cached:
            self._cache.popitem(last=False)
        return plaintext


def _open(src: Source, key: bytes, associated_data: bytes, expected_size: int | None) -> bytearray:
    total = _remaining_length(src)
    if total is None:
        if expected_size is not None:
            # Unknown length: trust the expected size for the layout; decrypt() still demands
            # that the stream ends exactly after the last segment.
            plaintext_size = expected_size
            segments = _streaming.segment_count(expected_size)
            return _streaming.decrypt(src, key, associated_data, plaintext_size, segments)
        buffered = src.read() or b""
        total = len(buffered)
        src = io.BytesIO(buffered)
    plaintext_size, segments = _streaming.split_ciphertext_size(total)
    if expected_size is not None and plaintext_size != expected_size:
        raise _streaming.StreamError
    return _streaming.decrypt(src, key, associated_data, plaintext_size, segments)


def _remaining_length(src: Source) -> int | None:
    """Bytes left in a seekable stream, or None if its length cannot be learned by seeking."""
    try:
        if not src.seekable():
            return None
        position = src.tell()
        end = src.seek(0, io.SEEK_END)
        src.seek(position)
    except (AttributeError, OSError):
        return None
    return end - position


def _check_key(key: bytes) -> None:
    if len(key) != KEY_SIZE:
        raise ValueError("key must be 32 bytes")


def _length_prefixed(field: bytes) -> bytes:
    return len(field).to_bytes(4, "big") + field
