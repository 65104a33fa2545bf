"""The row form that cloud model-server contracts share: one entry per instance, in and out.

TensorFlow Serving's ``instances``, SageMaker's JSON and CSV, and Azure ML's ``data`` all send a
batch as a list of rows and expect a list of predictions back. This module turns such rows into
tensors checked against a :class:`~modelkeep.runtime.signature.ModelSignature` and turns output
tensors back into rows. The tensor rules are the V2 codec's own (``api/v2/codec.py`` for the
declared shape and element limit, ``api/v2/_json.py`` for converting lists into numpy arrays),
so every protocol refuses the same inputs with the same messages; nothing here builds an array
before its shape has been checked against the signature and ``max_elements``.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from modelkeep.api.v2._json import json_array, json_data, shown
from modelkeep.api.v2.codec import check_declared
from modelkeep.errors import InternalError, InvalidInput
from modelkeep.runtime.signature import MAX_RANK, ModelSignature, TensorSpec, numpy_dtype

__all__ = [
    "RowRequest",
    "checked_shape",
    "checked_tensor",
    "columns_to_inputs",
    "csv_lines",
    "dumps",
    "list_tensor",
    "nested_shape",
    "only_input",
    "prediction_rows",
    "rows_to_inputs",
    "shown",
]


@dataclass(frozen=True, slots=True)
class RowRequest:
    """A decoded row-form request: the inputs in signature order, every output wanted.

    ``form`` records how the caller spoke (``"instances"``, ``"csv"``, ``"npy"``...) so the
    adapter can answer in kind; the data plane never looks at it.
    """

    inputs: dict[str, np.ndarray]
    form: str

    def output_names(self) -> list[str] | None:
        return None


def nested_shape(data: Any, what: str = "the data") -> tuple[int, ...]:
    """The shape a nested list declares, read along its first elements (as TF Serving does).

    Raggedness elsewhere is found when the array is built (``json_array``), after the declared
    shape passed the element limit; nesting deeper than any model's rank is refused here,
    before anything walks it (``what`` names the value in that refusal).
    """
    shape: list[int] = []
    probe = data
    while type(probe) is list:
        shape.append(len(probe))
        if len(shape) > MAX_RANK:
            raise InvalidInput(f"{what} is nested deeper than {MAX_RANK} levels")
        if not probe:
            break
        probe = probe[0]
    return tuple(shape)


def checked_shape(
    spec: TensorSpec, shape: Sequence[int], max_elements: int
) -> tuple[tuple[int, ...], int]:
    """``shape`` checked as the V2 codec checks a declared shape (rank, fixed dimensions,
    ``max_elements``, else InvalidInput / TooLarge); returns it and its element count."""
    return check_declared(spec, spec.datatype, list(shape), max_elements)


def list_tensor(
    spec: TensorSpec, data: list[Any], shape: tuple[int, ...], count: int
) -> np.ndarray:
    """The tensor from nested lists of an already checked ``shape``, by the V2 JSON rules."""
    return json_array(spec.name, data, spec.datatype, numpy_dtype(spec.datatype), shape, count)


def checked_tensor(spec: TensorSpec, data: Any, max_elements: int) -> np.ndarray:
    """The tensor for ``spec`` from nested-list ``data``: shape and size checked first.

    Rank, fixed dimensions and the element limit are checked on the declared shape (the V2
    codec's check) before numpy sees the data; then the V2 JSON conversion builds the array
    with its range and type rules.
    """
    if not isinstance(data, list):
        raise InvalidInput(f"input {shown(spec.name)} needs a list of values")
    shape, count = checked_shape(spec, nested_shape(data), max_elements)
    return list_tensor(spec, data, shape, count)


def only_input(signature: ModelSignature, form: str) -> TensorSpec:
    """The single input of ``signature``; forms without names need a one-input model."""
    if len(signature.inputs) != 1:
        names = ", ".join(shown(spec.name) for spec in signature.inputs)
        raise InvalidInput(
            f"{form} carries one unnamed tensor, but this model has inputs {names}: "
            "send JSON with a value per input name"
        )
    return signature.inputs[0]


def rows_to_inputs(
    signature: ModelSignature, rows: Any, max_elements: int, form: str = "instances"
) -> dict[str, np.ndarray]:
    """Tensors from a list of instances.

    For a one-input model each instance is that input's row (``[[5.1, 3.5, 1.4, 0.2], ...]``);
    otherwise, or when instances are objects, each instance maps every input name to its row.
    """
    if not isinstance(rows, list) or not rows:
        raise InvalidInput(f"'{form}' must be a non-empty list")
    if not isinstance(rows[0], dict):
        spec = only_input(signature, f"'{form}' as a list of rows")
        return {spec.name: checked_tensor(spec, rows, max_elements)}
    if not all(isinstance(row, dict) for row in rows):
        raise InvalidInput(f"'{form}' mixes objects and other values")
    wanted = {spec.name for spec in signature.inputs}
    for index, row in enumerate(rows):
        if row.keys() != wanted:
            unknown = sorted(set(row) - wanted)
            if unknown:
                raise InvalidInput(f"instance #{index} has unknown input {shown(str(unknown[0]))}")
            missing = next(spec.name for spec in signature.inputs if spec.name not in row)
            raise InvalidInput(f"instance #{index} lacks input {shown(missing)}")
    return columns_to_inputs(
        signature,
        {spec.name: [row[spec.name] for row in rows] for spec in signature.inputs},
        max_elements,
    )


def columns_to_inputs(
    signature: ModelSignature, columns: Mapping[str, Any], max_elements: int
) -> dict[str, np.ndarray]:
    """Tensors from a value per input name (the columnar form), in signature order."""
    if not isinstance(columns, Mapping):
        raise InvalidInput("the inputs must be an object of input names")
    for name in columns:
        if not any(spec.name == name for spec in signature.inputs):
            raise InvalidInput(f"unknown input {shown(str(name))}")
    inputs: dict[str, np.ndarray] = {}
    for spec in signature.inputs:
        if spec.name not in columns:
            raise InvalidInput(f"missing input {shown(spec.name)}")
        inputs[spec.name] = checked_tensor(spec, columns[spec.name], max_elements)
    return inputs


def prediction_rows(outputs: Mapping[str, np.ndarray]) -> Any:
    """Outputs as one prediction per row, as TensorFlow Serving's row form answers.

    One output: its rows (``[0, 2, 1]``). Several: an object per row naming each output
    (``[{"label": 0, "probabilities": [...]}, ...]``). Every output must share the batch axis.
    Outputs absent from ``outputs`` (removed by hardening) are simply not there. Numbers stay
    numpy arrays and scalars: write the result with :func:`dumps`, which turns them into JSON
    natively (and non-finite floats into ``null``, as the V2 codec does).
    """
    if not outputs:
        return []
    columns = {name: _json_ready(name, array) for name, array in outputs.items()}
    if len(columns) == 1:
        return next(iter(columns.values()))
    lengths = {len(values) for values in columns.values()}
    if len(lengths) != 1:
        raise InvalidInput("this model's outputs do not share a batch axis; ask for the V2 form")
    names = list(columns)
    return [{name: columns[name][row] for name in names} for row in range(lengths.pop())]


def dumps(value: Any) -> bytes:
    """JSON bytes for row-form answers, numpy arrays and scalars included."""
    return orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY)


def _json_ready(name: str, array: np.ndarray) -> Any:
    """An output orjson can write: a native, C-contiguous numeric array, or lists of text."""
    array = np.asarray(array)
    if array.ndim == 0:
        array = array.reshape(1)
    if array.dtype.kind in "OSU":
        flat = json_data(name, array, "BYTES")
        return np.asarray(flat, dtype=object).reshape(array.shape).tolist()
    if array.dtype.kind not in "biuf":
        raise InternalError(f"output {shown(name)} has a dtype JSON cannot carry")
    dtype = array.dtype
    canonical = _CANONICAL.get(dtype)
    if canonical is None:
        canonical = _CANONICAL[dtype] = np.dtype(dtype.str).newbyteorder("=")
    if dtype is not canonical:
        array = array.view(canonical) if dtype.isnative else array.astype(canonical)
    return np.ascontiguousarray(array)


# Each numeric dtype's canonical, native-order form, worked out once per dtype: ONNX Runtime
# answers INT64 as numpy.longlong, whose scalars orjson does not write (int64 is the same bytes).
_CANONICAL: dict[np.dtype[Any], np.dtype[Any]] = {}


def csv_lines(outputs: Mapping[str, np.ndarray]) -> list[bytes]:
    """One CSV line per row (no line end): each output's values for that row, in output order.

    The form of CSV answers (``label,prob0,prob1,prob2``). Numbers are written as JSON writes
    them (the shortest text that reads back to the same value; ``nan``, ``inf`` and ``-inf``
    spelled so), booleans as 0 and 1, text quoted as CSV quotes it. Every output must share
    the batch axis; a rank-0 output is one row.
    """
    columns = [_csv_cells(name, array) for name, array in outputs.items()]
    if not columns:
        return []
    if len({len(cells) for cells in columns}) != 1:
        raise InvalidInput(
            "this model's outputs do not share a batch axis; ask for application/json"
        )
    return [b",".join(row) for row in zip(*columns, strict=True)]


def _csv_cells(name: str, array: np.ndarray) -> list[bytes]:
    """One cell group per row of ``array``: its values for that row, comma-separated."""
    array = np.asarray(array)
    if array.ndim == 0:
        array = array.reshape(1)
    rows = array.shape[0]
    if rows == 0:
        return []
    if array.dtype.kind in "OSU":
        text = json_data(name, array, "BYTES")
        width = len(text) // rows
        stream = io.StringIO()
        csv.writer(stream, lineterminator="\n").writerows(
            text[row * width : (row + 1) * width] for row in range(rows)
        )
        return [line.encode("utf-8") for line in stream.getvalue().split("\n")[:-1]]
    if array.dtype.kind == "b":
        array = array.astype(np.uint8)
    table = _json_ready(name, array).reshape(rows, -1)
    if table.dtype.kind == "f" and not np.isfinite(table).all():
        return [b",".join(str(v).encode("ascii") for v in row) for row in table.tolist()]
    if table.shape[1] == 0:
        return [b""] * rows
    # orjson writes [[a,b],[c,d]]: the rows are what lies between the inner brackets.
    return dumps(table)[2:-2].split(b"],[")
