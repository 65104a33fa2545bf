"""TensorFlow Serving REST bodies: ``:predict``, ``:classify`` and ``:regress`` requests and
responses, as pure functions of the body and the model's signature.

Decoders run after the caller is authenticated and authorized (the data plane calls them with
the signature of the version it serves) and refuse, with ``InvalidInput`` or ``TooLarge``,
anything that does not fit the signature before a tensor is built. Encoders write only the
outputs they are given: the data plane has already hardened them for the caller.

Shapes follow TF Serving's ``json_tensor.cc``:

- row form ``{"instances": [...]}`` answers ``{"predictions": [...]}``; columnar form
  ``{"inputs": ...}`` answers ``{"outputs": ...}``;
- a model with one input takes plain values or lists per row, several inputs take one object
  per row; a model with one output answers plain values, several outputs answer objects (the
  model's signature decides, so a caller whose policy removes an output still gets objects);
- ``:classify`` and ``:regress`` take ``{"examples": [{feature: value}...], "context": {...}}``
  and answer ``{"results": ...}``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from modelkeep.api.v2._json import parse_json, shown
from modelkeep.errors import InvalidInput
from modelkeep.guard.hardening import score_outputs_of
from modelkeep.runtime.signature import ModelSignature, TensorSpec

from ._tensors import dumps, is_b64, tensor_from_json, tensor_to_json

__all__ = [
    "DEFAULT_SIGNATURE",
    "ExamplesRequest",
    "PredictRequest",
    "decode_classify",
    "decode_predict",
    "decode_regress",
    "encode_classify",
    "encode_columns",
    "encode_predict",
    "encode_regress",
    "encode_rows",
    "instances_inputs",
]

DEFAULT_SIGNATURE = "serving_default"
_FLOATS = frozenset({"FP16", "FP32", "FP64"})


@dataclass(frozen=True, slots=True)
class PredictRequest:
    """A decoded ``:predict`` body: the inputs in signature order, which form it used, and
    whether the model's answer names its outputs (it has more than one)."""

    inputs: dict[str, np.ndarray]
    columnar: bool
    named_outputs: bool

    def output_names(self) -> list[str] | None:
        """TF Serving's REST API has no output filter: every output."""
        return None


@dataclass(frozen=True, slots=True)
class ExamplesRequest:
    """A decoded ``:classify`` or ``:regress`` body, with the outputs its answer is made of."""

    inputs: dict[str, np.ndarray]
    method: Literal["classify", "regress"]
    label: str | None  # classify: the label output
    scores: str | None  # classify: the score output
    value: str | None  # regress: the one float output

    def output_names(self) -> list[str] | None:
        return None


def _document(body: bytes) -> dict[str, Any]:
    if not body:
        raise InvalidInput("the request body is empty; send a JSON object")
    document = parse_json(body)
    if type(document) is not dict:
        raise InvalidInput("the request body must be a JSON object")
    signature_name = document.get("signature_name")
    if signature_name is not None:
        if type(signature_name) is not str:
            raise InvalidInput("'signature_name' must be a string")
        # A modelkeep model has one signature; TF Serving names its default so.
        if signature_name not in ("", DEFAULT_SIGNATURE):
            raise InvalidInput(
                f"Serving signature name: {shown(signature_name)} not found in signature def"
            )
    return document


def decode_predict(body: bytes, signature: ModelSignature, max_elements: int) -> PredictRequest:
    """Decode a ``:predict`` body (row or columnar form) checked against ``signature``."""
    document = _document(body)
    instances = document.get("instances")
    columns = document.get("inputs")
    if instances is not None and columns is not None:
        raise InvalidInput("send either 'instances' (rows) or 'inputs' (columns), not both")
    named = len(signature.outputs) > 1
    if instances is not None:
        return PredictRequest(instances_inputs(instances, signature, max_elements), False, named)
    if columns is not None:
        return PredictRequest(_columnar_inputs(columns, signature, max_elements), True, named)
    raise InvalidInput("missing 'inputs' or 'instances' key")


