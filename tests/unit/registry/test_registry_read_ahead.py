"""ReadAhead: the bytes of its source in order, the source's errors where they happen, and a
thread that stops when the reader does."""

from __future__ import annotations

import io
import os
import threading

import pytest

from modelkeep.errors import Unavailable
from modelkeep.registry.blobs import ReadAhead


def test_every_byte_arrives_in_order_across_chunks() -> None:
    data = os.urandom(10_000)
    with io.BufferedReader(ReadAhead(io.BytesIO(data), chunk=333, depth=2)) as reader:
        assert reader.read(7) == data[:7]
        assert reader.read(5000) == data[7:5007]
        assert reader.read() == data[5007:]
        assert reader.read(1) == b""


class _BreaksAfter(io.RawIOBase):
    def __init__(self, good: bytes) -> None:
        self._good = io.BytesIO(good)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        count = self._good.readinto(buffer)
        if count == 0:
            raise Unavailable("the blob store is unavailable; try again later")
        return count


def test_an_error_of_the_source_is_raised_to_the_reader_after_the_bytes_before_it() -> None:
    got = bytearray()

    def read_all(reader: ReadAhead) -> None:
        while True:
            got.extend(reader.read(100) or b"")

    reader = ReadAhead(_BreaksAfter(b"x" * 100), chunk=40)  # type: ignore[arg-type]
    with reader, pytest.raises(Unavailable):
        read_all(reader)
    assert bytes(got) == b"x" * 100


class _Endless(io.RawIOBase):
    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        buffer[:] = b"\0" * len(buffer)
        return len(buffer)


def test_closing_early_stops_the_thread_and_leaves_the_source_open() -> None:
    source = _Endless()
    before = {t.name for t in threading.enumerate()}
    reader = ReadAhead(source, chunk=1024, depth=2)  # type: ignore[arg-type]
    assert reader.read(10) == b"\0" * 10
    reader.close()
    assert "modelkeep-read-ahead" not in {t.name for t in threading.enumerate()} - before
    assert not source.closed
