"""The Azure ML /score codec and its swagger document."""

from __future__ import annotations

import numpy as np
import orjson
import pytest
from openapi_spec_validator import validate
from openapi_spec_validator.validation import OpenAPIV2SpecValidator

from modelkeep.api.azureml._codec import encode_answer, read_score_body
from modelkeep.api.azureml._swagger import swagger_document
from modelkeep.errors import InvalidInput, TooLarge
from modelkeep.runtime.signature import ModelSignature, TensorSpec

IRIS = ModelSignature(
    inputs=(TensorSpec("input", "FP32", (-1, 4)),),
    outputs=(TensorSpec("label", "INT64", (-1,)), TensorSpec("probabilities", "FP32", (-1, 3))),
)
TWO = ModelSignature(
    inputs=(TensorSpec("age", "FP32", (-1, 1)), TensorSpec("count", "INT64", (-1,))),
    outputs=(TensorSpec("y", "FP32", (-1,)),),
)
ROWS = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]


def read(document: object, signature: ModelSignature = IRIS, limit: int = 1000) -> object:
    return read_score_body(orjson.dumps(document), signature, limit).inputs


@pytest.mark.parametrize(
    "document",
    [
        {"data": ROWS},
        {"input_data": ROWS},
        {"input_data": {"columns": ["a", "b", "c", "d"], "index": [0, 1], "data": ROWS}},
        {"input_data": {"data": ROWS}},
        {"input_data": {"input": ROWS}},
    ],
)
def test_every_body_form_gives_the_same_tensor(document: object) -> None:
    inputs = read(document)
    assert isinstance(inputs, dict)
    np.testing.assert_array_equal(inputs["input"], np.float32(ROWS))


def test_split_columns_may_name_the_inputs_of_a_multi_input_model() -> None:
    document = {"input_data": {"columns": ["count", "age"], "data": [[3, 1.5], [4, 2.5]]}}
    inputs = read(document, TWO)
    assert isinstance(inputs, dict)
    assert inputs["age"].tolist() == [[1.5], [2.5]]
    assert (inputs["count"].dtype, inputs["count"].tolist()) == (np.dtype(np.int64), [3, 4])


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ([1, 2], "JSON object"),
        ({}, "exactly one"),
        ({"data": ROWS, "input_data": ROWS}, "exactly one"),
        ({"input_data": 7}, "list of rows or an object"),
        ({"input_data": {"data": ROWS, "columns": ["a"]}}, "names 1 columns"),
        ({"input_data": {"data": ROWS, "index": [0]}}, "one entry per row"),
        ({"input_data": {"data": ROWS, "orient": "split"}}, "unknown key"),
        ({"input_data": {"data": "x"}}, "non-empty list of rows"),
        ({"input_data": {"nope": ROWS}}, "unknown input 'nope'"),
        ({"data": [["a", "b", "c", "d"]]}, "numbers"),
    ],
)
def test_bad_bodies_are_refused_with_a_reason(document: object, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        read(document)


def test_split_columns_of_a_multi_input_model_must_be_its_inputs() -> None:
    with pytest.raises(InvalidInput, match="must name this model's inputs"):
        read({"input_data": {"columns": ["x", "y"], "data": [[1, 2]]}}, TWO)


def test_garbage_is_invalid_input() -> None:
    with pytest.raises(InvalidInput, match="not valid JSON"):
        read_score_body(b"\x00{garbage", IRIS, 100)


def test_size_is_checked_before_tensors_are_built() -> None:
    with pytest.raises(TooLarge):
        read({"data": ROWS}, limit=7)


def test_the_answer_is_the_list_of_predictions() -> None:
    label = np.array([0, 2], dtype=np.int64)
    assert orjson.loads(encode_answer({"label": label})) == [0, 2]
    both = {"label": label, "probabilities": np.float32([[1, 0, 0], [0, 0, 1]])}
    assert orjson.loads(encode_answer(both))[1] == {"label": 2, "probabilities": [0, 0, 1]}


@pytest.mark.parametrize("signature", [IRIS, TWO])
def test_swagger_is_a_valid_openapi_2_document(signature: ModelSignature) -> None:
    document = swagger_document("iris", 3, signature)
    validate(document, cls=OpenAPIV2SpecValidator)
    assert set(document["paths"]) == {"/", "/score"}
    assert document["info"]["version"] == "3"


def test_swagger_describes_the_model_s_rows() -> None:
    rows = swagger_document("iris", 1, IRIS)["definitions"]["ServiceInput"]["properties"]["data"]
    assert rows == {
        "type": "array",
        "items": {
            "type": "array",
            "items": {"type": "number", "format": "float"},
            "minItems": 4,
            "maxItems": 4,
        },
    }
