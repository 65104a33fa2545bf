"""``modelkeep audit verify|ls|export``: the audit log, read from a data directory's database.

These commands run where the database is (the server machine, or anywhere the PostgreSQL URL
reaches), not through the management API; an auditor API on the server comes later. They only
read. The database layer and the audit package are imported inside the commands, so ``modelkeep
--help`` stays fast.

``verify`` has its own exit codes, for scripts and monitoring: 0 the log is intact, 1 it is not
(the first bad entry is named), 3 verification could not run (no database, no public key...).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from modelkeep.cli import _output as out
from modelkeep.cli._params import JsonOption, check_name
from modelkeep.errors import ConfigError, InvalidInput, ModelkeepError, Unavailable

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from modelkeep.audit import AuditEntry, AuditLog, VerifyResult

#: ``verify`` exit codes.
EXIT_INTACT = 0
EXIT_TAMPERED = 1
EXIT_CANNOT_VERIFY = 3

_DB_FILE = "modelkeep.db"
_AGO = re.compile(r"^(\d{1,6})([dhm])$")
_UNIT_SECONDS = {"d": 86_400, "h": 3_600, "m": 60}

VERIFY_EPILOG = (
    "Exit codes:\n\n0  the audit log is intact\n1  the audit log is NOT intact "
    "(the first bad entry is named)\n2  usage error\n3  verification could not run"
)
READ_EPILOG = (
    "Exit codes:\n\n0  success\n1  failure (no database, no audit log, unavailable...)\n"
    "2  usage error"
)

audit_app = typer.Typer(
    help="Verify, list and export the tamper-evident audit log (reads the database directly).",
    no_args_is_help=True,
)

DataDirOption = Annotated[
    Path,
    typer.Option(
        "--data-dir",
        metavar="DIR",
        envvar="MODELKEEP_DATA_DIR",
        help="Directory made by `modelkeep init`.",
        show_default=False,
        file_okay=False,
    ),
]
DatabaseUrlOption = Annotated[
    str | None,
    typer.Option(
        "--database-url",
        metavar="URL",
        envvar="MODELKEEP_DATABASE_URL",
        help="PostgreSQL URL; default: SQLite in the data directory.",
        show_default=False,
    ),
]
SinceOption = Annotated[
    str | None,
    typer.Option(
        metavar="WHEN",
        help="Only entries at or after WHEN: an ISO 8601 datetime (UTC unless an offset is "
        "given) or a duration ago (30m, 12h, 7d).",
        show_default=False,
    ),
]
UntilOption = Annotated[
    str | None,
    typer.Option(
        metavar="WHEN", help="Only entries before WHEN (same forms as --since).", show_default=False
    ),
]
ActorOption = Annotated[
    str | None,
    typer.Option(metavar="ACTOR", help="Only entries by this actor.", show_default=False),
]
ActionOption = Annotated[
    str | None,
    typer.Option(metavar="ACTION", help="Only entries of this action.", show_default=False),
]
ModelOption = Annotated[
    str | None,
    typer.Option(
        metavar="MODEL",
        help="Only entries about this model (its versions and labels included).",
        callback=lambda value: None if value is None else check_name(value),
        show_default=False,
    ),
]


@audit_app.command("verify", epilog=VERIFY_EPILOG)
def verify(
    data_dir: DataDirOption,
    database_url: DatabaseUrlOption = None,
    public_key: Annotated[
        Path | None,
        typer.Option(
            "--public-key",
            metavar="FILE",
            help="The checkpoint public key (PEM) to trust; keep a copy the server cannot write. "
            "Default: audit-signing.key.pub in the data directory.",
            show_default=False,
            dir_okay=False,
        ),
    ] = None,
    json_output: JsonOption = False,
) -> None:
    """Check every entry and signed checkpoint; exit 1 naming the first bad entry if any.

    Example: modelkeep audit verify --data-dir ./data
    """
    try:
        result = _verify(data_dir, database_url, public_key)
    except ModelkeepError as exc:
        out.error_line(exc.message)
        raise typer.Exit(EXIT_CANNOT_VERIFY) from None
    except Exception as exc:
        # Exit 1 would read as "tampered": anything unexpected must say "could not verify".
        if os.environ.get("MODELKEEP_DEBUG"):
            raise
        out.error_line(
            f"unexpected {type(exc).__name__} (set MODELKEEP_DEBUG=1 to see where it happened)"
        )
        raise typer.Exit(EXIT_CANNOT_VERIFY) from None
    if json_output:
        out.print_json(result.to_json())
    elif result.ok:
        out.say(
            f"audit log intact: {_count(result.entries, 'entry', 'entries')}, "
            f"{_count(result.checkpoints, 'signed checkpoint', 'signed checkpoints')}"
        )
    else:
        out.say(f"audit log NOT intact: first bad entry is {result.first_bad_seq}")
        out.say(f"  {out.clean(result.problem)}")
        out.say(f"  ({result.entries} entries verified before it)")
    raise typer.Exit(EXIT_INTACT if result.ok else EXIT_TAMPERED)


@audit_app.command("ls", epilog=READ_EPILOG)
def ls(
    data_dir: DataDirOption,
    database_url: DatabaseUrlOption = None,
    since: SinceOption = None,
    until: UntilOption = None,
    actor: ActorOption = None,
    action: ActionOption = None,
    model: ModelOption = None,
    limit: Annotated[
        int, typer.Option(metavar="N", min=1, help="Show the newest N matching entries.")
    ] = 50,
    json_output: JsonOption = False,
) -> None:
    """List the newest matching entries, oldest first (use `export` for all of them).

    Example: modelkeep audit ls --data-dir ./data --model iris --since 7d
    """
    filters = _filters(since, until, actor, action, model)
    with _audit_log(data_dir, database_url) as log:
        entries = list(log.entries(**filters, limit=limit, newest_first=True))
    entries.reverse()
    if json_output:
        out.print_json([entry.to_json() for entry in entries])
    elif not entries:
        out.say("no matching audit entries")
    else:
        out.stdout_console().print(_entries_table(entries))


@audit_app.command("export", epilog=READ_EPILOG)
def export(
    data_dir: DataDirOption,
    database_url: DatabaseUrlOption = None,
    since: SinceOption = None,
    until: UntilOption = None,
    actor: ActorOption = None,
    action: ActionOption = None,
    model: ModelOption = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            metavar="FILE",
            help="Write to FILE (created, mode 0600; never overwritten). Default: stdout.",
            show_default=False,
            dir_okay=False,
        ),
    ] = None,
) -> None:
    """Write every matching entry as one JSON object per line, oldest first.

    Each line carries seq, time, actor, action, target, outcome, details, prev_hash and hash, so
    an unfiltered export can be re-verified without the database (docs/audit.md).

    Example: modelkeep audit export --data-dir ./data --since 2026-11-01 -o audit.jsonl
    """
    filters = _filters(since, until, actor, action, model)
    with _audit_log(data_dir, database_url) as log:
        if output is None:
            for entry in log.entries(**filters):
                typer.echo(_json_line(entry))
            return
        with _new_file(output) as handle:
            for entry in log.entries(**filters):
                handle.write(_json_line(entry) + "\n")


# -- plumbing ---------------------------------------------------------------------------------


def _verify(data_dir: Path, database_url: str | None, public_key: Path | None) -> VerifyResult:
    from modelkeep.audit import KEY_FILE, load_public_key, public_key_path, verify_chain

    with _engine(data_dir, database_url) as engine:
        key = load_public_key(public_key or public_key_path(data_dir / KEY_FILE))
        return verify_chain(engine, key)


@contextmanager
def _audit_log(data_dir: Path, database_url: str | None) -> Iterator[AuditLog]:
    from modelkeep.audit import AuditLog

    with _engine(data_dir, database_url) as engine:
        yield AuditLog(engine)


@contextmanager
def _engine(data_dir: Path, database_url: str | None) -> Iterator[Engine]:
    """The metadata store's engine for the data dir, if its database has an audit log."""
    import sqlalchemy as sa

    from modelkeep.store.metadata import MetadataStore

    if not data_dir.is_dir():
        raise ConfigError("the data directory does not exist")
    if database_url is None:
        # Never let SQLite create an empty database where the real one is missing.
        if not (data_dir / _DB_FILE).is_file():
            raise ConfigError(
                "the data directory has no database; pass --database-url if it uses PostgreSQL"
            )
        database_url = f"sqlite:///{data_dir / _DB_FILE}"
    store = MetadataStore(database_url)
    try:
        try:
            has_log = sa.inspect(store.engine).has_table("audit_log")
        except sa.exc.OperationalError as exc:
            raise Unavailable("cannot open the metadata database") from exc
        if not has_log:
            raise ConfigError(
                "this database has no audit log yet; `modelkeep serve` upgrades it on start"
            )
        yield store.engine
    finally:
        store.close()


