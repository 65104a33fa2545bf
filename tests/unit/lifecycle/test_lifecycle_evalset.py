"""Evaluation sets: hostile files are refused clearly; metrics match scikit-learn's."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Mapping, Sequence

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, mean_absolute_error, roc_auc_score

from modelkeep.errors import InvalidInput, TooLarge
from modelkeep.lifecycle.evalset import EvalSet, compute_metrics, read_evalset
from modelkeep.runtime.signature import ModelSignature, TensorSpec

LIMITS = {"max_unpacked": 1 << 20, "max_elements": 100_000}


def npz(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


def test_a_good_set_reads() -> None:
    data = npz(inputs=np.ones((3, 4), np.float32), expected=np.array([0, 1, 2]))
    found = read_evalset(data, **LIMITS)
    assert (found.rows, found.task, found.inputs.shape) == (3, "classification", (3, 4))


def pickled_npz() -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, inputs=np.array([{"a": 1}], dtype=object), expected=np.array([1]))
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("data", "error", "message"),
    [
        (b"not a zip", InvalidInput, "not an .npz file"),
        (b"PK\x03\x04 junk", InvalidInput, "not an .npz file"),
        (npz(x=np.ones(3)), InvalidInput, "'inputs' and 'expected'"),
        (
            npz(inputs=np.ones(3), expected=np.ones(3), extra=np.ones(3)),
            InvalidInput,
            "'inputs' and 'expected'",
        ),
        (pickled_npz(), InvalidInput, "could not be read"),
        (npz(inputs=np.ones((3, 4)), expected=np.ones(2)), InvalidInput, "same number of rows"),
        (npz(inputs=np.ones((3, 4)), expected=np.ones((3, 2))), InvalidInput, "1-D"),
        (npz(inputs=np.array(["a", "b"]), expected=np.ones(2)), InvalidInput, "must hold numbers"),
        (npz(inputs=np.zeros((0, 4)), expected=np.zeros(0)), InvalidInput, "at least one row"),
        (npz(inputs=np.full((2, 2), np.nan), expected=np.ones(2)), InvalidInput, "NaN"),
        (npz(inputs=np.ones((400, 400)), expected=np.ones(400)), TooLarge, "unpacks to more"),
    ],
)
def test_hostile_sets_are_refused_clearly(
    data: bytes, error: type[Exception], message: str
) -> None:
    with pytest.raises(error) as info:
        read_evalset(data, **LIMITS)
    assert message in str(info.value)


def test_a_zip_bomb_is_refused_from_its_table_before_inflating() -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        header = io.BytesIO()
        np.save(header, np.ones(2))
        archive.writestr("expected.npy", header.getvalue())
        archive.writestr("inputs.npy", b"\0" * (8 << 20))  # 8 MiB of zeros, a few KiB packed
    assert len(buffer.getvalue()) < 100_000
    with pytest.raises(TooLarge):
        read_evalset(buffer.getvalue(), **LIMITS)


class FakeModel:
    """Returns fixed outputs, whatever the rows."""

    def __init__(self, outputs: Mapping[str, np.ndarray], inputs: int = 2) -> None:
        self._outputs = outputs
        self.signature = ModelSignature(
            inputs=(TensorSpec("input", "FP32", (-1, inputs)),),
            outputs=tuple(
                TensorSpec(name, "INT64" if a.dtype.kind == "i" else "FP32", (-1, *a.shape[1:]))
                for name, a in outputs.items()
            ),
        )

    def run(
        self, inputs: Mapping[str, np.ndarray], output_names: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        rows = len(inputs["input"])
        start = self.calls
        self.calls += rows
        return {name: a[start : start + rows] for name, a in self._outputs.items()}

    calls = 0


def test_classification_metrics_match_scikit_learn() -> None:
    rng = np.random.default_rng(3)
    truth = rng.integers(0, 3, 500)
    scores = rng.random((500, 3)).astype(np.float32)
    scores[np.arange(500), truth] += 0.6
    scores /= scores.sum(axis=1, keepdims=True)
    labels = np.argmax(scores, axis=1).astype(np.int64)
    model = FakeModel({"label": labels, "probabilities": scores})
    evalset = EvalSet(inputs=np.zeros((500, 2), np.float32), expected=truth)
    metrics = compute_metrics(model, evalset)
    assert metrics == pytest.approx(
        {
            "accuracy": accuracy_score(truth, labels),
            "f1": f1_score(truth, labels, average="macro"),
            "auc": roc_auc_score(truth, scores, multi_class="ovr", average="macro"),
        },
        abs=1e-6,
    )


def test_binary_metrics_and_regression_metrics_match_scikit_learn() -> None:
    rng = np.random.default_rng(4)
    truth = rng.integers(0, 2, 300)
    p1 = np.clip(truth * 0.3 + rng.random(300) * 0.7, 0, 1)
    scores = np.stack([1 - p1, p1], axis=1).astype(np.float32)
    binary = compute_metrics(
        FakeModel({"probabilities": scores}),
        EvalSet(inputs=np.zeros((300, 2), np.float32), expected=truth),
    )
    predicted = np.argmax(scores, axis=1)
    assert binary == pytest.approx(
        {
            "accuracy": accuracy_score(truth, predicted),
            "f1": f1_score(truth, predicted),
            "auc": roc_auc_score(truth, scores[:, 1]),
        },
        abs=1e-6,
    )
    target = rng.random(300)
    guess = (target + rng.normal(0, 0.1, 300)).astype(np.float32)
    regression = compute_metrics(
        FakeModel({"y": guess.reshape(300, 1)}),
        EvalSet(inputs=np.zeros((300, 2), np.float32), expected=target),
    )
    assert regression == pytest.approx(
        {
            "rmse": float(np.sqrt(np.mean((guess - target) ** 2))),
            "mae": mean_absolute_error(target, guess),
        },
        abs=1e-6,
    )


def test_rows_that_do_not_fit_the_model_are_a_clear_error() -> None:
    model = FakeModel({"label": np.zeros(3, np.int64)}, inputs=4)
    with pytest.raises(InvalidInput, match=r"takes \[-1, 4\]"):
        compute_metrics(model, EvalSet(inputs=np.zeros((3, 2), np.float32), expected=np.zeros(3)))


def npy_header(shape: tuple[int, ...]) -> bytes:
    """The magic string and header of an .npy file declaring ``shape`` float64 values."""
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        out, {"descr": "<f8", "fortran_order": False, "shape": shape}
    )
    return out.getvalue()


def test_an_array_claiming_more_than_it_holds_is_refused_before_numpy_allocates_it() -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("inputs.npy", npy_header((10**12, 4)) + b"\0" * 64)
        archive.writestr("expected.npy", npy_header((10**12,)) + b"\0" * 64)
    with pytest.raises(InvalidInput, match="shorter than they claim"):
        read_evalset(buffer.getvalue(), max_unpacked=1 << 20, max_elements=10**15)
