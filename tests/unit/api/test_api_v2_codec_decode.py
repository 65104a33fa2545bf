"""Decoding V2 infer requests: every rule, and hostile bodies refused with short messages."""

from __future__ import annotations

import json
import math
import struct
import time
from typing import Any

import numpy as np
import orjson
import pytest

from modelkeep.api.v2.codec import InferRequest, RequestedOutput, decode_infer_request
from modelkeep.errors import InvalidInput, TooLarge
from modelkeep.runtime.signature import ModelSignature, TensorSpec

IRIS = ModelSignature(
    inputs=(TensorSpec("input", "FP32", (-1, 4)),),
    outputs=(TensorSpec("label", "INT64", (-1,)), TensorSpec("probabilities", "FP32", (-1, 3))),
)
LIMIT = 10_000


def _tensor(shape: list[int] | None = None, **extra: Any) -> dict[str, Any]:
    """The iris input declared without data (for the binary extension)."""
    return {"name": "input", "datatype": "FP32", "shape": shape or [1, 4], **extra}


def _row(shape: list[int] | None = None, data: Any = None, **extra: Any) -> dict[str, Any]:
    """The iris input with JSON data (one row unless told otherwise)."""
    tensor = _tensor(shape, data=[1.0, 2.0, 3.0, 4.0] if data is None else data)
    tensor.update(extra)
    return tensor


def _decode(
    request: Any,
    signature: ModelSignature = IRIS,
    *,
    header_length: int | None = None,
    max_elements: int = LIMIT,
) -> InferRequest:
    body = request if isinstance(request, bytes) else orjson.dumps(request)
    return decode_infer_request(
        body, signature, header_length=header_length, max_elements=max_elements
    )


def _refused(request: Any, signature: ModelSignature = IRIS, **kwargs: Any) -> str:
    with pytest.raises(InvalidInput) as caught:
        _decode(request, signature, **kwargs)
    return caught.value.message


def _one(name: str, datatype: str, shape: tuple[int, ...]) -> ModelSignature:
    return ModelSignature(inputs=(TensorSpec(name, datatype, shape),), outputs=())


def _binary(tensors: list[tuple[dict[str, Any], bytes]], **top: Any) -> tuple[bytes, int]:
    for tensor, raw in tensors:
        tensor.setdefault("parameters", {})["binary_data_size"] = len(raw)
    header = orjson.dumps({"inputs": [tensor for tensor, _ in tensors], **top})
    return header + b"".join(raw for _, raw in tensors), len(header)


