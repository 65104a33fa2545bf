"""TensorFlow Serving REST codec: request forms, response shapes, refusals before any tensor."""

from __future__ import annotations

import base64
import json

import numpy as np
import orjson
import pytest

from modelkeep.api.tfserving._codec import (
    decode_classify,
    decode_predict,
    decode_regress,
    encode_classify,
    encode_predict,
    encode_regress,
)
from modelkeep.api.tfserving._metadata import model_metadata, model_status
from modelkeep.errors import InvalidInput, TooLarge
from modelkeep.runtime.signature import ModelSignature, TensorSpec

MAX = 1_000_000

IRIS = ModelSignature(
    inputs=(TensorSpec("input", "FP32", (-1, 4)),),
    outputs=(
        TensorSpec("label", "INT64", (-1,)),
        TensorSpec("probabilities", "FP32", (-1, 3)),
    ),
)
TWO_IN = ModelSignature(
    inputs=(TensorSpec("a", "FP32", (-1, 2)), TensorSpec("tag", "BYTES", (-1,))),
    outputs=(TensorSpec("y", "FP64", (-1,)),),
)
REGRESSOR = ModelSignature(
    inputs=(TensorSpec("x", "FP32", (-1, 1)),), outputs=(TensorSpec("y", "FP32", (-1,)),)
)
TEXT = ModelSignature(
    inputs=(TensorSpec("text", "BYTES", (-1,)),),
    outputs=(TensorSpec("out_bytes", "BYTES", (-1,)), TensorSpec("out", "BYTES", (-1,))),
)


def body(document: object) -> bytes:
    return json.dumps(document).encode()


def test_row_form_batches_rows_along_the_first_axis() -> None:
    request = decode_predict(body({"instances": [[1, 2, 3, 4], [5, 6, 7, 8]]}), IRIS, MAX)
    assert not request.columnar
    assert request.inputs["input"].dtype == np.float32
    np.testing.assert_array_equal(request.inputs["input"], [[1, 2, 3, 4], [5, 6, 7, 8]])
    assert request.output_names() is None


def test_row_form_with_named_inputs_takes_one_object_per_row() -> None:
    document = {"instances": [{"a": [1, 2], "tag": "x"}, {"a": [3, 4], "tag": "y"}]}
    request = decode_predict(body(document), TWO_IN, MAX)
    assert list(request.inputs) == ["a", "tag"]
    np.testing.assert_array_equal(request.inputs["a"], [[1, 2], [3, 4]])
    assert request.inputs["tag"].tolist() == ["x", "y"]


def test_columnar_form_takes_a_value_or_an_object_of_inputs() -> None:
    single = decode_predict(body({"inputs": [[1, 2, 3, 4]]}), IRIS, MAX)
    assert single.columnar
    assert single.inputs["input"].shape == (1, 4)
    named = decode_predict(body({"inputs": {"a": [[1, 2]], "tag": ["t"]}}), TWO_IN, MAX)
    assert named.inputs["tag"].tolist() == ["t"]


def test_b64_values_are_decoded_for_string_inputs() -> None:
    encoded = base64.b64encode(b"hello").decode()
    request = decode_predict(
        body({"instances": [{"b64": encoded}, {"b64": encoded.rstrip("=")}]}), TEXT, MAX
    )
    assert request.inputs["text"].tolist() == ["hello", "hello"]


def test_signature_name_accepts_only_the_default() -> None:
    for name in ("serving_default", ""):
        decode_predict(body({"signature_name": name, "instances": [[1, 2, 3, 4]]}), IRIS, MAX)
    with pytest.raises(InvalidInput) as caught:
        decode_predict(body({"signature_name": "other", "instances": [[1, 2, 3, 4]]}), IRIS, MAX)
    assert caught.value.message == "Serving signature name: 'other' not found in signature def"
    with pytest.raises(InvalidInput):
        decode_predict(body({"signature_name": 3, "instances": [[1, 2, 3, 4]]}), IRIS, MAX)


