"""The fast path for V2 inference: a few lines of pure ASGI in front of FastAPI.

Routing and dependency handling in FastAPI cost several times a small model's inference
(bench/README.md). Infer requests are recognised here and handed to the same service calls the
FastAPI routes use, with the same checks in the same order: authentication, the body limit,
the bounded queue, then the service (authorization, validation, admission, runtime, guard).
Everything else goes on to FastAPI.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Receive, Scope, Send

from modelkeep.audit.access import bind_request, input_digest, new_request_id, reset_request
from modelkeep.auth import AuthFailure
from modelkeep.errors import ModelkeepError
from modelkeep.service import Service

from ._body import header_length, receive_body
from ._errors import error_response, modelkeep_error_response
from ._infer import InferRunner
from ._observe import NO_RESPONSE, ObserveMiddleware
from ._observe import REQUEST_ID_HEADER as REQUEST_ID

log = logging.getLogger(__name__)

INFER_PATH = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?/infer")
INFER_ROUTES = ("/v2/models/{model}/infer", "/v2/models/{model}/versions/{version}/infer")


class FastInfer:
    def __init__(
        self,
        app: ASGIApp,
        service: Service,
        runner: InferRunner,
        observer: ObserveMiddleware | None = None,
    ) -> None:
        self.app = app
        self.service = service
        self.runner = runner
        self.observer = observer
        self.max_body = service.settings.max_request_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        match = INFER_PATH.fullmatch(scope["path"])
        if match is None:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = new_request_id()
        model, version = match.group(1), match.group(2)
        # What the steps learn for the access log: principal, body size and digest (here),
        # rows and the version served (the service).
        stats: dict[str, Any] = scope.setdefault("state", {})
        id_header = (REQUEST_ID, request_id.encode("ascii"))
        status, bytes_out = NO_RESPONSE, 0
        # Log lines and captured payloads of this request carry its id.
        token = bind_request(request_id)
        try:
            try:
                content, headers = await self._handle(scope, receive, model, version, stats)
            except ModelkeepError as exc:
                response = modelkeep_error_response(exc)
            except Exception:
                log.exception("unhandled error in inference")
                response = error_response(500, "internal error")
            else:
                media_type = headers.pop("content-type", "application/json")
                raw = [
                    (b"content-type", media_type.encode("latin-1")),
                    (b"content-length", b"%d" % len(content)),
                    id_header,
                ]
                if headers:
                    raw += [
                        (k.lower().encode("latin-1"), v.encode("latin-1"))
                        for k, v in headers.items()
                    ]
                await send({"type": "http.response.start", "status": 200, "headers": raw})
                await send({"type": "http.response.body", "body": content})
                status, bytes_out = 200, len(content)
                return
            response.raw_headers.append(id_header)
            await response(scope, receive, send)
            status, bytes_out = response.status_code, len(response.body)
        finally:
            if self.observer is not None:
                try:
                    self._observe(
                        scope, request_id, status, started, model, version, stats, bytes_out
                    )
                except Exception:
                    log.exception("request observation failed")
            reset_request(token)

    def _observe(
        self,
        scope: Scope,
        request_id: str,
        status: int,
        started: float,
        model: str,
        version: str | None,
        stats: dict[str, Any],
        bytes_out: int,
    ) -> None:
        assert self.observer is not None
        principal = stats.get("principal")
        client = scope.get("client")
        self.observer.record(
            request_id=request_id,
            method="POST",
            route=INFER_ROUTES[version is not None],
            model=model,
            version=stats.get("version", version),
            status=status,
            started=started,
            principal=None if principal is None else principal.key_id,
            rows=stats.get("rows"),
            input_digest=stats.get("input_digest"),
            bytes_in=stats.get("bytes_in", 0),
            bytes_out=bytes_out,
            client=str(client[0]) if client else None,
        )

    async def _handle(
        self,
        scope: Scope,
        receive: Receive,
        model: str,
        version: str | None,
        stats: dict[str, Any],
    ) -> tuple[bytes, dict[str, str]]:
        authorization = None
        content_length = None
        length_header = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value.decode("latin-1")
            elif name == b"content-length":
                content_length = value
            elif name == b"inference-header-content-length":
                length_header = value
        # 1. Authentication (a refusal is audited before the 401 leaves).
        try:
            principal = self.service.authenticate(authorization)
        except AuthFailure as exc:
            client = scope.get("client")
            await run_in_threadpool(
                self.service.record_auth_failure, exc, client[0] if client else None
            )
            raise
        stats["principal"] = principal
        # 2. The body, refused as soon as it passes the limit.
        body = await receive_body(receive, content_length, self.max_body)
        stats["bytes_in"] = len(body)
        stats["input_digest"] = input_digest(body)
        # 3. Queue, then the service: authorization, validation, admission, runtime, guard.
        return await self.runner.run(
            principal, model, version, body, header_length(length_header), stats=stats
        )
