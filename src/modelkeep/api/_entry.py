"""A protocol's way in: a few lines of pure ASGI in front of FastAPI, as the V2 infer entry.

Routing and dependency handling in FastAPI cost several times a small model's inference
(bench/README.md), so each protocol adapter (``api/tfserving/``, ``api/vertex/``,
``api/sagemaker/``, ``api/azureml/``) recognises its own paths here and answers them itself, with
the same steps in the same order as every entry:

1. authentication (the one ``authenticate_request``; a refusal is audited before the 401),
   unless the route is public (a health check); the credential is the ``Authorization``
   header, or what the route's ``credentials`` takes from the headers for a protocol that
   carries it elsewhere (SageMaker's custom attributes);
2. the body, refused as soon as it passes ``max_request_bytes``;
3. the adapter's handler, which calls the data plane (authorization, decoding against the
   signature, admission, the queue, runtime, detectors, hardening, audit);
4. the access log line and request metrics, under the route's template.

Errors are the protocol's ``{"error": message}`` with the status of modelkeep's one map
(``api/_errors.py``); nothing but a ``ModelkeepError``'s message is ever shown.
Everything the adapter does not recognise goes on to the next app.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

import orjson
from starlette.types import ASGIApp, Receive, Scope, Send

from modelkeep.audit.access import bind_request, input_digest, new_request_id, reset_request
from modelkeep.auth import Principal
from modelkeep.errors import ModelkeepError
from modelkeep.service import Budget, Observed, Service

from ._auth import authenticate_request
from ._body import receive_body
from ._errors import STATUS_BY_CODE
from ._observe import NO_RESPONSE, ObserveMiddleware
from ._observe import REQUEST_ID_HEADER as REQUEST_ID

log = logging.getLogger(__name__)

JSON = b"application/json"
# The route table's bounds: paths come from clients, before authentication, so at most this
# many of at most this length (a model name is at most 63 characters) are remembered.
_MAX_ROUTES = 1024
_MAX_REMEMBERED_PATH = 256


@dataclass(slots=True)
class Exchange:
    """One request as its handler sees it, and what it learns for the access log."""

    principal: Principal | None
    body: bytes
    observed: Observed = field(default_factory=Observed)  # rows, version served
    # The request's headers (lower-case names; the last of a repeated header wins).
    headers: Mapping[bytes, bytes] = field(default_factory=dict)
    # The model the handler served, when the path does not name it (for the access log).
    model: str | None = None

    def header(self, name: bytes) -> str | None:
        """A header's value (``name`` in lower case), decoded only when asked for."""
        value = self.headers.get(name)
        return None if value is None else value.decode("latin-1")


@dataclass(slots=True)  # not frozen: one per request, and frozen costs a setattr per field
class Answer:
    status: int
    body: bytes
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    content_type: bytes = JSON


Handler = Callable[[Exchange], Awaitable[Answer]]
# Takes a protocol's credential from the request headers, as an ``Authorization`` value (or
# None); may refuse a malformed header with InvalidInput. Runs before authentication.
Credentials = Callable[[Mapping[bytes, bytes]], str | None]


@dataclass(frozen=True, slots=True)
class Route:
    """A recognised request: its template (for metrics and the log) and its handler."""

    template: str
    handler: Handler
    model: str | None = None
    version: str | None = None
    public: bool = False
    reads_body: bool = True
    credentials: Credentials | None = None  # None: the Authorization header


Matcher = Callable[[str, str], Route | None]


def error_answer(exc: ModelkeepError) -> Answer:
    """``{"error": message}`` with the status of modelkeep's one code map."""
    status = STATUS_BY_CODE.get(exc.code, 500)
    headers: list[tuple[bytes, bytes]] = []
    if exc.retry_after is not None:
        headers.append((b"retry-after", b"%d" % max(1, math.ceil(exc.retry_after))))
    if status == 401:
        headers.append((b"www-authenticate", b'Bearer realm="modelkeep"'))
    shown = status < 500 or exc.code in ("unavailable", "integrity")
    if exc.code in ("internal", "config"):
        log.error("internal error", exc_info=exc)
    message = exc.message if shown else "internal error"
    return Answer(status, orjson.dumps({"error": message}), headers)