@pytest.mark.parametrize(
    ("document", "fragment"),
    [
        ({"instances": [[1, 2, 3]]}, "size 4 on axis 1"),
        ({"instances": [1, 2]}, "rank 2"),
        ({"instances": [["a", "b", "c", "d"]]}, "needs numbers"),
        ({"instances": [[1, 2, 3, 4], [1, 2, 3]]}, "ragged"),
        ({"instances": []}, "no rows"),
        ({"instances": {"input": 1}}, "must be a list"),
        ({"instances": [[1, 2, 3, 4]], "inputs": [[1, 2, 3, 4]]}, "not both"),
        ({}, "missing 'inputs' or 'instances'"),
        ({"inputs": {"input": [[1, 2, 3, 4]], "extra": 1}}, "unknown input 'extra'"),
        ({"instances": [{"b64": "AAAA"}]}, "rank 2"),
    ],
)
def test_malformed_predict_bodies_are_refused_with_a_reason(
    document: object, fragment: str
) -> None:
    with pytest.raises(InvalidInput) as caught:
        decode_predict(body(document), IRIS, MAX)
    assert fragment in caught.value.message


@pytest.mark.parametrize(
    "raw",
    [b"", b"not json", b"[1, 2]", b"[" * 100_000 + b"]" * 100_000, b'{"instances": [[' * 50],
)
def test_garbage_and_deep_nesting_are_invalid_input(raw: bytes) -> None:
    with pytest.raises(InvalidInput):
        decode_predict(raw, IRIS, MAX)


def test_nesting_deeper_than_any_model_is_refused_before_walking_it() -> None:
    deep: object = 1.0
    for _ in range(40):
        deep = [deep]
    with pytest.raises(InvalidInput, match="nested deeper"):
        decode_predict(body({"instances": deep}), IRIS, MAX)


def test_element_limit_is_checked_from_the_shape_before_a_tensor_is_built() -> None:
    rows = [[0.0] * 4] * 10
    with pytest.raises(TooLarge):
        decode_predict(body({"instances": rows}), IRIS, 39)
    assert decode_predict(body({"instances": rows}), IRIS, 40).inputs["input"].shape == (10, 4)


@pytest.mark.parametrize("value", ["%%%", "AAA*", 3])
def test_bad_b64_is_refused(value: object) -> None:
    with pytest.raises(InvalidInput):
        decode_predict(body({"instances": [{"b64": value}]}), TEXT, MAX)


def test_b64_bytes_that_are_not_text_are_refused() -> None:
    encoded = base64.b64encode(b"\xff\xfe").decode()
    with pytest.raises(InvalidInput, match="not UTF-8"):
        decode_predict(body({"instances": [{"b64": encoded}]}), TEXT, MAX)


def test_b64_is_refused_for_numeric_inputs() -> None:
    with pytest.raises(InvalidInput):
        decode_predict(body({"inputs": [[{"b64": "AAAA"}] * 4]}), IRIS, MAX)


def test_rows_with_missing_or_unknown_inputs_are_refused() -> None:
    with pytest.raises(InvalidInput, match="missing input 'tag'"):
        decode_predict(body({"instances": [{"a": [1, 2]}]}), TWO_IN, MAX)
    with pytest.raises(InvalidInput, match="plain list"):
        decode_predict(body({"instances": [[1, 2]]}), TWO_IN, MAX)
    with pytest.raises(InvalidInput, match="mixes"):
        decode_predict(body({"instances": [{"a": [1, 2], "tag": "x"}, [1]]}), TWO_IN, MAX)


IRIS_OUT = {
    "label": np.array([2, 0], dtype=np.int64),
    "probabilities": np.array([[0.1, 0.2, 0.7], [0.8, 0.1, 0.1]], dtype=np.float32),
}


