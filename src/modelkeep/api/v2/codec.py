"""Open Inference Protocol (KServe V2) REST tensor codec, checked against the model signature.

:func:`decode_infer_request` is the gate in front of the runtime: it refuses anything that does
not match the :class:`~modelkeep.runtime.signature.ModelSignature` before a tensor is built, and
it refuses oversized tensors from their declared shape before any data is read. Errors are
``InvalidInput`` (or ``TooLarge``) with short messages that name the tensor and never echo data.

Supported: JSON ``data`` (flat or nested), the binary tensor data extension for inputs and
outputs, the request ``outputs`` filter, ``parameters.binary_data_output``. Refused: the
classification and shared-memory extensions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from modelkeep.api.v2._binary import binary_array, binary_bytes, binary_size
from modelkeep.api.v2._json import json_array, json_data, parse_json, shown
from modelkeep.errors import InternalError, InvalidInput, TooLarge
from modelkeep.runtime.signature import (
    MAX_RANK,
    V2_DATATYPES,
    ModelSignature,
    TensorSpec,
    numpy_dtype,
    v2_datatype,
)

__all__ = [
    "BINARY_CONTENT_TYPE",
    "INFERENCE_HEADER_CONTENT_LENGTH",
    "JSON_CONTENT_TYPE",
    "InferRequest",
    "RequestedOutput",
    "check_declared",
    "decode_infer_request",
    "encode_infer_response",
]

INFERENCE_HEADER_CONTENT_LENGTH = "Inference-Header-Content-Length"
JSON_CONTENT_TYPE = "application/json"
BINARY_CONTENT_TYPE = "application/octet-stream"

# Request parameters of V2 extensions modelkeep refuses, with the reason (REST and gRPC).
UNSUPPORTED_PARAMETERS = {
    "classification": "the classification extension is not supported",
    "shared_memory_region": "the shared-memory extension is not supported",
}


@dataclass(frozen=True, slots=True)
class RequestedOutput:
    """An output the caller asked for; ``binary`` is already resolved against the default."""

    name: str
    binary: bool


@dataclass(frozen=True, slots=True)
class InferRequest:
    """A decoded request whose inputs match the signature exactly (in signature order)."""

    id: str | None
    inputs: dict[str, np.ndarray]
    outputs: tuple[RequestedOutput, ...] | None  # None = all outputs
    binary_outputs_default: bool  # request parameters.binary_data_output

    def output_names(self) -> list[str] | None:
        """The names to pass to the runtime's ``run``; ``None`` means all outputs."""
        return None if self.outputs is None else [output.name for output in self.outputs]


@dataclass(slots=True)
class _Declared:
    # One input as declared in the header, checked but not yet read.
    spec: TensorSpec
    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    count: int
    data: Any
    binary: memoryview | None


@dataclass(frozen=True, slots=True)
class _Plan:
    # What every request to one signature is checked against, worked out once.
    inputs: dict[str, tuple[TensorSpec, np.dtype[Any]]]
    outputs: frozenset[str]


# Plans by signature identity. Each entry keeps its signature alive, so that no other object
# can take its id while the entry lives. A worker serves few signatures; the bound is a guard.
_plans: dict[int, tuple[ModelSignature, _Plan]] = {}
_MAX_PLANS = 1024


def _plan(signature: ModelSignature) -> _Plan:
    entry = _plans.get(id(signature))
    if entry is not None:
        return entry[1]
    plan = _Plan(
        inputs={spec.name: (spec, numpy_dtype(spec.datatype)) for spec in signature.inputs},
        outputs=frozenset(spec.name for spec in signature.outputs),
    )
    if len(_plans) >= _MAX_PLANS:
        _plans.clear()
    _plans[id(signature)] = (signature, plan)
    return plan


