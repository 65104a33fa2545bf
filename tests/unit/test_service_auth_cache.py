"""A verified Authorization header is remembered, but never past a change that affects it."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

import modelkeep.service.core as service_module
from modelkeep.auth import AuthFailure, Principal
from modelkeep.bootstrap import init_data_dir
from modelkeep.service import Service
from modelkeep.service._shared import SnapshotMemo
from modelkeep.settings import Settings


@pytest.fixture
def service(tmp_path: Path) -> Iterator[tuple[Service, Principal]]:
    init = init_data_dir(tmp_path / "data")
    service = Service.open(Settings(data_dir=tmp_path / "data"))
    try:
        yield service, service.authenticate(f"Bearer {init.admin_key}")
    finally:
        service.stop()


@pytest.fixture
def verifications(monkeypatch: pytest.MonkeyPatch) -> list[str | None]:
    """Every header the service verified the slow way (parse, hash, compare)."""
    seen: list[str | None] = []
    real = service_module.authenticate

    def counting(authorization: str | None, *args: object, **kwargs: object) -> Principal:
        seen.append(authorization)
        return real(authorization, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(service_module, "authenticate", counting)
    return seen


def new_key(svc: Service, admin: Principal, expires_at: datetime | None = None) -> str:
    created = svc.create_key(admin, role="consumer", models=["iris"], expires_at=expires_at)
    return f"Bearer {created.token}"


def test_a_header_is_verified_once_then_remembered(
    service: tuple[Service, Principal], verifications: list[str | None]
) -> None:
    svc, admin = service
    header = new_key(svc, admin)
    first = svc.authenticate(header)
    assert svc.authenticate(header) == first
    assert svc.authenticate(header) == first
    assert verifications == [header]


def test_a_revocation_applies_to_a_remembered_header(service: tuple[Service, Principal]) -> None:
    svc, admin = service
    header = new_key(svc, admin)
    key_id = svc.authenticate(header).key_id
    svc.revoke_key(admin, key_id)
    with pytest.raises(AuthFailure) as refused:
        svc.authenticate(header)
    assert refused.value.reason == "revoked"


def test_a_change_made_on_another_worker_applies_once_the_snapshot_follows(
    service: tuple[Service, Principal],
) -> None:
    svc, admin = service
    header = new_key(svc, admin)
    key_id = svc.authenticate(header).key_id
    # Another worker revokes the key: this one learns of it at its next refresh.
    svc.store.revoke_key(key_id, now=datetime.now(UTC))
    svc.refresh()
    with pytest.raises(AuthFailure) as refused:
        svc.authenticate(header)
    assert refused.value.reason == "revoked"


def test_expiry_is_checked_on_every_request(service: tuple[Service, Principal]) -> None:
    svc, admin = service
    expires = datetime.now(UTC) + timedelta(hours=1)
    header = new_key(svc, admin, expires_at=expires)
    assert svc.authenticate(header).expires_at == expires
    svc.core.clock = lambda: expires  # valid strictly before expires_at
    with pytest.raises(AuthFailure) as refused:
        svc.authenticate(header)
    assert refused.value.reason == "expired"


def test_refusals_are_not_remembered(
    service: tuple[Service, Principal], verifications: list[str | None]
) -> None:
    svc, admin = service
    header = new_key(svc, admin)
    wrong = header[:-1] + ("A" if header[-1] != "A" else "B")
    for _ in range(2):
        with pytest.raises(AuthFailure):
            svc.authenticate(wrong)
        with pytest.raises(AuthFailure):
            svc.authenticate(None)
    assert verifications.count(wrong) >= 2
    assert verifications.count(None) == 2
    # A good header still works, and a wrong one never became "known" beside it.
    assert svc.authenticate(header).role == "consumer"
    with pytest.raises(AuthFailure):
        svc.authenticate(wrong)


def test_the_cache_is_bounded_and_stays_right_past_the_bound(
    service: tuple[Service, Principal],
) -> None:
    svc, admin = service
    svc.core._verified = SnapshotMemo(3)
    headers = [new_key(svc, admin) for _ in range(7)]
    principals = [svc.authenticate(header) for header in headers]
    for _ in range(2):
        for header, principal in zip(headers, principals, strict=True):
            assert svc.authenticate(header) == principal
            assert len(svc.core._verified.table(svc.snapshot)) <= 3


def test_concurrent_callers_see_a_revocation_made_while_they_run(
    service: tuple[Service, Principal],
) -> None:
    svc, admin = service
    keep, drop = new_key(svc, admin), new_key(svc, admin)
    dropped_id = svc.authenticate(drop).key_id
    revoked = threading.Event()
    errors: list[BaseException] = []
    # Per refusal of the dropped key: its reason, and whether the revocation had been made.
    refusals: list[tuple[str, bool]] = []

    def caller() -> None:
        try:
            for _ in range(300):
                if svc.authenticate(keep).role != "consumer":
                    raise AssertionError("the kept key lost its role")
                try:
                    svc.authenticate(drop)
                except AuthFailure as exc:
                    refusals.append((exc.reason, revoked.is_set()))
        except BaseException as exc:  # reported below, from the main thread
            errors.append(exc)

    threads = [threading.Thread(target=caller) for _ in range(4)]
    for thread in threads:
        thread.start()
    svc.store.revoke_key(dropped_id, now=datetime.now(UTC))
    revoked.set()
    svc.refresh()
    for thread in threads:
        thread.join()
    assert errors == []
    assert set(refusals) <= {("revoked", True)}
    with pytest.raises(AuthFailure):
        svc.authenticate(drop)
    assert svc.authenticate(keep).role == "consumer"
