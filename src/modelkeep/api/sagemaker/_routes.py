"""``GET /ping`` and ``POST /invocations``: the SageMaker container contract over the data plane.

``/ping`` is public, like ``/v2/health/ready``: SageMaker's health checks carry no credentials,
and it says only whether this server is ready. ``/invocations`` is a way in like every other:
the caller's modelkeep key (in ``Authorization``, or as the ``modelkeep-key`` custom attribute
when SageMaker's front end sits in between, see docs/protocols.md), then the body limit, then
the data plane (authorization, limits, decoding against the signature, runtime, detectors,
hardening, capture), then the answer in the type Accept asked for.
"""

from __future__ import annotations

import time

from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from modelkeep.audit.access import new_request_id
from modelkeep.errors import InvalidInput, ModelkeepError
from modelkeep.service import InferCall, Service

from .._entry import Answer, Exchange, Route, budget_headers
from .._errors import error_response, modelkeep_error_response
from .._observe import REQUEST_ID_HEADER as REQUEST_ID
from .._observe import ObserveMiddleware
from ._attributes import CUSTOM_ATTRIBUTES, parse_custom_attributes, target_model
from ._codec import NotAcceptable, UnsupportedMediaType, answer_type, encode_answer, request_decoder

__all__ = ["sagemaker_routes"]

_CUSTOM_ATTRIBUTES = CUSTOM_ATTRIBUTES.lower().encode("latin-1")
_TARGET_MODEL = b"x-amzn-sagemaker-target-model"


def render_error(exc: ModelkeepError) -> Response:
    """modelkeep's error body; 415 and 406 for media types /invocations does not speak."""
    if isinstance(exc, UnsupportedMediaType):
        return error_response(415, exc.message)
    if isinstance(exc, NotAcceptable):
        return error_response(406, exc.message)
    return modelkeep_error_response(exc)


def sagemaker_routes(service: Service) -> dict[tuple[str, str], Route]:
    settings = service.settings
    dataplane = service.dataplane
    max_body = settings.max_request_bytes

    async def ping(_exchange: Exchange) -> Answer:
        if service.ready():
            return Answer(b"", "text/plain")
        return Answer(b"not ready", "text/plain", {"Retry-After": "1"}, status=503)

    async def invocations(exchange: Exchange) -> Answer:
        # 1. The key: in Authorization, or as a custom attribute (never both, never echoed).
        attributes = parse_custom_attributes(exchange.header(_CUSTOM_ATTRIBUTES))
        authorization = exchange.header(b"authorization")
        if attributes.key is not None:
            if authorization is not None:
                raise InvalidInput(
                    "send the key in Authorization or as the modelkeep-key custom attribute, "
                    "not both"
                )
            authorization = f"Bearer {attributes.key}"
        # 2. Authentication (a refusal is audited before the 401 leaves).
        principal = await exchange.authenticate(service, authorization)
        # 3. What to answer in and how to read the body, before the body is read.
        answer = answer_type(exchange.header(b"accept"))
        content_type = exchange.header(b"content-type")
        model = target_model(exchange.header(_TARGET_MODEL), settings.sagemaker_model)
        exchange.model = model
        # 4. The body, refused as soon as it passes the limit.
        body = await exchange.body(max_body)
        # 5. The data plane: queue, authorization, decoding, admission, runtime, guard.
        decode = request_decoder(body, content_type)
        call = InferCall(body, decode, "sagemaker", exchange.observed)
        result = await dataplane.infer(principal, model, call)
        content, headers = encode_answer(
            answer, result.request, result.outputs, model=result.model, version=result.version
        )
        media = headers.pop("content-type")
        headers.update(budget_headers(result.budget))
        if attributes.echo is not None:
            headers[CUSTOM_ATTRIBUTES] = attributes.echo
        return Answer(content, media, headers)

    return {
        ("GET", "/ping"): Route(ping, "/ping"),
        ("POST", "/invocations"): Route(invocations, "/invocations", render_error),
    }


# What a plaintext listener serves: SageMaker's two routes and nothing else.
PLAINTEXT_PATHS = frozenset({"/ping", "/invocations"})


def plaintext_guard(app: ASGIApp, observer: ObserveMiddleware | None = None) -> ASGIApp:
    """With ``sagemaker_unsafe_plaintext``: 404 for every path but ``/ping`` and
    ``/invocations``, before authentication, so management, V2, metrics and the console are
    never reachable without TLS (not even to be refused with a key in clear). Each refusal is
    still counted and in the access log."""

    async def guarded(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PLAINTEXT_PATHS:
            await app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = new_request_id()
        response = error_response(404, "not found: this listener serves SageMaker only")
        response.raw_headers.append((REQUEST_ID, request_id.encode("ascii")))
        await response(scope, receive, send)
        if observer is not None:
            client = scope.get("client")
            observer.record(
                request_id=request_id,
                method=scope["method"],
                route=None,
                model=None,
                version=None,
                status=404,
                started=started,
                principal=None,
                rows=None,
                input_digest=None,
                bytes_in=0,
                bytes_out=len(response.body),
                client=str(client[0]) if client else None,
            )

    return guarded
