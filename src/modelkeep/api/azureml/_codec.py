"""The Azure ML ``/score`` codec: the bodies Azure ML clients send, the list they get back.

Pure functions, no ASGI. Bodies (all JSON):

- ``{"data": [[...], ...]}``: rows, as the classic ``score.py`` examples send them (or, for a
  model with several inputs, one object per row naming each input);
- ``{"input_data": {"columns": [...], "index": [...], "data": [[...], ...]}}``: the pandas
  "split" form Azure ML's MLflow deployments and the studio's test tab send; ``columns`` name
  the features of a one-input model, or the inputs of a model whose inputs are single columns;
- ``{"input_data": [[...], ...]}``: plain rows; ``{"input_data": {"NAME": [...], ...}}``: a value
  per input name.

The answer is the JSON list of predictions (one per row; an object per row when several
outputs remain after hardening), as an MLflow model on Azure ML answers.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from modelkeep.api.v2._json import parse_json
from modelkeep.errors import InvalidInput
from modelkeep.runtime.signature import ModelSignature

from .._rows import (
    RowRequest,
    columns_to_inputs,
    dumps,
    prediction_rows,
    rows_to_inputs,
    shown,
)

__all__ = ["JSON_CONTENT_TYPE", "encode_answer", "request_decoder"]

JSON_CONTENT_TYPE = "application/json"
_SPLIT_KEYS = frozenset({"columns", "index", "data"})


def request_decoder(body: bytes) -> Callable[[ModelSignature, int], RowRequest]:
    """The decoder the data plane calls with the model's signature once the caller is allowed."""
    return functools.partial(read_score_body, body)


def read_score_body(body: bytes, signature: ModelSignature, max_elements: int) -> RowRequest:
    """Tensors from a ``/score`` body, checked against ``signature`` before they are built."""
    document = parse_json(body)
    if not isinstance(document, dict):
        raise InvalidInput("the body must be a JSON object with 'data' or 'input_data'")
    if ("data" in document) == ("input_data" in document):
        raise InvalidInput("the body needs exactly one of 'data' and 'input_data'")
    if "data" in document:
        return RowRequest(rows_to_inputs(signature, document["data"], max_elements, "data"), "data")
    value = document["input_data"]
    if isinstance(value, list):
        rows = rows_to_inputs(signature, value, max_elements, "input_data")
        return RowRequest(rows, "input_data")
    if not isinstance(value, dict):
        raise InvalidInput("'input_data' must be a list of rows or an object")
    if "data" in value:
        return RowRequest(_split_form(signature, value, max_elements), "split")
    return RowRequest(columns_to_inputs(signature, value, max_elements), "named")


def _split_form(
    signature: ModelSignature, split: Mapping[str, Any], max_elements: int
) -> dict[str, np.ndarray]:
    """The pandas split form: ``data`` rows, with ``columns`` and ``index`` checked against it."""
    unknown = set(split) - _SPLIT_KEYS
    if unknown:
        raise InvalidInput(f"'input_data' has an unknown key {shown(str(sorted(unknown)[0]))}")
    rows, columns, index = split.get("data"), split.get("columns"), split.get("index")
    if not isinstance(rows, list) or not rows or not all(isinstance(r, list) for r in rows):
        raise InvalidInput("'input_data.data' must be a non-empty list of rows")
    if index is not None and (not isinstance(index, list) or len(index) != len(rows)):
        raise InvalidInput("'input_data.index' must be a list with one entry per row")
    if columns is None:
        return rows_to_inputs(signature, rows, max_elements, "input_data.data")
    if not isinstance(columns, list) or not all(isinstance(c, str | int) for c in columns):
        raise InvalidInput("'input_data.columns' must be a list of column names")
    width = len(columns)
    if any(len(row) != width for row in rows):
        raise InvalidInput(
            f"'input_data.columns' names {width} columns; every row must have as many values"
        )
    names = [spec.name for spec in signature.inputs]
    if len(names) > 1:
        # Columns name the model's inputs: each column is one input's values.
        if sorted(map(str, columns)) != sorted(names):
            raise InvalidInput(
                "'input_data.columns' must name this model's inputs: "
                + ", ".join(shown(n) for n in names)
            )
        values: dict[str, Any] = {}
        for position, name in enumerate(columns):
            column = [row[position] for row in rows]
            spec = signature.inputs[names.index(str(name))]
            values[str(name)] = [[v] for v in column] if len(spec.shape) == 2 else column
        return columns_to_inputs(signature, values, max_elements)
    # One input: the columns are its features, in order (one column: a rank-1 input's values).
    if len(signature.inputs[0].shape) == 1 and width == 1:
        return columns_to_inputs(signature, {names[0]: [row[0] for row in rows]}, max_elements)
    return rows_to_inputs(signature, rows, max_elements, "input_data.data")


def encode_answer(outputs: Mapping[str, np.ndarray]) -> bytes:
    """The JSON list of predictions for ``outputs`` (already hardened)."""
    return dumps(prediction_rows(outputs))
