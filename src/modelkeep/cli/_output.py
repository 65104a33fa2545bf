"""Everything the command line prints: JSON for scripts, tables and sentences for people.

Strings that came from the server are shown only after ``clean`` has escaped control and format
characters, so a hostile or broken server cannot move the cursor, recolour the terminal or hide
text. Tables use ``rich.text.Text`` cells so that brackets in a description are not read as rich
markup. Errors are one line on stderr.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterable, Mapping
from typing import Any

import typer
from rich.console import Console
from rich.filesize import decimal
from rich.table import Table
from rich.text import Text

JSONObject = dict[str, Any]

#: What a model that accepts unsigned pushes shows in the SIGNATURES column.
UNSAFE_OPTIONAL = "UNSAFE: optional"

_ISO_UTC = re.compile(r"(\d{4}-\d{2}-\d{2})T(\d{2}:\d{2}):\d{2}(?:\.\d+)?(?:Z|\+00:00)")


def clean(value: object) -> str:
    """``value`` as one printable line: control and invisible format characters are escaped."""
    text = str(value)
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode() for ch in text)


def print_json(data: Any) -> None:
    """Write ``data`` as JSON to stdout, for scripts."""
    typer.echo(json.dumps(data, indent=2, ensure_ascii=False))


def say(line: str = "") -> None:
    """Write one line for people to stdout, exactly as given (no wrapping, no markup)."""
    typer.echo(line)


def warn(line: str) -> None:
    """Write one line for people to stderr."""
    typer.echo(line, err=True)


def error_line(message: str) -> None:
    """The single ``error: <message>`` line every failure ends with."""
    typer.echo(f"error: {clean(' '.join(message.split()))}", err=True)


def stdout_console() -> Console:
    # Built per call: CliRunner and pipes swap sys.stdout, and a table must not be truncated
    # silently, so cells fold instead.
    return Console(file=sys.stdout, highlight=False)


def stderr_console() -> Console:
    return Console(file=sys.stderr, highlight=False)


def size_text(size: object) -> str:
    return decimal(size) if isinstance(size, int) and size >= 0 else clean(size)


def models_table(models: Iterable[JSONObject]) -> Table:
    """One row per model; SIGNATURES flags in red the models that accept unsigned pushes."""
    table = _table(
        "NAME",
        "LATEST",
        "LABELS~",
        "SIGNATURES",
        "PUBLISHERS",
        "CREATED BY",
        "CREATED AT",
        "DESCRIPTION~",
    )
    for model in models:
        publishers = model.get("publishers")
        table.add_row(
            _cell(model.get("name")),
            _cell(model.get("latest_version")),
            _cell(labels_text(model.get("labels"))),
            signatures_cell(model.get("require_signature")),
            _cell(len(publishers) if isinstance(publishers, list) else None),
            _cell(model.get("created_by")),
            _cell(time_text(model.get("created_at"))),
            _cell(model.get("description")),
        )
    return table


def signatures_cell(require_signature: object) -> Text:
    """``required``, or a red ``UNSAFE: optional`` for a model that takes unsigned pushes."""
    if require_signature is True:
        return Text("required")
    if require_signature is False:
        return Text(UNSAFE_OPTIONAL, style="bold red")
    return Text("")  # an older server that does not say


def short_fingerprint(fingerprint: object) -> str:
    """A key fingerprint as a table shows it: its first twelve hex digits, or ``unsigned``.

    Every fingerprint is ``sha256:<hex>``, so the prefix is left out, as for the SHA256 column;
    any other algorithm keeps its name.
    """
    if not isinstance(fingerprint, str):
        return "unsigned" if fingerprint is None else clean(fingerprint)
    algorithm, _, digest = fingerprint.partition(":")
    if not digest:
        return clean(fingerprint[:12])
    return clean(digest[:12] if algorithm == "sha256" else f"{algorithm}:{digest[:12]}")


def versions_table(versions: Iterable[JSONObject], labels: Mapping[str, Any]) -> Table:
    """One row per version; ``labels`` (label -> version) fills the LABELS column."""
    by_version: dict[Any, list[str]] = {}
    for label, number in sorted(labels.items()):
        by_version.setdefault(number, []).append(label)
    versions = list(versions)
    # The EVAL column only for a model with an evaluation set (docs/lifecycle.md).
    evaluated = any(isinstance(v.get("evaluation"), dict) for v in versions)
    columns = ["VERSION", "LABELS~", "SIZE", "SHA256", "SIGNER", "UPLOADED BY", "CREATED AT"]
    table = _table(*columns, *(["EVAL"] if evaluated else []))
    for version in versions:
        number = version.get("version")
        sha = version.get("sha256")
        evaluation = version.get("evaluation")
        # The verdict only: metrics are in `modelkeep eval show` (a table must fit 80 columns).
        verdict = evaluation.get("status") if isinstance(evaluation, dict) else None
        extra = [_cell(verdict)] if evaluated else []
        table.add_row(
            _cell(number),
            # A crypto-shredded version has no labels: the column says it is gone.
            _cell(
                "(deleted)" if version.get("deleted_at") else ", ".join(by_version.get(number, []))
            ),
            _cell(size_text(version.get("size"))),
            # Twelve hex digits identify a version to a person, as short commit ids do.
            _cell(sha[:12] if isinstance(sha, str) else sha),
            _cell(short_fingerprint(version.get("signer")) if "signer" in version else None),
            _cell(version.get("uploaded_by")),
            _cell(time_text(version.get("created_at"))),
            *extra,
        )
    return table


def evaluation_text(evaluation: object) -> str:
    """``passed (accuracy 0.9733, f1 0.9733)``: a version's gate verdict and metrics."""
    if not isinstance(evaluation, dict):
        return ""
    status = clean(evaluation.get("status"))
    metrics = evaluation.get("metrics")
    shown = ""
    if isinstance(metrics, dict):
        shown = ", ".join(
            f"{clean(name)} {value:.4f}"
            for name, value in sorted(metrics.items())
            if isinstance(value, int | float)
        )
    return f"{status} ({shown})" if shown else status


