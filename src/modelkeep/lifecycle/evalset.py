"""Evaluation sets: rows with their expected outputs, and the metrics a version earns on them.

An evaluation set is an ``.npz`` holding two arrays: ``inputs`` (rows for the model's one input)
and ``expected`` (one expected output per row). Integer or boolean ``expected`` means a
classifier (accuracy, f1, auc); floating point means a regressor (rmse, mae). The file is parsed
with ``allow_pickle=False`` after its members' sizes are checked, so a pickled or oversized
member is refused before anything is unpacked. It is kept sealed (``_service/lifecycle.py``) and
only ever opened in memory.
"""

from __future__ import annotations

import io
import math
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata

from modelkeep.errors import InvalidInput, TooLarge
from modelkeep.runtime.base import LoadedModel
from modelkeep.runtime.signature import ModelSignature, numpy_dtype

__all__ = ["MAX_ROWS", "EvalSet", "compute_metrics", "read_evalset"]

#: Rows of one evaluation set at most.
MAX_ROWS = 1_000_000
# Rows per inference call while evaluating, so memory stays bounded whatever the set's size.
_BATCH = 4096
_ARRAYS = frozenset({"inputs", "expected"})
_USAGE = "an evaluation set is an .npz with two numeric arrays: 'inputs' and 'expected'"


@dataclass(frozen=True, slots=True)
class EvalSet:
    """Parsed rows; ``task`` is ``classification`` or ``regression`` (from ``expected``)."""

    inputs: np.ndarray
    expected: np.ndarray

    @property
    def task(self) -> str:
        return "regression" if self.expected.dtype.kind == "f" else "classification"

    @property
    def rows(self) -> int:
        return int(self.expected.shape[0])


def read_evalset(data: bytes, *, max_unpacked: int, max_elements: int) -> EvalSet:
    """The evaluation set in ``data``; InvalidInput or TooLarge (never a pickle load)."""
    # 1. The archive's table first: member count and unpacked sizes, before any inflating.
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise InvalidInput(f"the evaluation set is not an .npz file: {_USAGE}") from exc
    names = {info.filename.removesuffix(".npy") for info in infos}
    if len(infos) != 2 or names != _ARRAYS:
        raise InvalidInput(_USAGE)
    if sum(info.file_size for info in infos) > max_unpacked:
        raise TooLarge(f"the evaluation set unpacks to more than {max_unpacked} bytes")
    # 2. Each array's header before its data: numpy allocates what a header declares, so a
    #    shape larger than the member's bytes (or a pickled object array) stops here.
    _check_headers(data, infos, max_elements)
    # 3. Only plain arrays: allow_pickle=False refuses object arrays (pickles) outright.
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            inputs, expected = npz["inputs"], npz["expected"]
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as exc:
        raise InvalidInput(f"the evaluation set could not be read: {_USAGE}") from exc
    # 4. Shapes and types that make sense together.
    for name, array in (("inputs", inputs), ("expected", expected)):
        if array.dtype.kind not in "biuf":
            raise InvalidInput(f"'{name}' must hold numbers (not {array.dtype.kind!r} values)")
        if array.ndim == 0 or array.shape[0] == 0:
            raise InvalidInput(f"'{name}' must have at least one row")
    if int(inputs.size) + int(expected.size) > max_elements:
        raise TooLarge(f"the evaluation set holds more than {max_elements} values")
    if expected.ndim != 1:
        raise InvalidInput("'expected' must be one value per row (a 1-D array)")
    if inputs.shape[0] != expected.shape[0]:
        raise InvalidInput("'inputs' and 'expected' must have the same number of rows")
    if expected.shape[0] > MAX_ROWS:
        raise TooLarge(f"an evaluation set holds at most {MAX_ROWS} rows")
    if inputs.dtype.kind == "f" and not np.isfinite(inputs).all():
        raise InvalidInput("'inputs' holds NaN or infinite values")
    if expected.dtype.kind == "f" and not np.isfinite(expected).all():
        raise InvalidInput("'expected' holds NaN or infinite values")
    return EvalSet(inputs=inputs, expected=expected)


def _check_headers(data: bytes, infos: list[zipfile.ZipInfo], max_elements: int) -> None:
    elements = 0
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            for info in infos:
                with archive.open(info) as member:
                    version = np.lib.format.read_magic(member)
                    if version == (1, 0):
                        shape, _, dtype = np.lib.format.read_array_header_1_0(member)
                    else:
                        shape, _, dtype = np.lib.format.read_array_header_2_0(member)
                if dtype.hasobject:
                    raise InvalidInput(f"the evaluation set could not be read: {_USAGE}")
                count = math.prod(shape)
                if count * dtype.itemsize > info.file_size:
                    raise InvalidInput("the evaluation set's arrays are shorter than they claim")
                elements += count
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, RuntimeError) as exc:
        raise InvalidInput(f"the evaluation set could not be read: {_USAGE}") from exc
    if elements > max_elements:
        raise TooLarge(f"the evaluation set holds more than {max_elements} values")