def _strings(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


# --- what a good request becomes ------------------------------------------------------------


def test_flat_json_data_becomes_a_tensor_of_the_declared_shape() -> None:
    request = _decode({"inputs": [_row([2, 4], [1, 2, 3, 4, 5, 6, 7, 8])]})
    expected = np.arange(1, 9, dtype=np.float32).reshape(2, 4)
    assert np.float32 == request.inputs["input"].dtype
    assert np.array_equal(expected, request.inputs["input"])


def test_nested_json_data_becomes_the_same_tensor() -> None:
    request = _decode({"inputs": [_row([2, 4], [[1, 2, 3, 4], [5, 6, 7, 8]])]})
    assert np.array_equal(np.arange(1, 9, dtype=np.float32).reshape(2, 4), request.inputs["input"])


def test_request_defaults() -> None:
    request = _decode({"inputs": [_row()]})
    assert (request.id, request.outputs, request.binary_outputs_default) == (None, None, False)


def test_id_is_kept() -> None:
    assert _decode({"id": "req-1", "inputs": [_row()]}).id == "req-1"


def test_zero_sized_tensors_are_allowed() -> None:
    assert _decode({"inputs": [_row([0, 4], [])]}).inputs["input"].shape == (0, 4)


def test_non_finite_json_literals_are_accepted() -> None:
    body = b'{"inputs":[{"name":"input","datatype":"FP32","shape":[1,4],'
    body += b'"data":[NaN, Infinity, -Infinity, 1e999]}]}'
    values = _decode(body).inputs["input"][0]
    assert math.isnan(values[0])
    assert [math.inf, -math.inf, math.inf] == values[1:].tolist()


def test_integers_are_accepted_for_float_tensors() -> None:
    assert _decode({"inputs": [_row(data=[1, 2, 3, 4])]}).inputs["input"].tolist() == [
        [1.0, 2.0, 3.0, 4.0]
    ]


@pytest.mark.parametrize("count", [1, 64, 65, 1000])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize(
    ("datatype", "big"), [("FP32", 1e39), ("FP16", 70000.0), ("FP16", 70000), ("FP32", -1e300)]
)
def test_values_beyond_a_float_range_become_infinite_quietly_however_sent(
    count: int, nested: bool, datatype: str, big: float
) -> None:
    # Warnings are errors in this suite: an overflow warning escaping the decoder fails here.
    values: list[float] = [0.5] * count
    values[-1] = big
    data: Any = [[v] for v in values] if nested else values
    request = _decode(
        {"inputs": [_row(data=data, shape=[count, 1], datatype=datatype)]},
        _one("input", datatype, (-1, 1)),
    )
    array = request.inputs["input"]
    assert array.dtype == np.dtype("float16" if datatype == "FP16" else "float32")
    assert array.shape == (count, 1)
    assert array[-1, 0] == (math.inf if big > 0 else -math.inf)
    assert (array[:-1] == 0.5).all()


def test_values_at_the_edge_of_the_range_stay_finite() -> None:
    edge = float(np.finfo(np.float32).max)
    request = _decode({"inputs": [_row(data=[edge, -edge, 1e-50, -0.0])]})
    assert request.inputs["input"].tolist() == [[edge, -edge, 0.0, -0.0]]


def test_fp16_from_json_overflows_to_infinity() -> None:
    request = _decode(
        {"inputs": [_row(data=[1e10], shape=[1], datatype="FP16")]}, _one("input", "FP16", (-1,))
    )
    assert np.float16 == request.inputs["input"].dtype
    assert [math.inf] == request.inputs["input"].tolist()


@pytest.mark.parametrize(
    ("datatype", "data", "expected"),
    [
        ("INT8", [-128, 127], [-128, 127]),
        ("UINT8", [0, 255], [0, 255]),
        ("INT64", [-(2**63), 2**63 - 1], [-(2**63), 2**63 - 1]),
        ("UINT64", [1, 2**64 - 1], [1, 2**64 - 1]),
        ("BOOL", [True, False], [True, False]),
        ("FP64", [0.1, -2], [0.1, -2.0]),
    ],
)
def test_json_values_keep_their_exact_value(
    datatype: str, data: list[Any], expected: list[Any]
) -> None:
    request = _decode(
        {"inputs": [{"name": "t", "datatype": datatype, "shape": [2], "data": data}]},
        _one("t", datatype, (2,)),
    )
    assert expected == request.inputs["t"].tolist()


def test_bytes_json_data_becomes_an_object_array_of_text() -> None:
    signature = _one("text", "BYTES", (-1, 2))
    request = _decode(
        {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1, 2], "data": ["a", "é"]}]},
        signature,
    )
    assert object == request.inputs["text"].dtype
    assert request.inputs["text"].tolist() == [["a", "é"]]


def test_unicode_names_are_matched_and_kept() -> None:
    signature = _one("entrée_données", "FP32", (2,))
    request = _decode(
        {"inputs": [{"name": "entrée_données", "datatype": "FP32", "shape": [2], "data": [1, 2]}]},
        signature,
    )
    assert list(request.inputs) == ["entrée_données"]


def test_inputs_come_out_in_signature_order() -> None:
    signature = ModelSignature(
        inputs=(TensorSpec("a", "FP32", (1,)), TensorSpec("b", "INT64", (1,))), outputs=()
    )
    request = _decode(
        {
            "inputs": [
                {"name": "b", "datatype": "INT64", "shape": [1], "data": [1]},
                {"name": "a", "datatype": "FP32", "shape": [1], "data": [1]},
            ]
        },
        signature,
    )
    assert list(request.inputs) == ["a", "b"]


