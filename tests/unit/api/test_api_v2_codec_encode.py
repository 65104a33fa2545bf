"""Encoding V2 infer responses: JSON layout, the outputs filter and binary outputs."""

from __future__ import annotations

import math
import struct
from typing import Any

import numpy as np
import orjson
import pytest

from modelkeep.api.v2.codec import (
    INFERENCE_HEADER_CONTENT_LENGTH,
    InferRequest,
    RequestedOutput,
    encode_infer_response,
)
from modelkeep.errors import InternalError, InvalidInput

OUTPUTS = {
    "label": np.array([0, 2], dtype=np.int64),
    "probabilities": np.array([[0.75, 0.25, 0.0], [0.125, 0.125, 0.75]], dtype=np.float32),
}


def _request(
    outputs: tuple[RequestedOutput, ...] | None = None,
    *,
    binary_default: bool = False,
    request_id: str | None = "r-1",
) -> InferRequest:
    return InferRequest(
        id=request_id, inputs={}, outputs=outputs, binary_outputs_default=binary_default
    )


def _encode(
    request: InferRequest, outputs: dict[str, np.ndarray] | None = None
) -> tuple[bytes, dict[str, str]]:
    return encode_infer_response(
        model_name="iris", model_version="3", request=request, outputs=outputs or OUTPUTS
    )


def _split(body: bytes, headers: dict[str, str]) -> tuple[dict[str, Any], bytes]:
    length = int(headers[INFERENCE_HEADER_CONTENT_LENGTH])
    document: dict[str, Any] = orjson.loads(body[:length])
    return document, body[length:]


def test_json_response_has_the_v2_layout() -> None:
    body, headers = _encode(_request())
    expected = {
        "model_name": "iris",
        "model_version": "3",
        "id": "r-1",
        "outputs": [
            {"name": "label", "datatype": "INT64", "shape": [2], "data": [0, 2]},
            {
                "name": "probabilities",
                "datatype": "FP32",
                "shape": [2, 3],
                "data": [0.75, 0.25, 0.0, 0.125, 0.125, 0.75],
            },
        ],
    }
    assert expected == orjson.loads(body)
    assert headers == {"content-type": "application/json"}


def test_id_is_left_out_when_the_request_had_none() -> None:
    body, _ = _encode(_request(request_id=None))
    assert "id" not in orjson.loads(body)


def test_the_outputs_filter_is_honoured_in_signature_order() -> None:
    request = _request((RequestedOutput("probabilities", False), RequestedOutput("label", False)))
    body, _ = _encode(request, {"probabilities": OUTPUTS["probabilities"]})
    assert [output["name"] for output in orjson.loads(body)["outputs"]] == ["probabilities"]
    body, _ = _encode(_request((RequestedOutput("label", False),)))
    assert [output["name"] for output in orjson.loads(body)["outputs"]] == ["label"]


def test_outputs_removed_before_encoding_are_skipped() -> None:
    body, _ = _encode(_request(), {"label": OUTPUTS["label"]})
    assert [output["name"] for output in orjson.loads(body)["outputs"]] == ["label"]


def test_binary_default_sends_every_output_as_binary() -> None:
    body, headers = _encode(_request(binary_default=True))
    document, tail = _split(body, headers)
    assert headers["content-type"] == "application/octet-stream"
    assert [output["parameters"] for output in document["outputs"]] == [
        {"binary_data_size": 16},
        {"binary_data_size": 24},
    ]
    assert all("data" not in output for output in document["outputs"])
    assert OUTPUTS["label"].astype("<i8").tobytes() + OUTPUTS["probabilities"].tobytes() == tail


def test_per_output_binary_choice_mixes_json_and_binary() -> None:
    request = _request((RequestedOutput("label", True), RequestedOutput("probabilities", False)))
    body, headers = _encode(request)
    document, tail = _split(body, headers)
    label, probabilities = document["outputs"]
    assert label["parameters"] == {"binary_data_size": 16}
    assert probabilities["data"] == [0.75, 0.25, 0.0, 0.125, 0.125, 0.75]
    assert OUTPUTS["label"].tobytes() == tail


def test_header_length_is_the_json_length_in_bytes() -> None:
    body, headers = _encode(_request(binary_default=True, request_id="é" * 10))
    length = int(headers[INFERENCE_HEADER_CONTENT_LENGTH])
    assert body[length - 1 : length] == b"}"
    assert len(body) == length + 16 + 24


