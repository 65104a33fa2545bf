"""The gRPC codec: ModelInferRequest -> tensors checked against the signature, and back."""

from __future__ import annotations

import subprocess
import sys

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor_pb2

from modelkeep.api.grpc import grpc_predict_v2_pb2 as pb
from modelkeep.api.grpc._codec import (
    decode_infer_request,
    encode_infer_response,
    model_metadata_response,
    parse_infer_request,
)
from modelkeep.api.grpc._servicer import STATUS_BY_CODE, _peer_host, _refusal
from modelkeep.errors import (
    InternalError,
    InvalidInput,
    ModelkeepError,
    RateLimited,
    TooLarge,
    Unavailable,
)
from modelkeep.runtime.signature import ModelSignature, TensorSpec

SIGNATURE = ModelSignature(
    inputs=(
        TensorSpec("x", "FP32", (-1, 2)),
        TensorSpec("word", "BYTES", (-1,)),
        TensorSpec("small", "INT8", (-1,)),
    ),
    outputs=(TensorSpec("label", "INT64", (-1,)), TensorSpec("scores", "FP32", (-1, 2))),
)
LIMIT = 1000


def _raw_request(rows: int = 2) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="m", id="r1")
    request.inputs.add(name="x", datatype="FP32", shape=[rows, 2])
    request.raw_input_contents.append(np.arange(rows * 2, dtype="<f4").tobytes())
    request.inputs.add(name="word", datatype="BYTES", shape=[rows])
    words = b"".join(len(w).to_bytes(4, "little") + w for w in [b"hi", b"\xc3\xa9t\xc3\xa9"][:rows])
    request.raw_input_contents.append(words)
    request.inputs.add(name="small", datatype="INT8", shape=[rows])
    request.raw_input_contents.append(np.array([-3, 7][:rows], dtype=np.int8).tobytes())
    return request


def _typed_request() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="m")
    x = request.inputs.add(name="x", datatype="FP32", shape=[2, 2])
    x.contents.fp32_contents.extend([0.0, 1.0, 2.0, 3.0])
    word = request.inputs.add(name="word", datatype="BYTES", shape=[2])
    word.contents.bytes_contents.extend([b"hi", "été".encode()])
    small = request.inputs.add(name="small", datatype="INT8", shape=[2])
    small.contents.int_contents.extend([-3, 7])
    return request


@pytest.mark.parametrize("build", [_raw_request, _typed_request], ids=["raw", "typed"])
def test_raw_and_typed_requests_decode_to_the_same_tensors(build: object) -> None:
    decoded = decode_infer_request(build(), SIGNATURE, LIMIT)  # type: ignore[operator]
    assert list(decoded.inputs) == ["x", "word", "small"]
    np.testing.assert_array_equal(decoded.inputs["x"], [[0.0, 1.0], [2.0, 3.0]])
    assert decoded.inputs["x"].dtype == np.float32
    assert decoded.inputs["word"].tolist() == ["hi", "été"]
    assert decoded.inputs["small"].dtype == np.int8
    assert decoded.inputs["small"].tolist() == [-3, 7]
    assert decoded.output_names() is None


def test_inputs_come_out_in_signature_order_whatever_the_request_order() -> None:
    request = _raw_request()
    reordered = pb.ModelInferRequest(model_name="m")
    for index in (2, 0, 1):
        reordered.inputs.append(request.inputs[index])
        reordered.raw_input_contents.append(request.raw_input_contents[index])
    decoded = decode_infer_request(reordered, SIGNATURE, LIMIT)
    assert list(decoded.inputs) == ["x", "word", "small"]
    assert decoded.inputs["small"].tolist() == [-3, 7]


def _broken(change: str) -> pb.ModelInferRequest:
    request = _raw_request()
    raw = request.raw_input_contents
    if change == "no inputs":
        return pb.ModelInferRequest(model_name="m")
    if change == "wrong datatype":
        request.inputs[0].datatype = "FP64"
    elif change == "unknown datatype":
        request.inputs[0].datatype = "FLOAT"
    elif change == "wrong rank":
        request.inputs[0].shape.append(1)
    elif change == "wrong fixed dim":
        request.inputs[0].shape[1] = 3
    elif change == "negative dim":
        request.inputs[0].shape[0] = -2
    elif change == "raw too short":
        raw[0] = raw[0][:-1]
    elif change == "raw too long":
        raw[0] = raw[0] + b"\0"
    elif change == "raw count":
        del raw[2]
    elif change == "bytes item too long":
        raw[1] = (99).to_bytes(4, "little") + b"hi" + (2).to_bytes(4, "little") + b"ok"
    elif change == "bytes not utf-8":
        raw[1] = (1).to_bytes(4, "little") + b"\xff" + (1).to_bytes(4, "little") + b"a"
    elif change == "both contents":
        request.inputs[0].contents.fp32_contents.extend([1.0] * 4)
    elif change == "duplicate input":
        request.inputs.append(request.inputs[0])
        raw.append(raw[0])
    elif change == "missing input":
        del request.inputs[2]
        del raw[2]
    elif change == "unknown input":
        request.inputs[2].name = "other"
    elif change == "unknown output":
        request.outputs.add(name="secret")
    elif change == "output twice":
        request.outputs.add(name="label")
        request.outputs.add(name="label")
    elif change == "shared memory":
        request.inputs[0].parameters["shared_memory_region"].string_param = "r"
    elif change == "classification":
        request.outputs.add(name="label").parameters["classification"].int64_param = 2
    return request


