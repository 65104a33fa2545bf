"""One entry point from (format, verified bytes) to a served model, for push and for load.

:func:`load_model` picks the runtime for a format; each runtime module is imported only when
its format is first loaded, so a server that serves ONNX alone never imports XGBoost.
:func:`inspect_model` is the push-time check: it loads the model exactly as the server will,
then proves it by a smoke run on a batch of zeros and checks that what comes back matches the
signature the V2 protocol will promise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from math import prod

import numpy as np

from modelkeep.errors import ModelkeepError, ModelRefused
from modelkeep.runtime._plaintext_file import PlaintextFile
from modelkeep.runtime.base import FORMATS, LoadedModel, ModelSource, read_whole
from modelkeep.runtime.signature import ModelSignature, TensorSpec, numpy_dtype

__all__ = ["inspect_model", "load_model"]

# A smoke batch larger than this is not built (only a fixed-shape ONNX input could ask for it).
_MAX_SMOKE_ELEMENTS = 4_000_000


def load_model(
    fmt: str,
    data: ModelSource | PlaintextFile,
    *,
    threads: int = 1,
    trusted_types: Sequence[str] = (),
    smoke: bool = False,
) -> LoadedModel:
    """Load verified model bytes into the runtime for ``fmt`` (one of :data:`FORMATS`).

    ``data`` is the bytes, a seekable file of them (a push reads the sealed copy through one:
    skops reads the zip through it, XGBoost and LightGBM read it into a buffer they let go of
    once parsed), or the plaintext in a private tmpfs file (only ONNX Runtime maps it; the
    other runtimes read a copy). ``threads`` is the runtime's intra-op thread count
    (0 = its default). ``trusted_types`` are the extra types the scanner approved for this
    file; only the skops runtime uses them, and only those. ``smoke`` loads for a trial run
    only: ONNX Runtime then does not pre-pack weights (no copy of them; slower MatMuls).
    Raises ``ModelRefused`` for an unknown format or bytes the runtime refuses,
    ``ConfigError`` for a bad thread count.
    """
    if fmt == "onnx":
        from modelkeep.runtime.onnx import OnnxModel

        if not isinstance(data, PlaintextFile | bytes):
            # A push without a usable tmpfs: ONNX Runtime takes bytes, so the buffer read is
            # copied once (and let go of at once), below the peak of the load that follows.
            data = bytes(read_whole(data))
        return OnnxModel.load(data, threads=threads, prepack=not smoke)
    if isinstance(data, PlaintextFile):
        data = bytes(data.buffer)
    if fmt == "skops":
        from modelkeep.runtime.skops_runtime import SkopsModel

        return SkopsModel.load(data, trusted_types=trusted_types, threads=threads)
    if fmt == "xgboost-json" or fmt == "xgboost-ubj":
        from modelkeep.runtime.xgboost_runtime import XGBoostModel

        return XGBoostModel.load(
            data, fmt="json" if fmt == "xgboost-json" else "ubj", threads=threads
        )
    if fmt == "lightgbm-text":
        from modelkeep.runtime.lightgbm_runtime import LightGBMModel

        return LightGBMModel.load(data, threads=threads)
    shown = repr(fmt)[:40] if isinstance(fmt, str) else "a non-string"
    raise ModelRefused(f"unknown model format {shown}; modelkeep serves {', '.join(FORMATS)}")


def inspect_model(
    fmt: str, data: ModelSource | PlaintextFile, *, trusted_types: Sequence[str] = ()
) -> ModelSignature:
    """Load the model as :func:`load_model` would, smoke-run it, and return its signature.

    The smoke run feeds one row of zeros (``[1, n_features]`` for the tabular runtimes); an
    ONNX input with a dynamic axis after the first is not guessed at and skips it. Raises
    ``ModelRefused`` when loading fails, when the run fails, or when an output differs from
    the signature in name, datatype or a fixed dimension.
    """
    model = load_model(fmt, data, threads=1, trusted_types=trusted_types, smoke=True)
    signature = model.signature
    batch = _zero_batch(signature)
    if batch is None:
        return signature
    try:
        outputs = model.run(batch)
    except ModelkeepError as exc:
        raise ModelRefused(
            f"the model failed a trial prediction on {_describe(batch)}; check that it takes "
            "numeric features of that shape (the input must be a float matrix of the width "
            "the model was fitted on)"
        ) from exc
    for spec in signature.outputs:
        _check_output(spec, outputs.get(spec.name))
    return signature


def _zero_batch(signature: ModelSignature) -> dict[str, np.ndarray] | None:
    batch: dict[str, np.ndarray] = {}
    for spec in signature.inputs:
        if any(dim < 0 for dim in spec.shape[1:]):
            return None  # a dynamic inner axis: any size we picked could be wrong
        shape = tuple(1 if dim < 0 else dim for dim in spec.shape)
        if prod(shape) > _MAX_SMOKE_ELEMENTS:
            return None
        if spec.datatype == "BYTES":
            batch[spec.name] = np.full(shape, "", dtype=object)
        else:
            batch[spec.name] = np.zeros(shape, dtype=numpy_dtype(spec.datatype))
    return batch


def _describe(batch: Mapping[str, np.ndarray]) -> str:
    shapes = [list(array.shape) for array in batch.values()]
    if len(shapes) == 1:
        return f"a zero batch of shape {shapes[0]}"
    return f"a zero batch (inputs of shapes {shapes})"


def _check_output(spec: TensorSpec, value: np.ndarray | None) -> None:
    problem = None
    if not isinstance(value, np.ndarray):
        problem = "is missing"
    elif value.dtype.newbyteorder("=") != numpy_dtype(spec.datatype):
        problem = f"has numpy dtype {value.dtype.str}, not {spec.datatype}"
    elif spec.shape and (
        value.ndim != len(spec.shape)
        or any(want >= 0 and got != want for want, got in zip(spec.shape, value.shape, strict=True))
    ):
        problem = f"has shape {list(value.shape)}, not {list(spec.shape)}"
    if problem is not None:
        raise ModelRefused(
            f"the model's output {spec.name[:64]!r} {problem} in a trial prediction; "
            "the model does not produce what its signature declares"
        )