def test_requested_outputs_resolve_binary_against_the_default() -> None:
    request = _decode(
        {
            "inputs": [_row()],
            "parameters": {"binary_data_output": True},
            "outputs": [
                {"name": "probabilities"},
                {"name": "label", "parameters": {"binary_data": False}},
            ],
        }
    )
    expected = (RequestedOutput("probabilities", True), RequestedOutput("label", False))
    assert expected == request.outputs
    assert request.output_names() == ["probabilities", "label"]
    assert request.binary_outputs_default is True


def test_an_empty_outputs_list_means_all_outputs() -> None:
    assert None is _decode({"inputs": [_row()], "outputs": []}).outputs


# --- the binary extension --------------------------------------------------------------------


def test_binary_input_is_read_after_the_header() -> None:
    values = np.arange(8, dtype=np.float32).reshape(2, 4)
    body, length = _binary([(_tensor([2, 4]), values.tobytes())])
    assert np.array_equal(values, _decode(body, header_length=length).inputs["input"])


def test_binary_and_json_inputs_mix_in_input_order() -> None:
    signature = ModelSignature(
        inputs=(
            TensorSpec("a", "INT32", (2,)),
            TensorSpec("b", "FP32", (1,)),
            TensorSpec("c", "BYTES", (2,)),
        ),
        outputs=(),
    )
    body, length = _binary(
        [
            ({"name": "c", "datatype": "BYTES", "shape": [2]}, _strings(b"x", "é".encode())),
            ({"name": "a", "datatype": "INT32", "shape": [2]}, np.array([7, -7], "<i4").tobytes()),
        ]
    )
    document = orjson.loads(body[:length])
    document["inputs"].append({"name": "b", "datatype": "FP32", "shape": [1], "data": [0.5]})
    header = orjson.dumps(document)
    request = _decode(header + body[length:], signature, header_length=len(header))
    assert request.inputs["c"].tolist() == ["x", "é"]
    assert request.inputs["a"].tolist() == [7, -7]
    assert request.inputs["b"].tolist() == [0.5]


def test_header_length_equal_to_the_body_means_no_binary_section() -> None:
    body = orjson.dumps({"inputs": [_row()]})
    assert _decode(body, header_length=len(body)).inputs["input"].shape == (1, 4)


@pytest.mark.parametrize("header_length", [0, -1, 10**9, True])
def test_header_length_out_of_range_is_refused(header_length: int) -> None:
    body = orjson.dumps({"inputs": [_row()]})
    assert "header length is out of range" in _refused(body, header_length=header_length)


def test_header_length_cutting_the_json_is_refused() -> None:
    body = orjson.dumps({"inputs": [_row()]})
    assert "not valid JSON" in _refused(body, header_length=len(body) - 1)


@pytest.mark.parametrize("size", [15, 17, -16, True, "16", 16.0])
def test_binary_size_must_match_shape_and_datatype(size: Any) -> None:
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "datatype": "FP32",
                    "shape": [1, 4],
                    "parameters": {"binary_data_size": size},
                }
            ]
        }
    )
    with pytest.raises(InvalidInput, match="input 'input'"):
        _decode(header + bytes(16), header_length=len(header))


def test_binary_body_shorter_than_declared_is_refused() -> None:
    body, length = _binary([(_tensor(), bytes(16))])
    assert "more binary data than the body holds" in _refused(body[:-1], header_length=length)


def test_trailing_bytes_after_the_binary_inputs_are_refused() -> None:
    body, length = _binary([(_tensor(), bytes(16))])
    assert "longer than the inputs declare" in _refused(body + b"\x00", header_length=length)


def test_binary_size_without_a_binary_section_is_refused() -> None:
    tensor = _tensor(parameters={"binary_data_size": 16})
    assert "no Inference-Header-Content-Length" in _refused({"inputs": [tensor]})


def test_both_data_and_binary_are_refused() -> None:
    body, length = _binary([(_row(), bytes(16))])
    assert "both 'data' and binary data" in _refused(body, header_length=length)


def test_neither_data_nor_binary_is_refused() -> None:
    tensor = _tensor()
    assert "neither 'data' nor binary data" in _refused({"inputs": [tensor]})


