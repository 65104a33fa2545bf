"""Vertex AI's custom-container prediction body: ``{"instances": [...], "parameters": {...}}``
answered by ``{"predictions": [...]}``.

Instances are rows as in TensorFlow Serving's row form (Vertex's own prebuilt containers serve
TF Serving behind this contract), so the row codec of ``api/tfserving`` decodes and encodes them.
``parameters`` must be an object when present; modelkeep models take none, so it is not used.
Any other key is refused, so that a body meant for another protocol is not half understood.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from modelkeep.api.v2._json import parse_json, shown
from modelkeep.errors import InvalidInput
from modelkeep.runtime.signature import ModelSignature

from ..tfserving._codec import encode_rows, instances_inputs

__all__ = ["VertexRequest", "decode_vertex", "encode_vertex"]


@dataclass(frozen=True, slots=True)
class VertexRequest:
    """Decoded instances (signature order) and whether the answer names its outputs."""

    inputs: dict[str, np.ndarray]
    named_outputs: bool

    def output_names(self) -> list[str] | None:
        return None


def decode_vertex(body: bytes, signature: ModelSignature, max_elements: int) -> VertexRequest:
    """Decode a Vertex AI prediction body checked against ``signature``."""
    if not body:
        raise InvalidInput("the request body is empty; send a JSON object")
    document = parse_json(body)
    if type(document) is not dict:
        raise InvalidInput("the request body must be a JSON object")
    unknown = next((key for key in document if key not in ("instances", "parameters")), None)
    if unknown is not None:
        raise InvalidInput(
            f"unknown key {shown(unknown)}: a Vertex AI request holds 'instances' and "
            "'parameters' only"
        )
    parameters = document.get("parameters")
    if parameters is not None and type(parameters) is not dict:
        raise InvalidInput("'parameters' must be an object")
    if "instances" not in document:
        raise InvalidInput("missing 'instances' key")
    inputs = instances_inputs(document["instances"], signature, max_elements)
    return VertexRequest(inputs, len(signature.outputs) > 1)


def encode_vertex(request: VertexRequest, outputs: Mapping[str, np.ndarray]) -> bytes:
    """``{"predictions": [...]}``: one value per instance, or one object when the model has
    several outputs."""
    return encode_rows(outputs, named=request.named_outputs)
