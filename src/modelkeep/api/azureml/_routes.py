"""``POST /score``, ``GET /`` and ``GET /swagger.json``: Azure ML's contract over the data plane.

``GET /`` is public liveness, like ``/v2/health/live`` (Azure's probes carry no credentials).
``/score`` and ``/swagger.json`` need a modelkeep key in ``Authorization: Bearer`` and serve the
model named by ``MODELKEEP_AZUREML_MODEL``; the ``azureml-model-deployment`` header, which
Azure ML uses to pick a deployment, picks a modelkeep label of that model.
"""

from __future__ import annotations

import orjson

from modelkeep.auth import Principal
from modelkeep.errors import NotFound, Unauthenticated
from modelkeep.service import InferCall, Service

from .._entry import Answer, Exchange, Route, budget_headers
from ._codec import encode_answer, request_decoder
from ._swagger import swagger_document

__all__ = ["azureml_routes"]

_DEPLOYMENT = b"azureml-model-deployment"


def azureml_routes(service: Service) -> dict[tuple[str, str], Route]:
    """``GET /`` (public), ``POST /score`` and ``GET /swagger.json``, by method and path."""
    settings = service.settings
    dataplane = service.dataplane

    def served_model() -> str:
        if settings.azureml_model is None:
            raise NotFound("no model is served on /score (set MODELKEEP_AZUREML_MODEL)")
        return settings.azureml_model

    def deployment_label(exchange: Exchange) -> str | None:
        value = exchange.header(_DEPLOYMENT)
        return value.strip() or None if value is not None else None

    def caller(exchange: Exchange) -> Principal:
        if exchange.principal is None:  # unreachable: the route is not public; fail closed
            raise Unauthenticated("missing credentials")
        return exchange.principal

    async def live(_exchange: Exchange) -> Answer:
        return Answer(200, b"Healthy", content_type=b"text/plain")

    async def score(exchange: Exchange) -> Answer:
        # Authenticated (ProtocolEntry), body read within the limit; then the data plane:
        # queue, authorization, decoding, admission, runtime, guard.
        model = exchange.model = served_model()
        call = InferCall(
            exchange.body, request_decoder(exchange.body), "azureml", exchange.observed
        )
        result = await dataplane.infer(
            caller(exchange), model, call, label=deployment_label(exchange)
        )
        return Answer(200, encode_answer(result.outputs), budget_headers(result.budget))

    async def swagger(exchange: Exchange) -> Answer:
        model = exchange.model = served_model()
        # Authorized (model read) like the model's V2 metadata.
        found, signature = dataplane.signature(
            caller(exchange), model, label=deployment_label(exchange)
        )
        exchange.observed.version = found.number
        return Answer(200, orjson.dumps(swagger_document(found.model, found.number, signature)))

    return {
        ("GET", "/"): Route("/", live, public=True, reads_body=False),
        ("POST", "/score"): Route("/score", score),
        ("GET", "/swagger.json"): Route("/swagger.json", swagger, reads_body=False),
    }
