"""What a scan says: a verdict, the findings that justify it, and the limits it ran under.

The verdict is a contract that scripts rely on through the exit code of ``modelkeep scan``:

    verdict         exit  meaning
    safe            0     modelkeep would load it
    malicious       1     only content that can do harm when loaded: code execution on load,
                          a path escaping its directory, or a resource bomb
    unsafe-format   2     refused by policy: a (pickle-based) format that can run code when
                          loaded, nothing malicious found; the finding says how to convert
    error           3     only what no loader could read either, or cannot be identified

Every finding has a severity, and each severity stands for one verdict:

    severity   verdict          used for
    info       safe             what was checked, approved types, notes
    low        safe             oddities that change nothing
    medium     unsafe-format    a format or feature that can run code when loaded
    high       error            a part no reader could load, or not identified or analysed
    critical   malicious        evidence of an attack or a bomb

The verdict of a report is the worst verdict among its findings, with ``error`` ranked above
``unsafe-format``: a part the scanner could not analyse may hide anything.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType
from typing import Any

from modelkeep.errors import ConfigError

__all__ = [
    "EXIT_CODES",
    "Finding",
    "ScanLimits",
    "ScanReport",
    "Severity",
    "Verdict",
]


class Verdict(StrEnum):
    """The outcome of a scan; only ``SAFE`` lets a model be loaded."""

    SAFE = "safe"
    MALICIOUS = "malicious"
    UNSAFE_FORMAT = "unsafe-format"
    ERROR = "error"

    @property
    def rank(self) -> int:
        """How bad the verdict is: safe 0 < unsafe-format 1 < error 2 < malicious 3."""
        return _RANK[self]


_RANK: Mapping[Verdict, int] = MappingProxyType(
    {Verdict.SAFE: 0, Verdict.UNSAFE_FORMAT: 1, Verdict.ERROR: 2, Verdict.MALICIOUS: 3}
)

#: The exit code of ``modelkeep scan`` for each verdict.
EXIT_CODES: Mapping[Verdict, int] = MappingProxyType(
    {Verdict.SAFE: 0, Verdict.MALICIOUS: 1, Verdict.UNSAFE_FORMAT: 2, Verdict.ERROR: 3}
)


class Severity(StrEnum):
    """How serious one finding is; each severity maps to one verdict (see the module text)."""

    INFO = "info"
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"
    CRITICAL = "critical"

    @property
    def verdict(self) -> Verdict:
        """The verdict a report gets when this is its worst finding."""
        return _VERDICT_BY_SEVERITY[self]


_VERDICT_BY_SEVERITY: Mapping[Severity, Verdict] = MappingProxyType(
    {
        Severity.INFO: Verdict.SAFE,
        Severity.LOW: Verdict.SAFE,
        Severity.MEDIUM: Verdict.UNSAFE_FORMAT,
        Severity.HIGH: Verdict.ERROR,
        Severity.CRITICAL: Verdict.MALICIOUS,
    }
)


@dataclass(frozen=True)
class Finding:
    """One observation. ``location`` says where (``model.pt > archive/data.pkl @ opcode 42``);
    ``message`` says what was found and what a person should do about it."""

    severity: Severity
    location: str
    message: str

    def to_json(self) -> dict[str, Any]:
        return {"severity": self.severity.value, "location": self.location, "message": self.message}


@dataclass(frozen=True)
class ScanReport:
    """The result of scanning one file or directory.

    ``format`` is what the content is (``onnx``, ``pickle``, ``pytorch-zip``, ``zip``, ...,
    ``directory`` for a directory of mixed files, ``unknown``); ``files`` lists every file and
    archive member that was analysed; ``trusted_types`` are the skops types the scan approved
    beyond skops' own defaults, exactly what the skops runtime may pass as ``trusted``.
    """

    verdict: Verdict
    format: str
    findings: tuple[Finding, ...]
    files: tuple[str, ...]
    trusted_types: tuple[str, ...] = ()

    @classmethod
    def from_findings(
        cls,
        format: str,
        findings: Iterable[Finding],
        files: Iterable[str],
        trusted_types: Iterable[str] = (),
    ) -> ScanReport:
        """A report whose verdict is the worst of ``findings`` (``safe`` when there are none)."""
        found = tuple(findings)
        verdict = max((f.severity.verdict for f in found), key=_RANK.__getitem__, default=None)
        return cls(
            verdict=verdict or Verdict.SAFE,
            format=format,
            findings=found,
            files=tuple(files),
            trusted_types=tuple(trusted_types),
        )

    @property
    def exit_code(self) -> int:
        """The process exit code of ``modelkeep scan`` for this report (:data:`EXIT_CODES`)."""
        return EXIT_CODES[self.verdict]

    def to_json(self) -> dict[str, Any]:
        """The report as plain JSON types, worst findings first, for scripts and the API."""
        ordered = sorted(self.findings, key=lambda f: -_SEVERITY_ORDER[f.severity])
        return {
            "verdict": self.verdict.value,
            "exit_code": self.exit_code,
            "format": self.format,
            "findings": [finding.to_json() for finding in ordered],
            "files": list(self.files),
            "trusted_types": list(self.trusted_types),
        }


_SEVERITY_ORDER: Mapping[Severity, int] = MappingProxyType(
    {severity: index for index, severity in enumerate(Severity)}
)


@dataclass(frozen=True)
class ScanLimits:
    """The bounds a scan works within; exceeding one is a finding, never a crash or a hang.

    The defaults suit a server that scans every push in memory.
    """

    #: Total bytes the scan may unpack: decompressed archive members and compressed streams
    #: (joblib, gzip...). Members stored without compression are read in place and not counted.
    #: An archive declaring more, or a stream found inflating past it (decompression stops
    #: there), is a decompression bomb. Compression ratios are not judged: a small, very
    #: compressible member (a zero-initialised tensor) is fine.
    max_total_bytes: int = 8 * 1024**3
    #: Members one archive may hold (zip, tar, 7z, HDF5 objects).
    max_members: int = 10_000
    #: How deep containers may nest: archives in archives, compressed streams, embedded pickles.
    max_depth: int = 4
    #: Largest element count one declared tensor may have (ONNX, safetensors, GGUF, NumPy,
    #: PyTorch): 2**32 elements is 16 GiB of float32.
    max_tensor_elements: int = 2**32
    #: Largest element count an operator may allocate from constant inputs (ONNX
    #: ConstantOfShape, Expand, Tile, Range, Resize...), alone or all together: 2**28 elements
    #: is 1 GiB of float32.
    max_alloc_elements: int = 2**28

    def __post_init__(self) -> None:
        for name in (
            "max_total_bytes",
            "max_members",
            "max_depth",
            "max_tensor_elements",
            "max_alloc_elements",
        ):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ConfigError(f"ScanLimits.{name} must be a positive integer")
