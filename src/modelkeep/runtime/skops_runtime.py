"""scikit-learn estimators stored in the skops format.

skops rebuilds an estimator from a JSON schema inside a zip file instead of unpickling it, and
refuses any type outside its default allow-list (scikit-learn, numpy, scipy building blocks)
unless the caller names it. modelkeep names exactly the types its scanner approved for this
file, never ``trusted=True``, and checks :func:`skops.io.get_untrusted_types` first so that a
refusal lists every type the publisher would need to have approved.

The served signature: ``input`` FP32 ``[-1, n_features_in_]`` (cast to float64 before the
estimator sees it: exact, and the precision scikit-learn fits in), ``label`` ``[-1]`` from
``predict`` and, for classifiers with ``predict_proba``, ``probabilities`` FP32
``[-1, n_classes]`` in ``classes_`` order.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import skops.io as sio

from modelkeep.errors import InternalError, InvalidInput, ModelRefused
from modelkeep.runtime.base import (
    RUN_FAILED,
    ModelSource,
    check_feature_count,
    check_threads,
    empty_outputs,
    feature_matrix,
    matrix_signature,
    select_outputs,
)
from modelkeep.runtime.signature import ModelSignature, TensorSpec

__all__ = ["SkopsModel"]

_ZIP_MAGIC = b"PK\x03\x04"
_SHOWN_TYPES = 10
_NOT_SKOPS = (
    "the file is not a skops model or is damaged; save the estimator with "
    "skops.io.dump(estimator, 'model.skops')"
)


class SkopsModel:
    """A fitted scikit-learn estimator (or Pipeline) loaded from skops bytes.

    ``run`` holds a lock: scikit-learn does not promise that ``predict`` is thread safe for
    every estimator (scikit-learn issue #18530 is still open), and a pipeline may hold steps
    nobody has audited for it. ``threads`` is accepted for symmetry but not applied: estimators
    predict in the calling thread, and BLAS thread pools are process-wide, not per model.
    """

    __slots__ = ("_estimator", "_label_datatype", "_lock", "_n_classes", "_n_features", "signature")

    def __init__(
        self,
        estimator: Any,
        n_features: int,
        label_datatype: str,
        n_classes: int | None,
    ) -> None:
        self._estimator = estimator
        self._n_features = n_features
        self._label_datatype = label_datatype
        self._n_classes = n_classes
        self._lock = threading.Lock()
        outputs = [TensorSpec(name="label", datatype=label_datatype, shape=(-1,))]
        if n_classes is not None:
            outputs.append(TensorSpec(name="probabilities", datatype="FP32", shape=(-1, n_classes)))
        self.signature: ModelSignature = matrix_signature(n_features, outputs)

    @classmethod
    def load(
        cls, data: ModelSource, *, trusted_types: Sequence[str] = (), threads: int = 1
    ) -> SkopsModel:
        """Load skops bytes, or a seekable file of them, trusting skops' defaults plus exactly
        ``trusted_types``.

        skops reads a zip through a file, so a file is never read whole here: each array is
        read out of the zip once by skops and once more into the array itself.

        Raises ``ModelRefused`` when the bytes are not a skops file, when the file holds a type
        that is neither skops-default nor in ``trusted_types`` (all such types are listed), or
        when the object is not a fitted estimator with ``predict`` over a numeric matrix.
        """
        check_threads(threads, "skops")
        if isinstance(trusted_types, str | bytes):
            raise InternalError("trusted_types must be a sequence of type names, not one string")
        trusted = [name for name in trusted_types if isinstance(name, str)]
        if len(trusted) != len(trusted_types):
            raise InternalError("trusted_types must hold type names (strings) only")
        # 1. The bytes are a zip archive: skops' container, and nothing else is tried.
        if isinstance(data, bytes | bytearray | memoryview):
            data = io.BytesIO(data)  # over bytes it shares their buffer: no copy
        start = data.tell()
        if data.read(len(_ZIP_MAGIC)) != _ZIP_MAGIC:
            raise ModelRefused(_NOT_SKOPS)
        # 2. Every type skops would have to construct is skops-default or approved for this file.
        try:
            data.seek(start)
            # skops documents a path here; it hands it to ZipFile, which takes a file as well.
            untrusted = sio.get_untrusted_types(file=data)
        except Exception as exc:
            raise ModelRefused(_NOT_SKOPS) from exc
        refused = sorted(set(untrusted).difference(trusted))
        if refused:
            raise ModelRefused(_untrusted_message(refused))
        # 3. Load with that exact allow-list; skops enforces it again while building objects.
        try:
            data.seek(start)
            estimator = sio.load(data, trusted=trusted)
        except Exception as exc:
            raise ModelRefused(_NOT_SKOPS) from exc
        return cls._from_estimator(estimator)

    @classmethod
    def _from_estimator(cls, estimator: Any) -> SkopsModel:
        if not callable(getattr(estimator, "predict", None)):
            raise ModelRefused(
                f"the skops file holds a {_type_name(estimator)}, which has no predict method; "
                "only fitted estimators and pipelines ending in one are served"
            )
        n_features = check_feature_count(
            getattr(estimator, "n_features_in_", None),
            "the estimator (no n_features_in_: is it fitted on a 2-D numeric array?)",
        )
        classes = getattr(estimator, "classes_", None)
        n_classes: int | None = None
        if classes is not None:
            if not isinstance(classes, np.ndarray) or classes.ndim != 1 or len(classes) < 1:
                raise ModelRefused(
                    "multi-output classifiers are not served; train one classifier per output"
                )
            label_datatype = _classes_datatype(classes)
            if callable(getattr(estimator, "predict_proba", None)):
                n_classes = len(classes)
        else:
            label_datatype = _probe_datatype(estimator, n_features)
        return cls(estimator, n_features, label_datatype, n_classes)

    def run(
        self, inputs: Mapping[str, np.ndarray], output_names: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Predict; returns the outputs asked for (default all) in signature order.

        Raises ``InvalidInput`` for an unknown output name or an input the estimator rejects;
        the estimator's own message is never passed on.
        """
        names = select_outputs(self.signature, output_names)
        matrix = feature_matrix(inputs, self._n_features)
        rows = matrix.shape[0]
        if rows == 0:
            return empty_outputs(self.signature, names)
        features = matrix.astype(np.float64)
        result: dict[str, np.ndarray] = {}
        try:
            with self._lock:
                if "label" in names:
                    result["label"] = _labels(
                        self._estimator.predict(features), self._label_datatype, rows
                    )
                if "probabilities" in names:
                    result["probabilities"] = _probabilities(
                        self._estimator.predict_proba(features), rows, self._n_classes
                    )
        except InvalidInput:
            raise
        except Exception as exc:  # estimators raise anything from ValueError to IndexError
            raise InvalidInput(RUN_FAILED) from exc
        return {name: result[name] for name in names}


def _untrusted_message(refused: list[str]) -> str:
    shown = ", ".join(name[:120] for name in refused[:_SHOWN_TYPES])
    more = f" and {len(refused) - _SHOWN_TYPES} more" if len(refused) > _SHOWN_TYPES else ""
    return (
        f"the skops file holds types that were not approved for it: {shown}{more}; "
        "rebuild the model from scikit-learn types only, or have the scan approve them"
    )


def _type_name(obj: object) -> str:
    kind = type(obj)
    return f"{kind.__module__}.{kind.__qualname__}"[:120]


def _classes_datatype(classes: np.ndarray) -> str:
    kind = classes.dtype.kind
    if kind in "iu":
        return "INT64"
    if kind == "b":
        return "BOOL"
    if kind == "f":
        return "FP64"
    if kind == "U" or (kind == "O" and all(isinstance(c, str) for c in classes)):
        return "BYTES"
    raise ModelRefused(
        "the classifier's class labels are neither all integers nor all strings; "
        "encode them as one or the other before fitting"
    )


def _probe_datatype(estimator: Any, n_features: int) -> str:
    # Regressors, clusterers and outlier detectors carry no classes_: their output type is
    # whatever predict returns, so ask it once on a zero row.
    try:
        probe = np.asarray(estimator.predict(np.zeros((1, n_features), dtype=np.float64)))
    except Exception as exc:
        raise ModelRefused(
            f"the estimator failed a trial prediction on a zero row of {n_features} features; "
            "only estimators over a numeric matrix are served"
        ) from exc
    if probe.shape != (1,):
        raise ModelRefused(
            "the estimator predicts several values per row; multi-output estimators are not "
            "served (fit one estimator per output)"
        )
    kind = probe.dtype.kind
    if kind in "iu":
        return "INT64"
    if kind == "b":
        return "BOOL"
    if kind == "f":
        return "FP64"
    if kind == "U" or (kind == "O" and isinstance(probe[0], str)):
        return "BYTES"
    raise ModelRefused("the estimator predicts values that are neither numbers nor strings")


def _labels(raw: Any, datatype: str, rows: int) -> np.ndarray:
    labels = np.asarray(raw)
    if labels.shape != (rows,):
        raise InvalidInput(RUN_FAILED)
    if datatype == "BYTES":
        if labels.dtype.kind == "U":
            return labels.astype(object)  # elements become Python str, as the codec expects
        if labels.dtype.kind == "O" and all(isinstance(v, str) for v in labels):
            return labels
        raise InvalidInput(RUN_FAILED)
    target = {"INT64": np.int64, "BOOL": np.bool_, "FP64": np.float64}[datatype]
    return labels.astype(target)


def _probabilities(raw: Any, rows: int, n_classes: int | None) -> np.ndarray:
    probabilities = np.asarray(raw, dtype=np.float32)
    if probabilities.shape != (rows, n_classes):
        raise InvalidInput(RUN_FAILED)
    return probabilities
