"""PostgreSQL change notifications: a change made by one process reaches another at once.

Both services poll only every 5 s (the longest interval allowed), so a change seen well within a
second can only have come through LISTEN/NOTIFY.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from modelkeep.auth import AuthFailure, Principal
from modelkeep.bootstrap import init_data_dir
from modelkeep.service import Service
from modelkeep.settings import Settings
from modelkeep.store._changes import CHANNEL

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

POLL_S = 5.0
BOUND_S = 1.0


def _open(data_dir: Path, url: str) -> Service:
    service = Service.open(Settings(data_dir=data_dir, database_url=url, refresh_interval_s=POLL_S))
    service.start()
    return service


@pytest.fixture
def pair(tmp_path: Path, postgres_url: str) -> Iterator[tuple[Service, Service, Principal]]:
    init = init_data_dir(tmp_path / "data", postgres_url)
    first = _open(tmp_path / "data", postgres_url)
    second = _open(tmp_path / "data", postgres_url)
    try:
        for service in (first, second):
            assert service.core._listener is not None
            assert service.core._listener.listening.wait(10), "the listener did not connect"
        yield first, second, first.authenticate(f"Bearer {init.admin_key}")
    finally:
        second.stop()
        first.stop()


def _seconds_until(condition: Callable[[], bool], limit: float = POLL_S) -> float:
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > limit:
            return float("inf")
        time.sleep(0.005)
    return time.monotonic() - start


def _revoked(service: Service, header: str) -> bool:
    try:
        service.authenticate(header)
    except AuthFailure as failure:
        return failure.reason == "revoked"
    return False


def test_a_revocation_reaches_the_other_process_within_a_second(
    pair: tuple[Service, Service, Principal],
) -> None:
    first, second, admin = pair
    created = first.create_key(admin, role="consumer", models=["iris"], expires_at=None)
    header = f"Bearer {created.token}"
    assert _seconds_until(lambda: second.snapshot.generation == first.snapshot.generation) < BOUND_S
    key_id = second.authenticate(header).key_id

    first.revoke_key(admin, key_id)

    assert _seconds_until(lambda: _revoked(second, header)) < BOUND_S


def test_a_listener_whose_connection_is_killed_reconnects_and_catches_up(
    pair: tuple[Service, Service, Principal], postgres_base_url: str
) -> None:
    first, second, admin = pair
    listener = second.core._listener
    assert listener is not None
    engine = sa.create_engine(postgres_base_url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            killed = conn.execute(
                sa.text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE query = :listen AND pid <> pg_backend_pid()"
                ),
                {"listen": f"LISTEN {CHANNEL}"},
            ).scalar_one()
    finally:
        engine.dispose()
    assert killed >= 2  # both services' listeners (other tests' may be there too)
    # A change made while the listener is down is picked up when it reconnects.
    first.put_model(admin, "made-while-down")
    assert _seconds_until(lambda: "made-while-down" in second.snapshot.models, 4.0) < 4.0
    assert listener.listening.wait(5)


def test_sqlite_has_no_listener_and_polling_still_applies_changes(tmp_path: Path) -> None:
    init = init_data_dir(tmp_path / "data")
    service = Service.open(Settings(data_dir=tmp_path / "data", refresh_interval_s=0.05))
    other = Service.open(Settings(data_dir=tmp_path / "data", refresh_interval_s=0.05))
    service.start()
    try:
        assert service.core._listener is None
        admin = other.authenticate(f"Bearer {init.admin_key}")
        other.put_model(admin, "polled")
        assert _seconds_until(lambda: "polled" in service.snapshot.models, 2.0) < 2.0
    finally:
        service.stop()
        other.stop()
