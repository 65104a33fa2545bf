"""Write the scanner's test corpus: hostile and benign model files, and a manifest of verdicts.

    python scripts/make_scan_corpus.py OUTDIR

Every payload is inert: the only command any of them names is ``true`` (``os.system("true")``),
and nothing here loads a file it writes. Hostile pickles are assembled opcode by opcode, so
each trick is exactly the one its name says. ``OUTDIR/manifest.json`` maps each file or
directory (relative to OUTDIR) to the verdict ``modelkeep scan`` must give it.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import json
import lzma
import os
import re
import shutil
import struct
import sys
import tarfile
import warnings
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np

M, E, U, S = "malicious", "error", "unsafe-format", "safe"


# -- a tiny pickle assembler ------------------------------------------------------------------


def g(module: str, name: str) -> bytes:
    """GLOBAL module name."""
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def s0(text: str) -> bytes:
    """STRING (protocol 0)."""
    return b"S'" + text.encode() + b"'\n"


def u(text: str) -> bytes:
    """SHORT_BINUNICODE (protocol 4)."""
    raw = text.encode()
    return b"\x8c" + bytes([len(raw)]) + raw


def x(text: str) -> bytes:
    """BINUNICODE (protocol 1+)."""
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def cb(raw: bytes) -> bytes:
    """SHORT_BINBYTES / BINBYTES."""
    return (
        b"C" + bytes([len(raw)]) if len(raw) < 256 else b"B" + struct.pack("<I", len(raw))
    ) + raw


P2, P4, P5 = b"\x80\x02", b"\x80\x04", b"\x80\x05"
MARK, TUPLE, TUPLE1, TUPLE2, TUPLE3, EMPTY_TUPLE = b"(", b"t", b"\x85", b"\x86", b"\x87", b")"
REDUCE, BUILD, NEWOBJ, NEWOBJ_EX, OBJ, STOP = b"R", b"b", b"\x81", b"\x92", b"o", b"."
EMPTY_DICT, EMPTY_LIST, SETITEM, APPEND, MEMOIZE, POP = b"}", b"]", b"s", b"a", b"\x94", b"0"
STACK_GLOBAL, BINPERSID, NEWFALSE = b"\x93", b"Q", b"\x89"


def binput(i: int) -> bytes:
    return b"q" + bytes([i])


def binget(i: int) -> bytes:
    return b"h" + bytes([i])


def k(i: int) -> bytes:
    """BININT1 / BININT."""
    return b"K" + bytes([i]) if 0 <= i < 256 else b"J" + struct.pack("<i", i)


def os_system_p0() -> bytes:
    return g("os", "system") + MARK + s0("true") + TUPLE + REDUCE + STOP


def stack_global(module: str, name: str) -> bytes:
    return u(module) + MEMOIZE + u(name) + MEMOIZE + STACK_GLOBAL + MEMOIZE


def ordered_dict() -> bytes:
    return g("collections", "OrderedDict") + EMPTY_TUPLE + REDUCE


def torch_tensor(key: str, numel: int, hooks: bytes | None = None) -> bytes:
    """_rebuild_tensor_v2(persistent storage, 0, (numel,), (1,), False, OrderedDict())."""
    storage = MARK + x("storage") + g("torch", "FloatStorage") + x(key) + x("cpu") + k(numel)
    storage += TUPLE + BINPERSID
    args = storage + k(0) + k(numel) + TUPLE1 + k(1) + TUPLE1 + NEWFALSE
    args += hooks if hooks is not None else ordered_dict()
    return g("torch._utils", "_rebuild_tensor_v2") + MARK + args + TUPLE + REDUCE


def torch_state_dict(extra: bytes = b"", hooks: bytes | None = None) -> bytes:
    body = ordered_dict() + x("weight") + torch_tensor("0", 4, hooks) + SETITEM + extra
    return P2 + body + STOP


# -- helpers ----------------------------------------------------------------------------------


def zip_bytes(members: dict[str, bytes], method: int = zipfile.ZIP_STORED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=method) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def tar_bytes(entries: list[tarfile.TarInfo | tuple[str, bytes]], mode: str = "w") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as archive:  # type: ignore[call-overload]
        for entry in entries:
            if isinstance(entry, tarfile.TarInfo):
                archive.addfile(entry)
            else:
                info = tarfile.TarInfo(entry[0])
                info.size = len(entry[1])
                archive.addfile(info, io.BytesIO(entry[1]))
    return buffer.getvalue()


def tar_link(name: str, target: str, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def safetensors_raw(header: dict[str, object], data: bytes, length: int | None = None) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


class Corpus:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.manifest: dict[str, str] = {}

    def add(self, name: str, verdict: str, data: bytes) -> None:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        self.manifest[name] = verdict

    def directory(self, name: str, verdict: str, build: Callable[[Path], None]) -> None:
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        build(path)
        self.manifest[name] = verdict


# -- families ---------------------------------------------------------------------------------


def pickles(c: Corpus) -> None:
    payload_eval = "__import__('os').system('true')"
    c.add("pickle/global-os-system-p0.pkl", M, os_system_p0())
    c.add(
        "pickle/global-posix-system-p1.pkl",
        M,
        g("posix", "system") + MARK + b"U\x04true" + TUPLE + REDUCE + STOP,
    )
    c.add(
        "pickle/builtins-eval-p2.pkl",
        M,
        P2 + g("builtins", "eval") + x(payload_eval) + TUPLE1 + REDUCE + STOP,
    )
    c.add(
        "pickle/py2-builtin-eval-p2.pkl",
        M,
        P2 + g("__builtin__", "eval") + x(payload_eval) + TUPLE1 + REDUCE + STOP,
    )
    c.add(
        "pickle/subprocess-list-p3.pkl",
        M,
        b"\x80\x03"
        + g("subprocess", "check_call")
        + EMPTY_LIST
        + x("true")
        + APPEND
        + TUPLE1
        + REDUCE
        + STOP,
    )
    c.add(
        "pickle/stack-global-p4.pkl",
        M,
        P4 + stack_global("os", "system") + u("true") + TUPLE1 + REDUCE + STOP,
    )
    frame = (
        stack_global("builtins", "exec")
        + u("import os; os.system('true')")
        + TUPLE1
        + REDUCE
        + STOP
    )
    c.add(
        "pickle/stack-global-frame-p5.pkl", M, P5 + b"\x95" + struct.pack("<Q", len(frame)) + frame
    )
    c.add("pickle/inst.pkl", M, MARK + s0("true") + b"ios\nsystem\n" + STOP)
    c.add("pickle/obj.pkl", M, MARK + g("os", "system") + s0("true") + OBJ + STOP)
    c.add(
        "pickle/newobj.pkl",
        M,
        P2 + g("subprocess", "Popen") + EMPTY_LIST + x("true") + APPEND + TUPLE1 + NEWOBJ + STOP,
    )
    c.add(
        "pickle/newobj-ex.pkl",
        M,
        P4
        + stack_global("subprocess", "Popen")
        + EMPTY_LIST
        + u("true")
        + APPEND
        + TUPLE1
        + EMPTY_DICT
        + NEWOBJ_EX
        + STOP,
    )
    # BUILD on an allowlisted class sets a class attribute: monkey-patching.
    c.add(
        "pickle/build-on-class.pkl",
        M,
        P2
        + g("collections", "OrderedDict")
        + EMPTY_DICT
        + x("__reduce__")
        + x("x")
        + SETITEM
        + BUILD
        + STOP,
    )
    c.add(
        "pickle/build-unlisted-class.pkl",
        M,
        P2
        + g("argparse", "Namespace")
        + EMPTY_TUPLE
        + NEWOBJ
        + EMPTY_DICT
        + x("a")
        + x("b")
        + SETITEM
        + BUILD
        + STOP,
    )
    # getattr(__import__("os"), "system")("true"): the called value is computed.
    imported = g("builtins", "__import__") + MARK + s0("os") + TUPLE + REDUCE
    c.add(
        "pickle/getattr-chain.pkl",
        M,
        g("builtins", "getattr")
        + MARK
        + imported
        + s0("system")
        + TUPLE
        + REDUCE
        + MARK
        + s0("true")
        + TUPLE
        + REDUCE
        + STOP,
    )
    # Memo games: index 1 first holds "collections", then is overwritten with "os".
    memo = P4 + u("collections") + binput(1) + POP + u("os") + binput(1) + POP
    memo += u("OrderedDict") + binput(2) + POP + u("system") + binput(2) + POP
    c.add(
        "pickle/memo-overwrite.pkl",
        M,
        memo + binget(1) + binget(2) + STACK_GLOBAL + u("true") + TUPLE1 + REDUCE + STOP,
    )
    text_memo = s0("os") + b"p7\n" + POP + s0("system") + b"p9\n" + POP + b"g7\ng9\n" + STACK_GLOBAL
    c.add("pickle/memo-text-put-get.pkl", M, text_memo + MARK + s0("true") + TUPLE + REDUCE + STOP)
    c.add("pickle/ext1.pkl", M, P2 + b"\x82\x01" + EMPTY_TUPLE + REDUCE + STOP)
    c.add(
        "pickle/codecs-misuse.pkl",
        M,
        g("_codecs", "encode") + MARK + s0("x") + s0("rot13") + TUPLE + REDUCE + STOP,
    )
    c.add(
        "pickle/bytearray-bomb.pkl",
        M,
        P2 + g("builtins", "bytearray") + k(2**31 - 1) + TUPLE1 + REDUCE + STOP,
    )
    c.add(
        "pickle/dunder-name-p4.pkl",
        M,
        P4 + stack_global("builtins", "object.__subclasses__") + EMPTY_TUPLE + REDUCE + STOP,
    )
    c.add(
        "pickle/numpy-reconstruct-bomb.pkl",
        M,
        P2
        + g("numpy.core.multiarray", "_reconstruct")
        + g("numpy", "ndarray")
        + MARK
        + k(2**31 - 1)
        + k(2**31 - 1)
        + TUPLE
        + cb(b"b")
        + TUPLE3
        + REDUCE
        + STOP,
    )
    inner = os_system_p0()
    c.add(
        "pickle/nested-loads.pkl", M, P2 + g("pickle", "loads") + cb(inner) + TUPLE1 + REDUCE + STOP
    )
    dormant = P2 + os_system_p0()[:-1] + STOP
    c.add(
        "pickle/nested-dormant.pkl", M, P2 + EMPTY_DICT + x("blob") + cb(dormant) + SETITEM + STOP
    )
    c.add("pickle/second-stream.pkl", M, pickle_dumps({"weights": [1.0, 2.0]}) + os_system_p0())
    c.add("pickle/broken-tail-payload.pkl", M, os_system_p0()[:-1])
    c.add("pickle/broken-tail-benign.pkl", E, pickle_dumps({"a": 1}) + b"\xff\xfe garbage")
    c.add("pickle/truncated-benign.pkl", E, pickle_dumps({"weights": list(range(50))})[:-9])
    c.add("pickle/persistent-id-plain.pkl", E, P2 + x("ref") + BINPERSID + STOP)
    for protocol in range(6):
        data = {
            "w": np.arange(6, dtype=np.float32).reshape(2, 3),
            "b": np.float64(0.5),
            "n": [1, 2],
        }
        c.add(f"pickle/benign-numpy-dict-p{protocol}.pkl", U, pickle_dumps(data, protocol))
    c.add(
        "pickle/benign-builtins.pkl",
        U,
        pickle_dumps(
            {
                "s": {1, 2},
                "f": frozenset({3}),
                "c": complex(1, 2),
                "b": b"x",
                "ba": bytearray(b"y"),
            },
            2,
        ),
    )


def pickle_dumps(value: object, protocol: int = 4) -> bytes:
    import pickle

    return pickle.dumps(value, protocol=protocol)


def joblib_and_numpy(c: Corpus) -> None:
    import joblib

    arrays = {"coef": np.arange(12, dtype=np.float64).reshape(3, 4), "labels": np.array([1, 2])}
    buffer = io.BytesIO()
    joblib.dump(arrays, buffer)
    c.add("joblib/benign-plain.joblib", U, buffer.getvalue())
    c.add("joblib/benign-plain-then-payload.joblib", M, buffer.getvalue() + os_system_p0())
    for method in ("zlib", "gzip", "bz2", "lzma", "xz"):
        buffer = io.BytesIO()
        joblib.dump(arrays, buffer, compress=(method, 3))
        c.add(f"joblib/benign-{method}.joblib", U, buffer.getvalue())
    buffer = io.BytesIO()
    joblib.dump({"o": np.array([os.system], dtype=object)}, buffer)  # a reference, never called
    c.add("joblib/object-array-os-system.joblib", M, buffer.getvalue())
    c.add("joblib/zlib-payload.joblib", M, zlib.compress(os_system_p0()))
    c.add("joblib/gzip-payload.joblib", M, gzip.compress(os_system_p0(), mtime=0))
    c.add("joblib/xz-payload.joblib", M, lzma.compress(os_system_p0()))
    nested = os_system_p0()
    for _ in range(6):
        nested = gzip.compress(nested, mtime=0)
    c.add("joblib/gzip-nested-bomb.joblib", M, nested)
    c.add("joblib/gzip-truncated.joblib", E, gzip.compress(pickle_dumps(arrays), mtime=0)[:-20])
    c.add("numpy/benign.npy", S, npy(np.arange(20, dtype=np.int32)))
    c.add("numpy/benign-object.npy", U, npy(np.array([1, "a", None], dtype=object)))
    c.add("numpy/object-os-system.npy", M, npy(np.array([os.system], dtype=object)))
    c.add("numpy/truncated.npy", E, npy(np.arange(20, dtype=np.int32))[:-8])
    header = b"{'descr': '<f4', 'fortran_order': False, 'shape': (4294967296, 4294967296), }"
    header += b" " * (63 - len(header) % 64) + b"\n"
    c.add("numpy/shape-bomb.npy", M, b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header)
    c.add("numpy/benign.npz", S, zip_bytes({"a.npy": npy(np.ones(3)), "b.npy": npy(np.arange(4))}))
    c.add(
        "numpy/benign-compressed.npz",
        S,
        zip_bytes({"a.npy": npy(np.zeros(100))}, zipfile.ZIP_DEFLATED),
    )
    c.add("numpy/object.npz", U, zip_bytes({"a.npy": npy(np.array([1, "x"], dtype=object))}))
    c.add("numpy/malicious.npz", M, zip_bytes({"a.npy": npy(np.array([os.system], dtype=object))}))


def torch_files(c: Corpus) -> None:
    storage = np.arange(4, dtype=np.float32).tobytes()
    base = {"archive/version": b"3\n", "archive/byteorder": b"little", "archive/data/0": storage}
    c.add(
        "torch/benign-state-dict.pt", U, zip_bytes({"archive/data.pkl": torch_state_dict(), **base})
    )
    payload = x("run") + g("os", "system") + x("true") + TUPLE1 + REDUCE + SETITEM
    c.add(
        "torch/payload-in-data-pkl.pt",
        M,
        zip_bytes({"archive/data.pkl": torch_state_dict(extra=payload), **base}),
    )
    hooks = ordered_dict() + k(0) + g("os", "system") + SETITEM
    c.add(
        "torch/backward-hook.pt",
        M,
        zip_bytes({"archive/data.pkl": torch_state_dict(hooks=hooks), **base}),
    )
    c.add(
        "torch/second-pickle-member.pt",
        M,
        zip_bytes(
            {"archive/data.pkl": torch_state_dict(), "archive/extra.pkl": os_system_p0(), **base}
        ),
    )
    c.add(
        "torch/missing-storage.pt",
        E,
        zip_bytes({"archive/data.pkl": torch_state_dict(), "archive/version": b"3\n"}),
    )
    c.add(
        "torch/torchscript-code.pt",
        U,
        zip_bytes(
            {
                "archive/data.pkl": torch_state_dict(),
                **base,
                "archive/code/__torch__.py": b"import torch\ndef forward(self, x):\n    return x\n",
            }
        ),
    )
    magic = pickle_dumps(0x1950A86A20F9469CFC6C, 2)
    legacy = magic + pickle_dumps(1001, 2) + pickle_dumps({"little_endian": True}, 2)
    tail = pickle_dumps(["0"], 2) + struct.pack("<q", 4) + storage
    c.add("torch/benign-legacy.pt", U, legacy + torch_state_dict() + tail)
    c.add("torch/legacy-payload.pt", M, legacy + torch_state_dict(extra=payload) + tail)


def _fix_local_name(data: bytes, old: bytes, new: bytes) -> bytes:
    index = data.index(b"PK\x03\x04")
    return data[: index + 30] + data[index + 30 :].replace(old, new, 1)


def archives(c: Corpus, safetensors_data: bytes, onnx_data: bytes) -> None:
    payload = os_system_p0()
    level = zip_bytes({"inner.pkl": payload})
    for _ in range(2):
        level = zip_bytes({"nested.zip": level})
    c.add("archive/nested-zip-payload.zip", M, level)
    deep = zip_bytes({"model.safetensors": safetensors_data})
    for _ in range(6):
        deep = zip_bytes({"deeper.zip": deep})
    c.add("archive/nested-too-deep.zip", M, deep)
    # The local header says "other.safetensors", the central directory "model.safetensors".
    c.add(
        "archive/mismatched-local-name.zip",
        M,
        _fix_local_name(
            zip_bytes({"model.safetensors": safetensors_data}),
            b"model.safetensors",
            b"other.safetensors",
        ),
    )
    good = zip_bytes({"model.safetensors": safetensors_data})
    index = good.index(b"model.safetensors") + len("model.safetensors") + 20
    c.add("archive/bad-crc.zip", E, good[:index] + bytes([good[index] ^ 0xFF]) + good[index + 1 :])
    c.add("archive/zip-slip.zip", M, zip_bytes({"../../evil.pkl": b"x"}))
    c.add("archive/absolute-name.zip", M, zip_bytes({"/etc/cron.d/evil": b"x"}))
    c.add("archive/zip-bomb-declared.zip", M, _declared_bomb_zip())
    # 16 MiB of zero weights deflate a thousand times: compressible is not a bomb.
    zeros = safetensors_raw(
        {"w": {"dtype": "F32", "shape": [4 << 20], "data_offsets": [0, 16 << 20]}},
        b"\x00" * (16 << 20),
    )
    c.add("archive/zeros-compressible.zip", S, zip_bytes({"zeros.safetensors": zeros}, 8))
    # The payload's CRC-32 is wrong: zipfile refuses it, PyTorch's reader loads it.
    storage = np.arange(4, dtype=np.float32).tobytes()
    hook = x("run") + g("os", "system") + x("true") + TUPLE1 + REDUCE + SETITEM
    torch_zip = zip_bytes(
        {"archive/data.pkl": torch_state_dict(extra=hook), "archive/data/0": storage}
    )
    c.add("archive/bad-crc-payload.pt", M, _break_crc(torch_zip, "archive/data.pkl"))
    c.add("archive/too-many-members.zip", M, zip_bytes({f"f{i}.txt": b"" for i in range(10_001)}))
    c.add("archive/trailing-data.zip", E, good + b"hidden bytes after the end record")
    c.add("archive/duplicate-names.zip", M, _duplicate_zip(safetensors_data))
    c.add("archive/overlapping-members.zip", M, _overlapping_zip(safetensors_data))
    c.add("archive/symlink-escape.zip", M, _symlink_zip("link", "../../etc/passwd"))
    c.add("archive/unknown-member.zip", E, zip_bytes({"blob.bin": bytes(range(256)) * 4}))
    c.add(
        "archive/benign-models.zip",
        S,
        zip_bytes(
            {
                "model.onnx": onnx_data,
                "weights/model.safetensors": safetensors_data,
                "README.md": b"# Iris\nA tiny classifier.\n",
            },
            zipfile.ZIP_DEFLATED,
        ),
    )
    c.add(
        "archive/benign.tar",
        S,
        tar_bytes([("model.onnx", onnx_data), ("w.safetensors", safetensors_data)]),
    )
    c.add("archive/benign.tar.gz", S, tar_bytes([("model.onnx", onnx_data)], "w:gz"))
    c.add(
        "archive/tar-symlink-escape.tar",
        M,
        tar_bytes([tar_link("weights", "/etc/passwd", tarfile.SYMTYPE)]),
    )
    c.add(
        "archive/tar-hardlink-escape.tar",
        M,
        tar_bytes([tar_link("w", "../../etc/shadow", tarfile.LNKTYPE)]),
    )
    c.add("archive/tar-dotdot.tar", M, tar_bytes([("../../model.pkl", payload)]))
    device = tarfile.TarInfo("dev/sda")
    device.type = tarfile.BLKTYPE
    c.add("archive/tar-device.tar", M, tar_bytes([device]))
    c.add("archive/tar-payload.tar.gz", M, tar_bytes([("model.pkl", payload)], "w:gz"))
    c.add("archive/benign.7z", S, _seven_zip({"model.safetensors": safetensors_data}))
    c.add("archive/payload.7z", M, _seven_zip({"model.pkl": payload}))
    c.add("archive/gzip-onnx.onnx.gz", S, gzip.compress(onnx_data, mtime=0))


def _declared_bomb_zip() -> bytes:
    # Three members that each declare almost 4 GiB: 12 GiB past the default 8 GiB cap, refused
    # from the central directory before anything is inflated.
    data = bytearray(zip_bytes({f"w{i}.bin": b"\x00" * 4096 for i in range(3)}, 8))
    for info in zipfile.ZipFile(io.BytesIO(bytes(data))).infolist():
        struct.pack_into("<I", data, info.header_offset + 22, 0xFFFFFFF0)
    position = data.index(b"PK\x01\x02")
    while data[position : position + 4] == b"PK\x01\x02":
        struct.pack_into("<I", data, position + 24, 0xFFFFFFF0)
        lengths = struct.unpack_from("<HHH", data, position + 28)
        position += 46 + sum(lengths)
    return bytes(data)


def _break_crc(data: bytes, name: str) -> bytes:
    """``data`` with the CRC-32 of member ``name`` wrong in both of its headers."""
    info = zipfile.ZipFile(io.BytesIO(data)).getinfo(name)
    wrong = struct.pack("<I", info.CRC ^ 0xFFFF)
    right = struct.pack("<I", info.CRC)
    local = info.header_offset + 14
    patched = data[:local] + wrong + data[local + 4 :]
    central = patched.index(b"PK\x01\x02")
    index = patched.index(right, central)
    return patched[:index] + wrong + patched[index + 4 :]


def _duplicate_zip(data: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("model.safetensors", data)
        archive.writestr("model.safetensors", b"not the same")  # zipfile warns, writes both
    return buffer.getvalue()


def _overlapping_zip(data: bytes) -> bytes:
    # Two central directory entries pointing at the same local header: the non-recursive
    # zip bomb's trick, here on a single small file.
    one = zip_bytes({"a.safetensors": data})
    central = one.index(b"PK\x01\x02")
    end = one.index(b"PK\x05\x06")
    entry = one[central:end]
    record = bytearray(one[end:])
    struct.pack_into("<HHI", record, 8, 2, 2, 2 * len(entry))
    return one[:central] + entry + entry.replace(b"a.safetensors", b"b.safetensors") + bytes(record)


def _symlink_zip(name: str, target: str) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        info = zipfile.ZipInfo(name)
        info.create_system = 3
        info.external_attr = 0o120777 << 16
        archive.writestr(info, target)
    return buffer.getvalue()


def _seven_zip(members: dict[str, bytes]) -> bytes:
    import py7zr

    buffer = io.BytesIO()
    with py7zr.SevenZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(data, name)
    return buffer.getvalue()


def onnx_files(c: Corpus, onnx_data: bytes) -> None:
    from onnx import TensorProto, helper

    from modelkeep.testing import build_custom_domain_onnx

    c.add("onnx/benign-iris.onnx", S, onnx_data)
    c.add("onnx/custom-domain.onnx", M, build_custom_domain_onnx())
    for name, location, verdict in (
        ("absolute", "/etc/passwd", M),
        ("dotdot", "../../secret.bin", M),
        ("relative-alone", "weights.bin", E),
    ):
        c.add(f"onnx/external-{name}.onnx", verdict, _external_onnx(location))

    def with_data(link: str) -> Callable[[Path], None]:
        def build(path: Path) -> None:
            (path / "model.onnx").write_bytes(_external_onnx("weights.bin"))
            target = c.root / "onnx" / "_outside.bin"
            target.write_bytes(b"\x00" * 4)
            if link == "symlink":
                (path / "weights.bin").symlink_to(target)
            elif link == "hardlink":
                os.link(target, path / "weights.bin")
            else:
                (path / "weights.bin").write_bytes(b"\x00" * 4)

        return build

    c.directory("onnx/dir-external-regular", S, with_data("regular"))
    c.directory("onnx/dir-external-symlink", M, with_data("symlink"))
    c.directory("onnx/dir-external-hardlink", M, with_data("hardlink"))
    c.manifest.pop("onnx/_outside.bin", None)

    def graph(nodes: list[object], initializers: list[object]) -> bytes:
        model = helper.make_model(
            helper.make_graph(
                nodes,
                "bomb",
                [],
                [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                initializer=initializers,
            ),
            opset_imports=[helper.make_opsetid("", 17)],
        )
        return bytes(model.SerializeToString())

    huge = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[2**20, 2**20])
    c.add(
        "onnx/huge-declared-tensor.onnx",
        M,
        graph([helper.make_node("Identity", ["w"], ["y"])], [huge]),
    )
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [100_000, 100_000])
    c.add(
        "onnx/constantofshape-bomb.onnx",
        M,
        graph([helper.make_node("ConstantOfShape", ["shape"], ["y"])], [shape]),
    )
    start, limit, delta = (
        helper.make_tensor(n, TensorProto.FLOAT, [], [v])
        for n, v in (("start", 0.0), ("limit", 1e11), ("delta", 1.0))
    )
    c.add(
        "onnx/range-bomb.onnx",
        M,
        graph(
            [helper.make_node("Range", ["start", "limit", "delta"], ["y"])], [start, limit, delta]
        ),
    )
    small = helper.make_tensor("x", TensorProto.FLOAT, [2], [1.0, 2.0])
    repeats = helper.make_tensor("repeats", TensorProto.INT64, [1], [10**10])
    c.add(
        "onnx/tile-bomb.onnx",
        M,
        graph([helper.make_node("Tile", ["x", "repeats"], ["y"])], [small, repeats]),
    )
    c.add("onnx/not-onnx-truncated.onnx", E, onnx_data[: len(onnx_data) // 3])


def _external_onnx(location: str) -> bytes:
    from onnx import TensorProto, helper

    weight = helper.make_tensor("w", TensorProto.FLOAT, [1], [0.0])
    weight.ClearField("float_data")
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "4")):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "external",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        initializer=[weight],
    )
    return bytes(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    )


def safetensors_files(c: Corpus, data: bytes) -> None:
    entry = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    c.add("safetensors/benign.safetensors", S, data)
    c.add(
        "safetensors/header-length-past-file.safetensors",
        E,
        safetensors_raw({"a": entry}, b"\x00" * 8, 4096),
    )
    c.add(
        "safetensors/header-length-huge.safetensors",
        M,
        safetensors_raw({"a": entry}, b"\x00" * 8, 2**40),
    )
    c.add(
        "safetensors/overlapping.safetensors",
        M,
        safetensors_raw(
            {"a": entry, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\x00" * 12
        ),
    )
    c.add(
        "safetensors/out-of-bounds.safetensors",
        M,
        safetensors_raw(
            {"a": {"dtype": "F32", "shape": [1024], "data_offsets": [0, 4096]}}, b"\x00" * 8
        ),
    )
    c.add(
        "safetensors/shape-mismatch.safetensors",
        E,
        safetensors_raw({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\x00" * 8),
    )
    c.add("safetensors/trailing-data.safetensors", E, safetensors_raw({"a": entry}, b"\x00" * 16))
    c.add(
        "safetensors/bad-json.safetensors", E, struct.pack("<Q", 12) + b"{not json!!}" + b"\x00" * 8
    )
    twice = ('{"a": ' + json.dumps(entry) + ', "a": ' + json.dumps(entry) + "}").encode()
    c.add(
        "safetensors/duplicate-key.safetensors",
        M,
        struct.pack("<Q", len(twice)) + twice + b"\x00" * 8,
    )


def keras_files(c: Corpus) -> None:
    import h5py

    dense = {
        "module": "keras.layers",
        "class_name": "Dense",
        "config": {"units": 3, "activation": "relu"},
        "registered_name": None,
    }
    lam = {
        "module": "keras.layers",
        "class_name": "Lambda",
        "config": {"function": {"class_name": "__lambda__", "config": {"value": "base64-code"}}},
        "registered_name": None,
    }
    wrapped = {
        "module": "keras.layers",
        "class_name": "TimeDistributed",
        "config": {"layer": lam},
        "registered_name": None,
    }

    def sequential(layers: list[object]) -> dict[str, object]:
        return {
            "module": "keras",
            "class_name": "Sequential",
            "config": {"name": "m", "layers": layers},
            "registered_name": None,
        }

    weights = io.BytesIO()
    with h5py.File(weights, "w") as handle:
        handle.create_dataset("layers/dense/vars/0", data=np.ones((4, 3), dtype=np.float32))

    def keras_zip(config: dict[str, object]) -> bytes:
        return zip_bytes(
            {
                "metadata.json": b'{"keras_version": "3.6.0"}',
                "config.json": json.dumps(config).encode(),
                "model.weights.h5": weights.getvalue(),
            }
        )

    c.add("keras/benign.keras", S, keras_zip(sequential([dense])))
    c.add("keras/lambda-nested.keras", M, keras_zip(sequential([dense, sequential([wrapped])])))
    c.add(
        "keras/module-injection.keras",
        M,
        keras_zip(
            sequential(
                [
                    {
                        "module": "keras.utils",
                        "class_name": "get_file",
                        "config": {"origin": "http://x"},
                        "registered_name": None,
                    }
                ]
            )
        ),
    )
    c.add(
        "keras/custom-object.keras",
        M,
        keras_zip(
            sequential(
                [
                    {
                        "module": "mypackage.layers",
                        "class_name": "Evil",
                        "config": {},
                        "registered_name": "mypkg>Evil",
                    }
                ]
            )
        ),
    )

    def h5(config: dict[str, object]) -> bytes:
        buffer = io.BytesIO()
        with h5py.File(buffer, "w") as handle:
            handle.attrs["model_config"] = json.dumps(config)
            handle.create_dataset(
                "model_weights/dense/kernel", data=np.ones((4, 3), dtype=np.float32)
            )
        return buffer.getvalue()

    legacy_lambda = {
        "class_name": "Lambda",
        "config": {"function": ["4wEAAAAAAAAA", None, None], "function_type": "lambda"},
    }
    c.add(
        "keras/benign.h5",
        S,
        h5(
            {
                "class_name": "Sequential",
                "config": {"layers": [{"class_name": "Dense", "config": {"units": 3}}]},
            }
        ),
    )
    c.add(
        "keras/lambda.h5",
        M,
        h5(
            {
                "class_name": "Sequential",
                "config": {
                    "layers": [{"class_name": "Bidirectional", "config": {"layer": legacy_lambda}}]
                },
            }
        ),
    )


def gguf_files(c: Corpus, tmp: Path) -> None:
    import gguf

    def write(template: str) -> bytes:
        path = tmp / "model.gguf"
        writer = gguf.GGUFWriter(str(path), "llama")
        writer.add_string("tokenizer.chat_template", template)
        writer.add_array("tokenizer.ggml.tokens", ["<s>", "</s>", "a"])
        writer.add_tensor("tok_embd.weight", np.ones((3, 32), dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path.read_bytes()

    benign = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    c.add("gguf/benign.gguf", S, write(benign))
    c.add(
        "gguf/chat-template-ssti.gguf",
        M,
        write(
            "{{ ''.__class__.__mro__[1].__subclasses__() }}"
            "{{ cycler.__init__.__globals__.os.popen('true') }}"
        ),
    )
    head = b"GGUF" + struct.pack("<I", 3)
    c.add("gguf/kv-count-overflow.gguf", M, head + struct.pack("<QQ", 0, 2**60) + b"\x00" * 64)
    key = struct.pack("<Q", 2**62) + b"general.name"
    c.add(
        "gguf/string-length-overflow.gguf", M, head + struct.pack("<QQ", 0, 1) + key + b"\x00" * 64
    )
    tensor = struct.pack("<Q", 1) + b"w" + struct.pack("<I", 2) + struct.pack("<QQ", 2**40, 2**40)
    tensor += struct.pack("<IQ", 0, 0)
    c.add("gguf/dims-overflow.gguf", M, head + struct.pack("<QQ", 1, 0) + tensor + b"\x00" * 64)
    many = struct.pack("<Q", 1) + b"w" + struct.pack("<I", 1000) + b"\x00" * 8100
    c.add("gguf/too-many-dims.gguf", M, head + struct.pack("<QQ", 1, 0) + many)
    c.add("gguf/truncated.gguf", E, write(benign)[:-64])


def skops_and_trees(c: Corpus) -> None:
    import lightgbm
    import skops.io as sio
    import xgboost
    from sklearn.datasets import load_iris
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression

    features, labels = load_iris(return_X_y=True)
    logistic = sio.dumps(LogisticRegression(max_iter=500).fit(features, labels))
    c.add("skops/benign-logistic.skops", S, logistic)
    forest = RandomForestClassifier(n_estimators=3, max_depth=3, random_state=0).fit(
        features, labels
    )
    c.add("skops/benign-forest-approved-types.skops", S, sio.dumps(forest))

    def patched(module: str, cls: str) -> bytes:
        source = zipfile.ZipFile(io.BytesIO(logistic))
        members = {name: source.read(name) for name in source.namelist()}
        schema = json.loads(members["schema.json"])
        schema["__module__"], schema["__class__"] = module, cls
        members["schema.json"] = json.dumps(schema).encode()
        return zip_bytes(members)

    c.add("skops/os-system-type.skops", M, patched("os", "system"))
    c.add("skops/unknown-type.skops", U, patched("mypackage.models", "CustomModel"))
    booster = xgboost.train(
        {"objective": "multi:softprob", "num_class": 3, "max_depth": 2},
        xgboost.DMatrix(features, label=labels),
        num_boost_round=2,
    )
    model_json = bytes(booster.save_raw("json"))
    c.add("xgboost/benign.json", S, model_json)
    c.add("xgboost/benign.ubj", S, bytes(booster.save_raw("ubj")))
    broken = json.loads(model_json)
    broken["learner"]["gradient_booster"]["model"]["trees"][0]["left_children"][0] = 999
    c.add("xgboost/child-out-of-range.json", E, json.dumps(broken).encode())
    light = lightgbm.train(
        {"objective": "multiclass", "num_class": 3, "verbose": -1, "num_leaves": 4},
        lightgbm.Dataset(features, label=labels),
        num_boost_round=2,
    )
    text = light.model_to_string()
    c.add("lightgbm/benign.txt", S, text.encode())
    broken_text = re.sub(r"^left_child=\S+", "left_child=99", text, count=1, flags=re.MULTILINE)
    assert broken_text != text
    c.add("lightgbm/child-out-of-range.txt", E, broken_text.encode())


def misc(c: Corpus) -> None:
    c.add("misc/unknown.bin", E, bytes(range(256)) * 8)
    c.add("misc/empty.bin", E, b"")
    c.add("misc/text-alone.txt", E, b"just some notes about a model\n")

    def escaping(path: Path) -> None:
        (path / "model.safetensors").write_bytes(
            safetensors_raw(
                {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\x00" * 4
            )
        )
        (path / "secrets").symlink_to("/etc")

    c.directory("misc/dir-symlink-escape", M, escaping)


def _real_libraries() -> ModuleType:
    # The benign files written by the real libraries live next to this script.
    path = Path(__file__).with_name("scan_corpus_real.py")
    spec = importlib.util.spec_from_file_location("scan_corpus_real", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build(root: Path) -> dict[str, str]:
    """Write the corpus under ``root``; returns the manifest (also written as manifest.json)."""
    from safetensors.numpy import save

    from modelkeep.testing import build_iris_onnx

    root.mkdir(parents=True, exist_ok=True)
    c = Corpus(root)
    onnx_data = build_iris_onnx()
    tensors = save({"weight": np.arange(12, dtype=np.float32).reshape(3, 4), "bias": np.zeros(3)})
    scratch = root / "_scratch"
    scratch.mkdir(exist_ok=True)
    # Library warnings (a duplicate zip name on purpose, convergence) are not the corpus' concern.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pickles(c)
        joblib_and_numpy(c)
        torch_files(c)
        archives(c, tensors, onnx_data)
        onnx_files(c, onnx_data)
        safetensors_files(c, tensors)
        keras_files(c)
        gguf_files(c, scratch)
        skops_and_trees(c)
        misc(c)
        _real_libraries().build_real(c, scratch)
    shutil.rmtree(scratch)
    (root / "manifest.json").write_text(json.dumps(c.manifest, indent=2, sort_keys=True) + "\n")
    return c.manifest


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: make_scan_corpus.py OUTDIR")
    manifest = build(Path(sys.argv[1]))
    counts = {verdict: list(manifest.values()).count(verdict) for verdict in (M, U, E, S)}
    print(f"wrote {len(manifest)} corpus entries to {sys.argv[1]}: {counts}")


if __name__ == "__main__":
    main()
