"""The SageMaker ``/invocations`` codec: request bodies by Content-Type, answers by Accept.

Pure functions, no ASGI: :func:`request_decoder` picks the decoder for a Content-Type (the data
plane calls it with the model's signature once the caller is authorized), :func:`answer_type`
picks the response type from Accept, :func:`encode_answer` encodes the hardened outputs.

JSON bodies come in three forms: the V2 request (``{"inputs": [{"name", "datatype", "shape",
"data"}]}``, decoded by the V2 codec itself and answered as V2), TensorFlow Serving's row form
(``{"instances": [...]}`` or a bare list of rows) and its columnar form (``{"inputs": {name:
value}}``), answered ``{"predictions": [...]}`` / ``{"outputs": ...}`` as TF Serving answers.
CSV and npy requests answered in JSON get the row form.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from modelkeep.api.v2._json import parse_json
from modelkeep.api.v2.codec import InferRequest, decode_infer_request, encode_infer_response
from modelkeep.errors import InvalidInput
from modelkeep.runtime.signature import ModelSignature

from .._rows import RowRequest, columns_to_inputs, dumps, prediction_rows, rows_to_inputs
from ._csv import CSV_CONTENT_TYPE, read_csv, write_csv
from ._npy import NPY_CONTENT_TYPE, read_npy, write_npy

__all__ = [
    "JSON_CONTENT_TYPE",
    "NotAcceptable",
    "UnsupportedMediaType",
    "answer_type",
    "encode_answer",
    "request_decoder",
]

JSON_CONTENT_TYPE = "application/json"
ANSWER_TYPES = (JSON_CONTENT_TYPE, CSV_CONTENT_TYPE, NPY_CONTENT_TYPE)

Decoder = Callable[[ModelSignature, int], "InferRequest | RowRequest"]


class UnsupportedMediaType(InvalidInput):
    """A Content-Type /invocations does not read (answered 415)."""


class NotAcceptable(InvalidInput):
    """An Accept that names no type /invocations writes (answered 406)."""


def media_type(value: str | None) -> str:
    """The bare, lower-case media type of a Content-Type value (parameters dropped)."""
    return "" if value is None else value.split(";", 1)[0].strip().lower()


def request_decoder(body: bytes, content_type: str | None) -> Decoder:
    """The decoder for ``body`` as ``content_type`` says (JSON when none is given)."""
    kind = media_type(content_type) or JSON_CONTENT_TYPE
    if kind == JSON_CONTENT_TYPE:
        return functools.partial(_read_json, body)
    if kind == CSV_CONTENT_TYPE:
        return functools.partial(read_csv, body)
    if kind in (NPY_CONTENT_TYPE, "application/npy"):
        return functools.partial(read_npy, body)
    raise UnsupportedMediaType(
        f"Content-Type must be {JSON_CONTENT_TYPE}, {CSV_CONTENT_TYPE} or {NPY_CONTENT_TYPE}"
    )


def _read_json(body: bytes, signature: ModelSignature, max_elements: int) -> Any:
    document = parse_json(body)
    if isinstance(document, list):
        return RowRequest(rows_to_inputs(signature, document, max_elements), "instances")
    if not isinstance(document, dict):
        raise InvalidInput("the JSON body must be an object or a list of rows")
    if "instances" in document:
        if "inputs" in document:
            raise InvalidInput("send either 'instances' or 'inputs', not both")
        rows = document["instances"]
        return RowRequest(rows_to_inputs(signature, rows, max_elements), "instances")
    inputs = document.get("inputs")
    if isinstance(inputs, list) and inputs and all(isinstance(i, dict) for i in inputs):
        # The V2 request, checked by the V2 codec itself (body as received).
        return decode_infer_request(body, signature, max_elements=max_elements)
    if isinstance(inputs, dict):
        return RowRequest(columns_to_inputs(signature, inputs, max_elements), "columns")
    if isinstance(inputs, list):
        spec = signature.inputs[0] if len(signature.inputs) == 1 else None
        if spec is None:
            raise InvalidInput("'inputs' as a list needs a model with one input")
        return RowRequest(
            columns_to_inputs(signature, {spec.name: inputs}, max_elements), "columns"
        )
    raise InvalidInput(
        "the JSON body needs 'instances' (rows), 'inputs' (V2 or columns) or a list of rows"
    )


def answer_type(accept: str | None) -> str:
    """The response media type for an Accept header: the most preferred one /invocations
    writes; JSON for none, ``*/*`` or ``application/*``."""
    if accept is None or not accept.strip():
        return JSON_CONTENT_TYPE
    best: tuple[float, int, str] | None = None
    for position, item in enumerate(accept.split(",")):
        kind, *params = (part.strip() for part in item.split(";"))
        quality = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        kind = kind.lower()
        if kind in ("*/*", "application/*"):
            kind = JSON_CONTENT_TYPE
        elif kind == "text/*":
            kind = CSV_CONTENT_TYPE
        elif kind == "application/npy":
            kind = NPY_CONTENT_TYPE
        if kind not in ANSWER_TYPES or not quality > 0:
            continue
        # Highest quality first; among equals, the one listed first.
        candidate = (-quality, position, kind)
        if best is None or candidate < best:
            best = candidate
    if best is None:
        raise NotAcceptable(f"Accept must allow {', '.join(ANSWER_TYPES)}")
    return best[2]


def encode_answer(
    answer: str,
    request: InferRequest | RowRequest,
    outputs: Mapping[str, np.ndarray],
    *,
    model: str,
    version: int,
) -> tuple[bytes, dict[str, str]]:
    """The response body and its headers (content type first) for ``outputs`` (hardened)."""
    if answer == CSV_CONTENT_TYPE:
        return write_csv(outputs), {"content-type": CSV_CONTENT_TYPE}
    if answer == NPY_CONTENT_TYPE:
        if len(outputs) != 1:
            raise NotAcceptable(
                f"{NPY_CONTENT_TYPE} carries one array; this answer has {len(outputs)} outputs: "
                f"ask for {JSON_CONTENT_TYPE} or {CSV_CONTENT_TYPE}"
            )
        return write_npy(next(iter(outputs.values()))), {"content-type": NPY_CONTENT_TYPE}
    if isinstance(request, InferRequest):
        # The V2 answer, binary outputs and their header length included.
        return encode_infer_response(
            model_name=model, model_version=str(version), request=request, outputs=outputs
        )
    if request.form == "columns":
        columns = {name: prediction_rows({name: array}) for name, array in outputs.items()}
        value: Any = next(iter(columns.values())) if len(columns) == 1 else columns
        return dumps({"outputs": value}), {"content-type": JSON_CONTENT_TYPE}
    body = dumps({"predictions": prediction_rows(outputs)})
    return body, {"content-type": JSON_CONTENT_TYPE}
