"""--help for every command: it works, shows the exit codes, leaks no secret and loads no server."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from modelkeep.cli import app
from modelkeep.cli._errors import ERROR_TABLE

COMMANDS = [
    [],
    ["push"],
    ["models"],
    ["models", "ls"],
    ["models", "create"],
    ["models", "set"],
    ["publishers"],
    ["publishers", "add"],
    ["publishers", "ls"],
    ["publishers", "rm"],
    ["versions"],
    ["versions", "ls"],
    ["label"],
    ["label", "set"],
    ["label", "rm"],
    ["keys"],
    ["keys", "create"],
    ["keys", "ls"],
    ["keys", "revoke"],
    ["whoami"],
    ["init"],
    ["serve"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "modelkeep")
def test_help_works_for_every_command(command: list[str]) -> None:
    result = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "120"})

    assert result.exit_code == 0, result.output
    assert f"Usage: modelkeep {' '.join(command)}".rstrip() in result.stdout


@pytest.mark.parametrize(
    "command",
    [
        c
        for c in COMMANDS
        if c not in (["models"], ["versions"], ["label"], ["keys"], ["publishers"])
    ],
    ids=lambda c: " ".join(c) or "modelkeep",
)
def test_help_epilog_lists_the_exit_codes(command: list[str]) -> None:
    result = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "120"})

    lines = [line.strip() for line in result.stdout.splitlines()]
    assert "Exit codes:" in lines
    for row in ERROR_TABLE:
        if row.exit_code != 1:
            assert f"{row.exit_code}  {row.meaning} (HTTP {row.status})" in lines


def test_root_help_lists_every_command() -> None:
    result = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "120"})

    listed = {line.strip("│ ").split(" ")[0] for line in result.stdout.splitlines()}
    expected = {
        "push",
        "models",
        "publishers",
        "versions",
        "label",
        "keys",
        "whoami",
        "init",
        "serve",
    }
    assert expected <= listed


def test_help_never_shows_the_token_from_the_environment() -> None:
    result = CliRunner().invoke(
        app, ["whoami", "--help"], env={"MODELKEEP_TOKEN": "mk_zzzz_topsecretvalue"}
    )

    assert "MODELKEEP_TOKEN" in result.stdout
    assert "topsecretvalue" not in result.output


def test_no_arguments_shows_help() -> None:
    result = CliRunner().invoke(app, [])

    assert "Usage: modelkeep" in result.output


def test_help_does_not_import_the_server_side() -> None:
    code = (
        "import sys\n"
        "from modelkeep.cli import main\n"
        "sys.argv = ['modelkeep', '--help']\n"
        "try:\n"
        "    main()\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = ['fastapi', 'sqlalchemy', 'onnxruntime', 'uvicorn', 'modelkeep.settings']\n"
        "print(sorted(m for m in heavy if m in sys.modules), file=sys.stderr)\n"
    )

    finished = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )

    assert finished.stderr.strip().splitlines()[-1] == "[]"
