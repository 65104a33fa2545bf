"""The SageMaker /invocations codec: JSON, CSV and npy in; JSON, CSV and npy out; headers."""

from __future__ import annotations

import io
import pickle

import numpy as np
import orjson
import pytest

from modelkeep.api._rows import RowRequest
from modelkeep.api.sagemaker._attributes import parse_custom_attributes, target_model
from modelkeep.api.sagemaker._codec import (
    NotAcceptable,
    UnsupportedMediaType,
    answer_type,
    encode_answer,
    request_decoder,
)
from modelkeep.api.sagemaker._csv import read_csv
from modelkeep.api.sagemaker._npy import read_npy, write_npy
from modelkeep.api.v2.codec import InferRequest
from modelkeep.errors import InvalidInput, TooLarge
from modelkeep.runtime.signature import ModelSignature, TensorSpec

IRIS = ModelSignature(
    inputs=(TensorSpec("input", "FP32", (-1, 4)),),
    outputs=(TensorSpec("label", "INT64", (-1,)), TensorSpec("probabilities", "FP32", (-1, 3))),
)
COUNTS = ModelSignature(
    inputs=(TensorSpec("n", "INT32", (-1,)),), outputs=(TensorSpec("y", "FP32", (-1,)),)
)
ROWS = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]
OUTPUTS = {
    "label": np.array([0, 2], dtype=np.int64),
    "probabilities": np.array([[0.75, 0.25, 0.0], [0.0, 0.5, 0.5]], dtype=np.float32),
}


def decode(body: bytes, content_type: str | None, limit: int = 1000) -> object:
    return request_decoder(body, content_type)(IRIS, limit)


def npy(array: np.ndarray) -> bytes:
    stream = io.BytesIO()
    np.save(stream, array, allow_pickle=False)
    return stream.getvalue()


# -- JSON ------------------------------------------------------------------------------------


def test_json_instances_and_bare_rows_decode_alike() -> None:
    for body in (orjson.dumps({"instances": ROWS}), orjson.dumps(ROWS)):
        request = decode(body, "application/json; charset=utf-8")
        assert isinstance(request, RowRequest)
        np.testing.assert_array_equal(request.inputs["input"], np.float32(ROWS))


def test_json_v2_requests_go_through_the_v2_codec() -> None:
    body = orjson.dumps(
        {
            "inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 4], "data": ROWS}],
            "outputs": [{"name": "label"}],
        }
    )
    request = decode(body, None)
    assert isinstance(request, InferRequest)
    assert request.output_names() == ["label"]
    content, headers = encode_answer(
        "application/json", request, {"label": OUTPUTS["label"]}, model="iris", version=3
    )
    assert headers == {"content-type": "application/json"}
    answer = orjson.loads(content)
    assert (answer["model_name"], answer["model_version"]) == ("iris", "3")
    assert answer["outputs"][0]["data"] == [0, 2]


def test_json_v2_checks_stay_the_v2_codec_s() -> None:
    body = orjson.dumps(
        {"inputs": [{"name": "input", "datatype": "FP64", "shape": [2, 4], "data": ROWS}]}
    )
    with pytest.raises(InvalidInput, match="must have datatype FP32"):
        decode(body, "application/json")


def test_json_columnar_inputs_answer_outputs() -> None:
    request = decode(orjson.dumps({"inputs": {"input": ROWS}}), "application/json")
    assert isinstance(request, RowRequest)
    content, _ = encode_answer(
        "application/json", request, {"label": OUTPUTS["label"]}, model="iris", version=1
    )
    assert orjson.loads(content) == {"outputs": [0, 2]}


@pytest.mark.parametrize(
    "body",
    [b"{", b"nul", b'"text"', b"{}", b'{"instances": 5}', b'{"instances": [], "inputs": []}'],
)
def test_hostile_json_is_invalid_input(body: bytes) -> None:
    with pytest.raises(InvalidInput):
        decode(body, "application/json")


def test_json_rows_answer_predictions() -> None:
    request = decode(orjson.dumps({"instances": ROWS}), "application/json")
    assert isinstance(request, RowRequest)
    content, headers = encode_answer("application/json", request, OUTPUTS, model="m", version=1)
    assert headers["content-type"] == "application/json"
    assert orjson.loads(content) == {
        "predictions": [
            {"label": 0, "probabilities": [0.75, 0.25, 0.0]},
            {"label": 2, "probabilities": [0.0, 0.5, 0.5]},
        ]
    }


# -- CSV -------------------------------------------------------------------------------------


def test_csv_rows_become_the_input() -> None:
    request = decode(b"5.1,3.5,1.4,0.2\r\n6.7, 3.0 ,5.2,2.3\n", "text/csv")
    assert isinstance(request, RowRequest)
    np.testing.assert_array_equal(request.inputs["input"], np.float32(ROWS))


