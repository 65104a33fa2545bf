"""init and serve: wiring to modelkeep.bootstrap and modelkeep.api.server, replaced by fakes."""

from __future__ import annotations

import json
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from modelkeep.cli import app
from modelkeep.errors import Conflict
from modelkeep.settings import Settings

ADMIN_KEY = "mk_adminadmin23_initSecret"


@dataclass
class FakeInitResult:
    data_dir: Path
    admin_key: str
    ca_cert: Path


def _install(monkeypatch: pytest.MonkeyPatch, module_name: str, **attributes: Any) -> None:
    """Put a stand-in module in sys.modules, whether or not the real one exists yet."""
    module = types.ModuleType(module_name)
    for name, value in attributes.items():
        setattr(module, name, value)
    monkeypatch.setitem(sys.modules, module_name, module)


def _run(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(app, list(args), env=env)


@pytest.fixture
def init_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Path, str | None]]:
    calls: list[tuple[Path, str | None]] = []

    def init_data_dir(data_dir: Path, database_url: str | None) -> FakeInitResult:
        calls.append((data_dir, database_url))
        return FakeInitResult(data_dir.resolve(), ADMIN_KEY, data_dir.resolve() / "tls" / "ca.pem")

    _install(monkeypatch, "modelkeep.bootstrap", init_data_dir=init_data_dir)
    return calls


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> list[Settings]:
    settings_seen: list[Settings] = []
    _install(monkeypatch, "modelkeep.api.server", run_server=settings_seen.append)
    return settings_seen


# -- init -------------------------------------------------------------------------------------


