"""The ``modelkeep`` commands that talk to a running server through the management API.

Every command opens one ``ApiClient`` for its own duration and prints either text for people or,
with ``--json``, exactly the API's objects for scripts. Failures are not handled here: they raise
``ModelkeepError`` and ``_Group.invoke`` turns each into one ``error:`` line and its exit code.
The server-side commands (``init``, ``serve``) live in ``_server`` and import their heavy
dependencies only when run.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Annotated, Any

import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from typer.core import TyperGroup

from modelkeep.cli import (
    _audit,
    _canary,
    _kek,
    _lifecycle,
    _lineage,
    _models,
    _policy,
    _scan,
    _server,
    _sign,
)
from modelkeep.cli import _output as out
from modelkeep.cli._client import (
    DEFAULT_URL,
    PUSH_READ_TIMEOUT_S,
    PUSH_RETRIES,
    ApiClient,
    ClientOverrides,
    Connection,
    Invocation,
    JSONObject,
    client_from,
)
from modelkeep.cli._errors import (
    EXIT_FAILURE,
    SEE_EXIT_CODES,
    exit_code_for,
    exit_codes_epilog,
)
from modelkeep.cli._params import (
    CacertOption,
    JsonOption,
    TokenOption,
    UrlOption,
    check_name,
    check_names,
    parse_expires,
)
from modelkeep.errors import ModelkeepError, ModelRefused

#: Push reads and sends the model in pieces of this size, so no file is ever held in memory.
CHUNK_SIZE = 1024 * 1024

EPILOG = SEE_EXIT_CODES


class _Group(TyperGroup):
    """The root group: the one place where failures become an ``error:`` line and an exit code."""

    def invoke(self, ctx: typer.Context) -> Any:  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, typer.TyperException, BrokenPipeError):
            raise  # typer's own signals: help, usage errors (exit 2), Ctrl-C
        except ModelkeepError as exc:
            out.error_line(exc.message)
            raise typer.Exit(exit_code_for(exc)) from None
        except Exception as exc:
            if os.environ.get("MODELKEEP_DEBUG"):
                raise
            out.error_line(
                f"unexpected {type(exc).__name__}: {exc} "
                "(set MODELKEEP_DEBUG=1 to see where it happened)"
            )
            raise typer.Exit(EXIT_FAILURE) from None


app = typer.Typer(
    name="modelkeep",
    cls=_Group,
    help="modelkeep: a secure model server. Push models, move labels, manage API keys.",
    # The one full table of exit codes; each command's help points here.
    epilog=exit_codes_epilog(),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
versions_app = typer.Typer(
    help="List the versions of a model, export their bill of materials, delete them.",
    no_args_is_help=True,
)
label_app = typer.Typer(
    help="Point labels (production, staging...) at versions; protect, roll back, show history.",
    no_args_is_help=True,
)
keys_app = typer.Typer(help="Create, list and revoke API keys.", no_args_is_help=True)
app.add_typer(_models.models_app, name="models")
app.add_typer(versions_app, name="versions")
app.add_typer(label_app, name="label")
app.add_typer(keys_app, name="keys")
app.add_typer(_models.publishers_app, name="publishers")
app.add_typer(_policy.policy_app, name="policy")
app.add_typer(_kek.kek_app, name="kek")
versions_app.command("bom", epilog=EPILOG)(_lineage.versions_bom)
versions_app.command("delete", epilog=EPILOG)(_lineage.versions_delete)
app.add_typer(_lineage.retention_app, name="retention")
app.add_typer(_lineage.drift_app, name="drift")
app.add_typer(_lifecycle.eval_app, name="eval")
app.add_typer(_lifecycle.changes_app, name="changes")
app.add_typer(_canary.canary_app, name="canary")
label_app.command("protect", epilog=EPILOG)(_lifecycle.label_protect)
label_app.command("rollback", epilog=EPILOG)(_lifecycle.label_rollback)
label_app.command("history", epilog=EPILOG)(_lifecycle.label_history)


@app.callback()
def connection_options(
    ctx: typer.Context,
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = None,
    cacert: CacertOption = None,
) -> None:
    """Where the server is, given once for every command that talks to it."""
    overrides = ctx.obj if isinstance(ctx.obj, ClientOverrides) else ClientOverrides()
    ctx.obj = Invocation(Connection(url=url, token=token, cacert=cacert), overrides)


ModelArgument = Annotated[str, typer.Argument(help="Model name.", callback=check_name)]
LabelArgument = Annotated[str, typer.Argument(help="Label name.", callback=check_name)]


# -- push -------------------------------------------------------------------------------------

SignatureOption = Annotated[
    Path | None,
    typer.Option(
        "--signature",
        metavar="SIG",
        help="The signature of PATH, written by `modelkeep sign` or `model_signing sign key`.",
        show_default=False,
    ),
]
SignKeyOption = Annotated[
    Path | None,
    typer.Option(
        "--sign-key",
        metavar="KEY",
        help="Sign PATH with this private key (PEM) now, as `modelkeep sign` does, and send that.",
        show_default=False,
    ),
]


@app.command(epilog=EPILOG)
def push(
    ctx: typer.Context,
    model: ModelArgument,
    path: Annotated[
        Path,
        typer.Argument(
            metavar="PATH",
            help="The model: one file, or a directory (sent as a tar of its files).",
            show_default=False,
        ),
    ],
    signature: SignatureOption = None,
    sign_key: SignKeyOption = None,
    lineage: _lineage.LineageOption = None,
    code_revision: _lineage.CodeRevisionOption = None,
    parent_version: _lineage.ParentVersionOption = None,
    training_data: _lineage.TrainingDataOption = None,
    framework: _lineage.FrameworkOption = None,
    tag: _lineage.TagOption = None,
    json_output: JsonOption = False,
) -> None:
    """Upload PATH, with its signature, as the next version of MODEL (create MODEL first).

    Without --signature or --sign-key the push is unsigned, and refused unless an admin let
    MODEL accept unsigned pushes.

    Example: modelkeep push iris iris.onnx --signature iris.onnx.sig
    """
    if signature is not None and sign_key is not None:
        raise typer.BadParameter(
            "give --signature or --sign-key, not both", param_hint="'--signature'"
        )
    declared = _lineage.read_lineage(
        lineage,
        code_revision=code_revision,
        parent_version=parent_version,
        training_data=training_data,
        frameworks=framework,
        tags=tag,
    )
    with client_from(ctx.obj, read_timeout=PUSH_READ_TIMEOUT_S) as client:
        bundle = _models.push_signature(path, signature=signature, sign_key=sign_key)
        with _models.open_artifact(path, leave_out=signature) as artifact:
            try:
                if json_output:
                    chunks = _chunks(artifact.handle)
                    version = _send(client, model, artifact, bundle, chunks, declared)
                    out.print_json(version)
                    return
                version = _push_with_progress(client, model, artifact, bundle, declared)
            except ModelRefused as exc:
                report = _models.refused_report(exc)
                if report is not None and not json_output:
                    for line in out.report_lines(report):
                        out.warn(line)
                raise
    number = out.clean(version.get("version"))
    out.say(
        f"pushed {out.clean(version.get('model', model))} version {number} "
        f"({out.size_text(version.get('size'))}, sha256 {out.clean(version.get('sha256'))})"
    )
    signer = version.get("signer")
    if isinstance(signer, str):
        out.say(f"signed by {out.clean(signer)}")
    elif "signer" in version:
        out.warn(f"warning: version {number} is unsigned: model {model} accepts unsigned pushes")
    out.say(_policy.pushed_note(model))
    out.say(f"point a label at it: modelkeep label set {model} production {number}")


def _send(
    client: ApiClient,
    model: str,
    artifact: _models.Artifact,
    bundle: bytes | None,
    chunks: Callable[[], Iterator[bytes]],
    lineage: bytes | None = None,
) -> JSONObject:
    # One fresh key per `modelkeep push`, the same for each of its retries.
    return client.push(
        model,
        chunks,
        file_name=artifact.file_name,
        layout=artifact.layout,
        size=artifact.size,
        signature=bundle,
        idempotency_key=str(uuid.uuid4()),
        # A pipe cannot be read twice: it is sent once.
        retries=PUSH_RETRIES if artifact.handle.seekable() else 0,
        lineage=lineage,
    )


def _chunks(handle: IO[bytes]) -> Callable[[], Iterator[bytes]]:
    """The upload from its start, each time it is called (a retry reads the file again)."""
    start = handle.tell() if handle.seekable() else 0

    def chunks() -> Iterator[bytes]:
        if handle.seekable():
            handle.seek(start)
        while chunk := handle.read(CHUNK_SIZE):
            yield chunk

    return chunks


def _push_with_progress(
    client: ApiClient,
    model: str,
    artifact: _models.Artifact,
    bundle: bytes | None,
    lineage: bytes | None = None,
) -> JSONObject:
    console = out.stderr_console()
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        # A log file or CI output gets the result line only, not redraws of a bar.
        disable=not console.is_terminal,
    )
    read = _chunks(artifact.handle)
    with progress:
        task = progress.add_task(f"pushing {model}", total=artifact.size)

        def chunks() -> Iterator[bytes]:
            progress.reset(task, description=f"pushing {model}")
            for chunk in read():
                yield chunk
                progress.advance(task, len(chunk))
            # The answer comes after the server has scanned, encrypted and smoke-tested it.
            progress.update(task, description=f"{model}: server is checking the model")

        return _send(client, model, artifact, bundle, chunks, lineage)


# -- models, versions, labels -----------------------------------------------------------------


@versions_app.command("ls", epilog=EPILOG)
def versions_ls(
    ctx: typer.Context,
    model: ModelArgument,
    json_output: JsonOption = False,
) -> None:
    """List the versions of MODEL, oldest first.

    Example: modelkeep versions ls iris
    """
    with client_from(ctx.obj) as client:
        versions = client.list_versions(model)
        if json_output:
            out.print_json(versions)
            return
        labels = client.get_model(model).get("labels")
    if not versions:
        out.say(f"{model} has no versions")
        return
    table = out.versions_table(versions, labels if isinstance(labels, dict) else {})
    out.stdout_console().print(table)


@label_app.command("set", epilog=EPILOG)
def label_set(
    ctx: typer.Context,
    model: ModelArgument,
    label: LabelArgument,
    version: Annotated[
        int | None,
        typer.Argument(help="Version number (not with --shadow).", min=1, show_default=False),
    ] = None,
    canary: Annotated[
        float | None,
        typer.Option(
            "--canary",
            metavar="PCT",
            help="Do not move LABEL: serve PCT% of its callers (sticky per caller) from VERSION.",
            show_default=False,
        ),
    ] = None,
    max_error_rate: Annotated[
        float | None,
        typer.Option(
            "--max-error-rate",
            metavar="RATE",
            help="Canary: roll back when more than this share (0-1) of its runs fail.",
            show_default=False,
        ),
    ] = None,
    max_p99_ms: Annotated[
        float | None,
        typer.Option(
            "--max-p99-ms",
            metavar="MS",
            help="Canary: roll back when its p99 latency exceeds this.",
            show_default=False,
        ),
    ] = None,
    min_agreement: Annotated[
        float | None,
        typer.Option(
            "--min-agreement",
            metavar="RATE",
            help="Canary: roll back when its top-1 agreement with the primary falls below this.",
            show_default=False,
        ),
    ] = None,
    min_requests: Annotated[
        int,
        typer.Option(
            "--min-requests", metavar="N", help="Canary: requests before it is judged.", min=1
        ),
    ] = 20,
    window: Annotated[
        float,
        typer.Option("--window", metavar="SECONDS", help="Canary: the window judged."),
    ] = 300.0,
    shadow: Annotated[
        int | None,
        typer.Option(
            "--shadow",
            metavar="VERSION",
            help="Do not move LABEL: mirror a sample of its requests to VERSION off the "
            "request path (compared, never returned).",
            min=1,
            show_default=False,
        ),
    ] = None,
    sample: Annotated[
        float,
        typer.Option("--sample", metavar="PCT", help="Shadow: percent of requests mirrored."),
    ] = 100.0,
    json_output: JsonOption = False,
) -> None:
    """Point LABEL of MODEL at VERSION (creating or moving the label), or start a canary or
    a shadow on it.

    A protected label is not moved at once: a change request is opened that other keys
    approve (see `modelkeep changes`); so is a canary on it.

    Examples: modelkeep label set iris production 3;
    modelkeep label set iris production 4 --canary 10 --max-error-rate 0.05;
    modelkeep label set iris production --shadow 5 --sample 20
    """
    if canary is not None or shadow is not None:
        thresholds = {
            "max_error_rate": max_error_rate,
            "max_p99_ms": max_p99_ms,
            "min_agreement": min_agreement,
            "min_requests": min_requests,
            "window_s": window,
        }
        _canary.start(
            ctx,
            model,
            label,
            version,
            canary=canary,
            shadow=shadow,
            sample=sample,
            thresholds=thresholds,
            json_output=json_output,
        )
        return
    if version is None:
        raise typer.BadParameter("give the VERSION to point the label at")
    with client_from(ctx.obj) as client:
        answer = client.set_label(model, label, version)
    if json_output:
        out.print_json(answer)
        return
    if "approvals_needed" in answer:  # a protected label: a change request was opened
        _lifecycle.say_change(answer)
        return
    out.say(
        f"{out.clean(answer.get('model', model))}: label {out.clean(answer.get('label', label))} "
        f"-> version {out.clean(answer.get('version', version))}"
    )


@label_app.command("rm", epilog=EPILOG)
def label_rm(
    ctx: typer.Context,
    model: ModelArgument,
    label: LabelArgument,
    json_output: JsonOption = False,
) -> None:
    """Remove LABEL from MODEL; the version it pointed at stays.

    Example: modelkeep label rm iris staging
    """
    with client_from(ctx.obj) as client:
        client.remove_label(model, label)
    if json_output:
        out.print_json({"model": model, "label": label})
    else:
        out.say(f"{model}: label {label} removed")


# -- keys -------------------------------------------------------------------------------------


@keys_app.command("create", epilog=EPILOG)
def keys_create(
    ctx: typer.Context,
    role: Annotated[
        str,
        typer.Option(
            metavar="ROLE",
            help="Built-in roles: admin, publisher, approver, consumer, auditor.",
            show_default=False,
        ),
    ],
    model: Annotated[
        list[str] | None,
        typer.Option(
            "--model",
            metavar="MODEL",
            help="Limit the key to this model; repeat for more. Default: every model.",
            callback=check_names,
            show_default=False,
        ),
    ] = None,
    expires: Annotated[
        str | None,
        typer.Option(
            metavar="WHEN",
            help="A duration (30d, 12h, 90m) or an ISO 8601 datetime (UTC unless an offset "
            "is given). Default: never.",
            show_default=False,
        ),
    ] = None,
    description: Annotated[str, typer.Option(metavar="TEXT", help="What the key is for.")] = "",
    json_output: JsonOption = False,
) -> None:
    """Create an API key; its secret is printed once and cannot be shown again.

    Example: modelkeep keys create --role consumer --model iris --expires 30d
    """
    expires_at = None
    if expires is not None:
        try:
            expires_at = parse_expires(expires, now=datetime.now(UTC))
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="'--expires'") from exc
    with client_from(ctx.obj) as client:
        key = client.create_key(
            role=role, models=model, expires_at=expires_at, description=description
        )
    if json_output:
        out.print_json(key)
        return
    out.say(f"created key {out.clean(key.get('id'))}")
    for line in out.describe_key(key)[1:]:
        out.say(f"  {line}")
    out.say()
    out.say(f"    {out.clean(key.get('key'))}")
    out.say()
    out.warn("warning: this key is shown only once and cannot be recovered; store it now.")


@keys_app.command("ls", epilog=EPILOG)
def keys_ls(
    ctx: typer.Context,
    json_output: JsonOption = False,
) -> None:
    """List every API key (never their secrets).

    Example: modelkeep keys ls
    """
    with client_from(ctx.obj) as client:
        keys = client.list_keys()
    if json_output:
        out.print_json(keys)
    elif not keys:
        out.say("no keys")
    else:
        out.stdout_console().print(out.keys_table(keys))


@keys_app.command("revoke", epilog=EPILOG)
def keys_revoke(
    ctx: typer.Context,
    key_id: Annotated[str, typer.Argument(metavar="ID", help="The key's id (see keys ls).")],
    json_output: JsonOption = False,
) -> None:
    """Revoke a key; every server refuses it within a second.

    Example: modelkeep keys revoke abcdefgh2345
    """
    with client_from(ctx.obj) as client:
        key = client.revoke_key(key_id)
    if json_output:
        out.print_json(key)
        return
    out.say(f"revoked key {out.clean(key.get('id', key_id))}")
    for line in out.describe_key(key)[1:]:
        out.say(f"  {line}")


@app.command(epilog=EPILOG)
def whoami(
    ctx: typer.Context,
    json_output: JsonOption = False,
) -> None:
    """Show the key in use: its id, role, models and expiry.

    Example: modelkeep whoami
    """
    with client_from(ctx.obj) as client:
        key = client.whoami()
    if json_output:
        out.print_json(key)
        return
    for line in out.describe_key(key):
        out.say(line)


# -- server side ------------------------------------------------------------------------------

app.command(name="init", epilog=EPILOG, rich_help_panel="Server")(_server.init)
app.command(name="serve", epilog=EPILOG, rich_help_panel="Server")(_server.serve)
app.add_typer(_audit.audit_app, name="audit", rich_help_panel="Server")
app.add_typer(_server.tls_app, name="tls", rich_help_panel="Server")
app.add_typer(_server.db_app, name="db", rich_help_panel="Server")
app.command(name="sign", epilog=EPILOG, rich_help_panel="Signing")(_sign.sign)
app.command(name="keygen", epilog=EPILOG, rich_help_panel="Signing")(_sign.keygen)
app.command(name="scan", cls=_scan.ScanCommand, epilog=_scan.EPILOG, rich_help_panel="Scanning")(
    _scan.scan
)
