"""TensorFlow Serving's model status and metadata answers, from modelkeep's neutral metadata.

``GET /v1/models/{m}`` answers ``GetModelStatusResponse`` and ``GET .../metadata`` answers
``GetModelMetadataResponse`` as TF Serving prints them (protobuf JSON with field names kept and
default values written; int64 values as strings).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import orjson

from modelkeep.runtime.signature import ModelSignature

from ._codec import DEFAULT_SIGNATURE

__all__ = ["TF_DTYPES", "model_metadata", "model_status"]

# The TensorFlow DataType of each V2 datatype.
TF_DTYPES = {
    "BOOL": "DT_BOOL",
    "UINT8": "DT_UINT8",
    "UINT16": "DT_UINT16",
    "UINT32": "DT_UINT32",
    "UINT64": "DT_UINT64",
    "INT8": "DT_INT8",
    "INT16": "DT_INT16",
    "INT32": "DT_INT32",
    "INT64": "DT_INT64",
    "FP16": "DT_HALF",
    "FP32": "DT_FLOAT",
    "FP64": "DT_DOUBLE",
    "BYTES": "DT_STRING",
}
PREDICT_METHOD = "tensorflow/serving/predict"


def model_status(versions: Iterable[tuple[int, bool]]) -> bytes:
    """``{"model_version_status": [...]}`` for ``(version, available)`` pairs.

    A version that can be served is ``AVAILABLE``; one whose runtime could not be loaded is
    ``END`` with ``UNAVAILABLE`` (TF Serving's state for a version no longer served).
    """
    statuses = []
    for number, available in versions:
        statuses.append(
            {
                "version": str(number),
                "state": "AVAILABLE" if available else "END",
                "status": {
                    "error_code": "OK" if available else "UNAVAILABLE",
                    "error_message": "" if available else "the model could not be loaded",
                },
            }
        )
    return orjson.dumps({"model_version_status": statuses}, option=orjson.OPT_INDENT_2)


def _tensor_info(spec: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "dtype": TF_DTYPES.get(str(spec["datatype"]), "DT_INVALID"),
        "tensor_shape": {
            "dim": [{"size": str(size), "name": ""} for size in spec["shape"]],
            "unknown_rank": False,
        },
        "name": spec["name"],
    }


def model_metadata(name: str, version: int, signature: ModelSignature) -> bytes:
    """``{"model_spec": ..., "metadata": {"signature_def": ...}}`` for one served version."""
    described = signature.to_json()
    signature_def = {
        "inputs": {spec["name"]: _tensor_info(spec) for spec in described["inputs"]},
        "outputs": {spec["name"]: _tensor_info(spec) for spec in described["outputs"]},
        "method_name": PREDICT_METHOD,
        "defaults": {},
    }
    document = {
        "model_spec": {"name": name, "signature_name": "", "version": str(version)},
        "metadata": {"signature_def": {"signature_def": {DEFAULT_SIGNATURE: signature_def}}},
    }
    return orjson.dumps(document, option=orjson.OPT_INDENT_2)