def test_row_form_answers_one_object_per_row_for_several_outputs() -> None:
    request = decode_predict(body({"instances": [[1, 2, 3, 4]] * 2}), IRIS, MAX)
    answer = orjson.loads(encode_predict(request, IRIS_OUT))
    assert answer == {
        "predictions": [
            {"label": 2, "probabilities": [0.1, 0.2, 0.7]},
            {"label": 0, "probabilities": [0.8, 0.1, 0.1]},
        ]
    }


def test_row_form_keeps_objects_when_hardening_removed_an_output() -> None:
    request = decode_predict(body({"instances": [[1, 2, 3, 4]] * 2}), IRIS, MAX)
    answer = orjson.loads(encode_predict(request, {"label": IRIS_OUT["label"]}))
    assert answer == {"predictions": [{"label": 2}, {"label": 0}]}


def test_columnar_form_answers_an_object_of_outputs() -> None:
    request = decode_predict(body({"inputs": [[1, 2, 3, 4]] * 2}), IRIS, MAX)
    answer = orjson.loads(encode_predict(request, IRIS_OUT))
    assert answer == {
        "outputs": {"label": [2, 0], "probabilities": [[0.1, 0.2, 0.7], [0.8, 0.1, 0.1]]}
    }


def test_a_single_output_is_written_without_its_name() -> None:
    request = decode_predict(body({"instances": [[1.0], [2.0]]}), REGRESSOR, MAX)
    out = {"y": np.array([3.5, 4.0], dtype=np.float32)}
    assert orjson.loads(encode_predict(request, out)) == {"predictions": [3.5, 4.0]}
    columnar = decode_predict(body({"inputs": [[1.0], [2.0]]}), REGRESSOR, MAX)
    assert orjson.loads(encode_predict(columnar, out)) == {"outputs": [3.5, 4.0]}


def test_non_finite_floats_are_written_as_tf_serving_tokens() -> None:
    request = decode_predict(body({"instances": [[1.0], [2.0], [3.0]]}), REGRESSOR, MAX)
    out = {"y": np.array([np.nan, np.inf, 0.1], dtype=np.float32)}
    raw = encode_predict(request, out)
    assert raw == b'{"predictions":[NaN,Infinity,0.1]}'


def test_bytes_outputs_are_b64_objects_and_text_stays_text() -> None:
    request = decode_predict(body({"instances": ["a"]}), TEXT, MAX)
    out = {
        "out_bytes": np.array(["hi"], dtype=object),
        "out": np.array([b"\xff", "ok"][:1], dtype=object),
    }
    answer = orjson.loads(encode_predict(request, out))
    assert answer == {
        "predictions": [
            {"out_bytes": {"b64": base64.b64encode(b"hi").decode()}, "out": {"b64": "/w=="}}
        ]
    }


def test_classify_answers_label_score_pairs_per_example() -> None:
    document = {"examples": [{"input": [1, 2, 3, 4]}, {"input": [5, 6, 7, 8]}]}
    request = decode_classify(body(document), IRIS, MAX)
    assert request.inputs["input"].shape == (2, 4)
    answer = orjson.loads(encode_classify(request, IRIS_OUT))
    assert answer == {
        "results": [
            [["", 0.1], ["", 0.2], ["2", 0.7]],
            [["0", 0.8], ["", 0.1], ["", 0.1]],
        ]
    }


def test_classify_without_scores_answers_the_label_alone() -> None:
    request = decode_classify(body({"examples": [{"input": [1, 2, 3, 4]}]}), IRIS, MAX)
    answer = orjson.loads(encode_classify(request, {"label": np.array([1])}))
    assert answer == {"results": [[["1", 0.0]]]}


