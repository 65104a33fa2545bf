"""Options shared by the client commands, and parsing of the values people type.

The connection options (``--url``, ``--token``, ``--cacert``) belong to the ``modelkeep`` group
and are given once, before the command (``modelkeep --url URL models ls``), or by environment.

A value that cannot be right (a name the server would refuse, an expiry in the past) is a usage
error caught here, before any request, so it exits with typer's code 2 and says what is expected.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated

import typer

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
_DURATION = re.compile(r"^(\d{1,6})([dhm])$")
_UNIT_SECONDS = {"d": 86_400, "h": 3_600, "m": 60}

UrlOption = Annotated[
    str,
    typer.Option(
        "--url",
        metavar="URL",
        envvar="MODELKEEP_URL",
        help="Server address.",
        show_default=True,
        rich_help_panel="Connection (commands that talk to a server)",
    ),
]
TokenOption = Annotated[
    str | None,
    typer.Option(
        "--token",
        metavar="KEY",
        envvar="MODELKEEP_TOKEN",
        help="API key (mk_...). Prefer the environment variable: arguments show up in `ps`.",
        show_default=False,
        rich_help_panel="Connection (commands that talk to a server)",
    ),
]
CacertOption = Annotated[
    Path | None,
    typer.Option(
        "--cacert",
        metavar="FILE",
        envvar="MODELKEEP_CACERT",
        help="CA certificate (PEM) that signed the server's certificate; "
        "default: the system trust store.",
        show_default=False,
        dir_okay=False,
        rich_help_panel="Connection (commands that talk to a server)",
    ),
]
JsonOption = Annotated[
    bool,
    typer.Option("--json", help="Print JSON for scripts instead of text for people."),
]

__all__ = [
    "NAME_PATTERN",
    "CacertOption",
    "JsonOption",
    "TokenOption",
    "UrlOption",
    "check_name",
    "check_names",
    "parse_expires",
]


def check_name(value: str) -> str:
    """Typer callback: accept only names the API accepts (``^[a-z0-9][a-z0-9._-]{0,62}$``)."""
    if not NAME_PATTERN.fullmatch(value):
        raise typer.BadParameter(
            f"{value!r} is not a valid name: use 1-63 characters from a-z, 0-9, '.', '_', '-', "
            "starting with a letter or digit"
        )
    return value


def check_names(values: list[str] | None) -> list[str] | None:
    """Typer callback for repeated name options; an absent option stays ``None``."""
    if not values:
        return None
    return [check_name(value) for value in values]


def parse_expires(text: str, *, now: datetime) -> datetime:
    """When a key expires, as an aware UTC datetime strictly after ``now``.

    ``text`` is a duration from ``now`` (``30d``, ``12h``, ``90m``) or an ISO 8601 date or datetime;
    a datetime without an offset is read as UTC. Raises ``ValueError`` with a helpful message.
    """
    text = text.strip()
    duration = _DURATION.fullmatch(text)
    if duration:
        amount, unit = int(duration.group(1)), duration.group(2)
        if amount == 0:
            raise ValueError("the duration must be longer than zero")
        return now.astimezone(UTC) + timedelta(seconds=amount * _UNIT_SECONDS[unit])
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"{text!r} is neither a duration (30d, 12h, 90m) nor an ISO 8601 datetime "
            "(2027-01-01T00:00:00Z)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    moment = moment.astimezone(UTC)
    if moment <= now:
        raise ValueError(f"{text!r} is in the past")
    return moment
