"""``POST /score``, ``GET /`` and ``GET /swagger.json``: Azure ML's contract over the data plane.

``GET /`` is public liveness, like ``/v2/health/live`` (Azure's probes carry no credentials).
``/score`` and ``/swagger.json`` need a modelkeep key in ``Authorization: Bearer`` and serve the
model named by ``MODELKEEP_AZUREML_MODEL``; the ``azureml-model-deployment`` header, which
Azure ML uses to pick a deployment, picks a modelkeep label of that model.
"""

from __future__ import annotations

import orjson

from modelkeep.errors import NotFound
from modelkeep.service import InferCall, Service

from .._entry import Answer, Exchange, Route, budget_headers
from ._codec import JSON_CONTENT_TYPE, encode_answer, request_decoder
from ._swagger import swagger_document

__all__ = ["azureml_routes"]

_DEPLOYMENT = b"azureml-model-deployment"


def azureml_routes(service: Service) -> dict[tuple[str, str], Route]:
    settings = service.settings
    dataplane = service.dataplane
    max_body = settings.max_request_bytes

    def served_model() -> str:
        if settings.azureml_model is None:
            raise NotFound("no model is served on /score (set MODELKEEP_AZUREML_MODEL)")
        return settings.azureml_model

    def deployment_label(exchange: Exchange) -> str | None:
        value = exchange.header(_DEPLOYMENT)
        return value.strip() or None if value is not None else None

    async def live(_exchange: Exchange) -> Answer:
        return Answer(b"Healthy", "text/plain")

    async def score(exchange: Exchange) -> Answer:
        # 1. Authentication (a refusal is audited before the 401 leaves).
        principal = await exchange.authenticate(service, exchange.header(b"authorization"))
        model = exchange.model = served_model()
        label = deployment_label(exchange)
        # 2. The body, refused as soon as it passes the limit.
        body = await exchange.body(max_body)
        # 3. The data plane: queue, authorization, decoding, admission, runtime, guard.
        call = InferCall(body, request_decoder(body), "azureml", exchange.observed)
        result = await dataplane.infer(principal, model, call, label=label)
        return Answer(
            encode_answer(result.outputs), JSON_CONTENT_TYPE, budget_headers(result.budget)
        )

    async def swagger(exchange: Exchange) -> Answer:
        principal = await exchange.authenticate(service, exchange.header(b"authorization"))
        model = exchange.model = served_model()
        # Authorized (model read) like the model's V2 metadata.
        found, signature = dataplane.signature(principal, model, label=deployment_label(exchange))
        exchange.version = found.number
        document = swagger_document(found.model, found.number, signature)
        return Answer(orjson.dumps(document), JSON_CONTENT_TYPE)

    return {
        ("GET", "/"): Route(live, "/"),
        ("POST", "/score"): Route(score, "/score"),
        ("GET", "/swagger.json"): Route(swagger, "/swagger.json"),
    }