def test_fp16_outputs_encode_in_json_and_binary() -> None:
    half = {"h": np.array([0.5, -2.0, 65504.0], dtype=np.float16)}
    body, _ = _encode(_request(), half)
    output = orjson.loads(body)["outputs"][0]
    assert (output["datatype"], output["data"]) == ("FP16", [0.5, -2.0, 65504.0])
    body, headers = _encode(_request(binary_default=True), half)
    assert half["h"].tobytes() == _split(body, headers)[1]


def test_non_finite_floats_are_null_in_json_and_exact_in_binary() -> None:
    values = {"f": np.array([math.nan, math.inf, 1.0], dtype=np.float32)}
    body, _ = _encode(_request(), values)
    assert orjson.loads(body)["outputs"][0]["data"] == [None, None, 1.0]
    body, headers = _encode(_request(binary_default=True), values)
    decoded = np.frombuffer(_split(body, headers)[1], dtype="<f4")
    assert math.isnan(decoded[0])
    assert [math.inf, 1.0] == decoded[1:].tolist()


def test_bytes_outputs_encode_as_text_and_length_prefixed_binary() -> None:
    text = {"t": np.array([["a", "é"], [b"raw", ""]], dtype=object)}
    body, _ = _encode(_request(), text)
    output = orjson.loads(body)["outputs"][0]
    assert (
        output["datatype"],
        output["shape"],
        output["data"],
    ) == ("BYTES", [2, 2], ["a", "é", "raw", ""])
    body, headers = _encode(_request(binary_default=True), text)
    expected = b"".join(
        struct.pack("<I", len(item)) + item for item in (b"a", "é".encode(), b"raw", b"")
    )
    assert expected == _split(body, headers)[1]


def test_non_utf8_bytes_outputs_must_be_requested_as_binary() -> None:
    with pytest.raises(InvalidInput, match="request it as binary data"):
        _encode(_request(), {"t": np.array([b"\xff"], dtype=object)})


def test_bool_and_unsigned_outputs_keep_their_datatypes() -> None:
    values = {"b": np.array([True, False]), "u": np.array([2**64 - 1], dtype=np.uint64)}
    body, _ = _encode(_request(), values)
    outputs = orjson.loads(body)["outputs"]
    assert [(output["datatype"], output["data"]) for output in outputs] == [
        ("BOOL", [True, False]),
        ("UINT64", [2**64 - 1]),
    ]


def test_non_contiguous_and_big_endian_outputs_encode_correctly() -> None:
    matrix = np.arange(6, dtype=">f8").reshape(2, 3)
    values = {"t": matrix.T}
    body, _ = _encode(_request(), values)
    assert orjson.loads(body)["outputs"][0]["data"] == [0.0, 3.0, 1.0, 4.0, 2.0, 5.0]
    body, headers = _encode(_request(binary_default=True), values)
    decoded = np.frombuffer(_split(body, headers)[1], dtype="<f8").reshape(3, 2)
    assert np.array_equal(matrix.T, decoded)


def test_outputs_without_a_v2_datatype_are_an_internal_error() -> None:
    with pytest.raises(InternalError):
        _encode(_request(), {"c": np.array([1j], dtype=np.complex64)})


@pytest.mark.parametrize(
    "make",
    [
        lambda a: np.asfortranarray(a),  # column-major
        lambda a: a.T.copy().T,  # a transposed copy, seen back in the original order
        lambda a: np.repeat(a, 2, axis=1)[:, ::2],  # a strided view
        lambda a: a.astype(a.dtype.newbyteorder(">")),  # big-endian
        lambda a: a[::-1][::-1],  # reversed twice: negative strides
    ],
)
def test_json_data_is_in_row_major_order_whatever_the_layout(make: Any) -> None:
    values = np.arange(12, dtype=np.float32).reshape(3, 4) / 8
    outputs = {"label": OUTPUTS["label"], "probabilities": make(values)}
    body, _ = _encode(_request(), outputs)
    (_, probabilities) = orjson.loads(body)["outputs"]
    assert probabilities["shape"] == [3, 4]
    assert probabilities["data"] == values.ravel().tolist()
