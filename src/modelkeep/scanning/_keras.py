"""Keras models: ``.keras`` (a zip with ``config.json``) and ``.h5`` (HDF5 with ``model_config``).

Keras is never imported. The configuration is JSON, walked to any depth (a Lambda hides as
easily inside a TimeDistributed inside a nested Sequential as at the top), and judged:

- Lambda layers (``Lambda``, TF's op layers, ``__lambda__`` values) carry Python code;
- an object whose ``module`` is outside Keras' own layer, model, initializer, regularizer,
  constraint, activation, loss, metric, optimizer and dtype-policy modules names code Keras
  would import and call (``keras.utils.get_file``, ``keras.config.enable_unsafe_...`` or any
  third-party module: known ways past ``safe_mode``);
- a ``registered_name`` of the form ``package>Name`` is a custom object that needs its code.

Each of these is malicious evidence. In HDF5 files only the root attributes are read (no
dataset), datasets that store their data in other files are called out, and a user block
before the HDF5 data is scanned like an archive member.
"""

from __future__ import annotations

import io
import json
from typing import IO, Any, cast

from modelkeep.scanning._archive import Member, scan_members
from modelkeep.scanning._context import Buffer, MemoryReader, Scan, join
from modelkeep.scanning._zip_archive import OpenZip, read_json
from modelkeep.scanning.detect import hdf5_superblock_offset

__all__ = ["scan_hdf5", "scan_hdf5_file", "scan_keras_zip"]

_LAMBDAS = frozenset({"Lambda", "TFOpLambda", "SlicingOpLambda", "__lambda__"})
_ALLOWED_MODULES = tuple(
    f"{root}{part}"
    for root in ("keras.", "keras.src.")
    for part in (
        "layers",
        "models",
        "initializers",
        "regularizers",
        "constraints",
        "activations",
        "losses",
        "metrics",
        "optimizers",
        "dtype_policies",
        "engine",
        "trainers.compile_utils",
        "mixed_precision",
        "quantizers",
        "random.seed_generator",
    )
)
_MAX_NODES = 2_000_000
# detect.hdf5_superblock_offset looks for the superblock at offsets up to 1 MiB.
_SUPERBLOCK_PROBE = (1 << 20) + 8


def scan_keras_zip(scan: Scan, archive: OpenZip, members: list[Member], depth: int) -> None:
    """Judge a ``.keras`` archive's configuration; scan its other members by content."""
    config = read_json(scan, archive, "config.json")
    if config is not None:
        before = scan.finding_count
        check_config(scan, config, join(archive.location, "config.json"))
        if scan.finding_count == before:
            scan.info(
                join(archive.location, "config.json"),
                "Keras configuration without Lambda layers, foreign modules or custom objects",
            )
    metadata = (
        read_json(scan, archive, "metadata.json")
        if any(m.name == "metadata.json" for m in members)
        else None
    )
    if metadata is not None and not isinstance(metadata, dict):
        scan.high(join(archive.location, "metadata.json"), "not a JSON object")

    def skip(member: Member) -> bool:
        # Assets are whatever a layer saved (vocabularies...): data read by Keras code already
        # judged through the configuration, not models.
        return member.name in ("config.json", "metadata.json") or member.name.startswith("assets/")

    for member in members:
        if member.kind == "file" and member.name.startswith("assets/"):
            scan.record_file(join(archive.location, member.name))
    scan_members(scan, members, archive.location, depth, skip=skip)


def check_config(scan: Scan, config: Any, location: str) -> None:
    """Walk a Keras configuration and report every object that carries or imports code."""
    stack: list[tuple[Any, str]] = [(config, "")]
    visited = 0
    while stack:
        node, path = stack.pop()
        visited += 1
        if visited > _MAX_NODES:
            scan.high(location, "the configuration is too large to analyse")
            return
        if isinstance(node, list):
            stack.extend((item, f"{path}[{i}]") for i, item in enumerate(node))
            continue
        if not isinstance(node, dict):
            continue
        _check_object(scan, node, f"{location} @ {path or '/'}")
        stack.extend(
            (value, f"{path}/{str(key)[:40]}") for key, value in node.items() if key != "module"
        )


def _check_object(scan: Scan, node: dict[str, Any], where: str) -> None:
    class_name = node.get("class_name")
    module = node.get("module")
    registered = node.get("registered_name")
    shown = str(class_name)[:80]
    if class_name in _LAMBDAS or (class_name == "function" and module == "builtins"):
        scan.critical(
            where,
            f"a {shown} layer or value: it carries Python code that runs when the model is "
            "loaded or called; rebuild the model with built-in layers, or export it to ONNX",
        )
        return
    if "function" in node and "function_type" in node:
        scan.critical(where, "a serialized Python function (legacy Lambda configuration)")
        return
    if isinstance(module, str) and not _allowed_module(module):
        scan.critical(
            where,
            f"{shown} comes from module {module[:80]!r}, outside Keras' layer and model "
            "modules: loading imports and calls code from it (a known way around safe_mode)",
        )
    elif module is not None and not isinstance(module, str):
        scan.critical(where, f"{shown} names a module that is not text")
    if isinstance(registered, str) and ">" in registered:
        scan.critical(
            where,
            f"{shown} is registered as custom object {registered[:80]!r}: loading it needs, "
            "and runs, that package's code",
        )