def test_classify_context_is_shared_by_every_example() -> None:
    document = {"context": {"tag": "shared"}, "examples": [{"a": [1, 2]}, {"a": [3, 4]}]}
    signature = ModelSignature(
        inputs=TWO_IN.inputs,
        outputs=(TensorSpec("label", "INT64", (-1,)), TensorSpec("scores", "FP32", (-1, 2))),
    )
    request = decode_classify(body(document), signature, MAX)
    assert request.inputs["tag"].tolist() == ["shared", "shared"]
    clash = {"context": {"tag": "x"}, "examples": [{"a": [1, 2], "tag": "y"}]}
    with pytest.raises(InvalidInput, match="both 'context'"):
        decode_classify(body(clash), signature, MAX)


def test_classify_and_regress_refuse_models_whose_outputs_do_not_fit() -> None:
    with pytest.raises(InvalidInput, match=":classify needs a classifier"):
        decode_classify(body({"examples": [{"x": [1.0]}]}), REGRESSOR, MAX)
    with pytest.raises(InvalidInput, match=":regress needs a regressor"):
        decode_regress(body({"examples": [{"input": [1, 2, 3, 4]}]}), IRIS, MAX)


def test_regress_answers_one_value_per_example() -> None:
    request = decode_regress(body({"examples": [{"x": 1.0}, {"x": [2.0]}]}), REGRESSOR, MAX)
    np.testing.assert_array_equal(request.inputs["x"], [[1.0], [2.0]])
    out = {"y": np.array([3.5, 4.0], dtype=np.float32)}
    assert orjson.loads(encode_regress(request, out)) == {"results": [3.5, 4.0]}


def test_examples_must_be_a_non_empty_list_of_objects() -> None:
    for document in ({}, {"examples": []}, {"examples": [1]}, {"examples": {"x": 1}}):
        with pytest.raises(InvalidInput):
            decode_regress(body(document), REGRESSOR, MAX)


def test_model_status_is_tf_servings_shape() -> None:
    assert orjson.loads(model_status([(1, True), (2, False)])) == {
        "model_version_status": [
            {
                "version": "1",
                "state": "AVAILABLE",
                "status": {"error_code": "OK", "error_message": ""},
            },
            {
                "version": "2",
                "state": "END",
                "status": {
                    "error_code": "UNAVAILABLE",
                    "error_message": "the model could not be loaded",
                },
            },
        ]
    }


def test_model_metadata_is_a_signature_def_map() -> None:
    answer = orjson.loads(model_metadata("iris", 3, IRIS))
    assert answer["model_spec"] == {"name": "iris", "signature_name": "", "version": "3"}
    signature = answer["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert signature["method_name"] == "tensorflow/serving/predict"
    assert signature["inputs"]["input"] == {
        "dtype": "DT_FLOAT",
        "tensor_shape": {
            "dim": [{"size": "-1", "name": ""}, {"size": "4", "name": ""}],
            "unknown_rank": False,
        },
        "name": "input",
    }
    assert signature["outputs"]["label"]["dtype"] == "DT_INT64"


def test_int64_aliases_from_runtimes_are_written() -> None:
    request = decode_predict(body({"instances": [[1, 2, 3, 4]]}), IRIS, MAX)
    out = {
        "label": np.array([2], dtype=np.longlong),
        "probabilities": np.array([[0.1, 0.2, 0.7]], dtype=">f4"),
    }
    answer = orjson.loads(encode_predict(request, out))
    assert answer == {"predictions": [{"label": 2, "probabilities": [0.1, 0.2, 0.7]}]}


def test_int64_and_its_longlong_alias_both_encode_whichever_comes_first() -> None:
    request = decode_predict(body({"instances": [[1, 2, 3, 4]] * 2}), IRIS, MAX)
    for dtype in (np.int64, np.longlong, np.int64):
        out = {
            "label": np.array([2, 1], dtype=dtype),
            "probabilities": np.zeros((2, 3), dtype=np.float32),
        }
        answer = orjson.loads(encode_predict(request, out))
        assert [row["label"] for row in answer["predictions"]] == [2, 1]
