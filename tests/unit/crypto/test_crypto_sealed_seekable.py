"""Random access to a sealed blob: any range reads back exactly, and only verified bytes."""

from __future__ import annotations

import hashlib
import io
import random

import pytest

from modelkeep.crypto import SEGMENT_SIZE, associated_data_for, new_data_key, seal
from modelkeep.crypto.sealed import SeekableUnsealingReader
from modelkeep.errors import IntegrityError

FIRST = SEGMENT_SIZE - 40 - 16
LATER = SEGMENT_SIZE - 16
SIZES = [0, 1, FIRST, FIRST + 1, FIRST + LATER, 3_670_016]
FAILED = "sealed artifact failed verification"


def _sealed(size: int) -> tuple[bytes, bytes, bytes, bytes]:
    plaintext = random.Random(size).randbytes(size)
    key = new_data_key()
    ad = associated_data_for("seek", 1, hashlib.sha256(plaintext).hexdigest())
    out = io.BytesIO()
    seal(plaintext, key, ad, out)
    return plaintext, out.getvalue(), key, ad


@pytest.mark.parametrize("size", SIZES)
def test_any_range_reads_back_the_plaintext(size: int) -> None:
    plaintext, blob, key, ad = _sealed(size)
    reader = SeekableUnsealingReader(io.BytesIO(blob), key, ad, expected_size=size)
    rng = random.Random(7)
    for _ in range(50):
        start = rng.randrange(size + 2)
        length = rng.choice([1, 100, SEGMENT_SIZE, 3 * SEGMENT_SIZE])
        reader.seek(start)
        assert plaintext[start : start + length] == reader.read(length)
    reader.seek(0)
    assert plaintext == reader.read()
    assert size == reader.seek(0, io.SEEK_END)


def test_a_buffered_reader_over_it_seeks_and_reads_like_a_file() -> None:
    plaintext, blob, key, ad = _sealed(FIRST + LATER + 5)
    raw = SeekableUnsealingReader(io.BytesIO(blob), key, ad, expected_size=len(plaintext))
    buffered = io.BufferedReader(raw, 65536)
    buffered.seek(-10, io.SEEK_END)
    assert plaintext[-10:] == buffered.read()
    buffered.seek(FIRST - 3)
    assert plaintext[FIRST - 3 : FIRST + 3] == buffered.read(6)


def test_a_damaged_segment_fails_when_it_is_read_and_not_before() -> None:
    plaintext, blob, key, ad = _sealed(3 * SEGMENT_SIZE)
    damaged = bytearray(blob)
    damaged[2 * SEGMENT_SIZE + 10] ^= 1  # inside the third segment
    reader = SeekableUnsealingReader(
        io.BytesIO(bytes(damaged)), key, ad, expected_size=len(plaintext)
    )
    assert plaintext[:100] == reader.read(100)
    reader.seek(2 * SEGMENT_SIZE)
    with pytest.raises(IntegrityError) as info:
        reader.read(10)
    assert str(info.value) == FAILED


@pytest.mark.parametrize("change", ["truncated", "extended", "wrong size", "wrong key"])
def test_a_blob_that_is_not_the_one_sealed_fails_at_once(change: str) -> None:
    plaintext, blob, key, ad = _sealed(FIRST + LATER + 5)
    size = len(plaintext)
    if change == "truncated":
        blob = blob[:-1]
    elif change == "extended":
        blob += b"\x00" * 17
    elif change == "wrong size":
        size -= 1
    else:
        key = new_data_key()

    def read_last_byte() -> bytes:
        reader = SeekableUnsealingReader(io.BytesIO(blob), key, ad, expected_size=size)
        reader.seek(size - 1)
        return reader.read(1)

    with pytest.raises(IntegrityError) as info:
        read_last_byte()
    assert str(info.value) == FAILED


def test_reading_past_the_end_gives_nothing_and_what_is_left() -> None:
    plaintext, blob, key, ad = _sealed(FIRST + 10)
    reader = SeekableUnsealingReader(io.BytesIO(blob), key, ad, expected_size=len(plaintext))

    reader.seek(len(plaintext) + 5)
    assert reader.read(10) == b""
    reader.seek(FIRST - 2)
    assert plaintext[FIRST - 2 :] == reader.read(100)  # across the border, then to the end
    assert reader.read(1) == b""
