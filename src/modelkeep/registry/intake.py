"""What a push must pass before anything is stored: structure, signature, scan, runtime.

Written as a numbered checklist. The order is not quite DESIGN §2's, which scans before it verifies
the signature: here the signature is verified first, over digests taken as the bytes streamed in,
so that no parser looks at the content of a push that is not signed by a trusted publisher
(docs/architecture.md, "Where the code and the design differ"). The artifact arrives as an
:class:`~modelkeep.registry.upload.Upload`, sealed on the way in; the checks read it back from that
sealed copy, decrypting as they read, so plaintext is never written to disk and never held whole:
file digests are computed as the bytes stream past, and each file is scanned through a seekable
view of the sealed copy that decrypts only the segments its analyser reads. A file of a format the
server only scans (safetensors, pickle, HDF5, archives and compressed streams, decompressed as
they are read; text, anything unidentified) is therefore never in memory whole; one whose analyser
takes a whole buffer (7z members among them) is held while it is scanned. The servable file is
read by its runtime through the sealed copy as well (see step 4 of :func:`accept`).
"""

from __future__ import annotations

import hashlib
import io
import logging
import mmap
import posixpath
import tarfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Protocol

from modelkeep.crypto.signing import TrustedKey, verify_digests
from modelkeep.errors import ModelRefused
from modelkeep.registry.upload import Upload
from modelkeep.runtime._plaintext_file import DEFAULT_BASE, plaintext_file
from modelkeep.runtime.base import fill
from modelkeep.runtime.loader import inspect_model
from modelkeep.runtime.signature import ModelSignature
from modelkeep.scanning import FileSlice, ScanReport, Verdict, scan_reader

log = logging.getLogger(__name__)

# Formats a runtime can serve; everything else is refused even when the scan calls it safe.
SERVABLE_FORMATS = frozenset({"onnx", "skops", "xgboost-json", "xgboost-ubj", "lightgbm-text"})
TAR_FORMAT = "tar"
MAX_MEMBERS = 1000
_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class Accepted:
    """An artifact that passed every check, ready to be sealed."""

    model_file: str
    format: str
    signature: ModelSignature
    signer: str | None
    report: ScanReport
    trusted_types: tuple[str, ...]


class Writable(Protocol):
    """Where a load writes a model's plaintext: a file in memory, or a tmpfs file's writer."""

    def write(self, data: memoryview | bytes, /) -> int: ...


def read_directory(tar_stream: IO[bytes], model_file: str, into: Writable) -> dict[str, str]:
    """The SHA-256 of every file of a directory's tar, read as a stream; the content of
    ``model_file`` is written to ``into`` as it streams past, the others are only hashed.

    The rules of a push apply (see ``_members``).
    """
    digests: dict[str, str] = {}
    for name, _, content in _members(tar_stream):
        digests[name] = _digest(content, copy_to=into if name == model_file else None)
    if model_file not in digests:
        raise ModelRefused("the model file is missing from the directory")
    return digests


Span = tuple[int, int]  # where a file's bytes start in the upload, and how many there are


def _members(tar_stream: IO[bytes]) -> Iterator[tuple[str, Span, IO[bytes]]]:
    """Each regular file of an uploaded directory (a tar, read as a stream), where its bytes
    lie in the tar, and its content.

    A directory may hold only regular files with plain relative names: links, devices, sparse
    files, absolute names, ``..`` and duplicates are refused. Each content stream is valid
    until the next member is asked for.
    """
    seen: set[str] = set()
    try:
        with tarfile.open(fileobj=tar_stream, mode="r|") as tar:
            for count, member in enumerate(tar, start=1):
                if count > MAX_MEMBERS:
                    raise ModelRefused(f"the directory holds more than {MAX_MEMBERS} files")
                name = member.name
                if member.isdir():
                    continue
                if member.issym() or member.islnk():
                    raise ModelRefused(
                        f"the directory holds a link ({_show(name)}); links are refused"
                    )
                if not member.isfile() or member.issparse():
                    raise ModelRefused(f"the directory holds a special file ({_show(name)})")
                normal = posixpath.normpath(name)
                if name.startswith("/") or normal.startswith("..") or normal != name.lstrip("./"):
                    raise ModelRefused(f"the directory holds an unsafe file name ({_show(name)})")
                if normal in seen:
                    raise ModelRefused(f"the directory names a file twice ({_show(name)})")
                seen.add(normal)
                extracted = tar.extractfile(member)
                assert extracted is not None
                yield normal, (member.offset_data, member.size), extracted
    except tarfile.TarError as exc:
        raise ModelRefused("the uploaded directory is not a valid tar archive") from exc
    if not seen:
        raise ModelRefused("the uploaded directory is empty")


@contextmanager
def _directory(upload: Upload) -> Iterator[Iterator[tuple[str, Span, IO[bytes]]]]:
    """The files of an uploaded directory as streams read from the sealed copy, in tar order.

    The rest of the upload is read to its end afterwards, so the sealed copy is verified whole
    (a truncated copy fails there, not silently).
    """
    buffered = io.BufferedReader(upload.reader(), _CHUNK)
    try:
        yield _members(buffered)
        while buffered.read(_CHUNK):
            pass
    finally:
        buffered.close()


