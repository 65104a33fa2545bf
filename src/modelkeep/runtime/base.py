"""What every runtime gives the server, and the plumbing the tabular runtimes share.

A runtime turns verified model bytes into a :class:`LoadedModel`: an object with a
:class:`~modelkeep.runtime.signature.ModelSignature` and a thread-safe :meth:`LoadedModel.run`.
The tabular runtimes (skops, XGBoost, LightGBM) all serve one ``FP32`` matrix named
:data:`INPUT_NAME` of shape ``[-1, n_features]``; the helpers below check that matrix and pick
outputs the same way for each of them, so the three behave alike at the edges (unknown output,
empty batch, wrong width).

This module imports no runtime library.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import IO, Any, Protocol, runtime_checkable

import numpy as np

from modelkeep.errors import ConfigError, InvalidInput, ModelRefused
from modelkeep.runtime.signature import ModelSignature, TensorSpec, numpy_dtype

__all__ = [
    "FORMATS",
    "INPUT_NAME",
    "MAX_FEATURES",
    "RUN_FAILED",
    "LoadedModel",
    "ModelSource",
    "check_feature_count",
    "check_threads",
    "empty_outputs",
    "feature_matrix",
    "fill",
    "matrix_signature",
    "read_whole",
    "select_outputs",
]

FORMATS: tuple[str, ...] = ("onnx", "skops", "xgboost-json", "xgboost-ubj", "lightgbm-text")

INPUT_NAME = "input"
RUN_FAILED = "inference failed: the input does not fit the model"

# A wider model is refused at push: the smoke batch alone would be several megabytes and every
# request row larger still; no tabular model of this kind is legitimately that wide.
MAX_FEATURES = 1_000_000
_CHUNK = 1 << 20


# What a runtime loads from: the verified bytes (a version the server loads), or a seekable
# file over them (a push, read through the sealed copy): a runtime that can read a file reads
# only what it needs, and one that needs the model whole reads it into a buffer of its own,
# which it can let go of as soon as its library has parsed it.
ModelSource = bytes | IO[bytes]


@runtime_checkable
class LoadedModel(Protocol):
    """A model held in memory, ready to serve; ``run`` may be called from several threads."""

    @property
    def signature(self) -> ModelSignature: ...

    def run(
        self, inputs: Mapping[str, np.ndarray], output_names: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]: ...


def read_whole(source: ModelSource) -> bytes | bytearray:
    """The whole model: ``source`` itself if it is bytes, else the rest of the file, read into
    one buffer of its size (no chunks joined: the model is in memory once, not twice)."""
    if isinstance(source, bytes | bytearray):
        return source
    start = source.tell()
    size = source.seek(0, io.SEEK_END) - start
    source.seek(start)
    whole = bytearray(size)
    with memoryview(whole) as view:
        if not fill(view, source):
            raise ModelRefused("the model file changed while it was being read")
    return whole


def fill(view: memoryview, source: IO[bytes]) -> bool:
    """Read ``source`` into ``view`` in pieces (one read of it all would hold it twice); whether
    ``source`` held exactly ``len(view)`` bytes more, neither fewer nor more."""
    filled = 0
    while filled < len(view) and (chunk := source.read(min(_CHUNK, len(view) - filled))):
        view[filled : filled + len(chunk)] = chunk
        filled += len(chunk)
    return filled == len(view) and not source.read(1)


def check_threads(threads: int, runtime: str) -> int:
    """Return ``threads`` if it is an int >= 0 (0 = the library's default), else ConfigError."""
    if type(threads) is not int or threads < 0:
        raise ConfigError(f"the {runtime} runtime thread count must be an integer >= 0")
    return threads


def check_feature_count(n_features: object, what: str) -> int:
    """The model's feature count as a positive int no larger than :data:`MAX_FEATURES`."""
    if type(n_features) is not int or n_features < 1:
        raise ModelRefused(f"{what} does not state a positive number of input features")
    if n_features > MAX_FEATURES:
        raise ModelRefused(
            f"{what} takes {n_features} input features; at most {MAX_FEATURES} are served"
        )
    return n_features


def matrix_signature(n_features: int, outputs: Sequence[TensorSpec]) -> ModelSignature:
    """The signature of a model taking one ``FP32 [-1, n_features]`` matrix."""
    return ModelSignature(
        inputs=(TensorSpec(name=INPUT_NAME, datatype="FP32", shape=(-1, n_features)),),
        outputs=tuple(outputs),
    )


def select_outputs(signature: ModelSignature, output_names: Sequence[str] | None) -> list[str]:
    """The requested output names in signature order (all when ``None``).

    Raises ``InvalidInput`` naming the first unknown output.
    """
    known = [spec.name for spec in signature.outputs]
    if output_names is None:
        return known
    if isinstance(output_names, str):  # one name, not a sequence of one-letter names
        output_names = [output_names]
    wanted = set(output_names)
    unknown = wanted.difference(known)
    if unknown:
        raise InvalidInput(f"unknown output {sorted(unknown)[0][:64]!r}")
    return [name for name in known if name in wanted]


def feature_matrix(inputs: Mapping[str, np.ndarray], n_features: int) -> np.ndarray:
    """The one input as a C-contiguous float32 array of shape ``[rows, n_features]``.

    The V2 codec has already checked the request against the signature; this repeats the
    check cheaply so that a runtime never hands a native library an array of the wrong shape.
    Raises ``InvalidInput`` for a missing or extra input, a wrong dtype or a wrong shape.
    """
    extra = set(inputs).difference((INPUT_NAME,))
    if extra:
        raise InvalidInput(f"unknown input {str(sorted(extra)[0])[:64]!r}")
    if INPUT_NAME not in inputs:
        raise InvalidInput(f"missing input {INPUT_NAME!r}")
    array = inputs[INPUT_NAME]
    if not isinstance(array, np.ndarray) or array.dtype.newbyteorder("=") != np.float32:
        raise InvalidInput(f"input {INPUT_NAME!r} must be an FP32 tensor")
    if array.ndim != 2 or array.shape[1] != n_features:
        raise InvalidInput(f"input {INPUT_NAME!r} must have shape [-1, {n_features}]")
    return np.ascontiguousarray(array, dtype=np.float32)


def empty_outputs(signature: ModelSignature, names: Sequence[str]) -> dict[str, np.ndarray]:
    """Zero-row outputs for a zero-row batch, shaped as the signature says.

    Native libraries disagree on what an empty batch returns (some drop the class axis), so
    the runtimes answer it themselves without calling the library.
    """
    specs = {spec.name: spec for spec in signature.outputs}
    result: dict[str, np.ndarray] = {}
    for name in names:
        spec = specs[name]
        shape: tuple[int, ...] = tuple(0 if dim < 0 else dim for dim in spec.shape)
        dtype: np.dtype[Any] = numpy_dtype(spec.datatype)
        result[name] = np.empty(shape, dtype=dtype)
    return result
