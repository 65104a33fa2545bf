"""Shared fixtures: databases (SQLite and the real PostgreSQL), and model bytes."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

PG_BASE_URL = os.environ.get(
    "MODELKEEP_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


def _pg_available() -> str | None:
    try:
        engine = sa.create_engine(PG_BASE_URL, connect_args={"connect_timeout": 3})
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        engine.dispose()
    except Exception as exc:
        return f"{type(exc).__name__}"
    return None


@pytest.fixture(scope="session")
def postgres_base_url() -> str:
    """The PostgreSQL server; missing means fail under CI=true, skip elsewhere."""
    problem = _pg_available()
    if problem is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(
                f"PostgreSQL at 127.0.0.1:5432 is required in CI and unreachable ({problem})"
            )
        pytest.skip(f"PostgreSQL at 127.0.0.1:5432 is not reachable ({problem})")
    return PG_BASE_URL


@pytest.fixture
def postgres_url(postgres_base_url: str) -> Iterator[str]:
    """A URL whose search_path is a fresh schema, dropped afterwards: tests never collide."""
    schema = f"mk_test_{secrets.token_hex(6)}"
    admin = sa.create_engine(postgres_base_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield f"{postgres_base_url}?options=-csearch_path%3D{schema}"
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


# Each pytest-xdist worker ("gw0", "gw1", ...) gets a database of its own, so tests that run at
# once in two workers never share a counter (servers name Redis keys by model and key, and
# two tests may both serve "iris").
_WORKER = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
REDIS_URL = os.environ.get("MODELKEEP_TEST_REDIS_URL", f"redis://127.0.0.1:6379/{_WORKER}")


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The Redis server; unreachable means fail under CI=true, skip elsewhere."""
    import redis

    try:
        client = redis.Redis.from_url(REDIS_URL, socket_timeout=2, socket_connect_timeout=2)
        client.ping()
        client.close()
    except redis.RedisError as exc:
        problem = type(exc).__name__
        if os.environ.get("CI") == "true":
            pytest.fail(f"Redis at {REDIS_URL} is required in CI and unreachable ({problem})")
        pytest.skip(f"Redis at {REDIS_URL} is not reachable ({problem}); start redis-server")
    return REDIS_URL


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Each registry test runs on the embedded SQLite and on the real PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path_factory.mktemp('db') / 'modelkeep.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture(scope="session")
def iris_onnx() -> bytes:
    from modelkeep.testing import build_iris_onnx

    return build_iris_onnx()
