"""Scanning through a seekable file: the same reports as from bytes, read only as far as needed."""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from modelkeep.scanning import ScanReport, Verdict, scan_path, scan_reader
from modelkeep.scanning._context import FileBytes

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


def _stored_npz(path: Path, nbytes: int) -> None:
    """A ``.npz`` of one FP32 array of zeros, stored (as ``np.savez`` stores), written in pieces."""
    with zipfile.ZipFile(path, "w") as archive, archive.open("w.npy", "w") as member:
        header = {"descr": "<f4", "fortran_order": False, "shape": (nbytes // 4,)}
        np.lib.format.write_array_header_1_0(member, header)
        for _ in range(nbytes // MiB):
            member.write(bytes(MiB))


def _safetensors_tar(path: Path, nbytes: int) -> None:
    inner = path.with_name("inner.safetensors")
    header = json.dumps(
        {"w": {"dtype": "F32", "shape": [nbytes // 4], "data_offsets": [0, nbytes]}}
    ).encode()
    with inner.open("wb") as out:
        out.write(struct.pack("<Q", len(header)) + header)
        out.truncate(8 + len(header) + nbytes)
    with tarfile.open(path, "w") as archive:
        archive.add(inner, arcname="weights.safetensors")
    inner.unlink()


@pytest.mark.parametrize(
    ("name", "write", "fmt"),
    [("big.npz", _stored_npz, "npz"), ("big.tar", _safetensors_tar, "tar")],
)
def test_a_large_archive_is_scanned_through_a_reader_without_holding_it(
    tmp_path: Path, name: str, write: Callable[[Path, int], None], fmt: str
) -> None:
    """The archive's directory is read through the file and its member is analysed in place
    (its header only), so no buffer near the archive's size is ever made."""
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