def _filters(
    since: str | None, until: str | None, actor: str | None, action: str | None, model: str | None
) -> dict[str, Any]:
    now = datetime.now(UTC)
    return {
        "since": None if since is None else _parse_when(since, now, "--since"),
        "until": None if until is None else _parse_when(until, now, "--until"),
        "actor": actor,
        "action": action,
        "model": model,
    }


def _parse_when(text: str, now: datetime, option: str) -> datetime:
    """``text`` as an aware UTC datetime: a duration before ``now`` or an ISO 8601 datetime."""
    text = text.strip()
    ago = _AGO.fullmatch(text)
    if ago:
        return now - timedelta(seconds=int(ago.group(1)) * _UNIT_SECONDS[ago.group(2)])
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise typer.BadParameter(
            f"{text!r} is neither a duration ago (30m, 12h, 7d) nor an ISO 8601 datetime "
            "(2026-11-25T18:00:00Z)",
            param_hint=f"'{option}'",
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def _count(number: int, one: str, many: str) -> str:
    return f"{number} {one if number == 1 else many}"


def _json_line(entry: AuditEntry) -> str:
    return json.dumps(entry.to_json(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@contextmanager
def _new_file(path: Path) -> Iterator[IO[str]]:
    # Audit entries name people and models: the export is as private as the database.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise InvalidInput(f"{path} already exists; refusing to overwrite it") from None
    except OSError as exc:
        raise InvalidInput(f"cannot create {path}: {exc.strerror or 'I/O error'}") from None
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        yield handle
        handle.flush()
        os.fsync(handle.fileno())


def _entries_table(entries: list[AuditEntry]) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold")
    # Numbers, times and actions stay on one line; targets and details fold on narrow terminals.
    for column in ("SEQ", "TIME", "ACTOR", "ACTION", "OUTCOME"):
        table.add_column(column, no_wrap=True)
    for column in ("TARGET", "DETAILS"):
        table.add_column(column, overflow="fold", ratio=1, min_width=len(column))
    for entry in entries:
        table.add_row(
            *(
                Text(out.clean(value))
                for value in (
                    entry.seq,
                    entry.time.strftime("%Y-%m-%d %H:%M:%S"),
                    entry.actor,
                    entry.action,
                    entry.outcome,
                    entry.target,
                    json.dumps(
                        dict(entry.details),
                        sort_keys=True,
                        separators=(",", ":"),
                        ensure_ascii=False,
                    ),
                )
            )
        )
    return table