def test_bool_binary_bytes_other_than_zero_and_one_are_refused() -> None:
    signature = _one("flags", "BOOL", (2,))
    body, length = _binary([({"name": "flags", "datatype": "BOOL", "shape": [2]}, b"\x01\x02")])
    assert "BOOL bytes" in _refused(body, signature, header_length=length)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (_strings(b"a") + b"\x05\x00\x00", "fewer BYTES items"),
        (_strings(b"a") + struct.pack("<I", 9) + b"abc", "longer than its data"),
        (_strings(b"a", b"\xff\xfe"), "not UTF-8"),
        (_strings(b"a", b"b") + b"z", "more binary data than its shape needs"),
        (b"\x00" * 7, "too few bytes"),
    ],
)
def test_malformed_binary_bytes_tensors_are_refused(raw: bytes, message: str) -> None:
    signature = _one("text", "BYTES", (2,))
    body, length = _binary([({"name": "text", "datatype": "BYTES", "shape": [2]}, raw)])
    assert message in _refused(body, signature, header_length=length)


# --- hostile requests ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body", [b"", b"{", b'{"inputs": [}', b"\xff\xfe", b"{'inputs': []}", b"[1,2"]
)
def test_malformed_json_is_refused(body: bytes) -> None:
    assert _refused(body) == "the request body is not valid JSON"


@pytest.mark.parametrize("body", [b"[]", b'"inputs"', b"42", b"null", b"true"])
def test_json_that_is_not_an_object_is_refused(body: bytes) -> None:
    assert _refused(body) == "the request body must be a JSON object"


@pytest.mark.parametrize("depth", [200, 1100, 100_000])
def test_deeply_nested_data_is_refused_without_recursion_errors(depth: int) -> None:
    body = b'{"inputs":[{"name":"input","datatype":"FP32","shape":[1,4],"data":'
    body += b"[" * depth + b"1" + b"]" * depth + b"}]}"
    _refused(body)


def test_deep_nesting_with_nan_literal_does_not_escape_as_recursion_error() -> None:
    # NaN sends the parser down the fallback path; it must fail just as cleanly.
    body = b'{"id":NaN,"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert _refused(body) == "the request body is not valid JSON"


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        ({}, "'inputs' must be a non-empty list"),
        ({"inputs": []}, "'inputs' must be a non-empty list"),
        ({"inputs": {"input": [1]}}, "'inputs' must be a non-empty list"),
        ({"inputs": [[1, 2]]}, "input #0 must be an object"),
        ({"inputs": [{"datatype": "FP32"}]}, "input #0 needs a string 'name'"),
        ({"inputs": [_row(name=7)]}, "input #0 needs a string 'name'"),
        ({"inputs": [_row(name="other")]}, "unknown input 'other'"),
        ({"inputs": [_row(), _row()]}, "input 'input' appears more than once"),
        ({"inputs": [_row()], "id": 5}, "'id' must be a string"),
        ({"inputs": [_row()], "parameters": []}, "'parameters' must be an object"),
        ({"inputs": [_row(parameters=5)]}, "'parameters' must be an object"),
        (
            {"inputs": [_row()], "parameters": {"binary_data_output": "yes"}},
            "'binary_data_output' must be true or false",
        ),
    ],
)
def test_malformed_request_structure_is_refused(request_: Any, message: str) -> None:
    assert message in _refused(request_)


