"""Identify what bytes are by their content (magic numbers and structure), never by a file name.

A file called ``model.onnx`` that holds a pickle is a pickle: loaders pick their parser by
content too (``torch.load`` opens anything starting with ``PK\\x03\\x04`` as a zip), so a
scanner that trusted names could be told to look at the wrong thing.

:func:`detect_format` returns a *kind*: the container or encoding the bytes start with. The
format a report names can be finer (a ``zip`` kind becomes ``pytorch-zip``, ``npz``, ``skops``
or ``keras`` once its members are seen; a ``pickle`` kind becomes ``joblib`` or
``pytorch-legacy``); the scanners of each family decide that.
"""

from __future__ import annotations

import _compat_pickle
import functools
import importlib.util
import io
import pickletools
import re
import struct
import sys
import zlib

__all__ = ["KINDS", "detect_format", "hdf5_superblock_offset"]

#: Every kind :func:`detect_format` can return.
KINDS = frozenset(
    {
        "zip",
        "tar",
        "7z",
        "gzip",
        "bz2",
        "xz",
        "lzma",
        "zlib",
        "lz4",
        "zstd",
        "pickle",
        "numpy",
        "safetensors",
        "gguf",
        "hdf5",
        "onnx",
        "xgboost-json",
        "xgboost-ubj",
        "lightgbm-text",
        "text",
        "unknown",
    }
)

_PEEK = 64 * 1024
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
# Opcodes a pickle without a PROTO header can start with: those that push onto an empty stack.
_PICKLE_TEXT_STARTS = frozenset(
    b"(]})NIJKLMFGSTUVXBCPcghj\x82\x83\x84\x88\x89\x8a\x8b\x8c\x8d\x8e\x8f\x95\x96\x97"
)
# Valid opcodes filling the whole peek window of a longer file make it a pickle.
_TEXT_PICKLE_RUN = 64
_IMPORTS = frozenset({"GLOBAL", "INST", "STACK_GLOBAL", "EXT1", "EXT2", "EXT4"})
_CALLS = frozenset({"REDUCE", "OBJ", "NEWOBJ", "NEWOBJ_EX", "BUILD", "INST"})
# Third-party packages a pickle payload may count on finding where the model is loaded.
_ML_MODULES = frozenset(
    {
        "numpy", "scipy", "sklearn", "joblib", "torch", "torchvision", "tensorflow", "keras",
        "jax", "pandas", "transformers", "dill", "cloudpickle", "yaml", "requests", "xgboost",
        "lightgbm", "onnx", "skops", "h5py",
    }
)  # fmt: skip
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_.]* [A-Za-z_][A-Za-z0-9_.]*")
# ModelProto fields an ONNX file can start with when ir_version (field 1) is absent, with their
# wire types: a deterministic serializer writes fields in number order, so ir_version comes first.
_ONNX_TAGS = frozenset({0x08, 0x12, 0x1A, 0x22, 0x28, 0x32, 0x3A, 0x42})


def detect_format(data: bytes | bytearray | memoryview) -> str:
    """The kind of content ``data`` holds, one of :data:`KINDS`; ``unknown`` when none fits.

    Looks at a prefix only (at most 64 KiB), so it is cheap on any size. A match is a claim the
    family's scanner then verifies in full: a zip kind whose central directory is broken is a
    zip that fails to parse, not an unknown file.
    """
    head = bytes(data[:_PEEK])
    size = len(data)
    # 1. Containers and compressed streams, by their magic numbers.
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    if head.startswith(b"7z\xbc\xaf\x27\x1c"):
        return "7z"
    if head.startswith(b"\x1f\x8b"):
        return "gzip"
    if len(head) >= 4 and head.startswith(b"BZh") and head[3:4].isdigit():
        return "bz2"
    if head.startswith(b"\xfd7zXZ\x00"):
        return "xz"
    if head.startswith(b"\x04\x22\x4d\x18"):
        return "lz4"
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        return "zstd"
    # 2. Model formats with a magic number or a fixed header.
    if head.startswith(b"GGUF"):
        return "gguf"
    if hdf5_superblock_offset(data) is not None:
        return "hdf5"
    if head.startswith(b"\x93NUMPY"):
        return "numpy"
    if _is_safetensors(head):
        return "safetensors"
    if len(head) >= 2 and head[0] == 0x80 and head[1] <= 5:
        return "pickle"
    text_pickle = _text_pickle(head, truncated=size > len(head))  # once: it decodes the peek
    if text_pickle == "strong":
        return "pickle"
    if _is_tar(head):
        return "tar"
    # 3. Weaker signatures, each confirmed by a little decoding.
    if head.startswith(b"\x5d\x00\x00"):
        return "lzma"  # the "alone" format joblib writes for compress="lzma"
    if _is_zlib(head):
        return "zlib"
    if _is_onnx(head):
        return "onnx"
    stripped = head.lstrip()
    if stripped.startswith(b"{") and b'"learner"' in head[:4096]:
        return "xgboost-json"
    if (
        head.startswith(b"{")
        and len(head) > 1
        and head[1:2] in b"iUIlL"
        and b"learner" in head[:32]
    ):
        return "xgboost-ubj"
    if head.startswith((b"tree\n", b"tree\r\n")) and b"version=" in head[:256]:
        return "lightgbm-text"
    if _is_text(head, truncated=size > len(head)):
        return "text"
    if text_pickle == "weak":
        return "pickle"
    return "unknown"


