"""authenticate_request: the one authentication of every entry point."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from modelkeep.api._auth import authenticate_request
from modelkeep.auth import AuthFailure, Principal
from modelkeep.errors import Unavailable

PRINCIPAL = Principal("key:abcdefghijkl", "consumer", None)


class StubService:
    """Accepts one header; records what was audited, and when, relative to the refusal."""

    def __init__(self, audit_error: Exception | None = None) -> None:
        self.events: list[tuple[str, Any]] = []
        self.audit_error = audit_error

    def authenticate(self, authorization: str | None) -> Principal:
        if authorization == "Bearer good":
            return PRINCIPAL
        raise AuthFailure("invalid API key", reason="invalid")

    def record_auth_failure(self, failure: AuthFailure, source: str | None) -> None:
        self.events.append(("audited", (failure.reason, source)))
        if self.audit_error is not None:
            raise self.audit_error


def call(service: StubService, header: str | None) -> Principal:
    async def main() -> Principal:
        try:
            return await authenticate_request(service, header, "10.0.0.7")  # type: ignore[arg-type]
        except Exception:
            service.events.append(("raised", None))
            raise

    return asyncio.run(main())


def test_a_good_key_gives_its_principal_and_audits_nothing() -> None:
    service = StubService()
    assert call(service, "Bearer good") is PRINCIPAL
    assert service.events == []


def test_a_refusal_is_audited_with_its_source_before_it_is_raised() -> None:
    service = StubService()
    with pytest.raises(AuthFailure):
        call(service, "Bearer bad")
    assert service.events == [("audited", ("invalid", "10.0.0.7")), ("raised", None)]


def test_when_the_audit_cannot_be_written_that_error_is_raised_not_the_401() -> None:
    service = StubService(audit_error=Unavailable("the database is down", retry_after=1))
    with pytest.raises(Unavailable, match="database"):
        call(service, None)
