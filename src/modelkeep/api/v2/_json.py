"""JSON side of the V2 tensor codec: parsing the header and converting tensor ``data`` lists.

Kept apart from the request rules in ``codec.py`` so each half stays readable. Every function
here is handed a tensor whose name, datatype, shape and element count were already checked.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import orjson

from modelkeep.errors import InvalidInput

# Output data and tensor names are shared with payload capture, which keeps V2 JSON.
from modelkeep.runtime.tensor_json import json_data as json_data
from modelkeep.runtime.tensor_json import shown as shown

_FLOAT_KINDS = "iuf"
# The largest finite value of each float datatype, by its size in bytes.
_FINITE_MAX = {size: float(np.finfo(f"f{size}").max) for size in (2, 4, 8)}
# Flat data up to this many values is range-checked in Python before a narrowing cast.
_SHORT = 64
_FLOATS = {float}
_INT_KINDS = "iu"


def parse_json(header: bytes | memoryview) -> Any:
    """Parse the JSON header; ``InvalidInput`` for anything that is not JSON.

    orjson is tried first (fast, depth-limited). Clients that send non-finite floats write
    ``NaN``/``Infinity``, which orjson refuses, so the standard library gets a second try.
    """
    try:
        return orjson.loads(header)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(bytes(header))
    except (ValueError, RecursionError):
        # The message would echo request bytes; the position does not help enough to risk it.
        raise InvalidInput("the request body is not valid JSON") from None


def _nesting_depth(data: list[Any], rank: int) -> int:
    # Follows the first element only: enough to route flat vs nested data and to stop deep
    # nesting before numpy sees it; raggedness elsewhere is numpy's to find.
    depth = 0
    probe: Any = data
    while isinstance(probe, list):
        depth += 1
        if depth > max(rank, 1) or not probe:
            break
        probe = probe[0]
    return depth


def json_array(
    name: str, data: Any, datatype: str, dtype: np.dtype[Any], shape: tuple[int, ...], count: int
) -> np.ndarray:
    """Build the tensor from JSON ``data`` (flat, or nested exactly as ``shape``)."""
    if not isinstance(data, list):
        raise InvalidInput(f"input {shown(name)} needs 'data' as a list")
    depth = _nesting_depth(data, len(shape))
    nested = depth > 1
    if nested and depth != len(shape):
        raise InvalidInput(f"input {shown(name)} has data nested differently from its shape")
    expected = shape[0] if nested else count
    if len(data) != expected:
        raise InvalidInput(
            f"input {shown(name)} has {len(data)} values; its shape needs {expected}"
            if not nested
            else f"input {shown(name)} has data that does not match its shape"
        )
    if datatype == "BYTES":
        array = _json_strings(name, data)
    else:
        array = _json_numbers(name, data, datatype, dtype, flat=not nested)
    if array.shape == shape:
        return array
    if array.ndim == 1 and array.size == count:
        return array.reshape(shape)
    raise InvalidInput(f"input {shown(name)} has data that does not match its shape")


def _json_numbers(
    name: str, data: list[Any], datatype: str, dtype: np.dtype[Any], *, flat: bool
) -> np.ndarray:
    # The common case, in one numpy call instead of three: a short flat list of floats within
    # the target's range converts exactly as the general path below converts it.
    if (
        flat
        and 0 < len(data) <= _SHORT
        and dtype.kind == "f"
        and set(map(type, data)) == _FLOATS
        and _in_range(data, dtype)
    ):
        return np.array(data, dtype=dtype)
    try:
        inferred = np.asarray(data)
    except (ValueError, TypeError, OverflowError, RecursionError):
        raise InvalidInput(f"input {shown(name)} has ragged or malformed data") from None
    kind = inferred.dtype.kind
    if inferred.size == 0:
        return inferred.astype(dtype)
    if datatype == "BOOL":
        if kind != "b":
            raise InvalidInput(f"input {shown(name)} needs true/false values for BOOL")
        return inferred
    if dtype.kind in _INT_KINDS:
        if kind not in _INT_KINDS:
            # numpy widens a mix of large unsigned and small ints to float64; look exactly.
            return _exact_integers(name, data, datatype, dtype, inferred.shape)
        info = np.iinfo(dtype)
        if inferred.dtype != dtype and (inferred.min() < info.min or inferred.max() > info.max):
            raise InvalidInput(f"input {shown(name)} has values out of range for {datatype}")
        return inferred.astype(dtype, copy=False)
    if kind not in _FLOAT_KINDS:
        raise InvalidInput(f"input {shown(name)} needs numbers for {datatype}")
    if inferred.dtype == dtype:
        return inferred
    # A short flat list is range-checked, which costs less than the errstate context below.
    if flat and len(data) <= _SHORT and _in_range(data, dtype):
        return inferred.astype(dtype, copy=False)
    # Overflow to inf (e.g. 1e10 as FP16) is the IEEE answer, not an error.
    with np.errstate(over="ignore"):
        return inferred.astype(dtype, copy=False)


def _in_range(data: list[Any], dtype: np.dtype[Any]) -> bool:
    """Whether the numbers of the flat list ``data`` cast to the float ``dtype`` quietly.

    Only a finite value beyond the target's range overflows; NaN, inf and underflow do not.
    A NaN may make min or max NaN, and then the answer is False: the caller takes the path
    that is safe for any value.
    """
    finite_max = _FINITE_MAX[dtype.itemsize]
    return bool(-finite_max <= min(data) and max(data) <= finite_max)


def _exact_integers(
    name: str, data: list[Any], datatype: str, dtype: np.dtype[Any], shape: tuple[int, ...]
) -> np.ndarray:
    objects = np.asarray(data, dtype=object)
    if objects.shape != shape or not all(type(value) is int for value in objects.flat):
        raise InvalidInput(f"input {shown(name)} needs integers for {datatype}")
    try:
        return np.asarray(objects.tolist(), dtype=dtype)
    except OverflowError:
        raise InvalidInput(f"input {shown(name)} has values out of range for {datatype}") from None


def _json_strings(name: str, data: list[Any]) -> np.ndarray:
    try:
        array = np.asarray(data, dtype=object)
    except (ValueError, TypeError, RecursionError):
        raise InvalidInput(f"input {shown(name)} has ragged or malformed data") from None
    if not all(type(value) is str for value in array.flat):
        raise InvalidInput(f"input {shown(name)} needs strings for BYTES")
    return array