@pytest.mark.parametrize(
    "change",
    [
        "no inputs",
        "wrong datatype",
        "unknown datatype",
        "wrong rank",
        "wrong fixed dim",
        "negative dim",
        "raw too short",
        "raw too long",
        "raw count",
        "bytes item too long",
        "bytes not utf-8",
        "both contents",
        "duplicate input",
        "missing input",
        "unknown input",
        "unknown output",
        "output twice",
        "shared memory",
        "classification",
    ],
)
def test_malformed_requests_are_invalid_input(change: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        decode_infer_request(_broken(change), SIGNATURE, LIMIT)
    assert "\\x" not in caught.value.message  # no data echoed


def _typed_broken(change: str) -> pb.ModelInferRequest:
    request = _typed_request()
    x = request.inputs[0]
    if change == "no contents":
        x.ClearField("contents")
    elif change == "too few values":
        del x.contents.fp32_contents[-1]
    elif change == "other field":
        x.contents.int_contents.append(1)
    elif change == "int8 out of range":
        request.inputs[2].contents.int_contents[0] = 300
    return request


@pytest.mark.parametrize(
    "change", ["no contents", "too few values", "other field", "int8 out of range"]
)
def test_malformed_typed_contents_are_invalid_input(change: str) -> None:
    with pytest.raises(InvalidInput):
        decode_infer_request(_typed_broken(change), SIGNATURE, LIMIT)


def test_a_huge_declared_shape_is_too_large_before_any_data_is_read() -> None:
    request = _raw_request()
    request.inputs[0].shape[0] = 2**40
    with pytest.raises(TooLarge, match="limit is 1000"):
        decode_infer_request(request, SIGNATURE, LIMIT)


def test_fp16_needs_raw_contents() -> None:
    signature = ModelSignature(
        inputs=(TensorSpec("h", "FP16", (1,)),), outputs=(TensorSpec("y", "FP16", (1,)),)
    )
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="h", datatype="FP16", shape=[1]).contents.fp32_contents.append(1.0)
    with pytest.raises(InvalidInput, match="needs raw contents"):
        decode_infer_request(request, signature, LIMIT)
    raw = pb.ModelInferRequest(model_name="m", raw_input_contents=[np.float16(1.5).tobytes()])
    raw.inputs.add(name="h", datatype="FP16", shape=[1])
    assert decode_infer_request(raw, signature, LIMIT).inputs["h"].tolist() == [1.5]


def test_garbage_bytes_do_not_parse() -> None:
    for body in (b"\xff\xff\xff", b"\x0a\xff\xff\xff\xff\x0f", b"\x3a\x05abc"):
        with pytest.raises(InvalidInput, match="not a valid ModelInferRequest"):
            parse_infer_request(body)
    assert parse_infer_request(_raw_request().SerializeToString()).id == "r1"


OUTPUTS = {
    "label": np.array([1, 0], dtype=np.int64),
    "scores": np.array([[0.25, 0.75], [0.5, 0.5]], dtype=np.float32),
}


def test_a_raw_request_gets_raw_outputs() -> None:
    request = decode_infer_request(_raw_request(), SIGNATURE, LIMIT)
    response = encode_infer_response(
        model_name="m", model_version="3", request=request, outputs=OUTPUTS
    )
    assert (response.model_name, response.model_version, response.id) == ("m", "3", "r1")
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [
        ("label", "INT64", [2]),
        ("scores", "FP32", [2, 2]),
    ]
    assert np.frombuffer(response.raw_output_contents[0], "<i8").tolist() == [1, 0]
    scores = np.frombuffer(response.raw_output_contents[1], "<f4").reshape(2, 2)
    np.testing.assert_array_equal(scores, OUTPUTS["scores"])
    assert not response.outputs[0].HasField("contents")


