"""V2 datatypes and the model signature's JSON form."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from modelkeep.errors import InvalidInput
from modelkeep.runtime.signature import (
    V2_DATATYPES,
    ModelSignature,
    TensorSpec,
    numpy_dtype,
    v2_datatype,
)

IRIS = ModelSignature(
    inputs=(TensorSpec("input", "FP32", (-1, 4)),),
    outputs=(TensorSpec("label", "INT64", (-1,)), TensorSpec("probabilities", "FP32", (-1, 3))),
)


def test_v2_datatypes_are_exactly_the_protocol_names() -> None:
    expected = {
        "BOOL",
        "UINT8",
        "UINT16",
        "UINT32",
        "UINT64",
        "INT8",
        "INT16",
        "INT32",
        "INT64",
        "FP16",
        "FP32",
        "FP64",
        "BYTES",
    }
    assert expected == set(V2_DATATYPES)


@pytest.mark.parametrize("datatype", sorted(V2_DATATYPES))
def test_numpy_dtype_and_v2_datatype_round_trip(datatype: str) -> None:
    assert datatype == v2_datatype(numpy_dtype(datatype))


@pytest.mark.parametrize(
    ("datatype", "expected"),
    [("FP32", np.float32), ("FP16", np.float16), ("UINT64", np.uint64), ("BOOL", np.bool_)],
)
def test_numpy_dtype_maps_to_the_matching_numpy_type(datatype: str, expected: type) -> None:
    assert np.dtype(expected) == numpy_dtype(datatype)


def test_bytes_is_held_in_object_arrays() -> None:
    assert np.dtype(object) == numpy_dtype("BYTES")


@pytest.mark.parametrize("bad", ["FP8", "fp32", "", "BF16"])
def test_numpy_dtype_refuses_unknown_names(bad: str) -> None:
    with pytest.raises(InvalidInput):
        numpy_dtype(bad)


@pytest.mark.parametrize("dtype", [np.dtype("<U5"), np.dtype("S3"), np.dtype(object)])
def test_text_and_object_dtypes_are_bytes(dtype: np.dtype[Any]) -> None:
    assert v2_datatype(dtype) == "BYTES"


def test_byte_order_does_not_change_the_datatype() -> None:
    assert v2_datatype(np.dtype(">f4")) == "FP32"
    assert v2_datatype(np.dtype("<i8")) == "INT64"


@pytest.mark.parametrize("dtype", [np.dtype(np.complex64), np.dtype("M8[s]"), np.dtype("V4")])
def test_dtypes_without_a_v2_name_are_refused(dtype: np.dtype[Any]) -> None:
    with pytest.raises(InvalidInput):
        v2_datatype(dtype)


def test_signature_json_has_the_v2_metadata_layout() -> None:
    expected = {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [
            {"name": "label", "datatype": "INT64", "shape": [-1]},
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]},
        ],
    }
    assert expected == IRIS.to_json()


def test_signature_json_round_trips() -> None:
    assert ModelSignature.from_json(IRIS.to_json()) == IRIS


def test_signature_is_hashable_and_compares_by_value() -> None:
    copy = ModelSignature.from_json(IRIS.to_json())
    assert hash(IRIS) == hash(copy)


@pytest.mark.parametrize(
    "bad",
    [
        [],
        {"inputs": []},
        {"inputs": "x", "outputs": []},
        {"inputs": [{"name": "a", "datatype": "FP32"}], "outputs": []},
        {"inputs": [{"name": "a", "datatype": "FP99", "shape": [1]}], "outputs": []},
        {"inputs": [{"name": "", "datatype": "FP32", "shape": [1]}], "outputs": []},
        {"inputs": [{"name": "a", "datatype": "FP32", "shape": [-2]}], "outputs": []},
        {"inputs": [{"name": "a", "datatype": "FP32", "shape": [True]}], "outputs": []},
        {"inputs": [{"name": "a", "datatype": "FP32", "shape": [1] * 33}], "outputs": []},
        {
            "inputs": [
                {"name": "a", "datatype": "FP32", "shape": [1]},
                {"name": "a", "datatype": "FP32", "shape": [1]},
            ],
            "outputs": [],
        },
    ],
)
def test_malformed_signature_json_is_refused(bad: Any) -> None:
    with pytest.raises(InvalidInput):
        ModelSignature.from_json(bad)
