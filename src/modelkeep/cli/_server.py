"""``modelkeep init`` and ``modelkeep serve``: thin wrappers over the server-side modules.

Those modules pull in the web framework, the database and the runtimes, so they are imported
inside the command functions only: ``modelkeep --help`` and every client command stay fast, and
work on an installation that has no server components.
"""

from __future__ import annotations

import importlib
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Protocol, cast

import typer

from modelkeep.cli import _output as out
from modelkeep.cli._params import JsonOption
from modelkeep.errors import ConfigError

if TYPE_CHECKING:
    from modelkeep.settings import Settings


class _InitResult(Protocol):
    data_dir: Path
    admin_key: str
    ca_cert: Path


# Field of Settings -> how a person sets it; used to turn validation errors into advice.
_SETTING_SOURCES = {
    "data_dir": "--data-dir / MODELKEEP_DATA_DIR",
    "host": "--host / MODELKEEP_HOST",
    "port": "--port / AIP_HTTP_PORT / MODELKEEP_PORT",
    "workers": "--workers / MODELKEEP_WORKERS",
    "grpc_port": "--grpc-port / MODELKEEP_GRPC_PORT",
    "database_url": "--database-url / MODELKEEP_DATABASE_URL",
}


def init(
    data_dir: Annotated[
        Path,
        typer.Option(
            "--data-dir",
            metavar="DIR",
            envvar="MODELKEEP_DATA_DIR",
            help="Directory to create: keys, TLS certificates, database and blobs.",
            show_default=False,
            file_okay=False,
        ),
    ],
    database_url: Annotated[
        str | None,
        typer.Option(
            "--database-url",
            metavar="URL",
            envvar="MODELKEEP_DATABASE_URL",
            help="PostgreSQL URL; default: SQLite inside the data directory.",
            show_default=False,
        ),
    ] = None,
    json_output: JsonOption = False,
) -> None:
    """Create a data directory, a TLS certificate and the first admin API key.

    Example: modelkeep init --data-dir ./data
    """
    init_data_dir = cast(
        "Callable[[Path, str | None], _InitResult]",
        _server_part("modelkeep.bootstrap", "init_data_dir"),
    )
    result = init_data_dir(data_dir, database_url)
    if json_output:
        out.print_json(
            {
                "admin_key": result.admin_key,
                "ca_cert": str(result.ca_cert),
                "data_dir": str(result.data_dir),
            }
        )
        return
    data = shlex.quote(str(result.data_dir))
    ca_cert = shlex.quote(str(result.ca_cert))
    for line in (
        f"initialised {result.data_dir}",
        "",
        "admin API key (shown only once, store it now, e.g. in a secret manager):",
        "",
        f"    {result.admin_key}",
        "",
        f"CA certificate for clients: {result.ca_cert}",
        "",
        "next steps:",
        f"    modelkeep serve --data-dir {data}",
        "    export MODELKEEP_TOKEN=...        # the admin key above",
        f"    export MODELKEEP_CACERT={ca_cert}",
        "    modelkeep whoami",
    ):
        out.say(line)


