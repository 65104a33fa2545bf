"""Admission and tensor validation in front of the runtime; output hardening after it."""

from modelkeep.guard.tensors import (
    BINARY_CONTENT_TYPE,
    INFERENCE_HEADER_CONTENT_LENGTH,
    JSON_CONTENT_TYPE,
    InferRequest,
    RequestedOutput,
    decode_infer_request,
    encode_infer_response,
)

__all__ = [
    "BINARY_CONTENT_TYPE",
    "INFERENCE_HEADER_CONTENT_LENGTH",
    "JSON_CONTENT_TYPE",
    "InferRequest",
    "RequestedOutput",
    "decode_infer_request",
    "encode_infer_response",
]