def test_missing_input_is_refused() -> None:
    signature = ModelSignature(
        inputs=(TensorSpec("a", "FP32", (1,)), TensorSpec("b", "FP32", (1,))), outputs=()
    )
    request = {"inputs": [{"name": "a", "datatype": "FP32", "shape": [1], "data": [1]}]}
    assert _refused(request, signature) == "missing input 'b'"


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        (_row(datatype="FP64"), "must have datatype FP32"),
        (_row(datatype="FLOAT"), "needs a V2 'datatype'"),
        (_row(datatype=None), "needs a V2 'datatype'"),
        (_row(shape=[1, 4.0]), "non-negative integers"),
        (_row(shape=[1, -4]), "non-negative integers"),
        (_row(shape=[True, 4]), "non-negative integers"),
        (_row(shape="1,4"), "non-negative integers"),
        (_row(shape=[1] * 33), "non-negative integers"),
        (_row(shape=[4]), "must have rank 2"),
        (_row(shape=[1, 1, 4]), "must have rank 2"),
        (_row(shape=[1, 5]), "must have size 4 on axis 1"),
    ],
)
def test_declarations_that_do_not_fit_the_signature_are_refused(
    tensor: dict[str, Any], message: str
) -> None:
    assert message in _refused({"inputs": [tensor]})


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        (_row(data=[1, 2, 3]), "has 3 values; its shape needs 4"),
        (_row(data={"a": 1}), "needs 'data' as a list"),
        (_row(data="1,2,3,4"), "needs 'data' as a list"),
        (_row([2, 4], [[1, 2, 3, 4], [5, 6, 7]]), "ragged or malformed"),
        (_row([2, 4], [[1, 2, 3, 4], 5]), "ragged or malformed"),
        (_row([2, 4], [[1, 2, 3, 4]]), "does not match its shape"),
        (_row([2, 2], [[1, 2], [3, 4]]), "must have size 4"),
        (_row([1, 4], [[[1, 2, 3, 4]]]), "nested differently"),
        (_row([2, 4], [[1, 2, 3, 4], [5, 6, 7, [8]]]), "ragged or malformed"),
        (_row(data=[1, 2, "3", 4]), "needs numbers for FP32"),
        (_row(data=[1, 2, None, 4]), "needs numbers for FP32"),
        (_row(data=[True, False, True, False]), "needs numbers for FP32"),
        (_row(data=[1, 2, {"x": 3}, 4]), "needs numbers for FP32"),
    ],
)
def test_data_that_does_not_fit_its_declaration_is_refused(
    tensor: dict[str, Any], message: str
) -> None:
    assert message in _refused({"inputs": [tensor]})


@pytest.mark.parametrize(
    ("datatype", "data", "message"),
    [
        ("UINT8", [0, 256], "out of range for UINT8"),
        ("UINT8", [-1, 0], "out of range for UINT8"),
        ("INT8", [-129, 0], "out of range for INT8"),
        ("INT64", [2**63, 0], "out of range for INT64"),
        ("INT64", [1.5, 2], "needs integers for INT64"),
        ("INT32", ["1", "2"], "needs integers for INT32"),
        ("UINT64", [-1, 2**64 - 1], "out of range for UINT64"),
        ("BOOL", [1, 0], "needs true/false values for BOOL"),
        ("BYTES", ["a", 1], "needs strings for BYTES"),
        ("BYTES", [["a"], ["b"]], "nested differently"),
    ],
)
def test_values_that_do_not_fit_the_datatype_are_refused(
    datatype: str, data: list[Any], message: str
) -> None:
    request = {"inputs": [{"name": "t", "datatype": datatype, "shape": [2], "data": data}]}
    assert message in _refused(request, _one("t", datatype, (2,)))


def test_huge_declared_shape_is_refused_fast_before_the_data_is_read() -> None:
    tensor = _row(shape=[2**40, 2**40], data="not even a list")
    start = time.perf_counter()
    with pytest.raises(TooLarge) as caught:
        _decode({"inputs": [tensor]}, _one("input", "FP32", (-1, -1)))
    elapsed = time.perf_counter() - start
    expected = f"input 'input' declares {2**80} elements; the limit is {LIMIT}"
    assert expected == caught.value.message
    assert elapsed < 0.5


def test_the_element_limit_is_inclusive() -> None:
    request = {"inputs": [_row([2, 4], list(range(8)))]}
    assert _decode(request, max_elements=8).inputs["input"].shape == (2, 4)
    with pytest.raises(TooLarge):
        _decode(request, max_elements=7)


def test_every_input_is_sized_before_any_is_built() -> None:
    signature = ModelSignature(
        inputs=(TensorSpec("a", "FP32", (-1,)), TensorSpec("b", "FP32", (-1,))), outputs=()
    )
    request = {
        "inputs": [
            {"name": "a", "datatype": "FP32", "shape": [2], "data": ["bad", "data"]},
            {"name": "b", "datatype": "FP32", "shape": [LIMIT + 1], "data": []},
        ]
    }
    with pytest.raises(TooLarge, match="input 'b'"):
        _decode(request, signature)