def check_fits(evalset: EvalSet, signature: ModelSignature) -> None:
    """InvalidInput unless the set's rows fit the model's one input."""
    if len(signature.inputs) != 1:
        raise InvalidInput("evaluation needs a model with exactly one input")
    spec = signature.inputs[0]
    shape = evalset.inputs.shape
    if len(spec.shape) != len(shape) or any(
        want not in (-1, got) for want, got in zip(spec.shape[1:], shape[1:], strict=True)
    ):
        raise InvalidInput(
            f"'inputs' has shape {list(shape)}; the model's input {spec.name!r} takes "
            f"{list(spec.shape)}"
        )


def compute_metrics(model: LoadedModel, evalset: EvalSet) -> dict[str, float]:
    """The metrics of ``model`` on ``evalset``, rounded to 6 places.

    Classifiers get accuracy, f1 (binary: of class 1; more classes: macro average) and, when
    the model has a score output, auc (binary, or one-vs-rest macro average); regressors get
    rmse and mae. Raises InvalidInput when the model's outputs do not fit the set.
    """
    signature = model.signature
    check_fits(evalset, signature)
    spec = signature.inputs[0]
    x = evalset.inputs.astype(numpy_dtype(spec.datatype), copy=False)
    outputs: dict[str, list[np.ndarray]] = {}
    for start in range(0, evalset.rows, _BATCH):
        answer = model.run({spec.name: x[start : start + _BATCH]}, None)
        for name, array in answer.items():
            outputs.setdefault(name, []).append(np.asarray(array))
    merged = {name: np.concatenate(parts) for name, parts in outputs.items()}
    ordered = [merged[o.name] for o in signature.outputs if o.name in merged]
    if evalset.task == "regression":
        return _regression(ordered, evalset.expected)
    return _classification(ordered, evalset.expected)


def _rows_of(array: np.ndarray, rows: int) -> bool:
    return array.ndim >= 1 and array.shape[0] == rows


def _regression(outputs: list[np.ndarray], expected: np.ndarray) -> dict[str, float]:
    rows = expected.shape[0]
    for out in outputs:
        if out.dtype.kind == "f" and _rows_of(out, rows) and out.size == rows:
            error = out.reshape(rows).astype(np.float64) - expected.astype(np.float64)
            return {
                "rmse": round(float(np.sqrt(np.mean(error**2))), 6),
                "mae": round(float(np.mean(np.abs(error))), 6),
            }
    raise InvalidInput("the model has no output with one number per row to compare")


def _classification(outputs: list[np.ndarray], expected: np.ndarray) -> dict[str, float]:
    rows = expected.shape[0]
    truth = expected.astype(np.int64)
    labels = next(
        (o.reshape(rows) for o in outputs if o.dtype.kind in "biu" and o.size == rows), None
    )
    scores = next(
        (o for o in outputs if o.dtype.kind == "f" and o.ndim == 2 and _rows_of(o, rows)), None
    )
    if labels is None and scores is not None:
        labels = np.argmax(scores, axis=1)
    if labels is None:
        raise InvalidInput("the model has no class or class-score output to compare")
    predicted = labels.astype(np.int64)
    metrics = {
        "accuracy": round(float(np.mean(predicted == truth)), 6),
        "f1": round(_f1(predicted, truth), 6),
    }
    if scores is not None:
        auc = _auc(scores.astype(np.float64), truth)
        if auc is not None:
            metrics["auc"] = round(auc, 6)
    return metrics


def _f1_of(predicted: np.ndarray, truth: np.ndarray, positive: int) -> float:
    tp = float(np.sum((predicted == positive) & (truth == positive)))
    fp = float(np.sum((predicted == positive) & (truth != positive)))
    fn = float(np.sum((predicted != positive) & (truth == positive)))
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def _f1(predicted: np.ndarray, truth: np.ndarray) -> float:
    classes = np.union1d(np.unique(truth), np.unique(predicted))
    if set(classes.tolist()) <= {0, 1}:
        return _f1_of(predicted, truth, 1)
    return float(np.mean([_f1_of(predicted, truth, int(c)) for c in classes]))


def _binary_auc(score: np.ndarray, positive: np.ndarray) -> float | None:
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = rankdata(score)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _auc(scores: np.ndarray, truth: np.ndarray) -> float | None:
    n_classes = scores.shape[1]
    if truth.min() < 0 or truth.max() >= n_classes:
        return None
    if n_classes == 2:
        return _binary_auc(scores[:, 1], truth == 1)
    aucs = [_binary_auc(scores[:, c], truth == c) for c in range(n_classes)]
    known = [a for a in aucs if a is not None]
    return float(np.mean(known)) if known else None


def summary(evalset: EvalSet) -> Mapping[str, object]:
    """What may be shown of a set: its shape and task, never a row."""
    return {
        "rows": evalset.rows,
        "task": evalset.task,
        "input_shape": list(evalset.inputs.shape),
    }
