"""A captured response is kept in V2 JSON whatever protocol the caller spoke.

The service writes it without the V2 codec (service/ may not import api/), so these tests hold
the two to the same bytes: an auditor reads a capture exactly as a V2 client would have read
the response with every output asked for as JSON.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import numpy as np
import orjson
import pytest

from modelkeep.api.v2.codec import InferRequest, encode_infer_response
from modelkeep.errors import InternalError, InvalidInput
from modelkeep.registry.records import VersionRecord
from modelkeep.runtime.signature import ModelSignature
from modelkeep.service.capture import encode_capture_output

VERSION = VersionRecord(
    model="iris",
    number=3,
    sha256="ab" * 32,
    size=1,
    format="onnx",
    signature=ModelSignature(inputs=(), outputs=()),
    uploaded_by="k1",
    created_at=datetime(2026, 12, 1, tzinfo=UTC),
    blob_key="iris/3",
    wrapped_key=b"w",
    kek_id="kek",
)
ALL_JSON = InferRequest(id=None, inputs={}, outputs=None, binary_outputs_default=False)

OUTPUTS: dict[str, dict[str, Any]] = {
    "float32 with a NaN": {"p": np.array([[0.25, np.nan], [1.0, -2.5]], dtype=np.float32)},
    "integers and booleans": {
        "label": np.array([2, 0, 1], dtype=np.int64),
        "mask": np.array([True, False, True]),
        "small": np.array([1, 255], dtype=np.uint8),
    },
    "float16 and big-endian float64": {
        "h": np.array([0.5, 65504.0], dtype=np.float16),
        "be": np.array([1.5, -3.0], dtype=">f8"),
    },
    "strings and UTF-8 bytes": {
        "text": np.array(["setosa", "versicolor"], dtype=object),
        "raw": np.array([b"caf\xc3\xa9"], dtype=object),
    },
    "a scalar and an empty tensor": {
        "s": np.float64(7.0),
        "e": np.zeros((0, 3), dtype=np.float32),
    },
    "a list rather than an array": {"l": [1.0, 2.0]},
}


def v2_response(outputs: dict[str, Any]) -> bytes:
    content, headers = encode_infer_response(
        model_name="iris", model_version="3", request=ALL_JSON, outputs=outputs
    )
    assert headers == {"content-type": "application/json"}
    return content


@pytest.mark.parametrize("outputs", list(OUTPUTS.values()), ids=list(OUTPUTS))
def test_a_captured_response_is_the_v2_all_json_response_byte_for_byte(
    outputs: dict[str, Any],
) -> None:
    assert v2_response(outputs) == encode_capture_output(VERSION, outputs)


def test_a_captured_response_names_the_model_version_and_every_output() -> None:
    document = orjson.loads(encode_capture_output(VERSION, OUTPUTS["integers and booleans"]))
    assert document == {
        "model_name": "iris",
        "model_version": "3",
        "outputs": [
            {"name": "label", "datatype": "INT64", "shape": [3], "data": [2, 0, 1]},
            {"name": "mask", "datatype": "BOOL", "shape": [3], "data": [True, False, True]},
            {"name": "small", "datatype": "UINT8", "shape": [2], "data": [1, 255]},
        ],
    }


@pytest.mark.parametrize(
    ("outputs", "error"),
    [
        ({"c": np.array([1 + 2j])}, InternalError),
        ({"b": np.array([b"\xff"], dtype=object)}, InvalidInput),
    ],
    ids=["no V2 datatype", "bytes that are not UTF-8"],
)
def test_an_output_json_cannot_carry_fails_as_the_v2_codec_does(
    outputs: dict[str, Any], error: type[Exception]
) -> None:
    with pytest.raises(error) as from_v2:
        v2_response(outputs)
    with pytest.raises(error) as from_capture:
        encode_capture_output(VERSION, outputs)
    assert str(from_v2.value) == str(from_capture.value)
