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


def _lines(command: list[str]) -> list[str]:
    result = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "120"})
    return [line.strip("│ ").strip() for line in result.stdout.splitlines()]


def test_the_root_help_lists_every_exit_code() -> None:
    lines = _lines([])

    assert "Exit codes:" in lines
    for row in ERROR_TABLE:
        if row.exit_code != 1:
            assert f"{row.exit_code}  {row.meaning} (HTTP {row.status})" in lines


@pytest.mark.parametrize(
    "command",
    [
        c
        for c in COMMANDS
        if c not in ([], ["models"], ["versions"], ["label"], ["keys"], ["publishers"])
    ],
    ids=" ".join,
)
def test_a_commands_help_points_at_the_exit_codes_instead_of_repeating_them(
    command: list[str],
) -> None:
    text = " ".join(_lines(command))

    assert "listed once, in `modelkeep --help`" in text
    for row in ERROR_TABLE:
        assert row.meaning not in text


def test_the_connection_options_are_given_once_on_the_group_not_on_each_command() -> None:
    root = " ".join(_lines([]))
    whoami = " ".join(_lines(["whoami"]))

    for option in ("--url", "--token", "--cacert"):
        assert option in root
        assert option not in whoami


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
        app, ["--help"], env={"MODELKEEP_TOKEN": "mk_zzzz_topsecretvalue", "COLUMNS": "200"}
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


def test_models_ls_create_and_set_are_one_group_in_one_module() -> None:
    from modelkeep.cli import _models

    names = {command.name for command in _models.models_app.registered_commands}
    assert names == {"ls", "create", "set", "delete"}
    lines = _lines(["models"])
    assert {"ls", "create", "set", "delete"} <= {line.split(" ")[0] for line in lines}