def test_csv_floats_overflow_to_inf_and_keep_nan() -> None:
    request = read_csv(b"1e39,nan,-inf,-1\n", IRIS, 100)
    values = request.inputs["input"]
    assert values.dtype == np.float32
    assert values.shape == (1, 4)
    assert np.isinf(values[0, 0])
    assert np.isnan(values[0, 1])
    assert values[0, 2:].tolist() == [-np.inf, -1.0]


def test_csv_for_a_rank_one_integer_input() -> None:
    request = read_csv(b"1\n-2\n3", COUNTS, 100)
    assert request.inputs["n"].dtype == np.int32
    assert request.inputs["n"].tolist() == [1, -2, 3]
    with pytest.raises(InvalidInput, match="row 2 is not a row of integers"):
        read_csv(b"1\n2.5\n", COUNTS, 100)
    with pytest.raises(InvalidInput, match="out of range"):
        read_csv(b"99999999999\n", COUNTS, 100)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "no rows"),
        (b"\r\n", "no rows"),
        (b"a,b,c,d\n1,2,3,4\n", "row 1 is not a row of numbers"),
        (b'"1","2","3","4"', "row 1 is not"),
        (b"1_0,2,3,4", "row 1 is not"),
        (b"1,2,3,4\n\n1,2,3,4", "row 2 has 1 columns"),
        (b"1,2,3,4\n1,2,3", "row 2 has 3 columns"),
        (b"1,2,3\n", "size 4 on axis 1"),
        ("1,2,3,\u00e9".encode(), "ASCII"),
        (b"\xff\xfe", "ASCII"),
    ],
)
def test_bad_csv_is_refused_with_a_reason(body: bytes, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        decode(body, "text/csv")


def test_csv_size_is_checked_before_parsing() -> None:
    with pytest.raises(TooLarge, match="holds 12 values; the limit is 8"):
        decode(b"1,2,3,4\n" * 3, "text/csv", limit=8)
    with pytest.raises(InvalidInput, match="more than 65536 columns"):
        decode(b"1," * 70_000 + b"1", "text/csv", limit=10**9)


def test_csv_is_linear_on_long_digit_runs() -> None:
    # A pattern with two ways to match a digit would take quadratic time here.
    with pytest.raises(InvalidInput, match="row 1 is not"):
        decode(b"1" * 2_000_000 + b"x,1,2,3", "text/csv", limit=10**9)


def test_csv_answers_one_line_per_row() -> None:
    request = decode(b"1,2,3,4\n", "text/csv")
    assert isinstance(request, RowRequest)
    content, headers = encode_answer("text/csv", request, OUTPUTS, model="m", version=1)
    assert headers == {"content-type": "text/csv"}
    assert content == b"0,0.75,0.25,0.0\n2,0.0,0.5,0.5\n"


# -- npy -------------------------------------------------------------------------------------


def test_npy_float64_is_cast_to_the_input_dtype() -> None:
    request = decode(npy(np.array(ROWS)), "application/x-npy")
    assert isinstance(request, RowRequest)
    assert request.inputs["input"].dtype == np.float32
    np.testing.assert_array_equal(request.inputs["input"], np.float32(ROWS))


def test_npy_fortran_order_and_big_endian_are_read_right() -> None:
    array = np.asfortranarray(np.array(ROWS, dtype=">f4"))
    request = read_npy(npy(array), IRIS, 100)
    np.testing.assert_array_equal(request.inputs["input"], np.float32(ROWS))


def test_npy_object_arrays_are_refused_without_unpickling() -> None:
    stream = io.BytesIO()
    np.save(stream, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(InvalidInput, match="object arrays are refused"):
        read_npy(stream.getvalue(), IRIS, 100)


def test_a_pickle_posing_as_npy_is_refused() -> None:
    with pytest.raises(InvalidInput, match="bad magic"):
        read_npy(pickle.dumps([[1.0, 2.0, 3.0, 4.0]]), IRIS, 100)


def test_structured_and_text_dtypes_are_refused() -> None:
    with pytest.raises(InvalidInput, match="plain numbers"):
        read_npy(npy(np.zeros(2, dtype=[("a", "<f4"), ("b", "<i4")])), IRIS, 100)
    with pytest.raises(InvalidInput, match="send numbers"):
        read_npy(npy(np.array([["a", "b", "c", "d"]])), IRIS, 100)


def test_a_huge_declared_shape_is_refused_before_reading() -> None:
    header = {"descr": "<f4", "fortran_order": False, "shape": (2**40, 4)}
    stream = io.BytesIO()
    np.lib.format.write_array_header_1_0(stream, header)
    with pytest.raises(TooLarge, match="the limit is 1000"):
        read_npy(stream.getvalue(), IRIS, 1000)


def test_npy_data_must_match_its_header() -> None:
    body = npy(np.float32(ROWS))
    with pytest.raises(InvalidInput, match="header declares 32"):
        read_npy(body[:-4], IRIS, 100)
    with pytest.raises(InvalidInput, match="header declares 32"):
        read_npy(body + b"\0\0\0\0", IRIS, 100)


@pytest.mark.parametrize(
    "header",
    [
        b"{'descr': __import__('os').system('id'), 'fortran_order': False, 'shape': (1, 4)}",
        b"{'descr': '<f4', 'fortran_order': False}",
        b"{'descr': '<f4', 'fortran_order': False, 'shape': (-1, 4)}",
        b"not a dict at all",
    ],
)
def test_malformed_npy_headers_are_invalid_input(header: bytes) -> None:
    padded = header + b" " * (63 - (10 + len(header)) % 64) + b"\n"
    body = b"\x93NUMPY\x01\x00" + len(padded).to_bytes(2, "little") + padded
    with pytest.raises(InvalidInput):
        read_npy(body, IRIS, 100)


def test_npy_of_integers_for_an_integer_input_checks_range() -> None:
    request = read_npy(npy(np.array([1, 2], dtype=np.int64)), COUNTS, 100)
    assert request.inputs["n"].dtype == np.int32
    with pytest.raises(InvalidInput, match="out of range"):
        read_npy(npy(np.array([2**40], dtype=np.int64)), COUNTS, 100)
    with pytest.raises(InvalidInput, match="needs integers"):
        read_npy(npy(np.array([1.5])), COUNTS, 100)


def test_npy_answers_one_array_and_refuses_several() -> None:
    request = decode(npy(np.float32(ROWS)), "application/x-npy")
    assert isinstance(request, RowRequest)
    content, headers = encode_answer(
        "application/x-npy", request, {"label": OUTPUTS["label"]}, model="m", version=1
    )
    assert headers == {"content-type": "application/x-npy"}
    np.testing.assert_array_equal(np.load(io.BytesIO(content), allow_pickle=False), [0, 2])
    with pytest.raises(NotAcceptable, match="one array"):
        encode_answer("application/x-npy", request, OUTPUTS, model="m", version=1)
    with pytest.raises(InvalidInput, match="pickle"):
        write_npy(np.array(["a"], dtype=object))


# -- media types and headers ---------------------------------------------------------------


def test_unsupported_content_types_are_refused() -> None:
    with pytest.raises(UnsupportedMediaType):
        request_decoder(b"", "application/x-protobuf")


@pytest.mark.parametrize(
    ("accept", "answer"),
    [
        (None, "application/json"),
        ("*/*", "application/json"),
        ("text/csv", "text/csv"),
        ("application/x-npy", "application/x-npy"),
        ("image/png, text/csv;q=0.5, application/json;q=0.9", "application/json"),
        ("text/csv, application/json", "text/csv"),
    ],
)
def test_accept_picks_the_answer(accept: str | None, answer: str) -> None:
    assert answer_type(accept) == answer


def test_an_accept_with_nothing_writable_is_not_acceptable() -> None:
    with pytest.raises(NotAcceptable):
        answer_type("image/png, text/csv;q=0")


def test_custom_attributes_give_up_the_key_and_echo_the_rest() -> None:
    parsed = parse_custom_attributes("trace=abc,modelkeep-key=mk_a_b;c=d")
    assert (parsed.key, parsed.echo) == ("mk_a_b", "trace=abc,c=d")
    parsed = parse_custom_attributes("modelkeep-key=mk_a_b")
    assert (parsed.key, parsed.echo) == ("mk_a_b", None)
    parsed = parse_custom_attributes("just text")
    assert (parsed.key, parsed.echo) == (None, "just text")
    assert parse_custom_attributes(None).echo is None


@pytest.mark.parametrize(
    "value", ["x" * 1025, "a=\x01", "a=\u00e9", "modelkeep-key=a,modelkeep-key=b"]
)
def test_bad_custom_attributes_are_refused(value: str) -> None:
    with pytest.raises(InvalidInput):
        parse_custom_attributes(value)


def test_target_model_names_the_model_or_falls_back_to_the_default() -> None:
    assert target_model("iris.tar.gz", None) == "iris"
    assert target_model("iris", "other") == "iris"
    assert target_model(None, "other") == "other"
    with pytest.raises(InvalidInput, match="MODELKEEP_SAGEMAKER_MODEL"):
        target_model(None, None)
    with pytest.raises(InvalidInput):
        target_model(".tar.gz", None)
