"""Damaged or unusual zips are judged by what each loader would read from them.

Python's zipfile refuses a wrong CRC-32 or an unknown flag bit; PyTorch's reader and lenient
unzip tools read such members anyway, and streaming tools trust local headers. A payload any of
them would load is malicious; only a member no reader can load is an error.
"""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from types import ModuleType

import numpy as np
from safetensors.numpy import save

from modelkeep.scanning import Severity, Verdict, scan_bytes

TENSORS = save({"w": np.arange(4, dtype=np.float32)})


def central_offset(data: bytes, name: str) -> int:
    """Where the central directory entry of ``name`` starts."""
    position = data.index(b"PK\x01\x02")
    while True:
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", data, position + 28)
        if data[position + 46 : position + 46 + name_len] == name.encode():
            return position
        position += 46 + name_len + extra_len + comment_len


def local_offset(data: bytes, name: str) -> int:
    return zipfile.ZipFile(io.BytesIO(data)).getinfo(name).header_offset


def patch(data: bytes, offset: int, fmt: str, *values: int) -> bytes:
    patched = bytearray(data)
    struct.pack_into(fmt, patched, offset, *values)
    return bytes(patched)


def wrong_crc(data: bytes, name: str) -> bytes:
    """Both headers carry a CRC-32 that does not match the member's bytes."""
    for offset in (central_offset(data, name) + 16, local_offset(data, name) + 14):
        (crc,) = struct.unpack_from("<I", data, offset)
        data = patch(data, offset, "<I", crc ^ 0xFFFF)
    return data


def criticals(data: bytes) -> list[str]:
    return [f.message for f in scan_bytes(data).findings if f.severity is Severity.CRITICAL]


def torch_zip(asm: ModuleType, pickle_bytes: bytes) -> bytes:
    storage = np.arange(4, dtype=np.float32).tobytes()
    return asm.zip_bytes({"archive/data.pkl": pickle_bytes, "archive/data/0": storage})


def test_payload_with_a_wrong_crc_is_still_malicious(asm: ModuleType) -> None:
    payload = asm.x("run") + asm.g("os", "system") + asm.x("true") + asm.TUPLE1 + asm.REDUCE
    data = wrong_crc(
        torch_zip(asm, asm.torch_state_dict(extra=payload + asm.SETITEM)), "archive/data.pkl"
    )
    report = scan_bytes(data)
    assert (report.verdict, report.format) == (Verdict.MALICIOUS, "pytorch-zip")
    lows = [f.message for f in report.findings if f.severity is Severity.LOW]
    assert any("Bad CRC-32" in m and "PyTorch's reader" in m for m in lows)


def test_benign_member_with_a_wrong_crc_gets_its_content_verdict(asm: ModuleType) -> None:
    # Loaders that skip the check read a good tensor file: refusing it as unreadable would be
    # wrong, and nothing in it can hurt.
    data = wrong_crc(asm.zip_bytes({"model.safetensors": TENSORS}), "model.safetensors")
    assert scan_bytes(data).verdict == Verdict.SAFE


def test_unusual_flag_bit_does_not_hide_a_payload(asm: ModuleType) -> None:
    # Flag bit 5 (compressed patched data) in the central directory only: zipfile and PyTorch's
    # reader refuse the member, a streaming reader trusting the local header loads it.
    data = torch_zip(asm, asm.P2 + asm.os_system_p0())
    offset = central_offset(data, "archive/data.pkl") + 8
    (flags,) = struct.unpack_from("<H", data, offset)
    report = scan_bytes(patch(data, offset, "<H", flags | 0x20))
    assert report.verdict == Verdict.MALICIOUS
    lows = [f.message for f in report.findings if f.severity is Severity.LOW]
    assert any("flag bit 5" in m and "only streaming unzip tools" in m for m in lows)


def test_payload_only_a_streaming_reader_sees_is_malicious(asm: ModuleType) -> None:
    # The central directory says "stored" (raw deflate bytes: nothing a loader can use); the
    # local header says "deflated", and a streaming reader inflates the payload.
    deflater = zlib.compressobj(9, zlib.DEFLATED, -15)
    hidden = deflater.compress(asm.os_system_p0()) + deflater.flush()
    data = asm.zip_bytes({"notes.bin": hidden})
    data = patch(data, local_offset(data, "notes.bin") + 8, "<H", zipfile.ZIP_DEFLATED)
    assert any("os.system" in m for m in criticals(data))


def test_local_reading_that_yields_garbage_changes_nothing(asm: ModuleType) -> None:
    # Central: deflated tensors (what every loader reads). Local: "stored", so a streaming
    # reader gets deflate bytes it cannot use; that is no attack and no reason to refuse.
    data = asm.zip_bytes({"model.safetensors": TENSORS}, zipfile.ZIP_DEFLATED)
    data = patch(data, local_offset(data, "model.safetensors") + 8, "<H", zipfile.ZIP_STORED)
    report = scan_bytes(data)
    assert report.verdict == Verdict.SAFE
    assert any("local header disagrees" in f.message for f in report.findings)


def test_member_no_reader_can_decode_is_an_error(asm: ModuleType) -> None:
    data = asm.zip_bytes({"model.safetensors": TENSORS}, zipfile.ZIP_DEFLATED)
    start = local_offset(data, "model.safetensors") + 30 + len("model.safetensors")
    broken = data[:start] + b"\xff" * 8 + data[start + 8 :]  # a deflate block type 3: invalid
    report = scan_bytes(broken)
    assert report.verdict == Verdict.ERROR
    assert any("no reader can load this member" in f.message for f in report.findings)