class _ReadErrorsKept(io.RawIOBase):
    """``reader`` for h5py, whose read errors never cross h5py. Its file driver calls back
    into Python from HDF5's C code; an exception raised there leaves HDF5 holding the file
    half-open, and the process crashes (SIGSEGV) when HDF5 closes it at exit. A failed read
    ends the file instead (h5py then refuses it as truncated) and the error is kept, to be
    raised once h5py has let go of the file."""

    def __init__(self, reader: IO[bytes]) -> None:
        super().__init__()
        self._reader = reader
        self.error: Exception | None = None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._reader.seek(offset, whence)

    def tell(self) -> int:
        return self._reader.tell()

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        if self.error is not None:
            return 0
        try:
            chunk = self._reader.read(len(buffer))
        except Exception as exc:  # any: it must not reach HDF5's C code
            # Without its traceback, whose frames hold ``buffer``: a view of HDF5's memory,
            # which must not outlive this call (the error is raised again, and kept, later).
            self.error = exc.with_traceback(None)
            return 0
        buffer[: len(chunk)] = chunk
        return len(chunk)


def _allowed_module(module: str) -> bool:
    if module in ("keras", "keras.src"):
        return True
    return any(
        module == allowed or module.startswith(allowed + ".") for allowed in _ALLOWED_MODULES
    )


def scan_hdf5(scan: Scan, data: Buffer, location: str, depth: int) -> str:
    """A Keras ``.h5`` model: its ``model_config`` judged, external storage called out."""
    return scan_hdf5_file(scan, cast(IO[bytes], MemoryReader(data)), len(data), location, depth)


def scan_hdf5_file(scan: Scan, reader: IO[bytes], size: int, location: str, depth: int) -> str:
    """:func:`scan_hdf5` for a seekable file of ``size`` bytes: HDF5 reads the attributes and
    links it is asked for through it, never a dataset's data."""
    import h5py

    # A user block before the superblock is free-form bytes HDF5 ignores, and other readers
    # may not (a pickle there is a polyglot): it is scanned like a member.
    reader.seek(0)
    head = reader.read(min(size, _SUPERBLOCK_PROBE))
    offset = hdf5_superblock_offset(head) or 0
    block = head[:offset]
    del head
    if any(block):
        scan.nested(block, f"{location} > HDF5 user block", depth + 1)
    reader.seek(0)
    guarded = _ReadErrorsKept(reader)
    refused: str | None = None
    try:
        with h5py.File(guarded, "r") as handle:
            raw = handle.attrs.get("model_config")
            training = handle.attrs.get("training_config")
            _check_links(scan, handle, location)
    except Exception as exc:  # h5py raises OSError, KeyError, RuntimeError... for bad files
        refused = type(exc).__name__
    # Raised here, not in the handler above: h5py's exception (and what its traceback holds
    # of HDF5's state) must not ride along as this one's context.
    if guarded.error is not None:
        raise guarded.error  # the file's own: a sealed copy that stops verifying, a disk error
    if refused is not None:
        scan.high(location, f"not a readable HDF5 file ({refused})")
        return "keras-h5"
    if raw is None:
        scan.info(location, "an HDF5 file without a Keras model configuration (weights only)")
        return "keras-h5"
    for name, value in (("model_config", raw), ("training_config", training)):
        if value is None:
            continue
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
        try:
            config = json.loads(text)
        except (ValueError, RecursionError):
            scan.high(f"{location} @ {name}", "the configuration is not valid JSON")
            continue
        before = scan.finding_count
        check_config(scan, config, f"{location} @ {name}")
        if scan.finding_count == before:
            scan.info(
                f"{location} @ {name}",
                "Keras configuration without Lambda layers, foreign modules or custom objects",
            )
    return "keras-h5"


def _check_links(scan: Scan, handle: Any, location: str) -> None:
    import h5py

    count = 0
    queue: list[Any] = [handle]
    while queue:
        group = queue.pop()
        for name in list(group.keys()):
            count += 1
            if count > scan.limits.max_members:
                scan.critical(
                    location, f"more than {scan.limits.max_members} HDF5 objects (max_members)"
                )
                return
            link = group.get(name, getlink=True)
            where = f"{location} @ {group.name.rstrip('/')}/{str(name)[:60]}"
            if isinstance(link, h5py.ExternalLink):
                scan.critical(
                    where,
                    "an external link: reading it opens another file, "
                    "chosen by whoever made this one",
                )
                continue
            if isinstance(link, h5py.SoftLink):
                continue
            item = group.get(name)
            if isinstance(item, h5py.Group):
                queue.append(item)
            elif isinstance(item, h5py.Dataset) and (item.external or item.is_virtual):
                scan.critical(
                    where,
                    "a dataset stored in other files (external or virtual): "
                    "loading it reads files chosen by whoever made this one",
                )
