"""Hazardous layer: Tink's AES-GCM-HKDF streaming AEAD wire format, segment by segment.

Only ``sealed.py`` should import this module. It knows the byte layout and nothing about
modelkeep's errors: every verification failure raises :class:`StreamError`, which the caller
collapses into one opaque error.

Layout for the parameters of Tink's ``AES256_GCM_HKDF_1MB`` template (ciphertext offset 0)::

    header    = 0x28 (header length, 40) || salt (32) || nonce_prefix (7)
    key_i     = HKDF-SHA256(ikm=key, salt=salt, info=associated_data, length=32)
    nonce_i   = nonce_prefix || uint32_be(i) || (0x01 if i is the last segment else 0x00)
    segment_i = AES-256-GCM(key_i, nonce_i, plaintext_i, aad=empty)  (ciphertext || 16-byte tag)
    blob      = header || segment_0 || ... || segment_{n-1}

The header and segment 0 together fill one ciphertext segment (1 MiB); every later segment but
the last is exactly 1 MiB of ciphertext. The last-segment flag in the nonce is what makes
truncation and extension detectable; the segment index in the nonce is what makes reordering
detectable; HKDF over the associated data binds every segment to it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO, Protocol

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_SIZE = 32
SEGMENT_SIZE = 1 << 20
SALT_SIZE = KEY_SIZE  # Tink: the salt is as long as the derived key
NONCE_PREFIX_SIZE = 7
TAG_SIZE = 16
HEADER_SIZE = 1 + SALT_SIZE + NONCE_PREFIX_SIZE
FIRST_PLAINTEXT_SIZE = SEGMENT_SIZE - HEADER_SIZE - TAG_SIZE
PLAINTEXT_SIZE = SEGMENT_SIZE - TAG_SIZE
# How many plaintext buffers decrypt_segments turns over. A load keeps up to three segments in
# flight on its hashing and writing threads: with one (two buffers) each thread's wait for the
# GIL, which AES-GCM holds, stalled the others (1 GiB from a local file: 1.06-1.21 s with two,
# 0.85-0.93 s with four, 0.90-1.00 s with eight).
SEGMENT_BUFFERS = 4
# The segment index is a 4-byte counter in the nonce.
MAX_SEGMENTS = 1 << 32


class StreamError(Exception):
    """The ciphertext did not verify. Carries no detail on purpose."""


@dataclass(frozen=True, slots=True)
class Segment:
    """Where one segment sits in the plaintext and how long its ciphertext is."""

    index: int
    plaintext_start: int
    plaintext_size: int
    last: bool

    @property
    def ciphertext_size(self) -> int:
        return self.plaintext_size + TAG_SIZE


class Source(Protocol):
    """What a blob is read from: a file, a socket's body, a reader ahead of one."""

    def read(self, size: int = -1, /) -> bytes | None: ...
    def readinto(self, buffer: memoryview, /) -> int | None: ...
    def seekable(self) -> bool: ...
    def tell(self) -> int: ...
    def seek(self, offset: int, whence: int = 0, /) -> int: ...


