"""Archives, compressed streams, limits and directories."""

from __future__ import annotations

import gzip
import io
import os
import tarfile
import zipfile
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from safetensors.numpy import save

from modelkeep.errors import ConfigError, InvalidInput
from modelkeep.scanning import ScanLimits, Severity, Verdict, scan_bytes, scan_path

TENSORS = save({"w": np.ones(4, dtype=np.float32)})


def messages(report: object, severity: Severity) -> list[str]:
    return [f.message for f in report.findings if f.severity is severity]  # type: ignore[attr-defined]


def test_members_are_scanned_by_content_not_name(asm: ModuleType) -> None:
    report = scan_bytes(asm.zip_bytes({"model.safetensors": asm.os_system_p0()}), "m.zip")
    assert report.verdict == Verdict.MALICIOUS
    assert list(report.files) == ["m.zip", "m.zip > model.safetensors"]


def test_member_count_limit_is_checked_before_reading(asm: ModuleType) -> None:
    data = asm.zip_bytes({f"{i}.safetensors": TENSORS for i in range(5)})
    report = scan_bytes(data, limits=ScanLimits(max_members=4))
    assert report.verdict == Verdict.MALICIOUS
    assert list(report.files) != ["m.zip"]
    assert any("max_members" in m for m in messages(report, Severity.CRITICAL))


def test_total_size_limit_refuses_before_inflating(asm: ModuleType) -> None:
    data = asm.zip_bytes({"a.bin": b"\x01\x02" * 50_000}, zipfile.ZIP_DEFLATED)
    report = scan_bytes(data, limits=ScanLimits(max_total_bytes=10_000))
    assert report.verdict == Verdict.MALICIOUS
    assert sum("a.bin" in name for name in report.files) == 0


def test_highly_compressible_member_is_not_a_bomb(asm: ModuleType) -> None:
    # 16 MiB of zero weights deflate about a thousand times: a bomb is about size, not ratio.
    zeros = save({"w": np.zeros(4 << 20, dtype=np.float32)})
    report = scan_bytes(asm.zip_bytes({"zeros.safetensors": zeros}, zipfile.ZIP_DEFLATED))
    assert report.verdict == Verdict.SAFE
    assert scan_bytes(gzip.compress(zeros, mtime=0)).verdict == Verdict.SAFE


def test_gzip_bomb_stops_at_the_cap() -> None:
    # 64 MiB inflated from 64 KiB, against a 16 MiB cap: refused once the output passes it.
    report = scan_bytes(
        gzip.compress(b"\x00" * (64 << 20), mtime=0), limits=ScanLimits(max_total_bytes=16 << 20)
    )
    assert report.verdict == Verdict.MALICIOUS
    assert any("more than 16777216 bytes" in m for m in messages(report, Severity.CRITICAL))


def test_nesting_limit_is_configurable(asm: ModuleType) -> None:
    data = asm.zip_bytes({"inner.zip": asm.zip_bytes({"m.safetensors": TENSORS})})
    assert scan_bytes(data).verdict == Verdict.SAFE
    shallow = scan_bytes(data, limits=ScanLimits(max_depth=1))
    assert shallow.verdict == Verdict.MALICIOUS


def test_members_hidden_from_the_central_directory_are_scanned(asm: ModuleType) -> None:
    # zipfile reads the last archive of two concatenated ones; a streaming reader reads the
    # first one's members too. Benign there: safe, with a note; a payload there: malicious.
    second = asm.zip_bytes({"n.safetensors": TENSORS})
    report = scan_bytes(asm.zip_bytes({"m.safetensors": TENSORS}) + second)
    assert report.verdict == Verdict.SAFE
    assert any(
        "streaming unzip tools read 1 more members" in m for m in messages(report, Severity.LOW)
    )
    hidden = scan_bytes(asm.zip_bytes({"x.pkl": asm.os_system_p0()}) + second)
    assert hidden.verdict == Verdict.MALICIOUS
    assert any("only streaming readers see it" in f.location for f in hidden.findings)


def test_bytes_no_reader_takes_for_a_member_are_an_error(asm: ModuleType) -> None:
    first, second = (asm.zip_bytes({f"{n}.safetensors": TENSORS}) for n in "mn")
    report = scan_bytes(first + b"\x01\x02hidden bytes" + second)
    assert report.verdict == Verdict.ERROR
    assert any("belong to no member" in m for m in messages(report, Severity.HIGH))


def test_appended_archive_payload_is_still_found(asm: ModuleType) -> None:
    first = asm.zip_bytes({"m.safetensors": TENSORS})
    report = scan_bytes(first + asm.zip_bytes({"x.pkl": asm.os_system_p0()}))
    assert report.verdict == Verdict.MALICIOUS


def test_symlink_inside_an_archive_is_unsafe_and_writing_through_it_malicious(
    asm: ModuleType,
) -> None:
    inside = asm.tar_bytes([asm.tar_link("current", "v1", tarfile.SYMTYPE), ("v1", TENSORS)])
    assert scan_bytes(inside).verdict == Verdict.UNSAFE_FORMAT
    through = asm.tar_bytes([asm.tar_link("d", "sub", tarfile.SYMTYPE), ("d/m.bin", TENSORS)])
    assert any("through a link" in m for m in messages(scan_bytes(through), Severity.CRITICAL))


def test_tar_trailing_garbage_is_an_error(asm: ModuleType) -> None:
    data = asm.tar_bytes([("m.safetensors", TENSORS)]) + b"hidden"
    assert scan_bytes(data).verdict == Verdict.ERROR


