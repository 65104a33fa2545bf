"""scikit-learn estimators served from skops bytes: allow-list, signature, predictions."""

from __future__ import annotations

import functools
import io
import zipfile
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import skops.io as sio
from sklearn.datasets import load_iris
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler

from modelkeep.errors import ConfigError, InternalError, InvalidInput, ModelRefused
from modelkeep.runtime.base import RUN_FAILED, LoadedModel
from modelkeep.runtime.signature import ModelSignature, TensorSpec
from modelkeep.runtime.skops_runtime import SkopsModel

X, Y = load_iris(return_X_y=True)
X32 = X.astype(np.float32)
NAMES = np.array(["setosa", "versicolor", "virginica"])
INPUT = TensorSpec(name="input", datatype="FP32", shape=(-1, 4))


@pytest.fixture(scope="module")
def logistic() -> LogisticRegression:
    return LogisticRegression(max_iter=500).fit(X, Y)


@pytest.fixture(scope="module")
def logistic_model(logistic: LogisticRegression) -> SkopsModel:
    return SkopsModel.load(sio.dumps(logistic))


@pytest.fixture(scope="module")
def pipeline() -> Pipeline:
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)).fit(X, NAMES[Y])


@pytest.fixture(scope="module")
def partial_bytes() -> bytes:
    """A pipeline whose first step holds a functools.partial, a type skops does not trust."""
    step = FunctionTransformer(functools.partial(np.multiply, 2.0))
    data: bytes = sio.dumps(make_pipeline(step, LogisticRegression(max_iter=500)).fit(X, Y))
    return data


def _refusal(data: bytes, trusted_types: tuple[str, ...] = ()) -> str:
    with pytest.raises(ModelRefused) as caught:
        SkopsModel.load(data, trusted_types=trusted_types)
    return caught.value.message


# --- signature and predictions -----------------------------------------------------------------


def test_classifier_signature_has_int_label_and_probabilities(logistic_model: SkopsModel) -> None:
    expected = ModelSignature(
        inputs=(INPUT,),
        outputs=(
            TensorSpec(name="label", datatype="INT64", shape=(-1,)),
            TensorSpec(name="probabilities", datatype="FP32", shape=(-1, 3)),
        ),
    )
    assert expected == logistic_model.signature
    assert isinstance(logistic_model, LoadedModel)


def test_classifier_predictions_equal_sklearn(
    logistic: LogisticRegression, logistic_model: SkopsModel
) -> None:
    outputs = logistic_model.run({"input": X32})
    as_served = X32.astype(np.float64)  # the runtime widens FP32 exactly, as here
    assert np.int64 == outputs["label"].dtype
    assert logistic.predict(as_served).tolist() == outputs["label"].tolist()
    np.testing.assert_array_equal(
        logistic.predict_proba(as_served).astype(np.float32), outputs["probabilities"]
    )


def test_pipeline_with_string_classes_serves_bytes_labels(pipeline: Pipeline) -> None:
    model = SkopsModel.load(sio.dumps(pipeline))
    assert TensorSpec(name="label", datatype="BYTES", shape=(-1,)) == model.signature.outputs[0]
    labels = model.run({"input": X32[45:55]}, ["label"])["label"]
    assert object == labels.dtype
    assert {str} == {type(label) for label in labels}
    assert pipeline.predict(X32[45:55].astype(np.float64)).tolist() == labels.tolist()


def test_regressor_serves_fp64_label_only() -> None:
    regressor = LinearRegression().fit(X, X[:, 0] * 2.0)
    model = SkopsModel.load(sio.dumps(regressor))
    expected = (TensorSpec(name="label", datatype="FP64", shape=(-1,)),)
    assert expected == model.signature.outputs
    np.testing.assert_array_equal(
        regressor.predict(X32[:7].astype(np.float64)), model.run({"input": X32[:7]})["label"]
    )


def test_output_names_select_outputs(logistic_model: SkopsModel) -> None:
    assert list(logistic_model.run({"input": X32[:2]}, ["probabilities"])) == ["probabilities"]
    with pytest.raises(InvalidInput, match="unknown output 'scores'"):
        logistic_model.run({"input": X32[:2]}, ["scores"])


def test_empty_batch_returns_empty_outputs(logistic_model: SkopsModel) -> None:
    outputs = logistic_model.run({"input": np.zeros((0, 4), dtype=np.float32)})
    assert {k: v.shape for k, v in outputs.items()} == {"label": (0,), "probabilities": (0, 3)}


def test_estimator_errors_become_invalid_input(logistic_model: SkopsModel) -> None:
    rows = X32[:2].copy()
    rows[0, 0] = np.nan  # LogisticRegression refuses NaN with its own ValueError
    with pytest.raises(InvalidInput) as caught:
        logistic_model.run({"input": rows})
    assert caught.value.message == RUN_FAILED


def test_wrong_width_or_dtype_is_invalid_input(logistic_model: SkopsModel) -> None:
    with pytest.raises(InvalidInput, match=r"shape \[-1, 4\]"):
        logistic_model.run({"input": np.zeros((1, 5), dtype=np.float32)})
    with pytest.raises(InvalidInput, match="FP32"):
        logistic_model.run({"input": np.zeros((1, 4), dtype=np.float64)})


def test_concurrent_runs_return_the_same_as_one_run(logistic_model: SkopsModel) -> None:
    expected = logistic_model.run({"input": X32})["probabilities"]

    def one(_: int) -> Any:
        return logistic_model.run({"input": X32})["probabilities"]

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(one, range(32)))
    assert all(np.array_equal(expected, result) for result in results)


# --- what is refused ---------------------------------------------------------------------------


def test_untrusted_type_is_refused_and_named(partial_bytes: bytes) -> None:
    message = _refusal(partial_bytes)
    assert "functools.partial" in message
    assert "not approved" in message


def test_untrusted_type_is_refused_when_other_types_are_approved(partial_bytes: bytes) -> None:
    assert "functools.partial" in _refusal(partial_bytes, ("collections.OrderedDict",))


def test_type_approved_by_the_scan_is_loaded(partial_bytes: bytes) -> None:
    model = SkopsModel.load(partial_bytes, trusted_types=("functools.partial",))
    assert model.run({"input": X32[:3]})["label"].shape == (3,)


@pytest.mark.parametrize(
    "data",
    [b"", b"not a zip at all", b"PK\x03\x04truncated"],
    ids=["empty", "garbage", "truncated-zip"],
)
def test_bytes_that_are_not_skops_are_refused(data: bytes) -> None:
    assert "not a skops model" in _refusal(data)


def test_a_zip_that_is_not_skops_is_refused() -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("readme.txt", "hello")
    assert "not a skops model" in _refusal(buffer.getvalue())


def test_object_without_predict_is_refused() -> None:
    assert "no predict method" in _refusal(sio.dumps(StandardScaler().fit(X)))


def test_trusted_types_as_one_string_is_a_caller_bug(partial_bytes: bytes) -> None:
    with pytest.raises(InternalError):
        SkopsModel.load(partial_bytes, trusted_types="functools.partial")


def test_negative_thread_count_is_a_config_error(logistic: LogisticRegression) -> None:
    with pytest.raises(ConfigError):
        SkopsModel.load(sio.dumps(logistic), threads=-1)
