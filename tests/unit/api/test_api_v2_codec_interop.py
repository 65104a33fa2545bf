"""Interop with the real V2 clients' own codecs (Triton's tritonclient and the KServe SDK).

Offline: request bodies come from each client's encoder, responses go through each client's
decoder, and the model in between is the real iris model in ONNX Runtime.
"""

from __future__ import annotations

import base64
import json
import math
import subprocess
import sys
from typing import Any

import numpy as np
import orjson
import pytest
import tritonclient.http as triton

from modelkeep.api.v2.codec import (
    INFERENCE_HEADER_CONTENT_LENGTH,
    decode_infer_request,
    encode_infer_response,
)
from modelkeep.runtime.onnx import OnnxModel
from modelkeep.runtime.signature import ModelSignature, TensorSpec
from modelkeep.testing import build_iris_onnx, iris_rows

LIMIT = 100_000
ROWS = np.asarray(iris_rows(6), dtype=np.float32)


@pytest.fixture(scope="module")
def iris() -> OnnxModel:
    return OnnxModel.load(build_iris_onnx())


@pytest.fixture(scope="module")
def expected(iris: OnnxModel) -> dict[str, np.ndarray]:
    return iris.run({"input": ROWS})


def _serve(iris: OnnxModel, body: bytes, header_length: int | None) -> tuple[bytes, dict[str, str]]:
    request = decode_infer_request(
        body, iris.signature, header_length=header_length, max_elements=LIMIT
    )
    outputs = iris.run(request.inputs, request.output_names())
    return encode_infer_response(
        model_name="iris", model_version="1", request=request, outputs=outputs
    )


def _triton_result(body: bytes, headers: dict[str, str]) -> triton.InferResult:
    length = headers.get(INFERENCE_HEADER_CONTENT_LENGTH)
    return triton.InferResult.from_response_body(
        body, header_length=None if length is None else int(length)
    )


def _triton_input(binary: bool) -> triton.InferInput:
    tensor = triton.InferInput("input", list(ROWS.shape), "FP32")
    tensor.set_data_from_numpy(ROWS, binary_data=binary)
    return tensor


# --- tritonclient ----------------------------------------------------------------------------


@pytest.mark.parametrize("binary_input", [False, True], ids=["json-in", "binary-in"])
def test_triton_default_request_gets_every_output_back_in_binary(
    iris: OnnxModel, expected: dict[str, np.ndarray], binary_input: bool
) -> None:
    body, length = triton.InferenceServerClient.generate_request_body(
        [_triton_input(binary_input)], request_id="t-1"
    )
    response, headers = _serve(iris, body, length)
    result = _triton_result(response, headers)
    assert headers["content-type"] == "application/octet-stream"
    assert result.get_response()["id"] == "t-1"
    assert np.array_equal(expected["label"], result.as_numpy("label"))
    assert np.array_equal(expected["probabilities"], result.as_numpy("probabilities"))


@pytest.mark.parametrize("binary_input", [False, True], ids=["json-in", "binary-in"])
def test_triton_json_outputs_round_trip(
    iris: OnnxModel, expected: dict[str, np.ndarray], binary_input: bool
) -> None:
    outputs = [
        triton.InferRequestedOutput("label", binary_data=False),
        triton.InferRequestedOutput("probabilities", binary_data=False),
    ]
    body, length = triton.InferenceServerClient.generate_request_body(
        [_triton_input(binary_input)], outputs=outputs
    )
    response, headers = _serve(iris, body, length)
    result = _triton_result(response, headers)
    assert headers == {"content-type": "application/json"}
    assert np.array_equal(expected["label"], result.as_numpy("label"))
    # JSON carries float32 values in their shortest exact decimal form.
    assert np.array_equal(expected["probabilities"], result.as_numpy("probabilities"))


def test_triton_mixed_outputs_and_filter(iris: OnnxModel, expected: dict[str, np.ndarray]) -> None:
    outputs = [triton.InferRequestedOutput("probabilities", binary_data=True)]
    body, length = triton.InferenceServerClient.generate_request_body(
        [_triton_input(False)], outputs=outputs
    )
    response, headers = _serve(iris, body, length)
    result = _triton_result(response, headers)
    assert [output["name"] for output in result.get_response()["outputs"]] == ["probabilities"]
    assert result.as_numpy("label") is None
    assert np.array_equal(expected["probabilities"], result.as_numpy("probabilities"))


def test_triton_json_nan_literals_are_decoded(iris: OnnxModel) -> None:
    rows = ROWS.copy()
    rows[0, 0] = np.nan
    tensor = triton.InferInput("input", list(rows.shape), "FP32")
    tensor.set_data_from_numpy(rows, binary_data=False)
    body, length = triton.InferenceServerClient.generate_request_body([tensor])
    request = decode_infer_request(body, iris.signature, header_length=length, max_elements=LIMIT)
    assert math.isnan(request.inputs["input"][0, 0])
    assert np.array_equal(rows[1:], request.inputs["input"][1:])


