"""Vertex AI's custom-container routes, recognised in pure ASGI (``api/_entry.py``).

Vertex tells the container where to listen and what to answer with ``AIP_HTTP_PORT``,
``AIP_PREDICT_ROUTE`` and ``AIP_HEALTH_ROUTE`` (settings ``vertex_predict_route`` and
``vertex_health_route``; the port is ``port``). The predict route serves one model, the
setting ``vertex_model`` (MODELKEEP_VERTEX_MODEL), at its default version. The health route is
public, as ``/v2/health/*`` is: it answers 200 when the server is ready, 503 otherwise.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from modelkeep.errors import Unavailable
from modelkeep.service import DataPlane, InferCall, Service

from .._entry import Answer, Exchange, Route, budget_headers
from ._codec import decode_vertex, encode_vertex

__all__ = ["vertex_matcher"]


def vertex_matcher(service: Service) -> Callable[[str, str], Route | None] | None:
    """The matcher for ``ProtocolEntry``, or None when no Vertex route is configured."""
    dataplane = service.dataplane
    settings = service.settings
    predict_route = settings.vertex_predict_route
    health_route = settings.vertex_health_route
    model = settings.vertex_model
    if predict_route is None and health_route is None:
        return None
    predict = None
    if predict_route is not None and model is not None:
        handler = functools.partial(_predict, dataplane, model)
        # The configured paths are the templates metrics and the access log show: fixed at
        # start, so they add one label value each.
        predict = Route(predict_route, handler, model)
    health = Route(
        health_route or "", functools.partial(_health, service), public=True, reads_body=False
    )

    def match(method: str, path: str) -> Route | None:
        if method == "POST" and path == predict_route:
            return predict
        if method == "GET" and path == health_route:
            return health
        return None

    return match


async def _predict(dataplane: DataPlane, model: str, exchange: Exchange) -> Answer:
    assert exchange.principal is not None
    decode = functools.partial(decode_vertex, exchange.body)
    result = await dataplane.infer(
        exchange.principal,
        model,
        InferCall(exchange.body, decode, "vertex", exchange.observed),
    )
    return Answer(200, encode_vertex(result.request, result.outputs), budget_headers(result.budget))


async def _health(service: Service, exchange: Exchange) -> Answer:
    if not service.ready():
        raise Unavailable("not ready", retry_after=1)
    return Answer(200, b"{}")
