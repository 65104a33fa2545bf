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
from collections.abc import Mapping

import orjson
from starlette.types import ASGIApp, Receive, Scope, Send

from modelkeep.audit.access import new_request_id
from modelkeep.errors import InvalidInput, ModelkeepError
from modelkeep.service import InferCall, Service

from .._entry import Answer, Exchange, Route, budget_headers
from .._errors import error_response
from .._observe import REQUEST_ID_HEADER as REQUEST_ID
from .._observe import ObserveMiddleware
from ._attributes import CUSTOM_ATTRIBUTES, parse_custom_attributes, target_model
from ._codec import NotAcceptable, UnsupportedMediaType, answer_type, encode_answer, request_decoder

__all__ = ["PLAINTEXT_PATHS", "credentials", "plaintext_guard", "sagemaker_routes"]

_CUSTOM_ATTRIBUTES = CUSTOM_ATTRIBUTES.lower().encode("latin-1")
_ECHO = CUSTOM_ATTRIBUTES.lower().encode("latin-1")
_TARGET_MODEL = b"x-amzn-sagemaker-target-model"


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("latin-1")


def credentials(headers: Mapping[bytes, bytes]) -> str | None:
    """The key: in ``Authorization``, or as the ``modelkeep-key`` custom attribute (SageMaker's
    front end forwards no Authorization header); both at once is refused."""
    authorization = _text(headers.get(b"authorization"))
    key = parse_custom_attributes(_text(headers.get(_CUSTOM_ATTRIBUTES))).key
    if key is None:
        return authorization
    if authorization is not None:
        raise InvalidInput(
            "send the key in Authorization or as the modelkeep-key custom attribute, not both"
        )
    return f"Bearer {key}"


def _refusal(status: int, exc: ModelkeepError) -> Answer:
    """415 and 406, which modelkeep's error codes do not name: media types /invocations does
    not speak."""
    return Answer(status, orjson.dumps({"error": exc.message}))


def sagemaker_routes(service: Service) -> dict[tuple[str, str], Route]:
    """``GET /ping`` (public) and ``POST /invocations``, by method and path."""
    settings = service.settings
    dataplane = service.dataplane

    async def ping(_exchange: Exchange) -> Answer:
        if service.ready():
            return Answer(200, b"", content_type=b"text/plain")
        return Answer(503, b"not ready", [(b"retry-after", b"1")], b"text/plain")

    async def invocations(exchange: Exchange) -> Answer:
        # Authenticated (ProtocolEntry, with ``credentials``), body read within the limit.
        principal = exchange.principal
        if principal is None:  # unreachable: the route is not public; fail closed
            raise InvalidInput("missing credentials")
        # 1. How to read the body and what to answer in, before any work.
        try:
            answer = answer_type(exchange.header(b"accept"))
            decode = request_decoder(exchange.body, exchange.header(b"content-type"))
        except UnsupportedMediaType as exc:
            return _refusal(415, exc)
        except NotAcceptable as exc:
            return _refusal(406, exc)
        model = exchange.model = target_model(
            exchange.header(_TARGET_MODEL), settings.sagemaker_model
        )
        # 2. The data plane: queue, authorization, decoding, admission, runtime, guard.
        call = InferCall(exchange.body, decode, "sagemaker", exchange.observed)
        result = await dataplane.infer(principal, model, call)
        try:
            content, headers = encode_answer(
                answer, result.request, result.outputs, model=result.model, version=result.version
            )
        except NotAcceptable as exc:
            return _refusal(406, exc)
        media = headers.pop("content-type").encode("latin-1")
        raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
        raw += budget_headers(result.budget)
        # 3. The custom attributes back, as SageMaker returns them to the caller, key cut out.
        echo = parse_custom_attributes(exchange.header(_CUSTOM_ATTRIBUTES)).echo
        if echo is not None:
            raw.append((_ECHO, echo.encode("latin-1")))
        return Answer(200, content, raw, media)

    return {
        ("GET", "/ping"): Route("/ping", ping, public=True, reads_body=False),
        ("POST", "/invocations"): Route("/invocations", invocations, credentials=credentials),
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
