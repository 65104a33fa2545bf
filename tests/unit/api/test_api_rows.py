"""The row form shared by the cloud protocols: rows in, tensors checked, predictions out."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from modelkeep.api._rows import (
    checked_tensor,
    csv_lines,
    dumps,
    prediction_rows,
    rows_to_inputs,
)
from modelkeep.errors import InvalidInput, TooLarge
from modelkeep.runtime.signature import ModelSignature, TensorSpec

IRIS = ModelSignature(
    inputs=(TensorSpec("input", "FP32", (-1, 4)),),
    outputs=(TensorSpec("label", "INT64", (-1,)), TensorSpec("probabilities", "FP32", (-1, 3))),
)
TWO = ModelSignature(
    inputs=(TensorSpec("a", "FP32", (-1, 2)), TensorSpec("b", "INT64", (-1,))),
    outputs=(TensorSpec("y", "FP32", (-1,)),),
)


def test_rows_of_a_one_input_model_become_its_tensor() -> None:
    inputs = rows_to_inputs(IRIS, [[1, 2, 3, 4], [5.5, 6, 7, 8]], 100)
    assert list(inputs) == ["input"]
    assert inputs["input"].dtype == np.float32
    assert inputs["input"].tolist() == [[1, 2, 3, 4], [5.5, 6, 7, 8]]


def test_instances_as_objects_fill_each_input() -> None:
    inputs = rows_to_inputs(TWO, [{"a": [1, 2], "b": 3}, {"b": 4, "a": [5, 6]}], 100)
    assert list(inputs) == ["a", "b"]
    assert inputs["a"].tolist() == [[1, 2], [5, 6]]
    assert (inputs["b"].dtype, inputs["b"].tolist()) == (np.dtype(np.int64), [3, 4])


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([], "non-empty list"),
        ([[1, 2, 3]], "size 4 on axis 1"),
        ([1, 2, 3, 4], "rank 2"),
        ([[1, 2, 3, 4], [1, 2]], "ragged"),
        ([["a", "b", "c", "d"]], "numbers"),
        ([{"input": [1, 2, 3, 4]}, [1, 2, 3, 4]], "mixes"),
    ],
)
def test_bad_rows_are_refused_with_a_reason(rows: object, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        rows_to_inputs(IRIS, rows, 100)


def test_unnamed_rows_need_a_one_input_model() -> None:
    with pytest.raises(InvalidInput, match="inputs 'a', 'b'"):
        rows_to_inputs(TWO, [[1, 2]], 100)


def test_unknown_and_missing_instance_inputs_are_named() -> None:
    with pytest.raises(InvalidInput, match="unknown input 'c'"):
        rows_to_inputs(TWO, [{"a": [1, 2], "b": 3, "c": 1}], 100)
    with pytest.raises(InvalidInput, match="lacks input 'b'"):
        rows_to_inputs(TWO, [{"a": [1, 2]}], 100)


def test_the_element_limit_is_checked_on_the_declared_shape() -> None:
    with pytest.raises(TooLarge, match="declares 8 elements; the limit is 7"):
        checked_tensor(IRIS.inputs[0], [[1, 2, 3, 4], [5, 6, 7, 8]], 7)


def test_one_output_answers_its_rows_and_several_answer_objects() -> None:
    label = np.array([0, 2], dtype=np.int64)
    probabilities = np.array([[0.5, 0.25, 0.25], [0, 0, 1]], dtype=np.float32)
    assert orjson.loads(dumps(prediction_rows({"label": label}))) == [0, 2]
    both = prediction_rows({"label": label, "probabilities": probabilities})
    assert orjson.loads(dumps(both)) == [
        {"label": 0, "probabilities": [0.5, 0.25, 0.25]},
        {"label": 2, "probabilities": [0.0, 0.0, 1.0]},
    ]
    assert csv_lines({"label": label, "probabilities": probabilities}) == [
        b"0,0.5,0.25,0.25",
        b"2,0.0,0.0,1.0",
    ]


def test_non_finite_outputs_become_null() -> None:
    rows = prediction_rows({"y": np.array([np.nan, 1.0, np.inf])})
    assert orjson.loads(dumps(rows)) == [None, 1.0, None]


def test_float32_answers_are_written_as_float32_reads_them() -> None:
    rows = prediction_rows({"y": np.float32([0.1, 1e-8])})
    assert dumps(rows) == b"[0.1,1e-8]"
    assert csv_lines({"y": np.float32([0.1, 1e-8])}) == [b"0.1", b"1e-8"]


def test_csv_lines_spell_non_finite_values_and_quote_text() -> None:
    assert csv_lines({"y": np.float32([[np.nan, 1.5], [np.inf, -np.inf]])}) == [
        b"nan,1.5",
        b"inf,-inf",
    ]
    text = np.array([["a,b", 'say "hi"'], ["c", "d"]], dtype=object)
    assert csv_lines({"t": text, "n": np.array([True, False])}) == [
        b'"a,b","say ""hi""",1',
        b"c,d,0",
    ]


def test_longlong_outputs_are_written_like_int64() -> None:
    # ONNX Runtime answers INT64 outputs as numpy.longlong arrays.
    label = np.array([0, 2], dtype=np.longlong)
    both = prediction_rows({"label": label, "p": np.float32([[1.0], [0.5]])})
    assert dumps(both) == b'[{"label":0,"p":[1.0]},{"label":2,"p":[0.5]}]'