def _digest(content: IO[bytes], *, copy_to: Writable | None = None) -> str:
    digest = hashlib.sha256()
    while chunk := content.read(_CHUNK):
        digest.update(chunk)
        if copy_to is not None:
            copy_to.write(chunk)
    return digest.hexdigest()


def _read_into(content: IO[bytes], buffer: mmap.mmap, digest: str | None) -> None:
    view = memoryview(buffer)
    try:
        if not fill(view, content):
            raise ModelRefused("the upload changed while it was being checked")
        _check_digest(view, digest)
    finally:
        view.release()
    # The pages stay in the file; only this mapping lets go of them. ONNX Runtime maps the
    # file again, and a page mapped twice counts twice in the process's resident size (what
    # `ps`, VmHWM and the kernel's choice of a process to kill under memory pressure read).
    buffer.madvise(mmap.MADV_DONTNEED)


def _check_digest(data: bytes | memoryview, digest: str | None) -> None:
    if hashlib.sha256(data).hexdigest() != digest:
        raise ModelRefused("the upload changed while it was being checked")


def accept(
    upload: Upload,
    *,
    file_name: str,
    is_directory: bool,
    bundle: bytes | None,
    trusted: Sequence[TrustedKey],
    require_signature: bool,
    model: str,
    plaintext_dir: str = DEFAULT_BASE,
) -> Accepted:
    """Run every push check in order; ModelRefused (with the scan report where there is one)."""
    # 1. The artifact's files: one file, whose digest was taken as it was uploaded, or the
    #    regular files of a directory's tar with clean names, each hashed as it streams from
    #    the sealed copy.
    digests = {file_name: upload.sha256}
    spans = {file_name: (0, upload.size)}
    if is_directory:
        digests, spans = {}, {}
        with _directory(upload) as files:
            for name, span, content in files:
                digests[name], spans[name] = _digest(content), span
    # 2. Signature, against this model's trusted publishers only, offline, over those digests,
    #    before any parser looks at the content.
    signer: str | None = None
    if bundle is not None:
        signer = verify_digests(digests, bundle, trusted).signer
    elif require_signature:
        if not trusted:
            raise ModelRefused(
                f"model '{model}' requires signed pushes and has no trusted publisher yet: an admin"
                " adds one with `modelkeep publishers add`"
            )
        raise ModelRefused(
            f"model '{model}' requires a signature: sign with `modelkeep sign` and push with"
            " --signature, or let the CLI sign with --sign-key"
        )
    else:
        log.warning("unsafe: unsigned push accepted for model %s (signatures not required)", model)
    # 3. Every file is scanned by content, one at a time, through a view of the sealed copy
    #    that decrypts and verifies only the segments read (so it is what step 1 hashed: the
    #    copy is authenticated under a key only this process holds); any verdict but `safe`
    #    refuses the push.
    servable: dict[str, tuple[int, ScanReport]] = {}
    with upload.seekable_reader() as sealed:
        for name, span in spans.items():
            with io.BufferedReader(FileSlice(sealed, *span), _CHUNK) as content:
                report = scan_reader(content, name, spool_dir=upload.staging_dir)
                if report.verdict is not Verdict.SAFE:
                    worst = next(f for f in report.findings if f.severity.verdict is report.verdict)
                    raise ModelRefused(
                        f"the scan refused {_show(name)} ({report.verdict.value}): {worst.message}",
                        details={"report": report.to_json()},
                    )
                if report.format in SERVABLE_FORMATS:
                    servable[name] = (span[1], report)
                    if len(servable) > 1:
                        break
    if len(servable) != 1:
        raise ModelRefused(
            "a model must hold exactly one servable file (ONNX, skops, XGBoost JSON/UBJSON,"
            f" LightGBM text); found {len(servable)}"
        )
    ((model_file, (size, report)),) = servable.items()
    trusted_types = report.trusted_types
    # 4. Exactly one file is the model a runtime serves; it is checked against its digest
    #    once more as it streams from the sealed copy, then the runtime reads it from there.
    #    An ONNX model is decrypted into a private tmpfs file that ONNX Runtime maps; a skops
    #    zip is read through the sealed copy; XGBoost and LightGBM read the model into a buffer
    #    of their own and let go of it once parsed. So the model is in memory once while it
    #    loads, besides what its library builds from it.
    # 5. The runtime's own view of the model is its signature; a smoke run proves it loads.
    with (
        upload.seekable_reader() as sealed,
        io.BufferedReader(FileSlice(sealed, *spans[model_file]), _CHUNK) as content,
        plaintext_file(
            size, base=plaintext_dir, enabled=report.format == "onnx" and size > 0
        ) as plain,
    ):
        if plain is not None:
            _read_into(content, plain.buffer, digests.get(model_file))
            signature = inspect_model(report.format, plain)
        else:
            if _digest(content) != digests.get(model_file):
                raise ModelRefused("the upload changed while it was being checked")
            content.seek(0)
            signature = inspect_model(report.format, content, trusted_types=trusted_types)
    return Accepted(
        model_file=model_file,
        format=report.format,
        signature=signature,
        signer=signer,
        report=report,
        trusted_types=trusted_types,
    )


def _show(name: str) -> str:
    printable = "".join(ch if ch.isprintable() else "?" for ch in name)
    return printable[:80]
