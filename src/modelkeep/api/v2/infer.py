"""The V2 REST infer entry: a few lines of pure ASGI in front of FastAPI.

Routing and dependency handling in FastAPI cost several times a small model's inference
(bench/README.md). Infer requests are recognised here and served by the data plane, with the
same checks in the same order as every protocol: authentication (``authenticate_request``),
the body limit, then ``service.dataplane.infer`` (the bounded queue, authorization, validation,
admission, runtime, guard). Everything else goes on to FastAPI.
"""

from __future__ import annotations

import functools
import logging
import re
import time

from starlette.types import ASGIApp, Receive, Scope, Send

from modelkeep.api._auth import authenticate_request
from modelkeep.api._body import header_length, receive_body
from modelkeep.api._errors import error_response, modelkeep_error_response
from modelkeep.api._observe import NO_RESPONSE, ObserveMiddleware
from modelkeep.api._observe import REQUEST_ID_HEADER as REQUEST_ID
from modelkeep.api.v2.codec import (
    INFERENCE_HEADER_CONTENT_LENGTH,
    InferRequest,
    decode_infer_request,
    encode_infer_response,
)
from modelkeep.audit.access import bind_request, input_digest, new_request_id, reset_request
from modelkeep.auth import Principal
from modelkeep.errors import ModelkeepError
from modelkeep.service import InferCall, InferResult, Observed, Service

log = logging.getLogger(__name__)

INFER_PATH = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?/infer")
INFER_ROUTES = ("/v2/models/{model}/infer", "/v2/models/{model}/versions/{version}/infer")
_HEADER_LENGTH = INFERENCE_HEADER_CONTENT_LENGTH.lower().encode("latin-1")


def v2_call(
    body: bytes, header_length: int | None = None, observed: Observed | None = None
) -> InferCall[InferRequest]:
    """A V2 REST infer request as the data plane takes it (decoded only once authorized)."""
    if header_length is None:
        decode = functools.partial(decode_infer_request, body)
    else:
        decode = functools.partial(decode_infer_request, body, header_length=header_length)
    return InferCall(body, decode, "v2", observed)


def encode_result(result: InferResult[InferRequest]) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """A V2 infer response: the body and its headers (content type, length, budget)."""
    content, headers = encode_infer_response(
        model_name=result.model,
        model_version=str(result.version),
        request=result.request,
        outputs=result.outputs,
    )
    raw = [
        (b"content-type", headers.pop("content-type").encode("latin-1")),
        (b"content-length", b"%d" % len(content)),
    ]
    if headers:
        raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
    budget = result.budget
    if budget is not None:
        raw.append((b"x-budget-limit", b"%d" % budget.limit))
        raw.append((b"x-budget-remaining", b"%d" % budget.remaining))
        if budget.reset is not None:
            raw.append((b"x-budget-reset", budget.reset.isoformat().encode("latin-1")))
    return content, raw


class FastInfer:
    def __init__(
        self,
        app: ASGIApp,
        service: Service,
        observer: ObserveMiddleware | None = None,
    ) -> None:
        self.app = app
        self.service = service
        self.dataplane = service.dataplane
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
        # What the access log learns: principal, body size and digest (here), rows and the
        # version served (the data plane, through ``observed``).
        principal: Principal | None = None
        bytes_in = 0
        digest: str | None = None
        observed = Observed()
        id_header = (REQUEST_ID, request_id.encode("ascii"))
        status, bytes_out = NO_RESPONSE, 0
        # Log lines and captured payloads of this request carry its id.
        token = bind_request(request_id)
        try:
            try:
                authorization = None
                content_length = None
                length_header = None
                for name, value in scope["headers"]:
                    if name == b"authorization":
                        authorization = value.decode("latin-1")
                    elif name == b"content-length":
                        content_length = value
                    elif name == _HEADER_LENGTH:
                        length_header = value
                client = scope.get("client")
                # 1. Authentication (a refusal is audited before the 401 leaves).
                principal = await authenticate_request(
                    self.service, authorization, client[0] if client else None
                )
                # 2. The body, refused as soon as it passes the limit.
                body = await receive_body(receive, content_length, self.max_body)
                bytes_in = len(body)
                digest = input_digest(body)
                # 3. The data plane: queue, authorization, validation, admission, runtime, guard.
                length = header_length(length_header)
                if length is None:
                    decode = functools.partial(decode_infer_request, body)
                else:
                    decode = functools.partial(decode_infer_request, body, header_length=length)
                # (v2_call, inlined: this is every request's path.)
                call = InferCall(body, decode, "v2", observed)
                result = await self.dataplane.infer(principal, model, call, version)
                content, raw = encode_result(result)
            except ModelkeepError as exc:
                response = modelkeep_error_response(exc)
            except Exception:
                log.exception("unhandled error in inference")
                response = error_response(500, "internal error")
            else:
                raw.append(id_header)
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
                    client = scope.get("client")
                    self.observer.record(
                        request_id=request_id,
                        method="POST",
                        route=INFER_ROUTES[version is not None],
                        model=model,
                        version=observed.version if observed.version is not None else version,
                        status=status,
                        started=started,
                        principal=None if principal is None else principal.key_id,
                        rows=observed.rows,
                        input_digest=digest,
                        bytes_in=bytes_in,
                        bytes_out=bytes_out,
                        client=str(client[0]) if client else None,
                    )
                except Exception:
                    log.exception("request observation failed")
            reset_request(token)
