"""XGBoost boosters served from JSON/UBJSON: signature, predictions, malformed trees refused.

The malformed-tree cases crash the interpreter (segmentation fault) if XGBoost ever predicts
with them, so a missing check fails this file loudly rather than quietly.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import xgboost as xgb
from sklearn.datasets import load_iris

from modelkeep.errors import ConfigError, InvalidInput, ModelRefused
from modelkeep.runtime._ubjson import load_ubjson
from modelkeep.runtime.base import LoadedModel
from modelkeep.runtime.signature import ModelSignature, TensorSpec
from modelkeep.runtime.xgboost_runtime import XGBoostModel, _check_document

X, Y = load_iris(return_X_y=True)
X32 = X.astype(np.float32)
INPUT = TensorSpec(name="input", datatype="FP32", shape=(-1, 4))


def _train(objective: str, label: np.ndarray, **params: Any) -> xgb.Booster:
    params = {"objective": objective, "nthread": 1, **params}
    if params.get("booster") != "gblinear":
        params["max_depth"] = 2
    return xgb.train(params, xgb.DMatrix(X, label=label), num_boost_round=3)


@pytest.fixture(scope="module")
def softprob() -> xgb.Booster:
    return _train("multi:softprob", Y, num_class=3)


@pytest.fixture(scope="module")
def logistic() -> xgb.Booster:
    return _train("binary:logistic", (Y == 1).astype(np.int64))


@pytest.fixture(scope="module")
def regression() -> xgb.Booster:
    return _train("reg:squarederror", X[:, 0])


def _load(booster: xgb.Booster, fmt: str = "json") -> XGBoostModel:
    return XGBoostModel.load(bytes(booster.save_raw(fmt)), fmt=fmt)  # type: ignore[arg-type]


def _refusal(data: bytes, fmt: str = "json") -> str:
    with pytest.raises(ModelRefused) as caught:
        XGBoostModel.load(data, fmt=fmt)  # type: ignore[arg-type]
    return caught.value.message


# --- signature and predictions -----------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["json", "ubj"])
def test_softprob_signature_and_predictions(softprob: xgb.Booster, fmt: str) -> None:
    model = _load(softprob, fmt)
    expected = ModelSignature(
        inputs=(INPUT,),
        outputs=(
            TensorSpec(name="predictions", datatype="FP32", shape=(-1, 3)),
            TensorSpec(name="label", datatype="INT64", shape=(-1,)),
        ),
    )
    assert expected == model.signature
    assert isinstance(model, LoadedModel)
    outputs = model.run({"input": X32})
    own = softprob.inplace_predict(X32)
    np.testing.assert_array_equal(own, outputs["predictions"])
    assert np.argmax(own, axis=1).tolist() == outputs["label"].tolist()


@pytest.mark.parametrize("fmt", ["json", "ubj"])
def test_binary_logistic_label_is_probability_above_half(logistic: xgb.Booster, fmt: str) -> None:
    model = _load(logistic, fmt)
    expected = (
        TensorSpec(name="predictions", datatype="FP32", shape=(-1,)),
        TensorSpec(name="label", datatype="INT64", shape=(-1,)),
    )
    assert expected == model.signature.outputs
    outputs = model.run({"input": X32})
    own = logistic.inplace_predict(X32)
    np.testing.assert_array_equal(own, outputs["predictions"])
    assert (own > 0.5).astype(np.int64).tolist() == outputs["label"].tolist()


@pytest.mark.parametrize("fmt", ["json", "ubj"])
def test_regression_serves_predictions_only(regression: xgb.Booster, fmt: str) -> None:
    model = _load(regression, fmt)
    expected = (TensorSpec(name="predictions", datatype="FP32", shape=(-1,)),)
    assert expected == model.signature.outputs
    np.testing.assert_array_equal(
        regression.inplace_predict(X32), model.run({"input": X32})["predictions"]
    )


def test_softmax_label_is_the_predicted_class() -> None:
    booster = _train("multi:softmax", Y, num_class=3)
    outputs = _load(booster).run({"input": X32})
    assert booster.inplace_predict(X32).astype(np.int64).tolist() == outputs["label"].tolist()


def test_output_names_and_empty_batch(softprob: xgb.Booster) -> None:
    model = _load(softprob)
    assert list(model.run({"input": X32[:2]}, ["label"])) == ["label"]
    empty = model.run({"input": np.zeros((0, 4), dtype=np.float32)})
    assert {k: v.shape for k, v in empty.items()} == {"predictions": (0, 3), "label": (0,)}
    with pytest.raises(InvalidInput, match="unknown output"):
        model.run({"input": X32[:2]}, ["probabilities"])


def test_wrong_width_is_invalid_input(regression: xgb.Booster) -> None:
    with pytest.raises(InvalidInput, match=r"shape \[-1, 4\]"):
        _load(regression).run({"input": np.zeros((2, 3), dtype=np.float32)})


def test_concurrent_runs_return_the_same_as_one_run(softprob: xgb.Booster) -> None:
    model = _load(softprob)
    expected = model.run({"input": X32})["predictions"]

    def one(_: int) -> Any:
        return model.run({"input": X32})["predictions"]

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(one, range(32)))
    assert all(np.array_equal(expected, result) for result in results)


# --- what is refused ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "fmt"),
    [(b"", "json"), (b"garbage", "json"), (b"{garbage", "ubj"), (b'{"learner": {', "json")],
    ids=["empty", "garbage-json", "garbage-ubj", "truncated-json"],
)
def test_bad_bytes_are_refused(data: bytes, fmt: str) -> None:
    assert "XGBoost" in _refusal(data, fmt)


def test_truncated_ubj_is_refused(regression: xgb.Booster) -> None:
    raw = bytes(regression.save_raw("ubj"))
    assert "truncated" in _refusal(raw[: len(raw) // 2], "ubj")


def test_declared_format_must_match_the_bytes(regression: xgb.Booster) -> None:
    assert "not an XGBoost UBJSON model" in _refusal(bytes(regression.save_raw("json")), "ubj")
    assert "not an XGBoost JSON model" in _refusal(bytes(regression.save_raw("ubj")), "json")


def test_pickled_booster_is_refused(regression: xgb.Booster) -> None:
    assert "pickled" in _refusal(pickle.dumps(regression))


def test_gblinear_is_refused_with_a_hint() -> None:
    booster = _train("reg:squarederror", X[:, 0], booster="gblinear")
    assert "gblinear" in _refusal(bytes(booster.save_raw("json")))


def _document(booster: xgb.Booster) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(bytes(booster.save_raw("json")))
    return loaded


def _tree0(document: dict[str, Any]) -> dict[str, Any]:
    booster = document["learner"]["gradient_booster"]
    trees = (booster["gbtree"] if booster["name"] == "dart" else booster)["model"]["trees"]
    tree: dict[str, Any] = trees[0]
    return tree


def _set(path: str, index: int, value: int) -> Callable[[dict[str, Any]], None]:
    def mutate(document: dict[str, Any]) -> None:
        _tree0(document)[path][index] = value

    return mutate


def _set_group(document: dict[str, Any]) -> None:
    document["learner"]["gradient_booster"]["model"]["tree_info"][0] = 7


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (_set("left_children", 0, 100_000), "does not exist"),
        (_set("left_children", 1, 0), "does not exist"),  # back to the root: a cycle
        (_set("right_children", 0, 1), "two parents"),
        (_set("split_indices", 0, -5), "feature the model does not have"),
        (_set("split_indices", 0, 4), "feature the model does not have"),
        (_set_group, "output that does not exist"),
    ],
    ids=["child-out-of-range", "cycle", "shared-child", "negative-feature", "feature-4", "group"],
)
def test_malformed_trees_are_refused_before_any_prediction(
    regression: xgb.Booster, mutate: Callable[[dict[str, Any]], None], expected: str
) -> None:
    document = _document(regression)
    mutate(document)
    message = _refusal(json.dumps(document).encode())
    assert "malformed" in message
    assert expected in message


def test_negative_thread_count_is_a_config_error(regression: xgb.Booster) -> None:
    with pytest.raises(ConfigError):
        XGBoostModel.load(bytes(regression.save_raw("json")), fmt="json", threads=-1)


def _ubj_document(booster: xgb.Booster) -> dict[str, Any]:
    document, _ = load_ubjson(booster.save_raw("ubj"))
    return _writable(document)  # type: ignore[no-any-return]


def _writable(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _writable(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_writable(item) for item in value]
    return value.copy() if isinstance(value, np.ndarray) else value


def _children_as(dtype: Any, *, shape: Callable[[int], Any] = lambda n: n) -> Callable[..., None]:
    # The tree's own left children, as another type (or shape) of array.
    def mutate(document: dict[str, Any]) -> None:
        tree = _tree0(document)
        left = np.asarray(tree["left_children"])
        if np.dtype(dtype) == np.uint64:
            values = np.where(left < 0, np.uint64(2**64 - 1), left.astype(np.uint64))
        else:
            values = left.astype(dtype)
        tree["left_children"] = values.reshape(shape(left.size))

    return mutate


def _drop_weight(document: dict[str, Any]) -> None:
    booster = document["learner"]["gradient_booster"]
    booster["weight_drop"] = booster["weight_drop"][1:]


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (_set("left_children", 0, 100_000), "does not exist"),
        (_set("left_children", 1, 0), "does not exist"),
        (_set("right_children", 0, 1), "two parents"),
        (_set("split_indices", 0, -5), "feature the model does not have"),
        (_set("split_type", 0, 2), "unknown split type"),
        (_children_as(np.float32), "holds something other than integers"),
        (_children_as(np.uint64), "holds something other than integers"),
        (_children_as(np.bool_), "holds something other than integers"),
        (_children_as(np.int32, shape=lambda n: (1, n)), "has the wrong length"),
        (_drop_weight, "dart weights do not match"),
    ],
    ids=[
        "child-out-of-range",
        "cycle",
        "shared-child",
        "negative-feature",
        "split-type",
        "float-children",
        "uint64-children",
        "bool-children",
        "2d-children",
        "dart-weights",
    ],
)
def test_the_tree_check_refuses_the_same_in_ubjson_arrays_as_in_json_lists(
    mutate: Callable[[dict[str, Any]], None], expected: str
) -> None:
    # The runtime checks XGBoost's UBJSON re-serialisation, whose typed arrays are NumPy arrays;
    # the same defects in the JSON form, as lists, are refused with the same message.
    booster = _train("reg:squarederror", X[:, 0], booster="dart", rate_drop=0.1)
    messages = []
    for document in (_document(booster), _ubj_document(booster)):
        json_lists = isinstance(_tree0(document)["left_children"], list)
        mutate(document)
        tree = _tree0(document)
        if json_lists and isinstance(tree["left_children"], np.ndarray):
            tree["left_children"] = tree["left_children"].tolist()
        with pytest.raises(ModelRefused) as caught:
            _check_document(document)
        messages.append(caught.value.message)
    assert messages[0] == messages[1]
    assert expected in messages[1]


def test_a_valid_booster_reads_the_same_from_ubjson_arrays_as_from_json_lists(
    softprob: xgb.Booster,
) -> None:
    assert _check_document(_document(softprob)) == _check_document(_ubj_document(softprob))
