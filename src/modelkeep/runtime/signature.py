"""What a model accepts and returns, in Open Inference Protocol (KServe V2) terms.

A :class:`ModelSignature` is computed once, when a model is pushed, from the runtime that will
serve it; the tensor codec in ``guard/`` checks every request against it before anything runs.
Dimensions of ``-1`` accept any size. ``BYTES`` tensors are numpy ``object`` arrays of ``str``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from modelkeep.errors import InvalidInput

__all__ = [
    "V2_DATATYPES",
    "ModelSignature",
    "TensorSpec",
    "numpy_dtype",
    "v2_datatype",
]

_NUMPY_BY_V2: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}
# Keyed by the native-order dtype; byte order is the codec's business, not the signature's.
_V2_BY_NUMPY: dict[np.dtype[Any], str] = {
    dtype: name for name, dtype in _NUMPY_BY_V2.items() if name != "BYTES"
}

V2_DATATYPES: frozenset[str] = frozenset(_NUMPY_BY_V2)

# The V2 protocol puts no limit on rank; numpy stops at 64 and no real model comes close to 32.
MAX_RANK = 32


def numpy_dtype(datatype: str) -> np.dtype[Any]:
    """The numpy dtype that holds ``datatype``; ``BYTES`` maps to ``object``.

    Raises ``InvalidInput`` for a name that is not a V2 datatype.
    """
    try:
        return _NUMPY_BY_V2[datatype]
    except (KeyError, TypeError):
        raise InvalidInput(f"unknown datatype {datatype!r}") from None


def v2_datatype(dtype: np.dtype[Any]) -> str:
    """The V2 datatype name for a numpy dtype; strings, bytes and objects map to ``BYTES``.

    Raises ``InvalidInput`` for a dtype with no V2 equivalent (complex, datetime, void...).
    """
    if dtype.kind in "OSU":
        return "BYTES"
    # newbyteorder() makes a new dtype: only needed for the rare non-native byte order.
    name = _V2_BY_NUMPY.get(dtype if dtype.isnative else dtype.newbyteorder("="))
    if name is None:
        raise InvalidInput(f"numpy dtype {dtype.str} has no V2 datatype")
    return name


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One named tensor: its V2 datatype and shape (``-1`` = any size on that axis)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, data: Any) -> TensorSpec:
        """Rebuild a spec, refusing anything :meth:`to_json` could not have produced."""
        if not isinstance(data, Mapping):
            raise InvalidInput("a tensor spec must be an object")
        name, datatype, shape = data.get("name"), data.get("datatype"), data.get("shape")
        if not isinstance(name, str) or not name:
            raise InvalidInput("a tensor spec needs a non-empty string 'name'")
        if datatype not in V2_DATATYPES:
            raise InvalidInput(f"tensor spec {name!r} has an unknown datatype")
        if (
            not isinstance(shape, list | tuple)
            or len(shape) > MAX_RANK
            or not all(type(d) is int and d >= -1 for d in shape)
        ):
            raise InvalidInput(f"tensor spec {name!r} needs a 'shape' of integers >= -1")
        return cls(name=name, datatype=datatype, shape=tuple(shape))


@dataclass(frozen=True, slots=True)
class ModelSignature:
    """The inputs a model requires and the outputs it produces, in the runtime's order."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def to_json(self) -> dict[str, Any]:
        """``{"inputs": [{"name", "datatype", "shape"}...], "outputs": [...]}`` (V2 metadata)."""
        return {
            "inputs": [spec.to_json() for spec in self.inputs],
            "outputs": [spec.to_json() for spec in self.outputs],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ModelSignature:
        """Inverse of :meth:`to_json`; raises ``InvalidInput`` on anything malformed."""
        if not isinstance(data, Mapping):
            raise InvalidInput("a model signature must be an object")
        parts: list[tuple[TensorSpec, ...]] = []
        for key in ("inputs", "outputs"):
            specs = data.get(key)
            if not isinstance(specs, list | tuple):
                raise InvalidInput(f"a model signature needs an {key!r} list")
            parsed = tuple(TensorSpec.from_json(spec) for spec in specs)
            if len({spec.name for spec in parsed}) != len(parsed):
                raise InvalidInput(f"a model signature has duplicate {key} names")
            parts.append(parsed)
        return cls(inputs=parts[0], outputs=parts[1])