def test_init_json_prints_exactly_key_ca_and_data_dir(
    init_calls: list[tuple[Path, str | None]], tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"

    result = _run("init", "--data-dir", str(data_dir), "--json")

    assert result.exit_code == 0, result.output
    expected = {
        "admin_key": ADMIN_KEY,
        "ca_cert": str(data_dir / "tls" / "ca.pem"),
        "data_dir": str(data_dir),
    }
    assert expected == json.loads(result.stdout)
    assert [(data_dir, None)] == init_calls


def test_init_passes_the_database_url(
    init_calls: list[tuple[Path, str | None]], tmp_path: Path
) -> None:
    url = "postgresql+psycopg://modelkeep@db/modelkeep"

    _run("init", "--data-dir", str(tmp_path), "--database-url", url, "--json")

    assert [(tmp_path, url)] == init_calls


def test_init_reads_the_data_dir_from_the_environment(
    init_calls: list[tuple[Path, str | None]], tmp_path: Path
) -> None:
    result = _run("init", "--json", env={"MODELKEEP_DATA_DIR": str(tmp_path)})

    assert result.exit_code == 0, result.output
    assert [(tmp_path, None)] == init_calls


def test_init_tells_people_the_admin_key_once_and_what_to_do_next(
    init_calls: list[tuple[Path, str | None]], tmp_path: Path
) -> None:
    result = _run("init", "--data-dir", str(tmp_path))

    assert result.exit_code == 0, result.output
    assert result.stdout.count(ADMIN_KEY) == 1
    assert "shown only once" in result.stdout
    assert f"CA certificate for clients: {tmp_path / 'tls' / 'ca.pem'}" in result.stdout
    assert f"modelkeep serve --data-dir {tmp_path}" in result.stdout
    assert f"export MODELKEEP_CACERT={tmp_path / 'tls' / 'ca.pem'}" in result.stdout


def test_init_requires_a_data_dir(init_calls: list[tuple[Path, str | None]]) -> None:
    result = _run("init")

    assert result.exit_code == 2
    assert init_calls == []


def test_init_error_is_one_line_with_its_exit_code(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def init_data_dir(data_dir: Path, database_url: str | None) -> FakeInitResult:
        raise Conflict("the data directory is already initialised")

    _install(monkeypatch, "modelkeep.bootstrap", init_data_dir=init_data_dir)

    result = _run("init", "--data-dir", str(tmp_path))

    assert result.exit_code == 6
    assert result.stderr == "error: the data directory is already initialised\n"


def test_unexpected_exception_is_one_line_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def init_data_dir(data_dir: Path, database_url: str | None) -> FakeInitResult:
        raise RuntimeError("boom")

    _install(monkeypatch, "modelkeep.bootstrap", init_data_dir=init_data_dir)

    result = _run("init", "--data-dir", str(tmp_path))

    assert result.exit_code == 1
    expected = (
        "error: unexpected RuntimeError: boom (set MODELKEEP_DEBUG=1 to see where it happened)\n"
    )
    assert expected == result.stderr


def test_init_without_server_components_says_so(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # None in sys.modules makes the import fail exactly as a missing module does.
    monkeypatch.setitem(sys.modules, "modelkeep.bootstrap", None)

    result = _run("init", "--data-dir", str(tmp_path))

    assert result.exit_code == 1
    expected = (
        "error: this modelkeep installation has no server components "
        "(modelkeep.bootstrap is missing)\n"
    )
    assert expected == result.stderr


# -- serve ------------------------------------------------------------------------------------


def test_serve_builds_settings_from_the_options(served: list[Settings], tmp_path: Path) -> None:
    result = _run(
        "serve",
        "--data-dir",
        str(tmp_path),
        "--host",
        "0.0.0.0",
        "--port",
        "9443",
        "--workers",
        "4",
        "--database-url",
        "postgresql+psycopg://db/modelkeep",
    )

    assert result.exit_code == 0, result.output
    (settings,) = served
    expected = (tmp_path, "0.0.0.0", 9443, 4, "postgresql+psycopg://db/modelkeep")
    actual = (
        settings.data_dir,
        settings.host,
        settings.port,
        settings.workers,
        settings.database_url,
    )
    assert expected == actual


def test_serve_leaves_options_not_given_to_the_environment(
    served: list[Settings], tmp_path: Path
) -> None:
    env = {
        "MODELKEEP_DATA_DIR": str(tmp_path),
        "MODELKEEP_HOST": "0.0.0.0",
        "MODELKEEP_WORKERS": "3",
        "MODELKEEP_PORT": "1234",
    }

    result = _run("serve", "--port", "9443", env=env)

    assert result.exit_code == 0, result.output
    (settings,) = served
    assert (tmp_path, "0.0.0.0", 3, 9443) == (
        settings.data_dir,
        settings.host,
        settings.workers,
        settings.port,
    )


def test_serve_with_defaults_listens_on_loopback(served: list[Settings], tmp_path: Path) -> None:
    _run("serve", "--data-dir", str(tmp_path))

    (settings,) = served
    assert (
        settings.host,
        settings.port,
        settings.workers,
        settings.database_url,
    ) == ("127.0.0.1", 8443, 1, None)


def test_serve_without_a_data_dir_says_how_to_give_one(served: list[Settings]) -> None:
    result = _run("serve")

    assert result.exit_code == 1
    assert result.stderr == "error: set --data-dir / MODELKEEP_DATA_DIR\n"
    assert served == []


def test_serve_with_an_invalid_value_names_the_option_but_not_the_value(
    served: list[Settings], tmp_path: Path
) -> None:
    result = _run(
        "serve",
        "--data-dir",
        str(tmp_path),
        "--workers",
        "0",
        "--database-url",
        "postgresql://user:hunter2@db/x",
    )

    assert result.exit_code == 1
    assert result.stderr.startswith("error: invalid --workers / MODELKEEP_WORKERS: ")
    assert "hunter2" not in result.output
    assert served == []


def test_serve_with_a_non_numeric_port_is_a_usage_error(served: list[Settings]) -> None:
    result = _run("serve", "--port", "http")

    assert result.exit_code == 2
    assert served == []


# -- tls renew --------------------------------------------------------------------------------


def test_tls_renew_replaces_the_server_certificate_and_prints_its_expiry(tmp_path: Path) -> None:
    from cryptography import x509

    from modelkeep.crypto import create_tls_material

    tls = tmp_path / "tls"
    create_tls_material(tls)
    before = (tls / "server.pem").read_bytes()

    result = _run("tls", "renew", "--data-dir", str(tmp_path), "--json")

    assert result.exit_code == 0, result.output
    leaf = x509.load_pem_x509_certificate((tls / "server.pem").read_bytes())
    assert before != (tls / "server.pem").read_bytes()
    assert {"not_after": leaf.not_valid_after_utc.isoformat()} == json.loads(result.output)


def test_tls_renew_without_tls_material_is_a_config_error_without_the_path(
    tmp_path: Path,
) -> None:
    from modelkeep.cli._errors import exit_code_for
    from modelkeep.errors import ConfigError

    result = _run("tls", "renew", "--data-dir", str(tmp_path))
    assert exit_code_for(ConfigError("")) == result.exit_code
    assert "cannot read the CA certificate or its key" in result.output
    assert str(tmp_path) not in result.output
