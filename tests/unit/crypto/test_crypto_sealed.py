"""Sealed artifacts: round trips, exact sizes, and one opaque error for every kind of damage."""

from __future__ import annotations

import hashlib
import io
import os
from typing import BinaryIO

import pytest

from modelkeep.crypto import (
    KEY_SIZE,
    SEGMENT_SIZE,
    associated_data_for,
    new_data_key,
    seal,
    sealed_size,
    unseal,
)
from modelkeep.errors import IntegrityError

HEADER = 40
TAG = 16
FIRST = SEGMENT_SIZE - HEADER - TAG  # plaintext bytes in segment 0
LATER = SEGMENT_SIZE - TAG  # plaintext bytes in every later full segment
FAILED = "sealed artifact failed verification"

SIZES = [0, 1, FIRST - 1, FIRST, FIRST + 1, FIRST + LATER, FIRST + LATER + 1, 3_670_016]


def _plaintext(size: int) -> bytes:
    # Not all zeros, so a misplaced segment cannot decrypt to the same bytes by accident.
    return (bytes(range(251)) * (size // 251 + 1))[:size]


def _sealed(plaintext: bytes, key: bytes, ad: bytes) -> bytes:
    out = io.BytesIO()
    seal(plaintext, key, ad, out)
    return out.getvalue()


def _ad(version: int, plaintext: bytes = b"model bytes") -> bytes:
    return associated_data_for("fraud", version, hashlib.sha256(plaintext).hexdigest())


def _refused(blob: bytes, key: bytes, ad: bytes, **kwargs: int) -> IntegrityError:
    with pytest.raises(IntegrityError) as info:
        unseal(io.BytesIO(blob), key, ad, **kwargs)
    return info.value


class _NonSeekable(io.RawIOBase):
    """A pipe-like source: no seeking, short reads of at most 1000 bytes."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        chunk = self._data.read(min(len(buffer), 1000))
        buffer[: len(chunk)] = chunk
        return len(chunk)


class _ShortWriter(io.RawIOBase):
    """A raw sink that accepts at most 4096 bytes per write, as a socket may."""

    def __init__(self) -> None:
        self.data = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, buffer: bytes | memoryview) -> int:  # type: ignore[override]
        accepted = bytes(buffer[:4096])
        self.data += accepted
        return len(accepted)


@pytest.mark.parametrize("size", SIZES)
def test_seal_then_unseal_returns_the_plaintext_and_writes_sealed_size_bytes(size: int) -> None:
    key = new_data_key()
    plaintext = _plaintext(size)
    out = io.BytesIO()
    written = seal(plaintext, key, _ad(1), out)
    assert sealed_size(size) == written
    assert sealed_size(size) == len(out.getvalue())
    out.seek(0)
    assert plaintext == unseal(out, key, _ad(1), expected_size=size)


def test_sealed_size_counts_header_and_one_tag_per_segment() -> None:
    assert sealed_size(0) == HEADER + TAG
    assert sealed_size(FIRST) == SEGMENT_SIZE
    assert sealed_size(FIRST + 1) == SEGMENT_SIZE + 1 + TAG
    assert sealed_size(FIRST + LATER) == 2 * SEGMENT_SIZE


def test_sealing_twice_gives_different_blobs() -> None:
    key = new_data_key()
    assert _sealed(b"same", key, _ad(1)) != _sealed(b"same", key, _ad(1))


def test_new_data_keys_are_32_random_bytes() -> None:
    first, second = new_data_key(), new_data_key()
    assert (len(first), len(second)) == (KEY_SIZE, KEY_SIZE)
    assert first != second


def test_seal_accepts_a_memoryview() -> None:
    key = new_data_key()
    plaintext = _plaintext(FIRST + 10)
    out = io.BytesIO()
    seal(memoryview(bytearray(plaintext)), key, _ad(1), out)
    out.seek(0)
    assert plaintext == unseal(out, key, _ad(1))


def test_seal_writes_everything_to_a_stream_that_takes_short_writes() -> None:
    key = new_data_key()
    plaintext = _plaintext(FIRST + 5000)
    sink = _ShortWriter()
    written = seal(plaintext, key, _ad(1), sink)  # type: ignore[arg-type]
    assert sealed_size(len(plaintext)) == written == len(sink.data)
    assert plaintext == unseal(io.BytesIO(bytes(sink.data)), key, _ad(1))


@pytest.mark.parametrize("expected_size", [None, FIRST + LATER + 7])
def test_unseal_reads_a_non_seekable_stream_with_short_reads(expected_size: int | None) -> None:
    key = new_data_key()
    plaintext = _plaintext(FIRST + LATER + 7)
    source: BinaryIO = _NonSeekable(_sealed(plaintext, key, _ad(1)))  # type: ignore[assignment]
    assert plaintext == unseal(source, key, _ad(1), expected_size=expected_size)


def test_unseal_starts_at_the_current_position_of_the_stream() -> None:
    key = new_data_key()
    src = io.BytesIO(b"prefix" + _sealed(b"payload", key, _ad(1)))
    src.seek(6)
    assert unseal(src, key, _ad(1)) == b"payload"


def test_a_blob_sealed_for_version_1_does_not_open_as_version_2() -> None:
    key = new_data_key()
    plaintext = _plaintext(3000)
    blob = _sealed(plaintext, key, _ad(1, plaintext))
    assert _refused(blob, key, _ad(2, plaintext)).message == FAILED


def test_a_blob_does_not_open_under_another_model_or_digest() -> None:
    key = new_data_key()
    digest = hashlib.sha256(b"x").hexdigest()
    blob = _sealed(b"x", key, associated_data_for("fraud", 1, digest))
    other_model = associated_data_for("churn", 1, digest)
    other_digest = associated_data_for("fraud", 1, hashlib.sha256(b"y").hexdigest())
    assert _refused(blob, key, other_model).message == FAILED
    assert _refused(blob, key, other_digest).message == FAILED


def test_a_wrong_key_is_refused() -> None:
    blob = _sealed(b"secret model", new_data_key(), _ad(1))
    assert _refused(blob, new_data_key(), _ad(1)).message == FAILED


@pytest.mark.parametrize(
    "position",
    [0, 1, HEADER - 1, HEADER, SEGMENT_SIZE - 1, SEGMENT_SIZE + 100, -1],
    ids=["length-byte", "salt", "nonce-prefix", "segment-0", "tag-0", "segment-1", "last-byte"],
)
def test_a_flipped_byte_anywhere_is_refused(position: int) -> None:
    key = new_data_key()
    blob = bytearray(_sealed(_plaintext(FIRST + 500), key, _ad(1)))
    blob[position] ^= 0x01
    assert _refused(bytes(blob), key, _ad(1)).message == FAILED


@pytest.mark.parametrize(
    "cut",
    [1, TAG, TAG + 500, 500 + TAG + 1],
    ids=["one-byte", "last-tag", "whole-last-segment", "into-segment-0"],
)
def test_a_truncated_blob_is_refused(cut: int) -> None:
    key = new_data_key()
    blob = _sealed(_plaintext(FIRST + 500), key, _ad(1))
    assert _refused(blob[:-cut], key, _ad(1)).message == FAILED


def test_a_blob_cut_exactly_at_a_segment_boundary_is_refused() -> None:
    # The remaining segment 0 is intact but was not sealed as the last one.
    key = new_data_key()
    blob = _sealed(_plaintext(FIRST + LATER + 10), key, _ad(1))
    assert _refused(blob[:SEGMENT_SIZE], key, _ad(1)).message == FAILED


@pytest.mark.parametrize("extra", [b"\x00", b"x" * TAG, b"y" * SEGMENT_SIZE])
def test_appended_bytes_are_refused(extra: bytes) -> None:
    key = new_data_key()
    blob = _sealed(_plaintext(1000), key, _ad(1))
    assert _refused(blob + extra, key, _ad(1)).message == FAILED


def test_appended_bytes_are_refused_on_a_non_seekable_stream_of_the_expected_size() -> None:
    # The layout comes from expected_size here, so only the end-of-stream check can notice.
    key = new_data_key()
    blob = _sealed(_plaintext(1000), key, _ad(1))
    source: BinaryIO = _NonSeekable(blob + b"\x00")  # type: ignore[assignment]
    with pytest.raises(IntegrityError) as info:
        unseal(source, key, _ad(1), expected_size=1000)
    assert info.value.message == FAILED


def test_reordered_segments_are_refused() -> None:
    key = new_data_key()
    plaintext = _plaintext(FIRST + 3 * LATER)
    blob = _sealed(plaintext, key, _ad(1))
    first, second = SEGMENT_SIZE, 2 * SEGMENT_SIZE
    swapped = blob[:first] + blob[second : second + SEGMENT_SIZE] + blob[first:second]
    swapped += blob[second + SEGMENT_SIZE :]
    assert len(blob) == len(swapped)
    assert _refused(swapped, key, _ad(1)).message == FAILED


def test_a_segment_spliced_from_another_blob_is_refused() -> None:
    key = new_data_key()
    one = _sealed(_plaintext(FIRST + 100), key, _ad(1))
    two = _sealed(_plaintext(FIRST + 100), key, _ad(1))
    assert _refused(one[:SEGMENT_SIZE] + two[SEGMENT_SIZE:], key, _ad(1)).message == FAILED


@pytest.mark.parametrize("blob", [b"", b"\x28", b"\x28" + bytes(HEADER + TAG - 2)])
def test_too_short_input_is_refused(blob: bytes) -> None:
    assert _refused(blob, new_data_key(), _ad(1)).message == FAILED


def test_a_size_other_than_expected_is_refused() -> None:
    key = new_data_key()
    blob = _sealed(_plaintext(1000), key, _ad(1))
    assert _refused(blob, key, _ad(1), expected_size=999).message == FAILED
    assert _refused(blob, key, _ad(1), expected_size=1001).message == FAILED


def test_a_size_other_than_expected_is_refused_on_a_non_seekable_stream() -> None:
    key = new_data_key()
    blob = _sealed(_plaintext(FIRST + 10), key, _ad(1))
    for expected in (FIRST + 9, FIRST + 11, 10):
        source: BinaryIO = _NonSeekable(blob)  # type: ignore[assignment]
        with pytest.raises(IntegrityError) as info:
            unseal(source, key, _ad(1), expected_size=expected)
        assert info.value.message == FAILED


def test_the_integrity_error_carries_no_cause_or_context() -> None:
    error = _refused(_sealed(b"x", new_data_key(), _ad(1)), new_data_key(), _ad(1))
    assert (str(error), error.__cause__, error.__context__) == (FAILED, None, None)


@pytest.mark.parametrize("length", [0, 16, 31, 33])
def test_a_key_of_the_wrong_length_is_a_programming_error(length: int) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        seal(b"x", os.urandom(length), _ad(1), io.BytesIO())
    with pytest.raises(ValueError, match="32 bytes"):
        unseal(io.BytesIO(b""), os.urandom(length), _ad(1))


def test_associated_data_is_length_prefixed_and_domain_separated() -> None:
    digest = "ab" * 32
    ad = associated_data_for("m", 7, digest)
    expected = (
        b"\x00\x00\x00\x13modelkeep/sealed/v1"
        + b"\x00\x00\x00\x01m"
        + (7).to_bytes(8, "big")
        + b"\x00\x00\x00\x20"
        + bytes.fromhex(digest)
    )
    assert expected == ad


def test_associated_data_differs_whenever_a_field_differs() -> None:
    digest = "0" * 64
    values = {
        associated_data_for("ab", 1, digest),
        associated_data_for("a", 1, digest),
        associated_data_for("ab", 2, digest),
        associated_data_for("ab", 1, "1" + "0" * 63),
        associated_data_for("ab", 256, digest),
    }
    assert len(values) == 5


def test_associated_data_ignores_the_case_of_the_digest() -> None:
    assert associated_data_for("m", 1, "AB" * 32) == associated_data_for("m", 1, "ab" * 32)


@pytest.mark.parametrize(
    ("version", "digest"),
    [(-1, "0" * 64), (1, "0" * 63), (1, "g" * 64), (1, "0" * 64 + "\n")],
)
def test_associated_data_refuses_bad_fields(version: int, digest: str) -> None:
    with pytest.raises(ValueError, match=r"version|sha256_hex"):
        associated_data_for("m", version, digest)


def test_sixty_four_mib_round_trip() -> None:
    key = new_data_key()
    plaintext = os.urandom(64 << 20)
    out = io.BytesIO()
    seal(plaintext, key, _ad(1), out)
    out.seek(0)
    assert plaintext == unseal(out, key, _ad(1), expected_size=len(plaintext))
