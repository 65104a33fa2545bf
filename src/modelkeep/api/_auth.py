"""Authentication: the one function every entry point calls, and the middleware for routes.

``authenticate_request`` is how every protocol adapter (and the middleware) turns an
``Authorization`` header into a principal; a refusal is audited durably before it is raised.
The middleware runs it for every route but health, before routing, so no route (including
unknown ones) answers a caller without a valid key. Decisions about what the caller may do stay
in the service (Cedar).
"""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from modelkeep.auth import AuthFailure, Principal
from modelkeep.errors import ModelkeepError, Unauthenticated
from modelkeep.service import Service

from ._errors import modelkeep_error_response

PUBLIC_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})


async def authenticate_request(
    service: Service, authorization: str | None, client_host: str | None
) -> Principal:
    """The principal of an ``Authorization`` header value, or ``AuthFailure`` (401).

    A refused credential is a security event: it is in the audit log, durably, before this
    raises (if writing it fails, that error is raised instead, and nothing is answered as if
    the caller were known).
    """
    try:
        return service.authenticate(authorization)
    except AuthFailure as exc:
        await run_in_threadpool(service.record_auth_failure, exc, client_host)
        raise


class AuthenticationMiddleware:
    def __init__(self, app: ASGIApp, service: Service) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        authorization = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value.decode("latin-1")
                break
        client = scope.get("client")
        try:
            principal = await authenticate_request(
                self.service, authorization, client[0] if client else None
            )
        except ModelkeepError as exc:
            await modelkeep_error_response(exc)(scope, receive, send)
            return
        scope.setdefault("state", {})["principal"] = principal
        await self.app(scope, receive, send)


def principal_of(request: Request) -> Principal:
    principal = request.scope.get("state", {}).get("principal")
    if not isinstance(principal, Principal):  # unreachable behind the middleware; fail closed
        raise Unauthenticated("missing credentials")
    return principal
