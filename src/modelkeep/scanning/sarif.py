"""A scan report as SARIF 2.1.0, the format CI code-scanning dashboards read.

One run per report. Each verdict that is not ``safe`` is a rule (``modelkeep/malicious``,
``modelkeep/unsafe-format``, ``modelkeep/unanalysable``, plus ``modelkeep/note`` for oddities
that change nothing), and each finding of severity low or worse is a result of its rule, located
in the file it was found in (``physicalLocation``) and, inside it, at the archive member, pickle
opcode or tensor the scanner names (``logicalLocations``). ``info`` findings say what was
checked, not what is wrong, and are left out. The verdict and its exit code are kept in the
run's ``properties`` and ``invocations``, so a dashboard and a script read the same answer.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import quote

from modelkeep import __version__
from modelkeep.scanning.report import Finding, ScanReport, Severity

__all__ = ["SARIF_SCHEMA", "SARIF_VERSION", "to_sarif"]

SARIF_VERSION = "2.1.0"
#: Where the SARIF 2.1.0 schema is published (named in the log, never fetched).
SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"

# (rule id, SARIF level, short description, help) for each severity that makes a result.
_RULES: Mapping[Severity, tuple[str, str, str, str]] = MappingProxyType(
    {
        Severity.CRITICAL: (
            "modelkeep/malicious",
            "error",
            "Content that can do harm when the model is loaded",
            "Do not load this file. Code execution on load, a path escaping its directory, or "
            "a resource bomb was found; exit code 1.",
        ),
        Severity.HIGH: (
            "modelkeep/unanalysable",
            "error",
            "A part no loader could read, or the scanner could not analyse",
            "The file is refused because a part of it could not be checked; exit code 3.",
        ),
        Severity.MEDIUM: (
            "modelkeep/unsafe-format",
            "warning",
            "A format that can run code when loaded (pickle-based)",
            "Refused by policy, nothing malicious found. Convert the model: scikit-learn to skops "
            "or ONNX, PyTorch weights to safetensors or ONNX; exit code 2.",
        ),
        Severity.LOW: (
            "modelkeep/note",
            "note",
            "An oddity that does not change the verdict",
            "For information: a damaged or unusual container that some loaders read anyway.",
        ),
    }
)
_ORDER = (Severity.CRITICAL, Severity.HIGH, Severity.MEDIUM, Severity.LOW)


def to_sarif(report: ScanReport, path: Path) -> dict[str, Any]:
    """``report`` (of the file or directory at ``path``) as a SARIF 2.1.0 log."""
    rules = [_rule(severity) for severity in _ORDER]
    results = [
        _result(finding, path, report.format == "directory" or path.is_dir())
        for finding in report.findings
        if finding.severity in _RULES
    ]
    return {
        "$schema": SARIF_SCHEMA,
        "version": SARIF_VERSION,
        "runs": [
            {
                "tool": {
                    "driver": {
                        "name": "modelkeep",
                        "version": __version__,
                        "rules": rules,
                    }
                },
                "invocations": [
                    {"executionSuccessful": True, "exitCode": report.exit_code},
                ],
                "results": results,
                "properties": {
                    "verdict": report.verdict.value,
                    "format": report.format,
                    "files": list(report.files),
                },
            }
        ],
    }


def _rule(severity: Severity) -> dict[str, Any]:
    rule_id, level, short, help_text = _RULES[severity]
    return {
        "id": rule_id,
        "name": rule_id.split("/", 1)[1].replace("-", " ").title().replace(" ", ""),
        "shortDescription": {"text": short},
        "help": {"text": help_text},
        "defaultConfiguration": {"level": level},
        "properties": {"severity": severity.value},
    }


def _result(finding: Finding, path: Path, directory: bool) -> dict[str, Any]:
    rule_id, level, _, _ = _RULES[finding.severity]
    return {
        "ruleId": rule_id,
        "ruleIndex": _ORDER.index(finding.severity),
        "level": level,
        "message": {"text": finding.message},
        "locations": [
            {
                "physicalLocation": {"artifactLocation": {"uri": _uri(finding, path, directory)}},
                "logicalLocations": [{"fullyQualifiedName": finding.location, "kind": "member"}],
            }
        ],
    }


def _uri(finding: Finding, path: Path, directory: bool) -> str:
    # A location starts with the file's own label ("model.pt > archive/data.pkl @ opcode 3");
    # in a directory scan the label is "<directory>/<relative path>".
    head = finding.location.split(" > ", 1)[0].split(" @ ", 1)[0]
    target = path
    if directory and "/" in head:
        target = path / head.split("/", 1)[1]
    return target.as_uri() if target.is_absolute() else quote(target.as_posix())
