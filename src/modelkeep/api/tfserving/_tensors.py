"""TensorFlow Serving's JSON tensors: nested lists (and ``{"b64": ...}`` bytes) to and from numpy.

Decoding checks each value against the model's ``TensorSpec`` from its nested shape alone (rank,
fixed dimensions, element count against ``max_elements``) before a tensor is built, then builds
it with the V2 codec's JSON converter (``api/v2/_json.py``), so TF Serving, Vertex AI and V2
callers meet the same datatype rules. Encoding follows TF Serving's ``json_tensor.cc``: tensors
as nested lists, ``NaN``/``Infinity`` as those tokens, strings as JSON strings, and bytes
(strings of tensors named ``*_bytes``, or bytes that are not UTF-8) as ``{"b64": ...}``.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import orjson

from modelkeep.api._rows import checked_shape, nested_shape
from modelkeep.api.v2._json import json_array, shown
from modelkeep.errors import InternalError, InvalidInput
from modelkeep.runtime.signature import TensorSpec, numpy_dtype

__all__ = ["B64_KEY", "dumps", "is_b64", "tensor_from_json", "tensor_to_json"]

B64_KEY = "b64"
BYTES_SUFFIX = "_bytes"


def is_b64(value: Any) -> bool:
    """Whether ``value`` is TF Serving's binary wrapper: an object whose one key is ``b64``."""
    return type(value) is dict and len(value) == 1 and type(value.get(B64_KEY)) is str


def tensor_from_json(name: str, value: Any, spec: TensorSpec, max_elements: int) -> np.ndarray:
    """Build input ``name`` from its JSON ``value``, checked against ``spec`` first.

    Refuses with ``InvalidInput`` a rank or fixed dimension that differs from ``spec`` and with
    ``TooLarge`` more than ``max_elements`` elements, before any tensor is allocated; then the
    values themselves (types, ranges, raggedness) as the V2 codec does.
    """
    shape, count = checked_shape(spec, nested_shape(value, f"input {shown(name)}"), max_elements)
    if spec.datatype == "BYTES":
        value = _strings(name, value, len(shape))
    if not shape:
        value = [value]
    return json_array(name, value, spec.datatype, numpy_dtype(spec.datatype), shape, count)


def _strings(name: str, value: Any, depth: int) -> Any:
    """``value`` with every ``{"b64": ...}`` leaf decoded to text (the runtimes take text)."""
    if depth == 0:
        if is_b64(value):
            return _b64_text(name, value[B64_KEY])
        return value
    if type(value) is not list:
        # Left for json_array to refuse as malformed (raggedness).
        return value
    return [_strings(name, item, depth - 1) for item in value]


def _b64_text(name: str, text: str) -> str:
    # TF Serving (absl) accepts the padding or its absence.
    padded = text + "=" * (-len(text) % 4)
    try:
        raw = base64.b64decode(padded, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(f"input {shown(name)} holds a 'b64' value that is not base64") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidInput(
            f"input {shown(name)} holds 'b64' bytes that are not UTF-8 text; the model's "
            "runtime only takes text"
        ) from None


def tensor_to_json(name: str, array: np.ndarray) -> Any:
    """A value orjson writes as TF Serving writes ``array``.

    Numbers stay numpy arrays (orjson writes them natively, float32 in its shortest form;
    non-finite floats are handled by ``dumps``); strings become nested lists, bytes
    ``{"b64": ...}`` as TF Serving writes them.
    """
    dtype = array.dtype
    canonical = _CANONICAL.get(dtype)
    if canonical is None:
        canonical = _canonical(name, dtype)
    if canonical is not _TEXT:
        # Identity, not equality: longlong compares equal to int64 yet orjson refuses it.
        if dtype is canonical and array.flags.c_contiguous:
            return array
        return np.ascontiguousarray(array, dtype=canonical)
    return _text_leaves(array.tolist(), name.endswith(BYTES_SUFFIX))


# The dtype orjson is given for each numeric dtype met (native order, canonical type: orjson
# refuses aliases such as ONNX Runtime's longlong for int64 in row slices, which are numpy
# scalars); _TEXT for strings. Few dtypes exist, so the table stays small.
_TEXT = np.dtype(object)
_CANONICAL: dict[np.dtype[Any], np.dtype[Any]] = {}


def _canonical(name: str, dtype: np.dtype[Any]) -> np.dtype[Any]:
    if dtype.kind in "biuf":
        canonical = np.dtype(dtype.str).newbyteorder("=")
    elif dtype.kind in "OSU":
        canonical = _TEXT
    else:
        raise InternalError(f"output {shown(name)} has a dtype JSON cannot carry")
    _CANONICAL[dtype] = canonical
    return canonical


def _text_leaves(value: Any, as_bytes: bool) -> Any:
    if type(value) is list:
        return [_text_leaves(item, as_bytes) for item in value]
    if type(value) is str:
        if not as_bytes:
            return value
        value = value.encode("utf-8")
    if isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        if not as_bytes:
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError:
                pass
        return {B64_KEY: base64.b64encode(raw).decode("ascii")}
    raise InternalError("an output string tensor holds a value that is neither text nor bytes")


def dumps(document: Mapping[str, Any]) -> bytes:
    """The JSON body; floats that are NaN or infinite are written as TF Serving writes them
    (``NaN``, ``Infinity``, ``-Infinity``), which JSON proper cannot carry."""
    content = orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY)
    # orjson writes non-finite floats as null, and nothing else in these documents is null
    # but an absent value: one substring search spares the usual answer a scan of its floats.
    if b"null" in content and _non_finite(document):
        return json.dumps(_plain(document), allow_nan=True, separators=(",", ":")).encode()
    return content


def _non_finite(value: Any) -> bool:
    if isinstance(value, np.ndarray | np.floating):
        return value.dtype.kind == "f" and not bool(np.isfinite(value).all())
    if type(value) is dict:
        return any(_non_finite(item) for item in value.values())
    if type(value) is list:
        return any(_non_finite(item) for item in value)
    return type(value) is float and not math.isfinite(value)


def _plain(value: Any) -> Any:
    # The slow path for the rare response with NaN or infinity: plain Python values, floats
    # narrower than 64 bits through their shortest text so 0.1f is written 0.1.
    if isinstance(value, np.ndarray):
        if value.dtype.kind == "f" and value.dtype.itemsize < 8:
            return value.astype(str).astype(np.float64).tolist()
        return value.tolist()
    if isinstance(value, np.generic):
        return _plain(np.asarray(value))
    if type(value) is dict:
        return {key: _plain(item) for key, item in value.items()}
    if type(value) is list:
        return [_plain(item) for item in value]
    return value
