"""``modelkeep scan PATH``: the malicious-model scanner on the command line, offline.

Its exit code is a contract scripts rely on, so it is the verdict's code and nothing else:
0 safe, 1 malicious, 2 unsafe-format, 3 error. Every other failure (no such path, an unreadable
file, a malformed command line) also exits 3 with one ``error:`` line on stderr, so that no
failure can be mistaken for a verdict that lets a model through.
"""

from __future__ import annotations

import enum
import textwrap
from pathlib import Path
from typing import Annotated, Any, cast

import typer
from typer.core import TyperCommand

from modelkeep.cli import _output as out
from modelkeep.cli._params import JsonOption
from modelkeep.errors import ModelkeepError
from modelkeep.scanning import EXIT_CODES, ScanReport, Verdict, scan_path
from modelkeep.scanning.sarif import to_sarif

__all__ = ["EPILOG", "OutputFormat", "ScanCommand", "scan"]

#: Any failure that is not a verdict: the same code as ``error``, which is refused too.
EXIT_SCAN_FAILED = EXIT_CODES[Verdict.ERROR]

EPILOG = (
    "Exit codes:\n\n"
    "0  safe: modelkeep would load it\n"
    "1  malicious: content that can do harm when loaded (code execution, processes, files, "
    "network, imports, attribute walking), a path escaping its directory, or a bomb\n"
    "2  unsafe-format: refused by policy, a pickle-based format that can run code when "
    "loaded, nothing malicious found; convert to skops, ONNX or safetensors\n"
    "3  error: no loader could read it, or it cannot be identified, or the path cannot be "
    "read; refused"
)

_MEANING = {
    Verdict.SAFE: "modelkeep would load it",
    Verdict.MALICIOUS: "do not load this file",
    Verdict.UNSAFE_FORMAT: "refused by format: it can run code when loaded; convert it",
    Verdict.ERROR: "no loader could read all of it; refused",
}
_SEVERITY_ORDER = ("critical", "high", "medium", "low", "info")
# typer ships its own copy of click; its UsageError (exit 2) is the base of BadParameter.
_UsageError = cast(type[Exception], typer.BadParameter.__base__)


class ScanCommand(TyperCommand):
    """A command whose malformed command line exits 3, not click's 2 (which means a verdict)."""

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: Any = None,
        **extra: Any,
    ) -> Any:
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except _UsageError as exc:
            message = getattr(exc, "format_message", lambda: "malformed command line")()
            out.error_line(f"{message} (usage: modelkeep scan PATH [--format text|json|sarif])")
            raise typer.Exit(EXIT_SCAN_FAILED) from None


class OutputFormat(enum.StrEnum):
    """How ``modelkeep scan`` prints its report."""

    TEXT = "text"
    JSON = "json"
    SARIF = "sarif"


def scan(
    path: Annotated[
        Path,
        typer.Argument(
            metavar="PATH",
            help="A model file, or a directory (every file in it is scanned).",
            show_default=False,
        ),
    ],
    json_output: JsonOption = False,
    output_format: Annotated[
        OutputFormat,
        typer.Option(
            "--format",
            help="text for people, json for scripts (as --json), sarif (2.1.0) for CI "
            "code-scanning dashboards.",
        ),
    ] = OutputFormat.TEXT,
) -> None:
    """Check a model file or directory for malicious content, without loading it.

    The format is identified by content, not by name. Pickle-based files (joblib, PyTorch,
    NumPy object arrays) are analysed opcode by opcode; archives are opened with limits. The
    exit code is the verdict's, whatever the output format.

    Example: modelkeep scan model.pt --format sarif > scan.sarif
    """
    if json_output and output_format not in (OutputFormat.TEXT, OutputFormat.JSON):
        out.error_line("--json and --format sarif ask for two outputs; give one")
        raise typer.Exit(EXIT_SCAN_FAILED)
    try:
        report = scan_path(path)
    except ModelkeepError as exc:
        out.error_line(f"{path}: {exc.message}")
        raise typer.Exit(EXIT_SCAN_FAILED) from None
    if json_output or output_format is OutputFormat.JSON:
        out.print_json(report.to_json())
    elif output_format is OutputFormat.SARIF:
        out.print_json(to_sarif(report, path))
    else:
        for line in describe(report):
            out.say(line)
    raise typer.Exit(report.exit_code)


def describe(report: ScanReport, width: int = 100) -> list[str]:
    """The report as lines for people: verdict first, then each finding, worst first."""
    lines = [
        f"verdict: {report.verdict.value} ({_MEANING[report.verdict]})",
        f"format:  {out.clean(report.format)}",
        f"files:   {len(report.files)} analysed",
    ]
    if report.trusted_types:
        lines.append(f"trusted: {out.clean(', '.join(report.trusted_types))}")
    findings = sorted(report.findings, key=lambda f: _SEVERITY_ORDER.index(f.severity.value))
    if findings:
        lines.append("")
    for finding in findings:
        lines.append(f"{finding.severity.value.upper():<9} {out.clean(finding.location)}")
        lines.extend(
            textwrap.wrap(
                out.clean(finding.message),
                width=width,
                initial_indent=" " * 10,
                subsequent_indent=" " * 10,
            )
        )
    lines.append("")
    lines.append(f"exit code {report.exit_code}")
    return lines