def instances_inputs(
    instances: Any, signature: ModelSignature, max_elements: int, *, key: str = "instances"
) -> dict[str, np.ndarray]:
    """The inputs of a row-form list (``instances``; also Vertex AI's and SageMaker's).

    Each element is one row: a value or list when the model has one input, an object holding
    every input by name when it has several. All rows are batched along a new first axis.
    """
    if type(instances) is not list:
        raise InvalidInput(f"'{key}' must be a list")
    if not instances:
        raise InvalidInput(f"'{key}' holds no rows")
    specs = signature.inputs
    objects = type(instances[0]) is dict and not is_b64(instances[0])
    if not objects:
        if len(specs) != 1:
            raise InvalidInput(
                f"'{key}' is a plain list, but the model has {len(specs)} inputs: send one "
                "object per row with every input by name"
            )
        spec = specs[0]
        if any(type(row) is dict and not is_b64(row) for row in instances):
            raise InvalidInput(f"'{key}' mixes objects and plain values")
        return {spec.name: tensor_from_json(spec.name, instances, spec, max_elements)}
    names = {spec.name for spec in specs}
    for index, row in enumerate(instances):
        if type(row) is not dict or is_b64(row):
            raise InvalidInput(f"'{key}' mixes objects and plain values (row {index})")
        if row.keys() != names:
            raise InvalidInput(_keys_message(f"row {index} of '{key}'", row, specs))
    return {
        spec.name: tensor_from_json(
            spec.name, [row[spec.name] for row in instances], spec, max_elements
        )
        for spec in specs
    }


def _keys_message(where: str, row: Mapping[str, Any], specs: tuple[TensorSpec, ...]) -> str:
    unknown = next((name for name in row if name not in {s.name for s in specs}), None)
    if unknown is not None:
        return f"{where} names an unknown input {shown(unknown)}"
    missing = next(spec.name for spec in specs if spec.name not in row)
    return f"{where} is missing input {shown(missing)}"


def _columnar_inputs(
    columns: Any, signature: ModelSignature, max_elements: int
) -> dict[str, np.ndarray]:
    specs = signature.inputs
    if type(columns) is not dict or is_b64(columns):
        if len(specs) != 1:
            raise InvalidInput(
                f"'inputs' is a plain value or list, but the model has {len(specs)} inputs: "
                "send an object with every input by name"
            )
        spec = specs[0]
        return {spec.name: tensor_from_json(spec.name, columns, spec, max_elements)}
    if columns.keys() != {spec.name for spec in specs}:
        raise InvalidInput(_keys_message("'inputs'", columns, specs))
    return {
        spec.name: tensor_from_json(spec.name, columns[spec.name], spec, max_elements)
        for spec in specs
    }


def encode_predict(request: PredictRequest, outputs: Mapping[str, np.ndarray]) -> bytes:
    """The ``:predict`` answer for ``outputs`` (hardened, in signature order)."""
    if request.columnar:
        return encode_columns(outputs, named=request.named_outputs)
    return encode_rows(outputs, named=request.named_outputs)


def encode_columns(outputs: Mapping[str, np.ndarray], *, named: bool) -> bytes:
    """``{"outputs": ...}``: the one output's value, or an object of outputs when ``named``."""
    values = _values(outputs)
    if named:
        return dumps({"outputs": values})
    return dumps({"outputs": next(iter(values.values()), None)})


def encode_rows(
    outputs: Mapping[str, np.ndarray], *, named: bool, key: str = "predictions"
) -> bytes:
    """``{"predictions": [...]}``: per row the one output's value, or an object of outputs when
    ``named``. Every output must have the same first dimension (TF Serving's rule)."""
    rows = _batch_size(outputs)
    values = _values(outputs)
    if not named:
        only = next(iter(values.values()), None)
        return dumps({key: [] if only is None else only})
    predictions = [{name: value[row] for name, value in values.items()} for row in range(rows)]
    return dumps({key: predictions})


def _values(outputs: Mapping[str, np.ndarray]) -> dict[str, Any]:
    return {name: tensor_to_json(name, array) for name, array in outputs.items()}


def _batch_size(outputs: Mapping[str, np.ndarray]) -> int:
    size: int | None = None
    for name, array in outputs.items():
        if array.ndim == 0:
            raise InvalidInput(
                f"output {shown(name)} is a scalar, which the row form cannot carry; "
                "send the columnar form ('inputs')"
            )
        if size is not None and array.shape[0] != size:
            raise InvalidInput(
                f"output {shown(name)} has a batch size of {array.shape[0]}, not {size}; "
                "send the columnar form ('inputs')"
            )
        size = array.shape[0]
    return size or 0


# -- :classify and :regress -----------------------------------------------------------------


def _classify_outputs(signature: ModelSignature) -> tuple[str, str]:
    scores = score_outputs_of(signature)
    labels = [
        spec.name
        for spec in signature.outputs
        if spec.name not in scores and (len(spec.shape) == 1 or spec.shape[1:] == (1,))
    ]
    if len(scores) != 1 or len(labels) != 1:
        raise InvalidInput(
            ":classify needs a classifier: one label output and one class-score output "
            "([N, classes]); use :predict for this model"
        )
    return labels[0], scores[0]