TEXT = ModelSignature(
    inputs=(TensorSpec("text", "BYTES", (-1,)), TensorSpec("half", "FP16", (-1,))),
    outputs=(),
)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_triton_bytes_and_fp16_inputs_decode(binary: bool) -> None:
    text = triton.InferInput("text", [3], "BYTES")
    text.set_data_from_numpy(np.array(["a", "é", ""], dtype=object), binary_data=binary)
    half = triton.InferInput("half", [2], "FP16")
    half.set_data_from_numpy(np.array([0.5, -1.25], dtype=np.float16), binary_data=True)
    body, length = triton.InferenceServerClient.generate_request_body([text, half])
    request = decode_infer_request(body, TEXT, header_length=length, max_elements=LIMIT)
    assert request.inputs["text"].tolist() == ["a", "é", ""]
    assert request.inputs["half"].tolist() == [0.5, -1.25]


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_triton_decodes_our_bytes_outputs(binary: bool) -> None:
    request = decode_infer_request(
        orjson.dumps(
            {
                "inputs": [
                    {"name": "text", "datatype": "BYTES", "shape": [1], "data": ["x"]},
                    {"name": "half", "datatype": "FP16", "shape": [1], "data": [1]},
                ],
                "parameters": {"binary_data_output": binary},
            }
        ),
        TEXT,
        max_elements=LIMIT,
    )
    outputs = {"words": np.array([["a", "é"]], dtype=object)}
    body, headers = encode_infer_response(
        model_name="m", model_version="1", request=request, outputs=outputs
    )
    # tritonclient hands binary BYTES back as bytes and JSON BYTES as str.
    expected = [[b"a", "é".encode()]] if binary else [["a", "é"]]
    assert expected == _triton_result(body, headers).as_numpy("words").tolist()


# --- KServe SDK ------------------------------------------------------------------------------
# The SDK's codec runs in a process of its own: importing kserve registers its generated
# protobuf messages in the default pool, where tritonclient.grpc (tests/integration/test_grpc.py,
# same pytest process) registers the same names, and the second import fails.

KSERVE = """
import base64, json, sys

import numpy as np
from kserve import InferInput, InferRequest, InferResponse
from kserve.protocol.infer_type import RequestedOutput

mode, args = sys.argv[1], json.loads(sys.argv[2])
if mode == "request":
    rows = np.asarray(args["rows"], dtype=np.float32)
    tensor = InferInput(name="input", shape=list(rows.shape), datatype="FP32")
    tensor.set_data_from_numpy(rows, binary_data=args["binary"])
    binary = {"binary_data": args["binary_output"]}
    request = InferRequest(
        model_name="iris",
        infer_inputs=[tensor],
        request_id="k-1",
        request_outputs=[RequestedOutput(n, binary) for n in ("label", "probabilities")],
    )
    rest, length = request.to_rest()
    body = rest if isinstance(rest, bytes) else json.dumps(rest).encode()
    print(json.dumps({"body": base64.b64encode(body).decode(), "length": length}))
else:
    raw = base64.b64decode(args["response"])
    if mode == "decode-json":
        decoded = InferResponse.from_rest(json.loads(raw))
    else:  # what kserve.InferenceRESTClient does with a response that has binary outputs
        decoded = InferResponse.from_bytes(raw, args["header_length"])
    print(json.dumps({
        "id": decoded.id,
        "model_name": decoded.model_name,
        "model_version": decoded.model_version,
        "outputs": {o.name: o.as_numpy().tolist() for o in decoded.outputs},
    }))
"""


def _kserve(mode: str, **args: object) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-c", KSERVE, mode, json.dumps(args)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    answer: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return answer


def _kserve_request(binary: bool, *, binary_output: bool) -> tuple[bytes, int | None]:
    made = _kserve("request", rows=ROWS.tolist(), binary=binary, binary_output=binary_output)
    return base64.b64decode(made["body"]), made["length"]


@pytest.mark.parametrize("binary_input", [False, True], ids=["json-in", "binary-in"])
def test_kserve_json_round_trip(
    iris: OnnxModel, expected: dict[str, np.ndarray], binary_input: bool
) -> None:
    body, length = _kserve_request(binary_input, binary_output=False)
    response, headers = _serve(iris, body, length)
    assert INFERENCE_HEADER_CONTENT_LENGTH not in headers
    decoded = _kserve("decode-json", response=base64.b64encode(response).decode())
    assert (decoded["id"], decoded["model_name"], decoded["model_version"]) == ("k-1", "iris", "1")
    assert list(decoded["outputs"]) == ["label", "probabilities"]
    assert expected["label"].tolist() == decoded["outputs"]["label"]
    assert expected["probabilities"].tolist() == decoded["outputs"]["probabilities"]


@pytest.mark.parametrize("binary_input", [False, True], ids=["json-in", "binary-in"])
def test_kserve_binary_outputs_round_trip(
    iris: OnnxModel, expected: dict[str, np.ndarray], binary_input: bool
) -> None:
    body, length = _kserve_request(binary_input, binary_output=True)
    response, headers = _serve(iris, body, length)
    header_length = int(headers.get(INFERENCE_HEADER_CONTENT_LENGTH, len(response)))
    decoded = _kserve(
        "decode-bytes", response=base64.b64encode(response).decode(), header_length=header_length
    )
    assert decoded["id"] == "k-1"
    assert list(decoded["outputs"]) == ["label", "probabilities"]
    assert expected["label"].tolist() == decoded["outputs"]["label"]
    assert expected["probabilities"].tolist() == decoded["outputs"]["probabilities"]