def test_onnx_external_data_inside_an_archive_is_resolved(asm: ModuleType) -> None:
    members = {"model.onnx": asm._external_onnx("weights.bin"), "weights.bin": b"\x00" * 4}
    report = scan_bytes(asm.zip_bytes(members))
    assert report.verdict == Verdict.SAFE  # weights.bin is data, not an unknown model
    missing = scan_bytes(asm.zip_bytes({"model.onnx": asm._external_onnx("weights.bin")}))
    assert missing.verdict == Verdict.ERROR


def test_directory_symlink_inside_is_unsafe_outside_malicious(tmp_path: Path) -> None:
    (tmp_path / "m.safetensors").write_bytes(TENSORS)
    (tmp_path / "alias.safetensors").symlink_to("m.safetensors")
    assert scan_path(tmp_path).verdict == Verdict.UNSAFE_FORMAT
    (tmp_path / "alias.safetensors").unlink()
    (tmp_path / "etc").symlink_to("/etc")
    assert scan_path(tmp_path).verdict == Verdict.MALICIOUS


def test_directory_fifo_is_not_opened(tmp_path: Path) -> None:
    (tmp_path / "m.safetensors").write_bytes(TENSORS)
    os.mkfifo(tmp_path / "pipe")
    report = scan_path(tmp_path)
    assert report.verdict == Verdict.ERROR
    assert any("fifo" in m for m in messages(report, Severity.HIGH))


def test_directory_lists_every_file_and_names_its_format(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.safetensors").write_bytes(TENSORS)
    (tmp_path / "README.md").write_text("# model\n")
    report = scan_path(tmp_path)
    assert (report.verdict, report.format) == (Verdict.SAFE, "safetensors")
    assert len(report.files) == 2


def test_missing_path_raises_invalid_input(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput) as caught:
        scan_path(tmp_path / "absent.onnx")
    assert caught.value.message == "no such file or directory"


def test_limits_must_be_positive_integers() -> None:
    with pytest.raises(ConfigError):
        ScanLimits(max_depth=0)


def test_seven_zip_member_name_escape_is_malicious() -> None:
    report = scan_bytes(_seven_zip_with_name("../escape.safetensors"))
    assert report.verdict == Verdict.MALICIOUS
    assert any("climbs out" in m for m in messages(report, Severity.CRITICAL))


def _seven_zip(files: dict[str, bytes], filters: list[dict[str, int]] | None = None) -> bytes:
    import py7zr

    buffer = io.BytesIO()
    with py7zr.SevenZipFile(buffer, "w", filters=filters) as archive:
        for name, content in files.items():
            archive.writestr(content, name)
    return buffer.getvalue()


@pytest.mark.parametrize("method", ["LZMA2", "COPY"])
def test_seven_zip_members_are_scanned_by_content_from_their_spools(
    asm: ModuleType, method: str
) -> None:
    import py7zr

    filters = [{"id": py7zr.FILTER_LZMA2 if method == "LZMA2" else py7zr.FILTER_COPY}]
    safe = _seven_zip({"a.safetensors": TENSORS, "b.safetensors": TENSORS}, filters)
    report = scan_bytes(safe, "m.7z")
    assert (report.format, report.verdict) == ("7z", Verdict.SAFE)
    assert list(report.files) == ["m.7z", "m.7z > a.safetensors", "m.7z > b.safetensors"]
    hostile = _seven_zip({"a.safetensors": TENSORS, "model.bin": asm.os_system_p0()}, filters)
    report = scan_bytes(hostile, "m.7z")
    assert report.verdict == Verdict.MALICIOUS
    assert "m.7z > model.bin" in report.files


def test_a_seven_zip_compressed_by_a_method_without_an_output_bound_is_refused_unopened() -> None:
    import py7zr

    data = _seven_zip({"a.safetensors": TENSORS}, [{"id": py7zr.FILTER_DEFLATE}])
    report = scan_bytes(data, "m.7z")
    assert report.verdict == Verdict.ERROR
    assert list(report.files) == ["m.7z"]
    assert any("compressed with DEFLATE" in m for m in messages(report, Severity.HIGH))


def _seven_zip_with_name(name: str) -> bytes:
    # py7zr refuses to write such a name: write a same-length one in a plain (not encoded)
    # header, swap it in, and fix the two CRCs that cover the header.
    import struct
    import zlib

    import py7zr

    placeholder = "x" * (len(name) - 1) + "y"
    buffer = io.BytesIO()
    with py7zr.SevenZipFile(buffer, "w") as archive:
        archive.set_encoded_header_mode(False)
        archive.writestr(TENSORS, placeholder)
    data = bytearray(buffer.getvalue())
    old, new = placeholder.encode("utf-16-le"), name.encode("utf-16-le")
    position = data.rindex(old)
    data[position : position + len(old)] = new
    offset, size = struct.unpack_from("<QQ", data, 12)
    header = bytes(data[32 + offset : 32 + offset + size])
    struct.pack_into("<I", data, 28, zlib.crc32(header))
    struct.pack_into("<I", data, 8, zlib.crc32(bytes(data[12:32])))
    return bytes(data)


def test_tar_gz_of_models_reports_tar(asm: ModuleType) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        info = tarfile.TarInfo("m.safetensors")
        info.size = len(TENSORS)
        archive.addfile(info, io.BytesIO(TENSORS))
    report = scan_bytes(buffer.getvalue())
    assert (report.format, report.verdict) == ("tar", Verdict.SAFE)


def test_tar_declaring_more_than_it_holds_is_an_error(asm: ModuleType) -> None:
    data = bytearray(asm.tar_bytes([("m.safetensors", TENSORS)]))
    data[124:135] = b"%011o" % (10**10)  # the size field of the first header
    checksum = sum(data[:148]) + 8 * 0x20 + sum(data[156:512])
    data[148:156] = b"%06o\x00 " % checksum
    report = scan_bytes(bytes(data))
    assert report.verdict == Verdict.ERROR
