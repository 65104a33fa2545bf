"""Authentication of a key created elsewhere moments ago (another worker or replica)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from modelkeep.auth import AuthFailure, Principal
from modelkeep.service import Service
from modelkeep.testing import open_service


@pytest.fixture
def service(tmp_path: Path) -> Iterator[tuple[Service, Principal]]:
    service, admin_key = open_service(tmp_path / "data")
    try:
        yield service, service.authenticate(f"Bearer {admin_key}")
    finally:
        service.stop()


def test_a_key_the_snapshot_learned_after_the_request_read_it_is_accepted(
    service: tuple[Service, Principal],
) -> None:
    # A request reads the snapshot; a change notification then loads the newer one, with a
    # key made on another replica. The request's own refresh finds nothing new to load, and
    # must still look at the snapshot that now holds the key (it answered 401 once, in CI).
    svc, admin = service
    core = svc.core
    before = core.snapshot
    created = svc.create_key(admin, role="consumer", models=None, expires_at=None)
    assert core.snapshot is not before  # the management call refreshed this worker
    core._last_forced_refresh = 0.0
    principal = core._verify(f"Bearer {created.token}", before)
    assert principal.key_id == created.record.key_id


def test_a_wrong_key_is_refused_after_one_look_at_the_store(
    service: tuple[Service, Principal],
) -> None:
    svc, admin = service
    token = svc.create_key(admin, role="consumer", models=None, expires_at=None).token
    wrong = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    looks: list[bool] = []
    real = svc.core.refresh

    def counting() -> bool:
        looks.append(True)
        return real()

    svc.core.refresh = counting  # type: ignore[method-assign]
    svc.core._last_forced_refresh = 0.0
    for _ in range(3):  # within 100 ms: the store is read once, not three times
        with pytest.raises(AuthFailure):
            svc.core.authenticate(f"Bearer {wrong}")
    assert looks == [True]
