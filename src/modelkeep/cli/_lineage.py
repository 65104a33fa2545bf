"""``versions bom|delete``, ``retention show|set``, ``drift show|set``, and
the ``--lineage`` file of ``push`` (docs/lifecycle.md); gates and approvals: ``_lifecycle.py``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from modelkeep.cli import _output as out
from modelkeep.cli._client import JSONObject, client_from
from modelkeep.cli._errors import exit_codes_epilog
from modelkeep.cli._params import JsonOption, check_name
from modelkeep.cli._policy_input import MAX_CALIBRATION_ROWS, read_rows
from modelkeep.errors import InvalidInput
from modelkeep.registry.lineage import MAX_LINEAGE_BYTES, parse_lineage

__all__ = [
    "CodeRevisionOption",
    "FrameworkOption",
    "LineageOption",
    "ParentVersionOption",
    "TagOption",
    "TrainingDataOption",
    "drift_app",
    "read_lineage",
    "retention_app",
    "versions_bom",
    "versions_delete",
]

EPILOG = exit_codes_epilog()

ModelArgument = Annotated[
    str, typer.Argument(metavar="MODEL", help="Model name.", callback=check_name)
]
VersionArgument = Annotated[
    int, typer.Argument(metavar="VERSION", help="Version number.", min=1, max=2**31 - 1)
]
YesOption = Annotated[
    bool, typer.Option("--yes", help="Confirm: this cannot be undone.", show_default=False)
]
LineageOption = Annotated[
    Path | None,
    typer.Option(
        "--lineage",
        metavar="FILE.json",
        help="Declared lineage to record with the version: training_data (digest, uri), "
        "code_revision, code_uri, frameworks, parent_version, tags, metrics; at most 8 KiB.",
        show_default=False,
    ),
]


CodeRevisionOption = Annotated[
    str | None,
    typer.Option(
        "--code-revision",
        metavar="REV",
        help="Lineage: the code revision (e.g. a commit).",
        show_default=False,
    ),
]
ParentVersionOption = Annotated[
    int | None,
    typer.Option(
        "--parent-version",
        metavar="N",
        min=1,
        help="Lineage: the version this one derives from.",
        show_default=False,
    ),
]
TrainingDataOption = Annotated[
    list[str] | None,
    typer.Option(
        "--training-data",
        metavar="sha256:HEX|URI",
        help="Lineage: a training data set, by digest or location (repeatable).",
        show_default=False,
    ),
]
FrameworkOption = Annotated[
    list[str] | None,
    typer.Option(
        "--framework",
        metavar="NAME=VERSION",
        help="Lineage: a framework used (repeatable).",
        show_default=False,
    ),
]
TagOption = Annotated[
    list[str] | None,
    typer.Option(
        "--tag",
        metavar="KEY=VALUE",
        help="Lineage: a free-form tag (repeatable).",
        show_default=False,
    ),
]


def _pairs(values: list[str] | None, option: str) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for value in values or []:
        key, sep, rest = value.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"use KEY=VALUE, not {value!r}", param_hint=f"'{option}'")
        pairs[key] = rest
    return pairs


def read_lineage(
    path: Path | None,
    *,
    code_revision: str | None = None,
    parent_version: int | None = None,
    training_data: list[str] | None = None,
    frameworks: list[str] | None = None,
    tags: list[str] | None = None,
) -> bytes | None:
    """The lineage to send: the file's, with the flags' values added over it; checked here as
    the server will check it (InvalidInput names the first problem)."""
    document: dict[str, Any] = {}
    if path is not None:
        try:
            with path.open("rb") as handle:
                data = handle.read(MAX_LINEAGE_BYTES + 1)
        except OSError as exc:
            reason = exc.strerror or "I/O error"
            raise InvalidInput(f"cannot read {out.clean(path)}: {reason}") from None
        document = parse_lineage(data).model_dump(exclude_none=True, exclude_defaults=True)
    if code_revision is not None:
        document["code_revision"] = code_revision
    if parent_version is not None:
        document["parent_version"] = parent_version
    for entry in training_data or []:
        field = "digest" if entry.startswith("sha256:") else "uri"
        document.setdefault("training_data", []).append({field: entry})
    for name, mapping in (
        ("frameworks", _pairs(frameworks, "--framework")),
        ("tags", _pairs(tags, "--tag")),
    ):
        if mapping:
            document[name] = {**document.get(name, {}), **mapping}
    if not document and path is None:
        return None
    return parse_lineage(json.dumps(document)).dumps().encode()


# -- versions and models --------------------------------------------------------------------


def versions_bom(
    ctx: typer.Context,
    model: ModelArgument,
    version: VersionArgument,
    output: Annotated[
        Path | None,
        typer.Option("-o", "--output", metavar="FILE", help="Write to FILE instead of stdout."),
    ] = None,
) -> None:
    """Print the CycloneDX 1.6 ML-BOM of VERSION of MODEL (JSON).

    It holds the digest, signature identity, scan verdict, metrics (in the model card),
    approvals and declared lineage; the server validates it against the CycloneDX 1.6 schema
    before sending it.

    Example: modelkeep versions bom iris 3 -o iris-3.cdx.json
    """
    with client_from(ctx.obj) as client:
        text = client.version_bom(model, str(version))
    if output is None:
        typer.echo(text)
    else:
        output.write_text(text + "\n", encoding="utf-8")
        out.say(f"wrote the bill of materials of {model} version {version} to {out.clean(output)}")


def versions_delete(
    ctx: typer.Context,
    model: ModelArgument,
    version: VersionArgument,
    yes: YesOption = False,
    json_output: JsonOption = False,
) -> None:
    """Delete VERSION of MODEL by crypto-shredding (admin; needs --yes).

    Its data key is destroyed, then its sealed blob: no copy of the blob (backup, replica) can
    be opened again. Refused while a label points at it. Its metadata stays, marked deleted.

    Example: modelkeep versions delete iris 2 --yes
    """
    if not yes:
        raise typer.BadParameter(
            "deleting a version cannot be undone: add --yes", param_hint="'--yes'"
        )
    with client_from(ctx.obj) as client:
        deleted = client.delete_version(model, str(version))
    if json_output:
        out.print_json(deleted)
        return
    out.say(
        f"deleted {model} version {version} (sha256 {out.clean(deleted.get('sha256'))}): data key "
        "destroyed, blob removed"
    )


# -- retention ------------------------------------------------------------------------------

retention_app = typer.Typer(
    help="Retention rules: keep the newest N versions, destroy captures after D days.",
    no_args_is_help=True,
)


def _say_rule(rule: JSONObject) -> None:
    keep, days = rule.get("keep_versions"), rule.get("capture_days")
    out.say(f"model: {out.clean(rule.get('model'))}")
    out.say(f"keep_versions: {'all' if keep is None else out.clean(keep)}")
    out.say(f"capture_days: {'per capture policy' if days is None else out.clean(days)}")


@retention_app.command("show", epilog=EPILOG)
def retention_show(
    ctx: typer.Context,
    model: ModelArgument,
    json_output: JsonOption = False,
) -> None:
    """Show the retention rule of MODEL.

    Example: modelkeep retention show iris
    """
    with client_from(ctx.obj) as client:
        rule = client.get_retention(model)
    if json_output:
        out.print_json(rule)
    else:
        _say_rule(rule)


@retention_app.command("set", epilog=EPILOG)
def retention_set(
    ctx: typer.Context,
    model: ModelArgument,
    keep_versions: Annotated[
        int | None,
        typer.Option(
            "--keep-versions",
            metavar="N",
            min=1,
            max=10_000,
            help="Keep the newest N versions; older unlabelled ones are crypto-shredded.",
            show_default=False,
        ),
    ] = None,
    capture_days: Annotated[
        int | None,
        typer.Option(
            "--capture-days",
            metavar="D",
            min=1,
            max=3650,
            help="Destroy captured payloads older than D days.",
            show_default=False,
        ),
    ] = None,
    clear: Annotated[bool, typer.Option("--clear", help="Remove the rule.")] = False,
    json_output: JsonOption = False,
) -> None:
    """Set the retention rule of MODEL (admin). The server applies it on a schedule
    (MODELKEEP_RETENTION_INTERVAL_S, hourly by default) and audits every deletion.

    Example: modelkeep retention set iris --keep-versions 5 --capture-days 30
    """
    if clear == (keep_versions is not None or capture_days is not None):
        raise typer.BadParameter("give --keep-versions and/or --capture-days, or --clear alone")
    with client_from(ctx.obj) as client:
        rule = client.put_retention(model, keep_versions=keep_versions, capture_days=capture_days)
    if json_output:
        out.print_json(rule)
    else:
        _say_rule(rule)


# -- drift ----------------------------------------------------------------------------------

drift_app = typer.Typer(
    help="Population drift of a model's inputs against its calibration reference.",
    no_args_is_help=True,
)


def _say_drift(status: JSONObject) -> None:
    out.say(f"model: {out.clean(status.get('model'))}")
    settings = status.get("settings")
    if not isinstance(settings, dict):
        out.say("drift: not monitored (run `modelkeep policy calibrate` or `drift set --benign`)")
        return
    for name in ("features", "reference_rows", "window", "psi_threshold", "ks_alpha"):
        out.say(f"{name}: {out.clean(settings.get(name))}")
    latest = status.get("latest")
    if not isinstance(latest, dict):
        out.say("latest: no full window yet")
        return
    out.say(
        f"latest: {'DRIFTING' if latest.get('drifted') else 'stable'} over "
        f"{out.clean(latest.get('rows'))} rows (PSI {out.clean(latest.get('psi'))}, KS "
        f"{out.clean(latest.get('ks_statistic'))}, {out.clean(latest.get('drifted_features'))} "
        "feature(s) rejected)"
    )


@drift_app.command("show", epilog=EPILOG)
def drift_show(
    ctx: typer.Context,
    model: ModelArgument,
    json_output: JsonOption = False,
) -> None:
    """Show MODEL's drift settings and the latest window's scores (the answering worker's).

    Example: modelkeep drift show iris
    """
    with client_from(ctx.obj) as client:
        status = client.get_drift(model)
    if json_output:
        out.print_json(status)
    else:
        _say_drift(status)


@drift_app.command("set", epilog=EPILOG)
def drift_set(
    ctx: typer.Context,
    model: ModelArgument,
    benign: Annotated[
        Path | None,
        typer.Option(
            "--benign",
            metavar="FILE",
            help="Refit the reference from benign rows (.npy, .csv or .json; at most "
            f"{MAX_CALIBRATION_ROWS} rows).",
            show_default=False,
        ),
    ] = None,
    window: Annotated[
        int | None,
        typer.Option(
            "--window",
            metavar="N",
            min=50,
            max=100_000,
            help="Rows per window.",
            show_default=False,
        ),
    ] = None,
    psi: Annotated[
        float | None,
        typer.Option(
            "--psi", metavar="X", help="PSI counted as drift (default 0.25).", show_default=False
        ),
    ] = None,
    ks_alpha: Annotated[
        float | None,
        typer.Option(
            "--ks-alpha", metavar="A", help="KS test level (default 0.01).", show_default=False
        ),
    ] = None,
    json_output: JsonOption = False,
) -> None:
    """Configure drift monitoring of MODEL (admin). `policy calibrate` also fits the reference.

    Example: modelkeep drift set iris --benign benign.npy --window 1000 --psi 0.2
    """
    body: JSONObject = {"window": window, "psi_threshold": psi, "ks_alpha": ks_alpha}
    if benign is not None:
        body["rows"] = read_rows(benign)
    with client_from(ctx.obj) as client:
        status = client.put_drift(model, body)
    if json_output:
        out.print_json(status)
    else:
        _say_drift(status)
