"""Each back end is probed off the request path: a metric per back end, and readiness."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelkeep.bootstrap import init_data_dir
from modelkeep.errors import Unavailable
from modelkeep.service import Service
from modelkeep.service.backends import Backend, BackendProbe
from modelkeep.settings import Settings


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(condition: object, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.02)
    return False


def _up(service: Service, backend: str, kind: str) -> float | None:
    return service.metrics.registry.get_sample_value(
        "modelkeep_backend_up", {"backend": backend, "kind": kind}
    )


@pytest.fixture
def started(tmp_path: Path) -> Iterator[Service]:
    init_data_dir(tmp_path / "data")
    service = Service.open(Settings(data_dir=tmp_path / "data"))
    service.start()
    try:
        yield service
    finally:
        service.stop()


def test_every_back_end_of_an_embedded_install_is_reported_up(started: Service) -> None:
    assert _wait(lambda: _up(started, "keys", "local") == 1.0)
    assert _up(started, "database", "sqlite") == 1.0
    assert _up(started, "limits", "memory") == 1.0
    assert _up(started, "blobs", "file") == 1.0
    assert _wait(started.ready)


def test_unreachable_limits_storage_is_reported_down_and_the_replica_not_ready(
    tmp_path: Path,
) -> None:
    init_data_dir(tmp_path / "data")
    dead = f"redis://127.0.0.1:{_closed_port()}/0"
    service = Service.open(Settings(data_dir=tmp_path / "data", limits_storage=dead))
    service.start()
    try:
        assert _wait(lambda: _up(service, "limits", "redis") == 0.0)
        assert not service.ready()
        assert _up(service, "database", "sqlite") == 1.0
    finally:
        service.stop()


def test_a_blob_store_or_key_service_outage_does_not_make_the_replica_unready() -> None:
    reported: dict[str, bool] = {}

    def down() -> None:
        raise Unavailable("the blob store is unavailable; try again later", retry_after=5)

    probe = BackendProbe(
        [
            Backend("database", "postgresql", lambda: 1),
            Backend("limits", "redis", lambda: None),
            Backend("blobs", "s3", down),
            Backend("keys", "openbao", lambda: (_ for _ in ()).throw(OSError("refused"))),
        ],
        lambda name, _kind, up: reported.__setitem__(name, up),
    )
    probe.probe_all()
    assert reported == {"database": True, "limits": True, "blobs": False, "keys": False}
    assert probe.required_up()


def test_a_database_outage_makes_the_replica_unready() -> None:
    def down() -> None:
        raise Unavailable("the metadata database is unavailable", retry_after=1)

    probe = BackendProbe(
        [Backend("database", "postgresql", down), Backend("limits", "memory", lambda: None)],
        lambda *_: None,
    )
    assert probe.required_up()  # optimistic before the first probe
    probe.probe_all()
    assert not probe.required_up()
