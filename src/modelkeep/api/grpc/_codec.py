"""Open Inference Protocol gRPC messages <-> tensors, checked against the model's signature.

:func:`decode_infer_request` is the gRPC twin of the V2 REST decoder (``guard/tensors.py``) and
shares its checks: every input of the signature exactly once, with its datatype, rank and fixed
dimensions, no more than ``max_elements`` elements declared, and only then is data looked at.
Tensor data comes either typed (``InferTensorContents``, one repeated field per datatype) or
as ``raw_input_contents`` (one little-endian, row-major blob per input; ``BYTES`` items each
prefixed by a 4-byte length, as in the binary extension). Errors are ``InvalidInput`` or
``TooLarge`` with messages that name the tensor and never echo data.

A response answers in the form the request used: raw contents for a raw request (what
tritonclient sends and reads), typed contents otherwise, unless an output has a datatype that
only raw contents can hold (FP16).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError

from modelkeep.api.v2._binary import binary_array, binary_bytes, binary_size
from modelkeep.api.v2._json import shown
from modelkeep.api.v2.codec import UNSUPPORTED_PARAMETERS, check_declared
from modelkeep.errors import InternalError, InvalidInput
from modelkeep.runtime.signature import ModelSignature, TensorSpec, numpy_dtype, v2_datatype

from . import grpc_predict_v2_pb2 as pb

__all__ = [
    "GrpcInferRequest",
    "decode_infer_request",
    "encode_infer_response",
    "model_metadata_response",
    "parse_infer_request",
]

# The typed field of InferTensorContents for each datatype; FP16 has none (raw only).
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
_FIELDS = tuple(sorted(set(CONTENTS_FIELD.values())))
# Integer datatypes held in a wider protobuf field: values must fit before the cast.
_NARROW = frozenset({"INT8", "INT16", "UINT8", "UINT16"})


@dataclass(frozen=True, slots=True)
class GrpcInferRequest:
    """A decoded ModelInferRequest whose inputs match the signature (in signature order)."""

    id: str
    inputs: dict[str, np.ndarray]
    outputs: tuple[str, ...] | None  # None = all outputs
    raw: bool  # the request used raw_input_contents, so the response does too

    def output_names(self) -> list[str] | None:
        """The outputs the caller asked for; ``None`` means all of them."""
        return None if self.outputs is None else list(self.outputs)


def parse_infer_request(body: bytes) -> pb.ModelInferRequest:
    """The ModelInferRequest in ``body``; ``InvalidInput`` for bytes that are not one."""
    try:
        return pb.ModelInferRequest.FromString(body)
    except (DecodeError, ValueError):
        raise InvalidInput("the request is not a valid ModelInferRequest message") from None


@dataclass(slots=True)
class _Declared:
    # One input as declared, checked but not yet turned into a tensor.
    spec: TensorSpec
    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    count: int
    data: Any  # raw bytes, or the typed repeated field


def decode_infer_request(
    message: pb.ModelInferRequest, signature: ModelSignature, max_elements: int
) -> GrpcInferRequest:
    """Check ``message`` against ``signature`` and build its tensors.

    Tensors have the signature's numpy dtypes; ``BYTES`` become object arrays of ``str``.
    """
    _refuse_parameters(message.parameters, "the request")
    specs = {spec.name: spec for spec in signature.inputs}
    tensors = message.inputs
    raw = message.raw_input_contents
    # 1. Raw contents, when used, hold one blob per declared input.
    if not tensors:
        raise InvalidInput("the request declares no inputs")
    if raw and len(raw) != len(tensors):
        raise InvalidInput(
            f"raw_input_contents holds {len(raw)} tensors; the request declares "
            f"{len(tensors)} inputs"
        )
    # 2. Every input is declared correctly and within limits before any data is touched.
    declared: dict[str, _Declared] = {}
    for index, tensor in enumerate(tensors):
        name = tensor.name
        spec = specs.get(name)
        if spec is None:
            raise InvalidInput(f"unknown input {shown(name)}")
        if name in declared:
            raise InvalidInput(f"input {shown(name)} appears more than once")
        _refuse_parameters(tensor.parameters, f"input {shown(name)}")
        shape, count = check_declared(spec, tensor.datatype, list(tensor.shape), max_elements)
        dtype = numpy_dtype(spec.datatype)
        typed = tensor.HasField("contents")
        if raw:
            if typed:
                raise InvalidInput(f"input {shown(name)} has both contents and raw contents")
            data: Any = raw[index]
            _check_raw_size(spec, dtype, count, len(data))
        else:
            if not typed:
                raise InvalidInput(f"input {shown(name)} has no contents")
            data = _typed_field(spec, tensor.contents, count)
        declared[name] = _Declared(spec, dtype, shape, count, data)
    if len(declared) != len(specs):
        missing = next(name for name in specs if name not in declared)
        raise InvalidInput(f"missing input {shown(missing)}")
    # 3. Requested outputs name real outputs.
    outputs = _requested_outputs(message.outputs, signature)
    # 4. Only now build tensors, each from data already sized against its shape.
    inputs: dict[str, np.ndarray] = {}
    for spec in signature.inputs:
        item = declared[spec.name]
        if raw:
            inputs[spec.name] = binary_array(
                spec.name, memoryview(item.data), spec.datatype, item.dtype, item.shape, item.count
            )
        else:
            inputs[spec.name] = _typed_array(item)
    return GrpcInferRequest(id=message.id, inputs=inputs, outputs=outputs, raw=bool(raw))


def _refuse_parameters(parameters: Mapping[str, pb.InferParameter], where: str) -> None:
    for key, problem in UNSUPPORTED_PARAMETERS.items():
        if key in parameters:
            raise InvalidInput(f"{where}: {problem}")


def _check_raw_size(spec: TensorSpec, dtype: np.dtype[Any], count: int, size: int) -> None:
    exact = binary_size(spec.datatype, dtype, count)
    if exact is not None and size != exact:
        raise InvalidInput(
            f"input {shown(spec.name)} has {size} bytes of raw contents; "
            f"its shape and datatype need {exact}"
        )
    if exact is None and size < 4 * count:
        raise InvalidInput(f"input {shown(spec.name)} has too few bytes for its BYTES items")


def _typed_field(spec: TensorSpec, contents: pb.InferTensorContents, count: int) -> Any:
    name = spec.name
    field = CONTENTS_FIELD.get(spec.datatype)
    if field is None:
        raise InvalidInput(f"input {shown(name)} of datatype {spec.datatype} needs raw contents")
    for other in _FIELDS:
        if other != field and len(getattr(contents, other)):
            raise InvalidInput(f"input {shown(name)} of datatype {spec.datatype} needs {field}")
    values = getattr(contents, field)
    if len(values) != count:
        raise InvalidInput(f"input {shown(name)} has {len(values)} values; its shape needs {count}")
    return values


def _typed_array(item: _Declared) -> np.ndarray:
    spec, dtype, values = item.spec, item.dtype, item.data
    name = spec.name
    if spec.datatype == "BYTES":
        try:
            # ONNX strings are UTF-8 and the runtime only takes text (as for V2 REST).
            items = [bytes(value).decode("utf-8") for value in values]
        except UnicodeDecodeError:
            raise InvalidInput(f"input {shown(name)} holds bytes that are not UTF-8 text") from None
        array = np.empty(item.count, dtype=object)
        array[:] = items
        return array.reshape(item.shape)
    if spec.datatype in _NARROW:
        wide = np.array(values, dtype=np.int64)
        limits = np.iinfo(dtype)
        if wide.size and (wide.min() < limits.min or wide.max() > limits.max):
            raise InvalidInput(f"input {shown(name)} has values out of range for {spec.datatype}")
        return wide.astype(dtype).reshape(item.shape)
    return np.array(values, dtype=dtype).reshape(item.shape)


def _requested_outputs(
    requested: Iterable[pb.ModelInferRequest.InferRequestedOutputTensor],
    signature: ModelSignature,
) -> tuple[str, ...] | None:
    known = {spec.name for spec in signature.outputs}
    names: list[str] = []
    for output in requested:
        name = output.name
        if name not in known:
            raise InvalidInput(f"unknown output {shown(name)}")
        if name in names:
            raise InvalidInput(f"output {shown(name)} is requested more than once")
        _refuse_parameters(output.parameters, f"output {shown(name)}")
        names.append(name)
    # An empty filter asks for nothing useful; the protocol's default is every output.
    return tuple(names) or None


def encode_infer_response(
    *,
    model_name: str,
    model_version: str,
    request: GrpcInferRequest,
    outputs: Mapping[str, np.ndarray],
) -> pb.ModelInferResponse:
    """The ModelInferResponse for ``outputs`` (hardened, in signature order).

    Outputs the caller did not ask for, or that hardening removed, are absent.
    """
    wanted = None if request.outputs is None else set(request.outputs)
    arrays: list[tuple[str, np.ndarray, str]] = []
    for name, value in outputs.items():
        if wanted is not None and name not in wanted:
            continue
        array = value if type(value) is np.ndarray else np.asarray(value)
        try:
            datatype = v2_datatype(array.dtype)
        except InvalidInput as exc:
            raise InternalError(f"output {shown(name)} has no V2 datatype") from exc
        arrays.append((name, array, datatype))
    raw = request.raw or any(datatype not in CONTENTS_FIELD for _, _, datatype in arrays)
    response = pb.ModelInferResponse(
        model_name=model_name, model_version=model_version, id=request.id
    )
    for name, array, datatype in arrays:
        tensor = response.outputs.add(name=name, datatype=datatype, shape=array.shape)
        if raw:
            response.raw_output_contents.append(binary_bytes(array, datatype))
            continue
        values = array.ravel().tolist()
        if datatype == "BYTES":
            values = [v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in values]
        getattr(tensor.contents, CONTENTS_FIELD[datatype]).extend(values)
    return response


def model_metadata_response(metadata: Mapping[str, Any]) -> pb.ModelMetadataResponse:
    """A ModelMetadataResponse from the neutral metadata (V2 JSON shapes)."""
    response = pb.ModelMetadataResponse(
        name=metadata["name"],
        versions=metadata["versions"],
        platform=metadata["platform"],
    )
    for key in ("inputs", "outputs"):
        for tensor in metadata[key]:
            getattr(response, key).add(
                name=tensor["name"], datatype=tensor["datatype"], shape=tensor["shape"]
            )
    return response