def segment_count(plaintext_size: int) -> int:
    """Number of segments used for ``plaintext_size`` bytes (at least one, even when empty)."""
    if plaintext_size < 0:
        raise ValueError("plaintext size must not be negative")
    if plaintext_size <= FIRST_PLAINTEXT_SIZE:
        return 1
    rest = plaintext_size - FIRST_PLAINTEXT_SIZE
    return 1 + -(-rest // PLAINTEXT_SIZE)


def ciphertext_size(plaintext_size: int) -> int:
    """Exact blob size for ``plaintext_size`` bytes, as :func:`encrypt` writes it."""
    return HEADER_SIZE + plaintext_size + TAG_SIZE * segment_count(plaintext_size)


def layout(plaintext_size: int, segments: int | None = None) -> Iterator[Segment]:
    """Segments covering ``plaintext_size`` bytes, full-size except the last.

    ``segments`` may exceed the minimal count by one: that is a valid blob whose last segment is
    empty (other Tink writers may end a stream that way exactly at a segment boundary).
    """
    count = segment_count(plaintext_size) if segments is None else segments
    if count > MAX_SEGMENTS:
        raise StreamError
    start = 0
    for index in range(count):
        capacity = FIRST_PLAINTEXT_SIZE if index == 0 else PLAINTEXT_SIZE
        size = min(capacity, plaintext_size - start)
        last = index == count - 1
        if size < 0 or (not last and size != capacity):
            raise StreamError
        yield Segment(index, start, size, last)
        start += size
    if start != plaintext_size:
        raise StreamError


def split_ciphertext_size(total: int) -> tuple[int, int]:
    """Plaintext size and segment count of a blob of ``total`` bytes; StreamError if impossible."""
    body = total - HEADER_SIZE
    first = SEGMENT_SIZE - HEADER_SIZE
    if body < TAG_SIZE:
        raise StreamError
    if body <= first:
        return body - TAG_SIZE, 1
    full, remainder = divmod(body - first, SEGMENT_SIZE)
    if remainder == 0:
        return FIRST_PLAINTEXT_SIZE + full * PLAINTEXT_SIZE, 1 + full
    if remainder < TAG_SIZE:
        raise StreamError
    return FIRST_PLAINTEXT_SIZE + full * PLAINTEXT_SIZE + remainder - TAG_SIZE, 2 + full


def new_header() -> tuple[bytes, bytes, bytes]:
    """A fresh random header; returns ``(header, salt, nonce_prefix)``."""
    salt = os.urandom(SALT_SIZE)
    nonce_prefix = os.urandom(NONCE_PREFIX_SIZE)
    return bytes([HEADER_SIZE]) + salt + nonce_prefix, salt, nonce_prefix


def parse_header(header: bytes | bytearray) -> tuple[bytes, bytes]:
    """``(salt, nonce_prefix)`` of a header; StreamError unless it has the expected shape."""
    if len(header) != HEADER_SIZE or header[0] != HEADER_SIZE:
        raise StreamError
    return bytes(header[1 : 1 + SALT_SIZE]), bytes(header[1 + SALT_SIZE :])


def segment_cipher(key: bytes, salt: bytes, associated_data: bytes) -> AESGCM:
    """The per-blob AES-GCM key: HKDF-SHA256 of the key, salted, with the associated data."""
    hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=salt, info=associated_data)
    return AESGCM(hkdf.derive(key))


def segment_nonce(nonce_prefix: bytes, index: int, last: bool) -> bytes:
    return nonce_prefix + index.to_bytes(4, "big") + (b"\x01" if last else b"\x00")


def encrypt(plaintext: memoryview, key: bytes, associated_data: bytes, out: BinaryIO) -> int:
    """Write the blob for ``plaintext`` to ``out`` one segment at a time; return bytes written."""
    header, salt, nonce_prefix = new_header()
    cipher = segment_cipher(key, salt, associated_data)
    written = write_all(out, memoryview(header))
    buffer = bytearray(SEGMENT_SIZE)
    view = memoryview(buffer)
    for segment in layout(len(plaintext)):
        end = segment.plaintext_start + segment.plaintext_size
        size = cipher.encrypt_into(
            segment_nonce(nonce_prefix, segment.index, segment.last),
            plaintext[segment.plaintext_start : end],
            None,
            view[: segment.ciphertext_size],
        )
        written += write_all(out, view[:size])
    return written


def decrypt(
    src: Source, key: bytes, associated_data: bytes, plaintext_size: int, segments: int
) -> bytearray:
    """Read and verify a blob laid out as ``(plaintext_size, segments)``; StreamError on any fault.

    The plaintext is decrypted into one preallocated buffer. ``InvalidTag`` from AES-GCM also
    means "did not verify"; the buffer may then hold unverified bytes and must be dropped.
    """
    plaintext = bytearray(plaintext_size)
    out = memoryview(plaintext)
    start = 0
    for part in decrypt_segments(src, key, associated_data, plaintext_size, segments):
        out[start : start + len(part)] = part
        start += len(part)
    return plaintext