class ProtocolEntry:
    """Serves the requests ``match`` recognises (by method and path); passes the rest on."""

    def __init__(
        self,
        app: ASGIApp,
        service: Service,
        match: Matcher,
        observer: ObserveMiddleware | None = None,
    ) -> None:
        self.app = app
        self.service = service
        self.match = match
        self.observer = observer
        self.max_body = service.settings.max_request_bytes
        # Routes already matched, by method and path: a client calls the same few paths again
        # and again, and this spares each call the regular expressions and the handler's
        # binding (bounded: see _MAX_ROUTES).
        self._routes: dict[tuple[str, str], Route] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        key = (scope["method"], scope["path"])
        route = self._routes.get(key)
        if route is None:
            route = self.match(*key)
            if route is None:
                await self.app(scope, receive, send)
                return
            if len(key[1]) <= _MAX_REMEMBERED_PATH:
                if len(self._routes) >= _MAX_ROUTES:
                    self._routes.clear()
                self._routes[key] = route
        started = time.perf_counter()
        request_id = new_request_id()
        request_headers = dict(scope["headers"])
        exchange = Exchange(None, b"", headers=request_headers)
        digest: str | None = None
        status, bytes_out = NO_RESPONSE, 0
        token = bind_request(request_id)
        try:
            try:
                # 1. Authentication.
                if not route.public:
                    if route.credentials is None:
                        value = request_headers.get(b"authorization")
                        authorization = None if value is None else value.decode("latin-1")
                    else:
                        authorization = route.credentials(request_headers)
                    client = scope.get("client")
                    exchange.principal = await authenticate_request(
                        self.service, authorization, client[0] if client else None
                    )
                # 2. The body, refused as soon as it passes the limit.
                if route.reads_body:
                    exchange.body = await receive_body(
                        receive, request_headers.get(b"content-length"), self.max_body
                    )
                    digest = input_digest(exchange.body)
                # 3. The adapter, over the data plane.
                answer = await route.handler(exchange)
            except ModelkeepError as exc:
                answer = error_answer(exc)
            except Exception:
                log.exception("unhandled error in %s", route.template)
                answer = Answer(500, b'{"error":"internal error"}')
            headers = [
                (b"content-type", answer.content_type),
                (b"content-length", b"%d" % len(answer.body)),
                (REQUEST_ID, request_id.encode("ascii")),
                *answer.headers,
            ]
            await send({"type": "http.response.start", "status": answer.status, "headers": headers})
            await send({"type": "http.response.body", "body": answer.body})
            status, bytes_out = answer.status, len(answer.body)
        finally:
            if self.observer is not None:
                try:
                    principal = exchange.principal
                    client = scope.get("client")
                    self.observer.record(
                        request_id=request_id,
                        method=scope["method"],
                        route=route.template,
                        model=route.model if exchange.model is None else exchange.model,
                        version=(
                            route.version
                            if exchange.observed.version is None
                            else exchange.observed.version
                        ),
                        status=status,
                        started=started,
                        principal=None if principal is None else principal.key_id,
                        rows=exchange.observed.rows,
                        input_digest=digest,
                        bytes_in=len(exchange.body),
                        bytes_out=bytes_out,
                        client=str(client[0]) if client else None,
                    )
                except Exception:
                    log.exception("request observation failed")
            reset_request(token)


def budget_headers(budget: Budget | None) -> list[tuple[bytes, bytes]]:
    """``X-Budget-*`` headers, as V2 answers carry them, for a result's budget (or none)."""
    if budget is None:
        return []
    headers = [
        (b"x-budget-limit", b"%d" % budget.limit),
        (b"x-budget-remaining", b"%d" % budget.remaining),
    ]
    if budget.reset is not None:
        headers.append((b"x-budget-reset", budget.reset.isoformat().encode("latin-1")))
    return headers
