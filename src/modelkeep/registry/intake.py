"""What a push must pass before anything is stored: structure, signature, scan, runtime.

The order is the design's (DESIGN §2), written as a checklist. Nothing here touches disk: the
artifact is held in memory from upload to sealing.
"""

from __future__ import annotations

import io
import logging
import posixpath
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from modelkeep.crypto.signing import TrustedKey, verify_in_memory
from modelkeep.errors import ModelRefused
from modelkeep.runtime.loader import inspect_model
from modelkeep.runtime.signature import ModelSignature
from modelkeep.scanning import ScanReport, Verdict, scan_bytes

log = logging.getLogger(__name__)

# Formats a runtime can serve; everything else is refused even when the scan calls it safe.
SERVABLE_FORMATS = frozenset({"onnx", "skops", "xgboost-json", "xgboost-ubj", "lightgbm-text"})
TAR_FORMAT = "tar"
MAX_MEMBERS = 1000


@dataclass(frozen=True, slots=True)
class Accepted:
    """An artifact that passed every check, ready to be sealed."""

    files: Mapping[str, bytes]
    model_file: str
    format: str
    signature: ModelSignature
    signer: str | None
    report: ScanReport
    trusted_types: tuple[str, ...]


def unpack(data: bytes, file_name: str, *, is_directory: bool) -> dict[str, bytes]:
    """The files of an artifact: one file, or the members of an uploaded directory (a tar).

    A directory may hold only regular files with plain relative names: links, devices,
    absolute names, ``..`` and duplicates are refused.
    """
    if not is_directory:
        return {file_name: data}
    files: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
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
                if not member.isfile():
                    raise ModelRefused(f"the directory holds a special file ({_show(name)})")
                normal = posixpath.normpath(name)
                if name.startswith("/") or normal.startswith("..") or normal != name.lstrip("./"):
                    raise ModelRefused(f"the directory holds an unsafe file name ({_show(name)})")
                if normal in files:
                    raise ModelRefused(f"the directory names a file twice ({_show(name)})")
                extracted = tar.extractfile(member)
                assert extracted is not None
                files[normal] = extracted.read()
    except tarfile.TarError as exc:
        raise ModelRefused("the uploaded directory is not a valid tar archive") from exc
    if not files:
        raise ModelRefused("the uploaded directory is empty")
    return files


def accept(
    files: Mapping[str, bytes],
    *,
    bundle: bytes | None,
    trusted: Sequence[TrustedKey],
    require_signature: bool,
    model: str,
) -> Accepted:
    """Run every push check in order; ModelRefused (with the scan report where there is one)."""
    # 1. Signature first, against this model's trusted publishers only, offline.
    signer: str | None = None
    if bundle is not None:
        signer = verify_in_memory(files, bundle, trusted).signer
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
    # 2. Every file is scanned by content; any verdict but `safe` refuses the push.
    reports = {name: scan_bytes(data, name) for name, data in files.items()}
    for name, report in reports.items():
        if report.verdict is not Verdict.SAFE:
            worst = next(f for f in report.findings if f.severity.verdict is report.verdict)
            raise ModelRefused(
                f"the scan refused {_show(name)} ({report.verdict.value}): {worst.message}",
                details={"report": report.to_json()},
            )
    # 3. Exactly one file is the model a runtime serves; the others are signed companions.
    servable = [name for name, r in reports.items() if r.format in SERVABLE_FORMATS]
    if len(servable) != 1:
        raise ModelRefused(
            "a model must hold exactly one servable file (ONNX, skops, XGBoost JSON/UBJSON,"
            f" LightGBM text); found {len(servable)}"
        )
    model_file = servable[0]
    report = reports[model_file]
    trusted_types = report.trusted_types
    # 4. The runtime's own view of the model is its signature; a smoke run proves it loads.
    signature = inspect_model(report.format, files[model_file], trusted_types=trusted_types)
    return Accepted(
        files=files,
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
