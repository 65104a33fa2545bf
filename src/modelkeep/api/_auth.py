"""Authentication for every route but health, as a thin pure-ASGI middleware.

It runs before routing, so no route (including unknown ones) answers a caller without a valid
key. Decisions about what the caller may do stay in the service (Cedar).
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
        try:
            principal = self.service.authenticate(authorization)
        except AuthFailure as exc:
            client = scope.get("client")
            source = client[0] if client else None
            # A security event: durable in the audit log before the 401 leaves.
            try:
                await run_in_threadpool(self.service.record_auth_failure, exc, source)
            except ModelkeepError as audit_error:
                await modelkeep_error_response(audit_error)(scope, receive, send)
                return
            await modelkeep_error_response(exc)(scope, receive, send)
            return
        scope.setdefault("state", {})["principal"] = principal
        await self.app(scope, receive, send)


def principal_of(request: Request) -> Principal:
    principal = request.scope.get("state", {}).get("principal")
    if not isinstance(principal, Principal):  # unreachable behind the middleware; fail closed
        raise Unauthenticated("missing credentials")
    return principal