def decode_infer_request(
    body: bytes,
    signature: ModelSignature,
    max_elements: int,
    *,
    header_length: int | None = None,
) -> InferRequest:
    """Decode a V2 infer request body and check it against ``signature``.

    ``header_length`` is the ``Inference-Header-Content-Length`` value when the binary
    extension is used: the JSON header is the first ``header_length`` bytes, the tensors follow
    in input order. Every input of the signature must appear exactly once with its datatype,
    rank and fixed dimensions; an input declaring more than ``max_elements`` elements raises
    ``TooLarge`` before any data is read. Everything else wrong raises ``InvalidInput``.

    Tensors have the signature's numpy dtypes; ``BYTES`` become object arrays of ``str``.
    Fixed-size binary inputs are read-only, zero-copy views of ``body``.
    """
    view = memoryview(body)
    # 1. Split header from binary section; the split point comes from the client.
    if header_length is None:
        header, section = view, None
    else:
        if type(header_length) is not int or not 0 < header_length <= len(view):
            raise InvalidInput("the inference header length is out of range for this body")
        header, section = view[:header_length], view[header_length:]

    # 2. The header is a JSON object.
    request = parse_json(header)
    if not isinstance(request, dict):
        raise InvalidInput("the request body must be a JSON object")
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidInput("'id' must be a string")
    parameters = request.get("parameters")
    binary_default = False if parameters is None else _binary_default(parameters)
    plan = _plan(signature)

    # 3. Every input is declared correctly and within limits, before any data is touched.
    declared = _declared_inputs(request.get("inputs"), plan, section, max_elements)

    # 4. Requested outputs name real outputs.
    requested = request.get("outputs")
    outputs = None if requested is None else _requested_outputs(requested, plan, binary_default)

    # 5. Only now build tensors, each from data already sized against its shape.
    inputs: dict[str, np.ndarray] = {}
    for spec in signature.inputs:
        item = declared[spec.name]
        if item.binary is not None:
            array = binary_array(
                spec.name, item.binary, spec.datatype, item.dtype, item.shape, item.count
            )
        else:
            array = json_array(
                spec.name, item.data, spec.datatype, item.dtype, item.shape, item.count
            )
        inputs[spec.name] = array
    return InferRequest(
        id=request_id, inputs=inputs, outputs=outputs, binary_outputs_default=binary_default
    )


