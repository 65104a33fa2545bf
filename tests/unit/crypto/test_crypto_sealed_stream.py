"""Sealing and opening as a stream: the same blobs as ``seal``, verified segment by segment."""

from __future__ import annotations

import hashlib
import io

import pytest

from modelkeep.crypto import SEGMENT_SIZE, associated_data_for, new_data_key, seal, unseal
from modelkeep.crypto.sealed import SEGMENT_BUFFERS, Sealer, UnsealingReader, unseal_segments
from modelkeep.errors import IntegrityError

FIRST = SEGMENT_SIZE - 40 - 16
LATER = SEGMENT_SIZE - 16
SIZES = [0, 1, FIRST - 1, FIRST, FIRST + 1, FIRST + LATER, FIRST + LATER + 1, 3_670_016]
FAILED = "sealed artifact failed verification"


def _plaintext(size: int) -> bytes:
    return (bytes(range(251)) * (size // 251 + 1))[:size]


def _ad(plaintext: bytes) -> bytes:
    return associated_data_for("stream", 1, hashlib.sha256(plaintext).hexdigest())


def _drain(reader: UnsealingReader) -> None:
    while reader.read(65536):
        pass


def _stream_sealed(plaintext: bytes, key: bytes, ad: bytes, chunk: int) -> tuple[bytes, int]:
    out = io.BytesIO()
    sealer = Sealer(key, ad, out)
    for start in range(0, len(plaintext), chunk):
        sealer.update(plaintext[start : start + chunk])
    written = sealer.finish()
    return out.getvalue(), written


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("chunk", [1000, 65536, SEGMENT_SIZE + 7])
def test_a_streamed_seal_opens_with_unseal_and_has_the_size_seal_writes(
    size: int, chunk: int
) -> None:
    key, plaintext = new_data_key(), _plaintext(size)
    blob, written = _stream_sealed(plaintext, key, _ad(plaintext), chunk)
    reference = io.BytesIO()
    seal(plaintext, key, _ad(plaintext), reference)
    assert (written, len(blob)) == (len(reference.getvalue()), len(reference.getvalue()))
    assert plaintext == unseal(io.BytesIO(blob), key, _ad(plaintext), expected_size=size)


@pytest.mark.parametrize("size", SIZES)
def test_the_reader_gives_back_the_plaintext_in_small_reads(size: int) -> None:
    key, plaintext = new_data_key(), _plaintext(size)
    blob, _ = _stream_sealed(plaintext, key, _ad(plaintext), 65536)
    reader = UnsealingReader(io.BytesIO(blob), key, _ad(plaintext), expected_size=size)
    parts = []
    while part := reader.read(4093):
        parts.append(part)
    assert plaintext == b"".join(parts)


def test_segments_are_released_one_at_a_time() -> None:
    key, plaintext = new_data_key(), _plaintext(FIRST + 2 * LATER + 5)
    blob, _ = _stream_sealed(plaintext, key, _ad(plaintext), 65536)
    sizes = [
        len(part)
        for part in unseal_segments(
            io.BytesIO(blob), key, _ad(plaintext), expected_size=len(plaintext)
        )
    ]
    assert sizes == [FIRST, LATER, LATER, 5]


def test_segments_stay_intact_while_the_next_ones_are_decrypted() -> None:
    # A load hashes and writes segments on threads while the next ones decrypt: each view must
    # hold its own bytes until SEGMENT_BUFFERS more have been asked for.
    size = FIRST + (2 * SEGMENT_BUFFERS + 1) * LATER
    key, plaintext = new_data_key(), _plaintext(size)
    blob, _ = _stream_sealed(plaintext, key, _ad(plaintext), 65536)
    kept: list[tuple[int, memoryview]] = []
    start = 0
    for segment in unseal_segments(io.BytesIO(blob), key, _ad(plaintext), expected_size=size):
        for at, view in kept:  # the SEGMENT_BUFFERS - 1 before this one
            assert bytes(view) == plaintext[at : at + len(view)]
        kept = [*kept, (start, segment)][-(SEGMENT_BUFFERS - 1) :]
        start += len(segment)
    assert start == size


@pytest.mark.parametrize("cut", [1, 16, LATER])
def test_a_truncated_stream_fails_by_its_end_with_the_opaque_error(cut: int) -> None:
    key, plaintext = new_data_key(), _plaintext(FIRST + LATER + 100)
    blob, _ = _stream_sealed(plaintext, key, _ad(plaintext), 65536)
    reader = UnsealingReader(
        io.BytesIO(blob[:-cut]), key, _ad(plaintext), expected_size=len(plaintext)
    )
    with pytest.raises(IntegrityError) as info:
        _drain(reader)
    assert str(info.value) == FAILED


def test_a_flipped_byte_is_refused_before_its_segment_is_released() -> None:
    key, plaintext = new_data_key(), _plaintext(FIRST + LATER)
    blob = bytearray(_stream_sealed(plaintext, key, _ad(plaintext), 65536)[0])
    blob[SEGMENT_SIZE + 10] ^= 1  # inside the second segment
    released: list[bytes] = []
    segments = unseal_segments(
        io.BytesIO(bytes(blob)), key, _ad(plaintext), expected_size=len(plaintext)
    )
    with pytest.raises(IntegrityError):
        released.extend(bytes(part) for part in segments)
    assert released == [plaintext[:FIRST]]


def test_a_stream_under_other_associated_data_is_refused() -> None:
    key, plaintext = new_data_key(), _plaintext(100)
    blob, _ = _stream_sealed(plaintext, key, _ad(plaintext), 10)
    with pytest.raises(IntegrityError):
        unseal(io.BytesIO(blob), key, _ad(b"other"), expected_size=100)
