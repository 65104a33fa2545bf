"""`modelkeep db upgrade`: applies the migrations, and running it again changes nothing."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from typer.testing import CliRunner

from modelkeep.cli import app


def _revision(url: str) -> str:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return str(conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar())
    finally:
        engine.dispose()


def test_db_upgrade_migrates_and_is_idempotent(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'meta.db'}"
    first = CliRunner().invoke(
        app, ["db", "upgrade", "--data-dir", str(tmp_path), "--database-url", url]
    )
    assert first.exit_code == 0, first.output
    assert "up to date" in first.output
    revision = _revision(url)
    again = CliRunner().invoke(
        app, ["db", "upgrade", "--database-url", url, "--data-dir", str(tmp_path)]
    )
    assert again.exit_code == 0, again.output
    assert _revision(url) == revision


def test_db_upgrade_of_an_unreachable_database_is_a_clear_error(tmp_path: Path) -> None:
    url = "postgresql+psycopg://nobody@127.0.0.1:1/none?connect_timeout=2"
    result = CliRunner().invoke(
        app, ["db", "upgrade", "--data-dir", str(tmp_path), "--database-url", url]
    )
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    assert "unavailable" in result.output