def test_a_typed_request_gets_typed_outputs_filtered_to_those_asked_for() -> None:
    message = _typed_request()
    message.outputs.add(name="scores")
    request = decode_infer_request(message, SIGNATURE, LIMIT)
    assert request.output_names() == ["scores"]
    response = encode_infer_response(
        model_name="m", model_version="1", request=request, outputs=OUTPUTS
    )
    assert [o.name for o in response.outputs] == ["scores"]
    assert list(response.outputs[0].contents.fp32_contents) == [0.25, 0.75, 0.5, 0.5]
    assert not response.raw_output_contents


def test_outputs_removed_by_hardening_are_absent() -> None:
    request = decode_infer_request(_typed_request(), SIGNATURE, LIMIT)
    response = encode_infer_response(
        model_name="m", model_version="1", request=request, outputs={"label": OUTPUTS["label"]}
    )
    assert [o.name for o in response.outputs] == ["label"]
    assert list(response.outputs[0].contents.int64_contents) == [1, 0]


def test_bytes_and_fp16_outputs() -> None:
    request = decode_infer_request(_typed_request(), SIGNATURE, LIMIT)
    words = np.array(["a", "été"], dtype=object)
    typed = encode_infer_response(
        model_name="m", model_version="1", request=request, outputs={"w": words}
    )
    assert list(typed.outputs[0].contents.bytes_contents) == [b"a", "été".encode()]
    # FP16 has no typed field: the whole response goes raw.
    half = encode_infer_response(
        model_name="m",
        model_version="1",
        request=request,
        outputs={"w": words, "h": np.array([0.5], dtype=np.float16)},
    )
    assert len(half.raw_output_contents) == 2
    assert np.frombuffer(half.raw_output_contents[1], "<f2").tolist() == [0.5]


def test_an_output_without_a_v2_datatype_is_an_internal_error() -> None:
    request = decode_infer_request(_typed_request(), SIGNATURE, LIMIT)
    with pytest.raises(InternalError):
        encode_infer_response(
            model_name="m",
            model_version="1",
            request=request,
            outputs={"c": np.array([1j], dtype=np.complex64)},
        )


def test_model_metadata_response_carries_the_signature() -> None:
    response = model_metadata_response(
        {
            "name": "m",
            "versions": ["1", "2"],
            "platform": "onnxruntime_onnx",
            **SIGNATURE.to_json(),
        }
    )
    assert (response.name, list(response.versions)) == ("m", ["1", "2"])
    assert [(t.name, t.datatype, list(t.shape)) for t in response.inputs] == [
        ("x", "FP32", [-1, 2]),
        ("word", "BYTES", [-1]),
        ("small", "INT8", [-1]),
    ]
    assert [t.name for t in response.outputs] == ["label", "scores"]


@pytest.mark.parametrize(
    ("error", "code", "shown"),
    [
        (InvalidInput("bad tensor"), grpc.StatusCode.INVALID_ARGUMENT, "bad tensor"),
        (TooLarge("too big"), grpc.StatusCode.INVALID_ARGUMENT, "too big"),
        (
            RateLimited("slow down", retry_after=2.5),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "slow down",
        ),
        (Unavailable("busy"), grpc.StatusCode.UNAVAILABLE, "busy"),
        (InternalError("/secret/path exploded"), grpc.StatusCode.INTERNAL, "internal error"),
    ],
)
def test_errors_map_to_grpc_status_without_internals(
    error: ModelkeepError, code: grpc.StatusCode, shown: str
) -> None:
    refusal = _refusal(error)
    assert (refusal.code, refusal.message) == (code, shown)
    if isinstance(error, RateLimited):
        assert refusal.trailers == (("retry-after", "3"),)


def test_every_error_code_has_a_grpc_status() -> None:
    from modelkeep.api._errors import STATUS_BY_CODE as HTTP

    assert set(STATUS_BY_CODE) == set(HTTP)


def test_peer_addresses() -> None:
    assert _peer_host("ipv4:10.0.0.7:5123") == "10.0.0.7"
    assert _peer_host("ipv6:[::1]:5123") == "::1"
    assert _peer_host("unix:/tmp/s") is None
    assert _peer_host(None) is None


def test_the_proto_is_kserves_field_for_field() -> None:
    # kserve's module in a process of its own: its names would clash with tritonclient's in
    # protobuf's default pool (ours live in a pool of their own, so they never clash).
    script = (
        "import sys, kserve.protocol.grpc.grpc_predict_v2_pb2 as k;"
        "sys.stdout.buffer.write(k.DESCRIPTOR.serialized_pb)"
    )
    theirs = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, check=True, timeout=120
    ).stdout
    expected = descriptor_pb2.FileDescriptorProto.FromString(theirs)
    actual = descriptor_pb2.FileDescriptorProto.FromString(pb.DESCRIPTOR.serialized_pb)
    expected.name = actual.name = ""
    assert expected == actual