def decrypt_segments(
    src: Source, key: bytes, associated_data: bytes, plaintext_size: int, segments: int
) -> Iterator[memoryview]:
    """Each segment's plaintext in order, each yielded only after its tag verified.

    A yielded view's buffer is reused :data:`SEGMENT_BUFFERS` segments later: a consumer may
    keep up to ``SEGMENT_BUFFERS - 1`` views while it takes the next (a load hashes and writes
    segments on threads while the next ones decrypt), and must copy what it keeps longer.
    ``src`` must end exactly where the last segment ends; that (and so truncation) is known
    only when the iteration finishes without StreamError or ``InvalidTag``.
    """
    salt, nonce_prefix = parse_header(read_exactly(src, HEADER_SIZE))
    cipher = segment_cipher(key, salt, associated_data)
    ciphertext = memoryview(bytearray(SEGMENT_SIZE))
    plaintexts = [memoryview(bytearray(PLAINTEXT_SIZE)) for _ in range(SEGMENT_BUFFERS)]
    for segment in layout(plaintext_size, segments):
        sealed = ciphertext[: segment.ciphertext_size]
        read_exactly_into(src, sealed)
        plaintext = plaintexts[segment.index % SEGMENT_BUFFERS][: segment.plaintext_size]
        cipher.decrypt_into(
            segment_nonce(nonce_prefix, segment.index, segment.last), sealed, None, plaintext
        )
        yield plaintext
    if src.read(1):
        raise StreamError


class Encryptor:
    """Seals a stream of unknown length, one segment at a time, into ``out``.

    A full segment is held back until the next byte arrives, because the nonce of the last
    segment differs (Tink's writer does the same); so at most one segment of plaintext is
    buffered. The layout is the minimal one :func:`layout` describes.
    """

    def __init__(self, key: bytes, associated_data: bytes, out: BinaryIO) -> None:
        header, salt, self._nonce_prefix = new_header()
        self._cipher = segment_cipher(key, salt, associated_data)
        self._out = out
        self._pending = bytearray()
        self._capacity = FIRST_PLAINTEXT_SIZE
        self._index = 0
        self._buffer = bytearray(SEGMENT_SIZE)
        self.written = write_all(out, memoryview(header))

    def update(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        while view:
            room = self._capacity - len(self._pending)
            if room == 0:
                self._emit(last=False)
                continue
            self._pending += view[:room]
            view = view[room:]

    def finish(self) -> int:
        """Seal the last segment; returns the number of bytes written in all."""
        self._emit(last=True)
        return self.written

    def _emit(self, *, last: bool) -> None:
        if self._index >= MAX_SEGMENTS:
            raise ValueError("too much data for one sealed stream")
        size = self._cipher.encrypt_into(
            segment_nonce(self._nonce_prefix, self._index, last),
            self._pending,
            None,
            memoryview(self._buffer)[: len(self._pending) + TAG_SIZE],
        )
        self.written += write_all(self._out, memoryview(self._buffer)[:size])
        self._pending.clear()
        self._capacity = PLAINTEXT_SIZE
        self._index += 1


def read_exactly(src: Source, size: int) -> bytearray:
    """``size`` bytes from ``src``, across short reads; StreamError if it ends first."""
    data = bytearray(size)
    read_exactly_into(src, memoryview(data))
    return data


def read_exactly_into(src: Source, target: memoryview) -> None:
    """Fill ``target`` from ``src``, across short reads; StreamError if it ends first."""
    have = 0
    while have < len(target):
        count = src.readinto(target[have:])
        if not count:
            raise StreamError
        have += count


def write_all(out: BinaryIO, data: memoryview) -> int:
    """Write all of ``data``, across short writes of unbuffered streams."""
    done = 0
    while done < len(data):
        count = out.write(data[done:])
        # Raw streams may accept only part of the data; old-style writers return None for "all".
        if count is None:
            return len(data)
        if count <= 0:
            raise OSError("the output stream accepted no data")
        done += count
    return done
