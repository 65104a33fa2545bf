"""Scanning through a seekable file: the same reports as from bytes, read only as far as needed."""

from __future__ import annotations

import gzip
import io
import json
import struct
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, cast

import gguf
import numpy as np
import pytest
import torch

from modelkeep._positioned import PositionedReader
from modelkeep.errors import IntegrityError
from modelkeep.scanning import ScanReport, Verdict, scan_path, scan_reader
from modelkeep.scanning._context import FileBytes, Rereadable
from modelkeep.testing_files import (
    deflated_npz,
    gzipped_npy,
    keras_h5,
    safetensors_tar,
    safetensors_tar_gz,
    stored_npz,
)

MiB = 1024 * 1024


class CountingFile(io.RawIOBase):
    """A file that counts the bytes read from it."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self._file = path.open("rb")
        self.read_bytes = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        count = self._file.readinto(buffer)
        self.read_bytes += count
        return count

    def close(self) -> None:
        self._file.close()
        super().close()


def _scan_file(path: Path) -> tuple[ScanReport, int]:
    raw = CountingFile(path)
    with io.BufferedReader(raw, 64 * 1024) as reader:
        report = scan_reader(reader, path.name)
    return report, raw.read_bytes


def test_every_corpus_file_gets_the_same_report_through_a_reader(corpus: Path) -> None:
    files = sorted(p for p in corpus.rglob("*") if p.is_file() and p.name != "manifest.json")
    mismatches = [p.name for p in files if _scan_file(p)[0] != scan_path(p)]
    assert len(files) > 100
    assert mismatches == []


def test_a_large_safetensors_file_is_scanned_from_its_header(tmp_path: Path) -> None:
    data_size = 64 * MiB
    header = json.dumps(
        {"w": {"dtype": "F32", "shape": [data_size // 4], "data_offsets": [0, data_size]}}
    ).encode()
    path = tmp_path / "big.safetensors"
    with path.open("wb") as out:
        out.write(struct.pack("<Q", len(header)) + header)
        out.truncate(8 + len(header) + data_size)  # sparse: no time spent writing zeros

    report, read = _scan_file(path)

    assert (report.verdict, report.format) == (Verdict.SAFE, "safetensors")
    assert read < 2 * MiB


def test_a_legacy_torch_checkpoint_is_scanned_without_reading_its_storages(
    tmp_path: Path,
) -> None:
    path = tmp_path / "legacy.pt"
    torch.save({"w": torch.zeros(8 * MiB)}, path, _use_new_zipfile_serialization=False)

    report, read = _scan_file(path)

    assert scan_path(path) == report
    assert report.format == "pytorch-legacy"
    assert read < 4 * MiB < path.stat().st_size


def test_a_large_gguf_file_is_scanned_from_its_header(tmp_path: Path) -> None:
    path = tmp_path / "big.gguf"
    elements = 16 * MiB
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor_info("w", (elements,), np.dtype(np.float32), elements * 4)
    writer.add_string("tokenizer.chat_template", "{{ messages }}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    with path.open("r+b") as out:  # the data, sparse, after the aligned header
        out.truncate(-(-path.stat().st_size // 32) * 32 + elements * 4)

    report, read = _scan_file(path)

    assert scan_path(path) == report
    assert (report.verdict, report.format) == (Verdict.SAFE, "gguf")
    assert read < 2 * MiB < path.stat().st_size


def test_a_large_npy_file_is_scanned_from_its_header(tmp_path: Path) -> None:
    path = tmp_path / "big.npy"
    np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(16 * MiB,)).flush()

    report, read = _scan_file(path)

    assert scan_path(path) == report
    assert (report.verdict, report.format) == (Verdict.SAFE, "numpy")
    assert read < 2 * MiB < path.stat().st_size


def test_scanning_an_onnx_model_holds_no_copy_of_its_weights() -> None:
    """protobuf copies any buffer other than ``bytes`` before parsing it, so the scanner hands
    it the ``bytes`` it has; and only the constants an allocating operator reads are decoded,
    not every small tensor (as Python floats, many times the model's size)."""
    import tracemalloc

    import onnx
    from onnx import helper, numpy_helper

    from modelkeep.scanning import scan_bytes

    rng = np.random.default_rng(3)
    weights = [f"w{i}" for i in range(16)]  # 16 tensors of 2 MiB: no one of them is the model
    graph = helper.make_graph(
        [helper.make_node("Sum", weights, ["y"])],
        "many",
        [],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [MiB // 2])],
        [numpy_helper.from_array(rng.random(MiB // 2, dtype=np.float32), n) for n in weights],
    )
    data = helper.make_model(graph).SerializeToString()
    tracemalloc.start()
    try:
        report = scan_bytes(data, "model.onnx")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (report.format, report.verdict) == ("onnx", Verdict.SAFE)
    # The parsed tensors live in protobuf's own memory, which tracemalloc does not see (each
    # tensor's bytes are copied out once, one at a time, to check their length). A copy of the
    # whole buffer would be a Python bytes object of the model's size; the tensors decoded as
    # floats about eight times that.
    assert peak < len(data) // 4, f"peak {peak / MiB:.0f} MiB for {len(data) / MiB:.0f} MiB"


def _gzipped_random(path: Path, nbytes: int) -> None:
    """Incompressible: the stream runs on past its first MiB."""
    path.write_bytes(gzip.compress(np.random.default_rng(2).bytes(nbytes), 1))


@pytest.mark.parametrize(
    ("name", "write", "fmt"),
    [
        ("big.npz", stored_npz, "npz"),
        ("big.tar", safetensors_tar, "tar"),
        ("deflated.npz", deflated_npz, "npz"),
        ("big.tar.gz", safetensors_tar_gz, "tar"),
        ("big.npy.gz", gzipped_npy, "numpy"),
        ("big.h5", keras_h5, "keras-h5"),
    ],
)
def test_a_large_archive_is_scanned_through_a_reader_without_holding_it(
    tmp_path: Path, name: str, write: Callable[[Path, int], None], fmt: str
) -> None:
    """The archive's directory is read through the file and its member is analysed in place
    (its header only), a compressed member or stream decompressed as that is read, and HDF5
    reads its attributes through the file: no buffer near the content's size is ever made."""
    import tracemalloc

    path = tmp_path / name
    write(path, 64 * MiB)
    tracemalloc.start()
    try:
        report, _ = _scan_file(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert scan_path(path) == report
    assert (report.verdict, report.format) == (Verdict.SAFE, fmt)
    assert peak < 8 * MiB, (
        f"peak {peak / MiB:.1f} MiB for a {path.stat().st_size / MiB:.0f} MiB file"
    )


def test_a_deflated_zip_member_gets_the_same_report_through_a_reader(tmp_path: Path) -> None:
    path = tmp_path / "small.npz"
    np.savez_compressed(path, w=np.arange(1000, dtype=np.float32))

    report, _ = _scan_file(path)

    assert scan_path(path) == report
    assert (report.verdict, report.format) == (Verdict.SAFE, "npz")


def test_a_rereadable_file_reads_like_bytes_and_spools_its_content_after_many_steps_back() -> None:
    data = np.random.default_rng(1).bytes(10_000)
    starts = 0

    def pieces() -> Iterator[bytes]:
        nonlocal starts
        starts += 1
        for at in range(0, len(data), 777):
            yield data[at : at + 777]

    with Rereadable(pieces, len(data)) as file:
        steps = (5, 9000, 100, 4000, 3999, 0, 9999, 20, 7000, 1, 8000, 2, 6000, 3, 10_000, 4)
        for at in (*steps, 5000, 5, 9000, 6):
            file.seek(at)
            assert file.read(1500) == data[at : at + 1500]
        assert file.readall() == data[6 + 1500 :]

    # Each step back starts over (here 10 steps); at the ninth the content is spooled instead
    # (one pass more), and the tenth costs none.
    assert starts == 1 + 8 + 1


def test_a_spooled_rereadable_file_never_holds_its_content() -> None:
    """24 MiB read backwards in 1 MiB steps: spooled after the eighth step back into a sealed
    file, then read from there. What is held: a sealed segment being written, the segments the
    decrypting view caches (four of 1 MiB) and the read buffer."""
    mib = 1 << 20
    data = np.random.default_rng(2).bytes(24 * mib)

    def pieces() -> Iterator[bytes]:
        for at in range(0, len(data), 64 * 1024):
            yield data[at : at + 64 * 1024]

    tracemalloc.start()
    try:
        with Rereadable(pieces, len(data)) as file:
            for at in range(len(data) - mib, -1, -mib):
                file.seek(at)
                assert file.read(mib) == data[at : at + mib]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 10 * mib, f"peak {peak / mib:.1f} MiB for {len(data) / mib:.0f} MiB"


class _FailingAfterItsStart(PositionedReader):
    """A file whose reads from its start (identification, a header) go through; any other
    raises ``error``, as a sealed copy does when a segment was altered or the disk fails."""

    def __init__(self, data: bytes, error: Exception) -> None:
        super().__init__(len(data))
        self._data, self._error = data, error

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        if self._pos > 0:
            raise self._error
        count = len(self._data[: len(buffer)])
        buffer[:count] = self._data[:count]
        self._pos = count
        return count


@pytest.mark.parametrize(
    ("name", "write", "error"),
    [
        ("model.h5", keras_h5, IntegrityError("the sealed artifact did not verify")),
        ("w.bin.gz", _gzipped_random, OSError(5, "Input/output error")),
    ],
)
def test_a_file_that_fails_to_read_under_an_analyser_is_an_error_not_a_finding(
    tmp_path: Path, name: str, write: Callable[[Path, int], None], error: Exception
) -> None:
    """h5py and the decompressor pass the file's own read errors on; they are not a verdict
    on the content (an unreadable HDF5 file, a corrupt stream) but the scan's failure."""
    path = tmp_path / name
    write(path, 4 * MiB)
    data = path.read_bytes()

    with pytest.raises(type(error)):
        scan_reader(cast(IO[bytes], _FailingAfterItsStart(data, error)), name)


@pytest.mark.parametrize(
    "part", [slice(None), slice(3, 9), slice(-4, None), slice(5, 2), slice(90, 200), slice(-500, 4)]
)
def test_file_bytes_slice_like_bytes(part: slice) -> None:
    data = bytes(range(100))
    whole = FileBytes(io.BytesIO(data))

    assert len(data) == len(whole)
    assert data[part] == bytes(whole[part])
    assert len(data[part]) == len(whole[part])
    assert data[part][1:3] == bytes(whole[part][1:3])
