"""The ``modelkeep`` command line: ``app`` is the typer application, ``main`` the console script.

Client commands talk to a server through the management API (``docs/api.md``); ``init`` and
``serve`` run the server side. See ``docs/cli.md`` for every command, environment variable and
exit code.
"""

from __future__ import annotations

from modelkeep.cli.commands import app

__all__ = ["app", "main"]


def main() -> None:
    """Run the command line; exits with the code documented in ``modelkeep --help``."""
    app(prog_name="modelkeep")