@pytest.mark.parametrize(
    ("outputs", "message"),
    [
        ({"name": "label"}, "'outputs' must be a list"),
        ([{"name": "weights"}], "unknown output 'weights'"),
        (["label"], "output #0 must be an object with a string 'name'"),
        ([{"name": 3}], "output #0 must be an object with a string 'name'"),
        ([{"name": "label"}, {"name": "label"}], "requested more than once"),
        ([{"name": "label", "parameters": {"binary_data": 1}}], "'binary_data' must be true"),
        ([{"name": "label", "parameters": {"classification": 2}}], "classification extension"),
        (
            [{"name": "label", "parameters": {"shared_memory_region": "r"}}],
            "shared-memory extension",
        ),
    ],
)
def test_bad_output_requests_are_refused(outputs: Any, message: str) -> None:
    assert message in _refused({"inputs": [_row()], "outputs": outputs})


def test_messages_never_echo_tensor_data() -> None:
    message = _refused({"inputs": [_row(data=[1, 2, "SECRET-VALUE-123", 4])]})
    assert "SECRET" not in message


def test_long_names_are_cut_short_in_messages() -> None:
    message = _refused({"inputs": [_row(name="x" * 10_000)]})
    assert len(message) < 120


def test_unknown_unicode_name_is_named_in_the_message() -> None:
    assert _refused({"inputs": [_row(name="données")]}) == "unknown input 'données'"


def test_each_signature_is_checked_against_itself_however_many_come_and_go_past_the_bound() -> None:
    # The checks worked out per signature are remembered (up to a bound): a request must be
    # checked against its own signature, never against one remembered for another.
    for index in range(3000):
        name = f"in{index}"
        signature = ModelSignature(
            inputs=(TensorSpec(name, "FP32", (-1, 1 + index % 5)),),
            outputs=(TensorSpec("out", "FP32", (-1,)),),
        )
        width = 1 + index % 5
        body = orjson.dumps(
            {
                "inputs": [
                    {"name": name, "shape": [1, width], "datatype": "FP32", "data": [0.5] * width}
                ]
            }
        )
        request = decode_infer_request(body, signature, max_elements=100)
        assert list(request.inputs) == [name]
        assert request.inputs[name].shape == (1, width)
        wrong = orjson.dumps(
            {
                "inputs": [
                    {
                        "name": "in-other",
                        "shape": [1, width],
                        "datatype": "FP32",
                        "data": [0.5] * width,
                    }
                ]
            }
        )
        with pytest.raises(InvalidInput, match="unknown input"):
            decode_infer_request(wrong, signature, max_elements=100)


@pytest.mark.parametrize("datatype", ["FP16", "FP32", "FP64"])
def test_short_float_lists_convert_exactly_as_long_ones(datatype: str) -> None:
    # Short flat float lists take a one-call path; the values must be those of the general
    # path (a float64 array cast to the target), bit for bit, edge values included.
    dtype = np.dtype({"FP16": np.float16, "FP32": np.float32, "FP64": np.float64}[datatype])
    limit = float(np.finfo(dtype).max)
    edges = [0.0, -0.0, 5e-324, -5e-324, 1e-40, 6e-8, 65504.0, 65519.99, limit, -limit]
    edges += [math.nan, math.inf, -math.inf, 0.1, 1 / 3, 2.0**60 + 1]
    rng = np.random.default_rng(7)
    for trial in range(200):
        count = int(rng.integers(1, 65))
        values = [float(v) for v in rng.choice(edges, count)] if trial % 2 else []
        values += [float(v) for v in rng.normal(0, 10.0 ** rng.integers(-8, 9), count)]
        values = values[:count]
        signature = _one("input", datatype, (-1,))
        # The standard library writes NaN and Infinity, which the decoder accepts.
        body = json.dumps({"inputs": [_row(data=values, shape=[count], datatype=datatype)]})
        short = _decode(body.encode(), signature)
        with np.errstate(over="ignore"):
            expected = np.asarray(values).astype(dtype)
        got = short.inputs["input"]
        assert got.dtype == dtype
        assert got.tobytes() == expected.tobytes(), values