def _regress_output(signature: ModelSignature) -> str:
    outputs = signature.outputs
    if (
        len(outputs) != 1
        or outputs[0].datatype not in _FLOATS
        or not (len(outputs[0].shape) == 1 or outputs[0].shape[1:] == (1,))
    ):
        raise InvalidInput(
            ":regress needs a regressor: a single floating-point output of one value per "
            "example; use :predict for this model"
        )
    return outputs[0].name


def _examples(document: dict[str, Any], signature: ModelSignature) -> list[dict[str, Any]]:
    examples = document.get("examples")
    if examples is None:
        raise InvalidInput("missing 'examples' key")
    if type(examples) is not list:
        raise InvalidInput("'examples' must be a list")
    if not examples:
        raise InvalidInput("'examples' holds no examples")
    context = document.get("context")
    if context is None:
        context = {}
    elif type(context) is not dict:
        raise InvalidInput("'context' must be an object")
    ranks = {spec.name: len(spec.shape) for spec in signature.inputs}
    rows: list[dict[str, Any]] = []
    for index, example in enumerate(examples):
        if type(example) is not dict:
            raise InvalidInput(f"example {index} must be an object of features")
        shared = next((name for name in example if name in context), None)
        if shared is not None:
            raise InvalidInput(f"feature {shown(shared)} is in both 'context' and example {index}")
        row = {**context, **example}
        # A feature is a value or a list of values, whichever the input's row needs.
        for name, rank in ranks.items():
            value = row.get(name)
            if rank == 1 and type(value) is list and len(value) == 1:
                row[name] = value[0]
            elif rank == 2 and name in row and type(value) is not list:
                row[name] = [value]
        rows.append(row)
    return rows


def _decode_examples(
    body: bytes,
    signature: ModelSignature,
    max_elements: int,
    method: Literal["classify", "regress"],
) -> ExamplesRequest:
    # The model must fit the method before the body is read: the answer names no data.
    label: str | None = None
    scores: str | None = None
    value: str | None = None
    if method == "classify":
        label, scores = _classify_outputs(signature)
    else:
        value = _regress_output(signature)
    document = _document(body)
    rows = _examples(document, signature)
    inputs = instances_inputs(rows, signature, max_elements, key="examples")
    return ExamplesRequest(inputs, method, label, scores, value)


def decode_classify(body: bytes, signature: ModelSignature, max_elements: int) -> ExamplesRequest:
    """Decode a ``:classify`` body; ``InvalidInput`` if the model is not a classifier."""
    return _decode_examples(body, signature, max_elements, "classify")


def decode_regress(body: bytes, signature: ModelSignature, max_elements: int) -> ExamplesRequest:
    """Decode a ``:regress`` body; ``InvalidInput`` if the model is not a regressor."""
    return _decode_examples(body, signature, max_elements, "regress")


def encode_classify(request: ExamplesRequest, outputs: Mapping[str, np.ndarray]) -> bytes:
    """``{"results": [[[label, score], ...] per example]}``.

    A modelkeep signature does not name the class of each score column, so only the top
    column carries a label (the model's own predicted label); the others carry ``""``, which
    TF Serving uses for a score with no label. When the caller's policy removed the scores
    (``label_only``), each example holds one pair: the predicted label and ``0.0``, as TF
    Serving writes a result that has classes but no scores.
    """
    assert request.label is not None
    assert request.scores is not None
    labels = outputs.get(request.label)
    if labels is None:
        raise InvalidInput("the model's label output is not available to this caller")
    names = [_label_text(value) for value in np.asarray(labels).reshape(-1).tolist()]
    scores = outputs.get(request.scores)
    results: list[list[list[Any]]] = []
    if scores is None:
        results = [[[name, 0.0]] for name in names]
        return dumps({"results": results})
    matrix = _shortest(np.asarray(scores).reshape(len(names), -1))
    top = np.argmax(matrix, axis=1) if matrix.size else np.zeros(len(names), dtype=np.int64)
    for row, name in enumerate(names):
        best = int(top[row])
        results.append(
            [
                [name if column == best else "", value]
                for column, value in enumerate(matrix[row].tolist())
            ]
        )
    return dumps({"results": results})


def _shortest(scores: np.ndarray) -> np.ndarray:
    # float32 scores through their shortest text: 0.1f is written 0.1, as TF Serving does.
    if scores.dtype.kind == "f" and scores.dtype.itemsize < 8:
        return scores.astype(str).astype(np.float64)
    return scores.astype(np.float64)


def _label_text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def encode_regress(request: ExamplesRequest, outputs: Mapping[str, np.ndarray]) -> bytes:
    """``{"results": [value per example]}``."""
    assert request.value is not None
    values = outputs.get(request.value)
    if values is None:
        raise InvalidInput("the model's output is not available to this caller")
    flat = np.asarray(values).reshape(-1)
    return dumps({"results": tensor_to_json(request.value, flat)})
