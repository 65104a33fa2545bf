"""TensorFlow Serving's REST routes, recognised in pure ASGI (``api/_entry.py``).

    POST /v1/models/{m}[/versions/{v}|/labels/{l}]:predict|:classify|:regress
    GET  /v1/models/{m}[/versions/{v}|/labels/{l}]            model_version_status
    GET  /v1/models/{m}[/versions/{v}|/labels/{l}]/metadata   signature_def

A TF Serving version label is a modelkeep label (``production``, ``canary``...). Without a
version or label the model's default version answers (``production``, else the newest), as
the V2 routes do.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any

from starlette.concurrency import run_in_threadpool

from modelkeep.errors import InvalidInput
from modelkeep.service import DataPlane, InferCall, Service

from .._entry import Answer, Exchange, Route, budget_headers
from ._codec import (
    ExamplesRequest,
    PredictRequest,
    decode_classify,
    decode_predict,
    decode_regress,
    encode_classify,
    encode_predict,
    encode_regress,
)
from ._metadata import model_metadata, model_status

__all__ = ["tfserving_matcher"]

_SELECTOR = r"(?:/versions/(?P<version>[^/:]+)|/labels/(?P<label>[^/:]+))?"
_POST = re.compile(
    r"/v1/models/(?P<model>[^/:]+)" + _SELECTOR + r":(?P<verb>predict|classify|regress)"
)
_GET = re.compile(r"/v1/models/(?P<model>[^/:]+)" + _SELECTOR + r"(?P<metadata>/metadata)?")

_DECODERS: dict[str, Callable[..., Any]] = {
    "predict": decode_predict,
    "classify": decode_classify,
    "regress": decode_regress,
}


def _template(version: str | None, label: str | None, suffix: str) -> str:
    if version is not None:
        return "/v1/models/{model}/versions/{version}" + suffix
    if label is not None:
        return "/v1/models/{model}/labels/{label}" + suffix
    return "/v1/models/{model}" + suffix


def tfserving_matcher(service: Service) -> Callable[[str, str], Route | None]:
    """The matcher for ``ProtocolEntry``: TF Serving's routes over the service's data plane."""
    dataplane = service.dataplane

    def match(method: str, path: str) -> Route | None:
        if not path.startswith("/v1/models/"):
            return None
        if method == "POST":
            found = _POST.fullmatch(path)
            if found is None:
                return None
            model, version, label, verb = found.group("model", "version", "label", "verb")
            handler = functools.partial(_infer, dataplane, model, version, label, verb)
            return Route(_template(version, label, ":" + verb), handler, model, version)
        if method == "GET":
            found = _GET.fullmatch(path)
            if found is None:
                return None
            model, version, label, metadata = found.group("model", "version", "label", "metadata")
            if metadata is not None:
                handler = functools.partial(_metadata, dataplane, model, version, label)
                template = _template(version, label, "/metadata")
            else:
                handler = functools.partial(_status, dataplane, model, version, label)
                template = _template(version, label, "")
            return Route(template, handler, model, version, reads_body=False)
        return None

    return match


async def _infer(
    dataplane: DataPlane,
    model: str,
    version: str | None,
    label: str | None,
    verb: str,
    exchange: Exchange,
) -> Answer:
    assert exchange.principal is not None
    decode = functools.partial(_DECODERS[verb], exchange.body)
    result = await dataplane.infer(
        exchange.principal,
        model,
        InferCall(exchange.body, decode, "tfserving", exchange.observed),
        version=version,
        label=label,
    )
    request = result.request
    if isinstance(request, PredictRequest):
        content = encode_predict(request, result.outputs)
    elif isinstance(request, ExamplesRequest) and request.method == "classify":
        content = encode_classify(request, result.outputs)
    elif isinstance(request, ExamplesRequest):
        content = encode_regress(request, result.outputs)
    else:  # pragma: no cover - the decoders above make only these
        raise InvalidInput("unsupported request")
    return Answer(200, content, budget_headers(result.budget))


async def _status(
    dataplane: DataPlane, model: str, version: str | None, label: str | None, exchange: Exchange
) -> Answer:
    assert exchange.principal is not None
    principal = exchange.principal
    if version is None and label is None:
        # Every version can be served on demand: all are available.
        metadata = dataplane.model_metadata(principal, model)
        return Answer(200, model_status((int(v), True) for v in metadata["versions"]))
    found, _ = dataplane.signature(principal, model, version, label)
    # Loading a runtime may decrypt and read a large file: not on the event loop.
    ready = await run_in_threadpool(
        dataplane.model_ready, principal, model, str(found.number), None
    )
    exchange.observed.version = found.number
    return Answer(200, model_status([(found.number, ready)]))


async def _metadata(
    dataplane: DataPlane, model: str, version: str | None, label: str | None, exchange: Exchange
) -> Answer:
    assert exchange.principal is not None
    found, signature = dataplane.signature(exchange.principal, model, version, label)
    exchange.observed.version = found.number
    return Answer(200, model_metadata(found.model, found.number, signature))
