"""Pure-ASGI entries for the cloud protocols' routes, in front of FastAPI.

Routing and dependency handling in FastAPI cost several times a small model's inference
(bench/README.md), so, like the V2 infer entry (``_fast.py``), the SageMaker and Azure ML routes
are recognised here by method and exact path (one dictionary lookup) and served by a handler
that does only its protocol's translation. What every handler needs around it lives here once:
the request id bound to log lines and captures, the error mapping (no exception text but a
ModelkeepError's message ever reaches a client), the response, and the access-log line and
metrics, written after the response as ``ObserveMiddleware`` writes them for FastAPI routes.
Every other request goes on to the app behind.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from modelkeep.audit.access import bind_request, input_digest, new_request_id, reset_request
from modelkeep.auth import Principal
from modelkeep.errors import ModelkeepError
from modelkeep.service import Observed, Service

from ._auth import authenticate_request
from ._body import receive_body
from ._errors import error_response, modelkeep_error_response
from ._observe import NO_RESPONSE, ObserveMiddleware
from ._observe import REQUEST_ID_HEADER as REQUEST_ID

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Exchange:
    """One request as a handler sees it, and what the access log learns while it is served."""

    scope: Scope
    receive: Receive
    headers: dict[bytes, bytes]  # lower-case names; the last value of a repeated header wins
    principal: Principal | None = None
    model: str | None = None
    version: int | str | None = None
    bytes_in: int = 0
    digest: str | None = None
    observed: Observed = field(default_factory=Observed)  # rows and version, from the data plane

    def header(self, name: bytes) -> str | None:
        """A header's value (``name`` in lower case), decoded only when asked for."""
        value = self.headers.get(name)
        return None if value is None else value.decode("latin-1")

    @property
    def client(self) -> str | None:
        client = self.scope.get("client")
        return str(client[0]) if client else None

    async def authenticate(self, service: Service, authorization: str | None) -> Principal:
        """Authentication, as every entry point does it (a refusal is audited before 401)."""
        self.principal = await authenticate_request(service, authorization, self.client)
        return self.principal

    async def body(self, limit: int) -> bytes:
        """The body, refused as soon as it passes ``limit``; its size and digest are logged."""
        body = await receive_body(self.receive, self.headers.get(b"content-length"), limit)
        self.bytes_in = len(body)
        self.digest = input_digest(body)
        return body


@dataclass(slots=True)
class Answer:
    """A handler's successful response."""

    body: bytes
    content_type: str
    headers: Mapping[str, str] = field(default_factory=dict)
    status: int = 200


Handler = Callable[[Exchange], Awaitable[Answer]]
# Maps an error to its response: the protocol's own status or body shape where it has one.
ErrorRenderer = Callable[[ModelkeepError], Response]


@dataclass(frozen=True, slots=True)
class Route:
    handler: Handler
    template: str  # the route as metrics and the access log name it
    render_error: ErrorRenderer = modelkeep_error_response


class ProtocolEntry:
    """Serve ``routes`` (keyed by method and exact path) here; everything else goes to ``app``."""

    def __init__(
        self,
        app: ASGIApp,
        routes: Mapping[tuple[str, str], Route],
        observer: ObserveMiddleware | None = None,
    ) -> None:
        self.app = app
        self.routes = dict(routes)
        self.observer = observer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = None
        if scope["type"] == "http":
            route = self.routes.get((scope["method"], scope["path"]))
        if route is None:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = new_request_id()
        id_header = (REQUEST_ID, request_id.encode("ascii"))
        exchange = Exchange(scope=scope, receive=receive, headers=dict(scope["headers"]))
        status, bytes_out = NO_RESPONSE, 0
        token = bind_request(request_id)
        try:
            try:
                answer = await route.handler(exchange)
            except ModelkeepError as exc:
                if exc.code in ("internal", "config"):
                    log.error("internal error", exc_info=exc)
                response = route.render_error(exc)
            except Exception:
                log.exception("unhandled error in %s", route.template)
                response = error_response(500, "internal error")
            else:
                raw = [
                    (b"content-type", answer.content_type.encode("latin-1")),
                    (b"content-length", b"%d" % len(answer.body)),
                    id_header,
                ]
                raw += [
                    (name.lower().encode("latin-1"), value.encode("latin-1"))
                    for name, value in answer.headers.items()
                ]
                await send({"type": "http.response.start", "status": answer.status, "headers": raw})
                await send({"type": "http.response.body", "body": answer.body})
                status, bytes_out = answer.status, len(answer.body)
                return
            response.raw_headers.append(id_header)
            await response(scope, receive, send)
            status, bytes_out = response.status_code, len(response.body)
        finally:
            if self.observer is not None:
                try:
                    self._observe(exchange, route, request_id, status, started, bytes_out)
                except Exception:
                    log.exception("request observation failed")
            reset_request(token)

    def _observe(
        self,
        exchange: Exchange,
        route: Route,
        request_id: str,
        status: int,
        started: float,
        bytes_out: int,
    ) -> None:
        assert self.observer is not None
        principal = exchange.principal
        self.observer.record(
            request_id=request_id,
            method=exchange.scope["method"],
            route=route.template,
            model=exchange.model,
            version=exchange.observed.version or exchange.version,
            status=status,
            started=started,
            principal=None if principal is None else principal.key_id,
            rows=exchange.observed.rows,
            input_digest=exchange.digest,
            bytes_in=exchange.bytes_in,
            bytes_out=bytes_out,
            client=exchange.client,
        )


def budget_headers(budget: Any) -> dict[str, str]:
    """The caller's budget after this request, as every protocol's answer carries it."""
    if budget is None:
        return {}
    headers = {"X-Budget-Limit": str(budget.limit), "X-Budget-Remaining": str(budget.remaining)}
    if budget.reset is not None:
        headers["X-Budget-Reset"] = budget.reset.isoformat()
    return headers