def serve(
    data_dir: Annotated[
        Path | None,
        typer.Option(
            "--data-dir",
            metavar="DIR",
            help="Directory made by `modelkeep init` (env MODELKEEP_DATA_DIR).",
            show_default=False,
            file_okay=False,
        ),
    ] = None,
    host: Annotated[
        str | None,
        typer.Option(
            metavar="HOST",
            help="Address to listen on; 0.0.0.0 for every interface. "
            "(env MODELKEEP_HOST; default 127.0.0.1)",
            show_default=False,
        ),
    ] = None,
    port: Annotated[
        int | None,
        typer.Option(
            metavar="PORT",
            help="TCP port (env AIP_HTTP_PORT, as Vertex AI sets it, else MODELKEEP_PORT; "
            "default 8443).",
            show_default=False,
        ),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            metavar="N",
            help="Worker processes (env MODELKEEP_WORKERS; default 1).",
            show_default=False,
        ),
    ] = None,
    grpc_port: Annotated[
        int | None,
        typer.Option(
            "--grpc-port",
            metavar="PORT",
            help="Also serve the Open Inference Protocol over gRPC (TLS, same keys) on this "
            "port, e.g. 8081 (env MODELKEEP_GRPC_PORT; default 0: off).",
            show_default=False,
        ),
    ] = None,
    database_url: Annotated[
        str | None,
        typer.Option(
            "--database-url",
            metavar="URL",
            help="PostgreSQL URL (env MODELKEEP_DATABASE_URL); "
            "default: SQLite in the data directory.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Run the server over HTTPS until interrupted.

    As a SageMaker container (`docker run IMAGE serve`), set MODELKEEP_SAGEMAKER=true: it then
    listens on 0.0.0.0, port SAGEMAKER_BIND_TO_PORT or 8080 (docs/protocols.md).

    Example: modelkeep serve --data-dir ./data --port 8443 --grpc-port 8081
    """
    given: dict[str, Any] = {
        name: value
        for name, value in {
            "data_dir": data_dir,
            "host": host,
            "port": port,
            "workers": workers,
            "grpc_port": grpc_port,
            "database_url": database_url,
        }.items()
        if value is not None
    }
    settings = _settings(given)
    run_server = cast(
        "Callable[[Settings], None]", _server_part("modelkeep.api.server", "run_server")
    )
    run_server(settings)


tls_app = typer.Typer(help="The server's TLS certificate.", no_args_is_help=True)


@tls_app.command("renew")
def tls_renew(
    data_dir: Annotated[
        Path,
        typer.Option(
            "--data-dir",
            metavar="DIR",
            envvar="MODELKEEP_DATA_DIR",
            help="Directory made by `modelkeep init`.",
            show_default=False,
            file_okay=False,
        ),
    ],
    json_output: JsonOption = False,
) -> None:
    """Issue a new server certificate and key from the data directory's CA (valid 366 days).

    The names stay those of the current certificate; a running server loads the new one within
    MODELKEEP_TLS_RELOAD_INTERVAL_S (10 s).

    Example: modelkeep tls renew --data-dir ./data
    """
    from modelkeep.bootstrap import TLS_DIR
    from modelkeep.crypto import renew_server_certificate

    expires = renew_server_certificate(data_dir / TLS_DIR)
    if json_output:
        out.print_json({"not_after": expires.isoformat()})
        return
    out.say(f"renewed the server certificate; it expires {expires:%Y-%m-%d %H:%M} UTC")


db_app = typer.Typer(help="The metadata database's schema.", no_args_is_help=True)


@db_app.command("upgrade")
def db_upgrade(
    data_dir: Annotated[
        Path | None,
        typer.Option(
            "--data-dir",
            metavar="DIR",
            help="Data directory whose SQLite database to upgrade (env MODELKEEP_DATA_DIR).",
            show_default=False,
            file_okay=False,
        ),
    ] = None,
    database_url: Annotated[
        str | None,
        typer.Option(
            "--database-url",
            metavar="URL",
            help="PostgreSQL URL (env MODELKEEP_DATABASE_URL).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Apply the database migrations this version needs; does nothing if there are none.

    Safe to run again and before every upgrade (the Helm chart's pre-upgrade Job runs it).

    Example: modelkeep db upgrade --database-url postgresql+psycopg://...
    """
    given = {"data_dir": data_dir, "database_url": database_url}
    settings = _settings({name: value for name, value in given.items() if value is not None})
    store_class = cast(Any, _server_part("modelkeep.store.metadata", "MetadataStore"))
    store = store_class(settings.effective_database_url)
    try:
        store.migrate()
    finally:
        store.close()
    out.say("the database schema is up to date")


def _settings(given: dict[str, Any]) -> Settings:
    """Settings from the options given; the environment fills the rest (pydantic-settings)."""
    from pydantic import ValidationError

    from modelkeep.settings import Settings

    try:
        return Settings(**given)
    except ValidationError as exc:
        raise ConfigError(_settings_problem(exc)) from None


def _settings_problem(exc: Any) -> str:
    problems = []
    # include_input=False: a database URL may hold a password.
    for error in exc.errors(include_input=False, include_url=False):
        field = str(error["loc"][0]) if error["loc"] else ""
        source = _SETTING_SOURCES.get(field, f"MODELKEEP_{field.upper()}")
        if error["type"] == "missing":
            problems.append(f"set {source}")
        else:
            problems.append(f"invalid {source}: {error['msg']}")
    return "; ".join(problems) or "invalid settings"


def _server_part(module_name: str, attribute: str) -> object:
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (exc.name == module_name or module_name.startswith(f"{exc.name}.")):
            raise ConfigError(
                f"this modelkeep installation has no server components ({module_name} is missing)"
            ) from None
        raise
    return cast(object, getattr(module, attribute))
