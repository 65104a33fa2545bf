"""Request observation as a thin pure-ASGI middleware: access log, metrics, X-Request-Id.

It wraps the FastAPI app, outside authentication and the body limit, so that it also sees
requests they refuse. The V2 infer entry (``v2/infer.py``), which runs before it, calls
``record`` itself with what it knows: wrapping every ASGI message in closures, then reading the
values back from the scope, costs more than a small model's inference.
It reads what the inner layers left in the ASGI scope, which Starlette mutates in place:

- ``scope["route"].path``: the route template, set by the router once a route matched (or
  ``scope["state"]["route"]``, set by a handler that bypasses the router);
- ``scope["path_params"]``: ``model`` and ``version`` as the client wrote them;
- ``scope["state"]``: ``principal`` (set by authentication), and optionally ``rows``,
  ``input_digest`` and ``version`` (the version actually served), set by a handler.

It never reads a header value or a body byte: it only counts bytes, and it takes only these
named keys from the state (which may hold other things, the body included).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from modelkeep.audit.access import (
    AccessLog,
    AccessRecord,
    bind_request,
    new_request_id,
    reset_request,
    safe_input_digest,
    safe_model,
    safe_version,
)
from modelkeep.audit.metrics import Metrics

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = b"x-request-id"
ANONYMOUS = "anonymous"
# Nothing was answered: the client went away or the server cancelled the request (nginx's 499).
NO_RESPONSE = 499
_MAX_METHOD = 16


class ObserveMiddleware:
    """Times each HTTP request, tags the response with ``X-Request-Id``, then logs and counts it.

    The access log line and the metrics are written after the response has been sent, so they
    add to the server's work but not to the latency the client sees before the last byte.
    """

    def __init__(
        self, app: ASGIApp, metrics: Metrics | None, access_log: AccessLog | None = None
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = new_request_id()
        id_header = (REQUEST_ID_HEADER, request_id.encode("ascii"))
        status = 0
        bytes_in = 0
        bytes_out = 0

        async def counting_receive() -> Message:
            nonlocal bytes_in
            message = await receive()
            if message["type"] == "http.request":
                bytes_in += len(message.get("body", b""))
            return message

        async def tagging_send(message: Message) -> None:
            nonlocal status, bytes_out
            if message["type"] == "http.response.start":
                status = message["status"]
                # A new list: the app may reuse its header list for other responses.
                message["headers"] = [*message.get("headers", ()), id_header]
            elif message["type"] == "http.response.body":
                bytes_out += len(message.get("body", b""))
            await send(message)

        token = bind_request(request_id)
        try:
            await self.app(scope, counting_receive, tagging_send)
        except Exception:
            if status == 0:
                status = 500  # the server's error middleware answers it, outside this one
            raise
        finally:
            try:
                self.observe(scope, request_id, status or NO_RESPONSE, started, bytes_in, bytes_out)
            except Exception:
                # Observation must never turn an answered request into a failed one.
                log.exception("request observation failed")
            reset_request(token)

    def observe(
        self,
        scope: Scope,
        request_id: str,
        status: int,
        started: float,
        bytes_in: int,
        bytes_out: int,
    ) -> None:
        """Record a request from what the inner layers left in its ``scope``."""
        state: Mapping[str, Any] = scope.get("state") or {}
        params: Mapping[str, Any] = scope.get("path_params") or {}
        # Starlette's router leaves the matched route in the scope; a handler that bypasses
        # the router may leave the template in the state instead.
        route = getattr(scope.get("route"), "path", None) or state.get("route")
        model = params.get("model")
        version = state.get("version", params.get("version"))
        key_id = getattr(state.get("principal"), "key_id", None)
        client = scope.get("client")
        self.record(
            request_id=request_id,
            method=str(scope.get("method", "")),
            route=route if isinstance(route, str) else None,
            model=model if isinstance(model, str) else None,
            version=version if isinstance(version, (str, int)) else None,
            status=status,
            started=started,
            principal=key_id if isinstance(key_id, str) else None,
            rows=state.get("rows"),
            input_digest=state.get("input_digest"),
            bytes_in=bytes_in,
            bytes_out=bytes_out,
            client=str(client[0]) if client else None,
        )

    def record(
        self,
        *,
        request_id: str,
        method: str,
        route: str | None,
        model: str | None,
        version: str | int | None,
        status: int,
        started: float,
        principal: str | None,
        rows: object,
        input_digest: object,
        bytes_in: int,
        bytes_out: int,
        client: str | None,
    ) -> None:
        """Count one request in the metrics and write its access line.

        ``route`` is the route template; ``model`` and ``version`` are as the client wrote
        them (the version may be the one served instead); ``principal`` is a key id. Values
        that come from the client are shape-checked before they reach the log.
        """
        seconds = time.perf_counter() - started
        if self.metrics is not None:
            self.metrics.observe_request(
                route=route, model=model, version=version, status=status, seconds=seconds
            )
        if self.access_log is None:
            return
        self.access_log.write(
            AccessRecord(
                request_id=request_id,
                principal=ANONYMOUS if principal is None else principal,
                method=method[:_MAX_METHOD],
                route=route,
                model=safe_model(model),
                version=safe_version(version),
                status=status,
                latency_ms=round(seconds * 1000.0, 3),
                rows=rows if type(rows) is int else None,
                input_digest=safe_input_digest(input_digest),
                bytes_in=bytes_in,
                bytes_out=bytes_out,
                client=client,
            )
        )