def _parameters(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInput(f"{where} 'parameters' must be an object")
    for key, message in UNSUPPORTED_PARAMETERS.items():
        if value.get(key) not in (None, 0, False):
            raise InvalidInput(message)
    return value


def _binary_default(value: Any) -> bool:
    flag = _parameters(value, "the request").get("binary_data_output", False)
    if not isinstance(flag, bool):
        raise InvalidInput("'binary_data_output' must be true or false")
    return flag


def _declared_inputs(
    value: Any, plan: _Plan, section: memoryview | None, max_elements: int
) -> dict[str, _Declared]:
    if not isinstance(value, list) or not value:
        raise InvalidInput("'inputs' must be a non-empty list")
    specs = plan.inputs
    declared: dict[str, _Declared] = {}
    offset = 0
    for index, entry in enumerate(value):
        if not isinstance(entry, dict):
            raise InvalidInput(f"input #{index} must be an object")
        name = entry.get("name")
        if not isinstance(name, str):
            raise InvalidInput(f"input #{index} needs a string 'name'")
        known = specs.get(name)
        if known is None:
            raise InvalidInput(f"unknown input {shown(name)}")
        if name in declared:
            raise InvalidInput(f"input {shown(name)} appears more than once")
        spec, dtype = known
        shape, count = _declared_shape(entry, spec, max_elements)
        parameters = entry.get("parameters")
        size = (
            None
            if parameters is None
            else _parameters(parameters, f"input {shown(name)}").get("binary_data_size")
        )
        data = entry.get("data")
        chunk: memoryview | None = None
        if size is None:
            if data is None:
                raise InvalidInput(f"input {shown(name)} has neither 'data' nor binary data")
        else:
            if data is not None:
                raise InvalidInput(f"input {shown(name)} has both 'data' and binary data")
            chunk = _binary_chunk(name, spec, dtype, count, size, section, offset)
            offset += size
        declared[name] = _Declared(spec, dtype, shape, count, data, chunk)
    if section is not None and offset != len(section):
        raise InvalidInput("the binary data is longer than the inputs declare")
    if len(declared) != len(specs):
        missing = next(name for name in specs if name not in declared)
        raise InvalidInput(f"missing input {shown(missing)}")
    return declared


def _declared_shape(
    entry: dict[str, Any], spec: TensorSpec, max_elements: int
) -> tuple[tuple[int, ...], int]:
    name = spec.name
    datatype = entry.get("datatype")
    if not isinstance(datatype, str) or datatype not in V2_DATATYPES:
        raise InvalidInput(f"input {shown(name)} needs a V2 'datatype'")
    if datatype != spec.datatype:
        raise InvalidInput(f"input {shown(name)} must have datatype {spec.datatype}")
    shape = entry.get("shape")
    if not isinstance(shape, list) or len(shape) > MAX_RANK:
        raise InvalidInput(_bad_shape(name))
    for dim in shape:
        if type(dim) is not int or dim < 0:
            raise InvalidInput(_bad_shape(name))
    if len(shape) != len(spec.shape):
        raise InvalidInput(
            f"input {shown(name)} must have rank {len(spec.shape)}; the value given has "
            f"rank {len(shape)}"
        )
    for axis, want in enumerate(spec.shape):
        if want != -1 and shape[axis] != want:
            raise InvalidInput(f"input {shown(name)} must have size {want} on axis {axis}")
    # Python ints: a declared [2**40, 2**40] is a big number, not an overflow.
    count = math.prod(shape)
    if count > max_elements:
        raise TooLarge(
            f"input {shown(name)} declares {count} elements; the limit is {max_elements}"
        )
    return tuple(shape), count


def check_declared(
    spec: TensorSpec, datatype: object, shape: object, max_elements: int
) -> tuple[tuple[int, ...], int]:
    """Check an input's declared datatype and shape against its ``spec``, for any protocol.

    Returns the shape and its element count. ``InvalidInput`` for a datatype or shape the
    signature does not accept; ``TooLarge`` past ``max_elements``, before any data is read.
    """
    return _declared_shape({"datatype": datatype, "shape": shape}, spec, max_elements)


def _bad_shape(name: str) -> str:
    return (
        f"input {shown(name)} needs a 'shape' list of non-negative integers "
        f"(at most {MAX_RANK} of them)"
    )


def _binary_chunk(
    name: str,
    spec: TensorSpec,
    dtype: np.dtype[Any],
    count: int,
    size: Any,
    section: memoryview | None,
    offset: int,
) -> memoryview:
    if type(size) is not int or size < 0:
        raise InvalidInput(f"input {shown(name)} needs a non-negative 'binary_data_size'")
    if section is None:
        raise InvalidInput(
            f"input {shown(name)} declares binary data but the request has no "
            f"{INFERENCE_HEADER_CONTENT_LENGTH} header"
        )
    exact = binary_size(spec.datatype, dtype, count)
    if exact is not None and size != exact:
        raise InvalidInput(
            f"input {shown(name)} declares {size} bytes of binary data; "
            f"its shape and datatype need {exact}"
        )
    if exact is None and size < 4 * count:
        raise InvalidInput(f"input {shown(name)} declares too few bytes for its BYTES items")
    if size > len(section) - offset:
        raise InvalidInput(f"input {shown(name)} declares more binary data than the body holds")
    return section[offset : offset + size]


def _requested_outputs(
    value: Any, plan: _Plan, binary_default: bool
) -> tuple[RequestedOutput, ...] | None:
    if not isinstance(value, list):
        raise InvalidInput("'outputs' must be a list")
    known = plan.outputs
    requested: dict[str, RequestedOutput] = {}
    for index, entry in enumerate(value):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise InvalidInput(f"output #{index} must be an object with a string 'name'")
        name = entry["name"]
        if name not in known:
            raise InvalidInput(f"unknown output {shown(name)}")
        if name in requested:
            raise InvalidInput(f"output {shown(name)} is requested more than once")
        binary = _parameters(entry.get("parameters"), f"output {shown(name)}").get(
            "binary_data", binary_default
        )
        if not isinstance(binary, bool):
            raise InvalidInput(f"output {shown(name)} 'binary_data' must be true or false")
        requested[name] = RequestedOutput(name=name, binary=binary)
    # An empty filter asks for nothing useful; the protocol's default is every output.
    return tuple(requested.values()) or None


def encode_infer_response(
    *,
    model_name: str,
    model_version: str,
    request: InferRequest,
    outputs: Mapping[str, np.ndarray],
) -> tuple[bytes, dict[str, str]]:
    """Encode a V2 infer response; returns the body and the headers to add to it.

    ``outputs`` must be in signature order (as ``OnnxModel.run`` returns them); the request's
    filter is honoured and outputs absent from ``outputs`` (removed by hardening) are skipped.
    Outputs requested as binary follow the JSON header, whose length is then given in the
    ``Inference-Header-Content-Length`` header and the content type is octet-stream.
    """
    if request.outputs is None:
        wanted: dict[str, bool] | None = None
    else:
        wanted = {output.name: output.binary for output in request.outputs}
    entries: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for name, value in outputs.items():
        binary = request.binary_outputs_default if wanted is None else wanted.get(name)
        if binary is None:
            continue
        array = value if type(value) is np.ndarray else np.asarray(value)
        try:
            datatype = v2_datatype(array.dtype)
        except InvalidInput as exc:
            raise InternalError(f"output {shown(name)} has no V2 datatype") from exc
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary:
            raw = binary_bytes(array, datatype)
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = json_data(name, array, datatype)
        entries.append(entry)
    document: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request.id is not None:
        document["id"] = request.id
    document["outputs"] = entries
    header = orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY)
    if not chunks:
        return header, {"content-type": JSON_CONTENT_TYPE}
    headers = {
        "content-type": BINARY_CONTENT_TYPE,
        INFERENCE_HEADER_CONTENT_LENGTH: str(len(header)),
    }
    return b"".join([header, *chunks]), headers