def publishers_table(publishers: Iterable[JSONObject]) -> Table:
    """Full fingerprints: they are what ``publishers rm`` takes."""
    table = _table("FINGERPRINT")
    for publisher in publishers:
        table.add_row(_cell(publisher.get("fingerprint")))
    return table


def report_lines(report: Mapping[str, Any]) -> list[str]:
    """A scan report for people: a summary line, then one line per finding, worst first."""
    lines = [
        f"scan report: verdict {clean(report.get('verdict', '?'))}, "
        f"format {clean(report.get('format', '?'))}"
    ]
    findings = report.get("findings")
    for finding in findings if isinstance(findings, list) else []:
        if not isinstance(finding, Mapping):
            continue
        severity = clean(finding.get("severity", "?"))
        location = clean(finding.get("location") or "-")
        message = clean(" ".join(str(finding.get("message", "")).split()))
        lines.append(f"  {severity:<8}  {location}: {message}")
    return lines


def keys_table(keys: Iterable[JSONObject]) -> Table:
    table = _table("ID", "ROLE", "MODELS~", "STATUS", "EXPIRES", "DESCRIPTION~")
    for key in keys:
        table.add_row(
            _cell(key.get("id")),
            _cell(key.get("role")),
            _cell(models_text(key.get("models"))),
            _cell("revoked" if key.get("revoked_at") else "active"),
            _cell(time_text(key.get("expires_at")) or "never"),
            _cell(key.get("description")),
        )
    return table


def time_text(value: object) -> str:
    """An API timestamp as a person reads it in a table: ``2026-11-25 18:00`` (UTC)."""
    if value is None:
        return ""
    text = clean(value)
    match = _ISO_UTC.fullmatch(text)
    return f"{match.group(1)} {match.group(2)}" if match else text


def labels_text(labels: object) -> str:
    if not isinstance(labels, Mapping) or not labels:
        return ""
    return ", ".join(f"{name}={labels[name]}" for name in sorted(labels))


