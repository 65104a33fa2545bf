"""Format dispatch and the push-time inspection (load + smoke run + output check)."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import lightgbm as lgb
import numpy as np
import pytest
import skops.io as sio
import xgboost as xgb
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer, OneHotEncoder

from modelkeep.errors import ConfigError, ModelRefused
from modelkeep.runtime import loader
from modelkeep.runtime.base import FORMATS, LoadedModel
from modelkeep.runtime.lightgbm_runtime import LightGBMModel
from modelkeep.runtime.loader import inspect_model, load_model
from modelkeep.runtime.onnx import OnnxModel, inspect_onnx
from modelkeep.runtime.signature import ModelSignature, TensorSpec
from modelkeep.runtime.skops_runtime import SkopsModel
from modelkeep.runtime.xgboost_runtime import XGBoostModel
from modelkeep.testing import build_iris_onnx

X, Y = load_iris(return_X_y=True)


@pytest.fixture(scope="module")
def artifacts() -> dict[str, bytes]:
    """One tiny iris model per served format."""
    booster = xgb.train(
        {"objective": "multi:softprob", "num_class": 3, "max_depth": 2, "nthread": 1},
        xgb.DMatrix(X, label=Y),
        num_boost_round=2,
    )
    gbm = lgb.train(
        {"objective": "multiclass", "num_class": 3, "verbose": -1, "min_data_in_leaf": 5},
        lgb.Dataset(X, label=Y),
        num_boost_round=2,
    )
    return {
        "onnx": build_iris_onnx(),
        "skops": sio.dumps(LogisticRegression(max_iter=500).fit(X, Y)),
        "xgboost-json": bytes(booster.save_raw("json")),
        "xgboost-ubj": bytes(booster.save_raw("ubj")),
        "lightgbm-text": gbm.model_to_string().encode(),
    }


RUNTIMES = {
    "onnx": OnnxModel,
    "skops": SkopsModel,
    "xgboost-json": XGBoostModel,
    "xgboost-ubj": XGBoostModel,
    "lightgbm-text": LightGBMModel,
}


def test_every_format_has_a_runtime() -> None:
    assert set(FORMATS) == set(RUNTIMES)


@pytest.mark.parametrize("fmt", FORMATS)
def test_load_model_dispatches_on_format(artifacts: dict[str, bytes], fmt: str) -> None:
    model = load_model(fmt, artifacts[fmt], threads=1)
    assert RUNTIMES[fmt] is type(model)
    assert isinstance(model, LoadedModel)


@pytest.mark.parametrize("fmt", FORMATS)
def test_inspect_model_returns_the_served_signature(artifacts: dict[str, bytes], fmt: str) -> None:
    assert load_model(fmt, artifacts[fmt]).signature == inspect_model(fmt, artifacts[fmt])


def test_inspect_model_agrees_with_inspect_onnx(artifacts: dict[str, bytes]) -> None:
    assert inspect_onnx(artifacts["onnx"]) == inspect_model("onnx", artifacts["onnx"])


def test_unknown_format_is_refused_with_the_served_list(artifacts: dict[str, bytes]) -> None:
    with pytest.raises(ModelRefused) as caught:
        load_model("pickle", artifacts["skops"])
    assert "unknown model format 'pickle'" in caught.value.message
    assert "lightgbm-text" in caught.value.message
    with pytest.raises(ModelRefused, match="unknown model format"):
        inspect_model("keras", artifacts["skops"])


@pytest.mark.parametrize("fmt", ["xgboost-json", "lightgbm-text", "skops"])
def test_bytes_of_another_format_are_refused(artifacts: dict[str, bytes], fmt: str) -> None:
    with pytest.raises(ModelRefused):
        inspect_model(fmt, artifacts["onnx"])


@pytest.mark.parametrize("fmt", FORMATS)
def test_negative_thread_count_is_a_config_error(artifacts: dict[str, bytes], fmt: str) -> None:
    with pytest.raises(ConfigError):
        load_model(fmt, artifacts[fmt], threads=-1)


def test_trusted_types_reach_the_skops_runtime() -> None:
    # functools.partial is outside skops' defaults: refused unless the caller approves it.
    step = FunctionTransformer(functools.partial(np.multiply, 2.0))
    data = sio.dumps(make_pipeline(step, LogisticRegression(max_iter=500)).fit(X, Y))
    with pytest.raises(ModelRefused, match=r"functools\.partial"):
        inspect_model("skops", data)
    signature = inspect_model("skops", data, trusted_types=["functools.partial"])
    assert signature.outputs[0].name == "label"


def test_model_failing_the_zero_batch_is_refused() -> None:
    # Every feature is seen only as 1..9 in training: zero is an unknown category.
    codes = np.rint(X) + 1
    encoder = OneHotEncoder(handle_unknown="error")
    data = sio.dumps(make_pipeline(encoder, LogisticRegression(max_iter=500)).fit(codes, Y))
    with pytest.raises(ModelRefused) as caught:
        inspect_model("skops", data)
    assert "trial prediction on a zero batch of shape [1, 4]" in caught.value.message


class _Lying:
    """A runtime whose output disagrees with its own signature."""

    def __init__(self, datatype: str, shape: tuple[int, ...], value: np.ndarray) -> None:
        self.signature = ModelSignature(
            inputs=(TensorSpec(name="input", datatype="FP32", shape=(-1, 2)),),
            outputs=(TensorSpec(name="y", datatype=datatype, shape=shape),),
        )
        self._value = value

    def run(
        self, inputs: Mapping[str, np.ndarray], output_names: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        assert inputs["input"].shape == (1, 2)
        return {"y": self._value}


@pytest.mark.parametrize(
    ("datatype", "shape", "value", "expected"),
    [
        ("FP32", (-1,), np.zeros(1, dtype=np.float64), "has numpy dtype <f8, not FP32"),
        ("FP32", (-1, 3), np.zeros((1, 2), dtype=np.float32), "has shape [1, 2], not [-1, 3]"),
        ("FP32", (-1,), np.zeros((1, 1), dtype=np.float32), "has shape [1, 1], not [-1]"),
    ],
    ids=["dtype", "width", "rank"],
)
def test_outputs_that_contradict_the_signature_are_refused(
    monkeypatch: pytest.MonkeyPatch,
    datatype: str,
    shape: tuple[int, ...],
    value: np.ndarray,
    expected: str,
) -> None:
    lying = _Lying(datatype, shape, value)
    monkeypatch.setattr(loader, "load_model", lambda *args, **kwargs: lying)
    with pytest.raises(ModelRefused) as caught:
        inspect_model("onnx", b"unused")
    assert expected in caught.value.message