def hdf5_superblock_offset(data: bytes | bytearray | memoryview) -> int | None:
    """Where an HDF5 superblock starts: 0, or after a user block of 512, 1024, 2048... bytes."""
    offset = 0
    while offset + 8 <= len(data) and offset <= 1 << 20:
        if bytes(data[offset : offset + 8]) == _HDF5_MAGIC:
            return offset
        offset = 512 if offset == 0 else offset * 2
    return None


def _is_safetensors(head: bytes) -> bool:
    # An 8-byte little-endian header length, then a JSON object; the length itself is checked
    # (hostile lengths included) by the safetensors scanner, not here.
    return len(head) >= 10 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] >= 2


def _is_tar(head: bytes) -> bool:
    if len(head) < 512:
        return False
    if head[257:262] == b"ustar":
        return True
    # A pre-POSIX (v7) header has no magic: its checksum is the only signature.
    field = head[148:156].replace(b"\x00", b" ").strip()
    if not field or any(c not in b"01234567" for c in field):
        return False
    expected = int(field, 8)
    actual = sum(head[:148]) + 8 * 0x20 + sum(head[156:512])
    return expected == actual and head[:1] != b"\x00"


def _is_zlib(head: bytes) -> bool:
    if len(head) < 2 or head[0] != 0x78 or ((head[0] << 8) | head[1]) % 31 != 0:
        return False
    try:
        zlib.decompressobj().decompress(head[:256], 64)
    except zlib.error:
        return False
    return True


def _is_onnx(head: bytes) -> bool:
    if not head or head[0] not in _ONNX_TAGS:
        return False
    if head[0] != 0x08:
        return _parses_as_onnx(head)
    # ir_version: a small varint, then the tag of another ModelProto field.
    value, index, shift = 0, 1, 0
    while index < len(head) and index < 11:
        byte = head[index]
        value |= (byte & 0x7F) << shift
        index += 1
        shift += 7
        if not byte & 0x80:
            break
    else:
        return False
    return 1 <= value <= 64 and index < len(head) and head[index] in _ONNX_TAGS | {0x72, 0xA2}


def _parses_as_onnx(head: bytes) -> bool:
    try:
        import onnx

        model = onnx.ModelProto()
        model.ParseFromString(head)
    except Exception:  # protobuf raises DecodeError or RuntimeError depending on the backend
        return False
    return bool(model.HasField("graph") and model.graph.node)


def _text_pickle(head: bytes, *, truncated: bool) -> str | None:
    """How strongly ``head`` reads as a pickle without a PROTO header (protocols 0 and 1, which
    are often plain text): ``strong``, ``weak`` or None.

    Strong: it imports a module that exists (standard library, installed, or a well-known ML
    package) and then calls or builds something (a payload runs even if the bytes after it are
    broken); or it decodes as opcodes up to its STOP without importing names no loader could
    find; or it decodes as opcodes for the whole peek window of a longer file. Strong evidence
    wins over a text, tar or ONNX reading of the same bytes: ``pickle.load`` would read it.
    Weak: it imports only names no loader could find (a word list that happens to start with
    ``c``) or stops early; weak evidence wins over nothing but text.
    """
    if not head or head[0] not in _PICKLE_TEXT_STARTS:
        return None
    count = 0
    imported = False
    unknown = False
    stream = io.BytesIO(head)
    try:
        for opcode, arg, _pos in pickletools.genops(stream):
            count += 1
            name = opcode.name
            if name in _IMPORTS:
                known = not isinstance(arg, str) or _known_import(arg)
                unknown = unknown or not known
                if name == "INST" and known:
                    return "strong"
                imported = imported or known
            elif name in _CALLS and imported:
                return "strong"
            if name == "STOP":
                return "weak" if unknown else "strong"
    except Exception:  # genops raises ValueError, struct.error, UnicodeDecodeError...
        # Cut by the peek window (the decoder ran out of bytes, not into a bad opcode) after
        # a long run of valid opcodes: a large protocol 0 or 1 pickle.
        cut = truncated and stream.tell() >= len(head)
        if cut and count >= _TEXT_PICKLE_RUN and not unknown:
            return "strong"
        return "weak" if count >= 16 else None
    return None


def _known_import(arg: str) -> bool:
    # GLOBAL and INST arguments read "module name"; only the top-level package is looked up,
    # which finds a module on the path without importing (running) anything.
    if _IDENTIFIER.fullmatch(arg) is None:
        return False
    top = arg.split(" ", 1)[0].split(".", 1)[0]
    # Python 2 names (__builtin__, copy_reg) are mapped by the loader, as in _compat_pickle.
    top = _compat_pickle.IMPORT_MAPPING.get(top, top)
    return top in sys.stdlib_module_names or top in _ML_MODULES or _installed(top)


@functools.lru_cache(maxsize=1024)
def _installed(top: str) -> bool:
    try:
        return importlib.util.find_spec(top) is not None
    except (ImportError, ValueError):
        return False


def _is_text(head: bytes, *, truncated: bool) -> bool:
    if not head or b"\x00" in head:
        return False
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        # A multi-byte character cut by the peek window is still text.
        if not (truncated and exc.start >= len(head) - 3):
            return False
        text = head[: exc.start].decode("utf-8")
    printable = sum(1 for ch in text if ch.isprintable() or ch in "\n\r\t\f")
    return printable >= 0.97 * len(text)