def models_text(models: object) -> str:
    """How a key's scope reads: ``null`` means every model."""
    if models is None:
        return "all"
    if isinstance(models, list):
        return ", ".join(str(name) for name in models) or "none"
    return str(models)


def describe_key(key: JSONObject) -> list[str]:
    """A key's fields as ``name: value`` lines, for whoami, create and revoke."""
    lines = [
        f"id:          {clean(key.get('id'))}",
        f"role:        {clean(key.get('role'))}",
        f"models:      {clean(models_text(key.get('models')))}",
        f"expires:     {clean(key.get('expires_at') or 'never')}",
        f"created:     {clean(key.get('created_at'))}",
    ]
    if key.get("revoked_at"):
        lines.append(f"revoked:     {clean(key.get('revoked_at'))}")
    if key.get("description"):
        lines.append(f"description: {clean(key.get('description'))}")
    return lines


#: The order in which ``policy_lines`` lists a policy's limits; others follow by name.
_LIMIT_ORDER = ("rate", "row_rate", "model_rate", "concurrency", "max_rows")


def policy_lines(policy: Mapping[str, Any]) -> list[str]:
    """A guard policy as ``name: value`` lines, for ``policy show``, ``set`` and ``calibrate``.

    Every field the API defines is shown, an unset one as ``none`` or ``default``, so that a
    person reads the whole policy in force, not only what was changed.
    """
    limits = policy.get("limits")
    limits = limits if isinstance(limits, Mapping) else {}
    names = [n for n in _LIMIT_ORDER if n in limits]
    names += sorted(str(n) for n in limits if n not in _LIMIT_ORDER and n != "budget")
    shown = [f"{name} {limits[name]}" for name in names if limits[name] is not None]
    budget = limits.get("budget")
    output_for = policy.get("output_for")
    overrides = (
        ", ".join(f"{role}={output_for[role]}" for role in sorted(output_for))
        if isinstance(output_for, Mapping)
        else ""
    )
    detect = policy.get("detect")
    detectors = ", ".join(str(d) for d in detect) if isinstance(detect, list) else ""
    threshold = policy.get("prada_threshold")
    fitted = isinstance(policy.get("ood_reference"), Mapping)
    lines = [
        ("limits", ", ".join(shown) or "none"),
        ("budget", f"{budget} (rows per key)" if budget is not None else "none"),
        ("output", policy.get("output", "full")),
        ("output for", overrides or "no role overrides"),
        ("detect", detectors or "none"),
        ("on alarm", policy.get("on_alarm", "log")),
        ("prada threshold", "default" if threshold is None else _number_text(threshold)),
        ("ood reference", "fitted" if fitted else "not fitted"),
    ]
    return [clean(f"{name + ':':<17} {value}") for name, value in lines]


def restrictions_table(restrictions: Iterable[Mapping[str, Any]]) -> Table:
    """One row per key a detector blocked or throttled: what ``policy unblock`` takes."""
    table = _table("KEY", "KIND", "REASON~")
    for restriction in restrictions:
        table.add_row(
            _cell(restriction.get("key")),
            _cell(restriction.get("kind")),
            _cell(restriction.get("reason")),
        )
    return table


def _number_text(value: object) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return clean(value)


def _table(*columns: str) -> Table:
    """A borderless table; a heading ending in ``~`` marks a column that may wrap.

    Ids, names, numbers and times are never wrapped, so a narrow terminal squeezes free text
    first and what a person copies into the next command stays on one line.
    """
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in columns:
        if column.endswith("~"):
            table.add_column(column[:-1], overflow="fold", ratio=1, min_width=len(column) - 1)
        else:
            table.add_column(column, no_wrap=True)
    return table


def _cell(value: object) -> Text:
    return Text("" if value is None else clean(value))


def table(*columns: str) -> Table:
    """A table as every command prints it (see ``_table``), for command modules."""
    return _table(*columns)


def cell(value: object) -> Text:
    """A cleaned table cell."""
    return _cell(value)
