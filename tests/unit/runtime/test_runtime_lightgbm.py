"""LightGBM boosters served from the text format: signature, predictions, malformed files refused.

Several malformed files here (a truncated file, a child index out of range) make LightGBM read
past its buffer or abort the interpreter if it ever parses them, so a missing check fails this
file loudly.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import lightgbm as lgb
import numpy as np
import pytest
from sklearn.datasets import load_iris

from modelkeep.errors import ConfigError, InvalidInput, ModelRefused
from modelkeep.runtime.base import LoadedModel
from modelkeep.runtime.lightgbm_runtime import LightGBMModel
from modelkeep.runtime.signature import ModelSignature, TensorSpec

X, Y = load_iris(return_X_y=True)
X32 = X.astype(np.float32)
INPUT = TensorSpec(name="input", datatype="FP32", shape=(-1, 4))


def _train(data: np.ndarray, label: np.ndarray, **params: Any) -> lgb.Booster:
    params = {"verbose": -1, "num_threads": 1, "min_data_in_leaf": 5, **params}
    return lgb.train(params, lgb.Dataset(data, label=label), num_boost_round=3)


@pytest.fixture(scope="module")
def multiclass() -> lgb.Booster:
    return _train(X, Y, objective="multiclass", num_class=3)


@pytest.fixture(scope="module")
def regression() -> lgb.Booster:
    return _train(X, X[:, 0], objective="regression")


@pytest.fixture(scope="module")
def categorical() -> tuple[lgb.Booster, np.ndarray]:
    """A regression whose first trees split on a categorical feature (num_cat > 0)."""
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 12, 600)
    noise = rng.normal(size=600)
    data = np.column_stack([codes, noise]).astype(np.float32)
    params = {"max_cat_to_onehot": 2, "min_data_per_group": 5, "cat_smooth": 1}
    dataset = lgb.Dataset(data, label=(codes % 3) * 2.0 + noise, categorical_feature=[0])
    booster = lgb.train({"verbose": -1, "objective": "regression", **params}, dataset, 3)
    return booster, data


def _text(booster: lgb.Booster) -> str:
    text: str = booster.model_to_string()
    return text


def _own(booster: lgb.Booster, data: np.ndarray) -> np.ndarray:
    """LightGBM's own prediction for ``data``."""
    return np.asarray(booster.predict(data))


def _refusal(data: bytes) -> str:
    with pytest.raises(ModelRefused) as caught:
        LightGBMModel.load(data)
    return caught.value.message


def _edit_tree(model: str, tree: int, edit: Callable[[str], str]) -> bytes:
    """Rewrite one tree block and fix tree_sizes, so only the edited field is wrong."""
    data = model.encode()
    start = data.index(b"\nTree=0\n") + 1
    header = data[:start].decode()
    found = re.search(r"^tree_sizes=(.*)$", header, re.M)
    assert found is not None
    blocks, pos = [], start
    for size in (int(token) for token in found.group(1).split()):
        blocks.append(data[pos : pos + size])
        pos += size
    blocks[tree] = edit(blocks[tree].decode()).encode()
    sizes = " ".join(str(len(block)) for block in blocks)
    header = re.sub(r"^tree_sizes=.*$", f"tree_sizes={sizes}", header, flags=re.M)
    return header.encode() + b"".join(blocks) + data[pos:]


def _field(key: str, change: Callable[[list[str]], list[str]]) -> Callable[[str], str]:
    def edit(block: str) -> str:
        found = re.search(rf"^{key}=(.*)$", block, re.M)
        assert found is not None
        value = " ".join(change(found.group(1).split()))
        return block[: found.start()] + f"{key}={value}" + block[found.end() :]

    return edit


# --- signature and predictions -----------------------------------------------------------------


def test_multiclass_signature_and_predictions(multiclass: lgb.Booster) -> None:
    model = LightGBMModel.load(_text(multiclass).encode())
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
    own = _own(multiclass, X32)
    np.testing.assert_array_equal(own.astype(np.float32), outputs["predictions"])
    assert np.argmax(own, axis=1).tolist() == outputs["label"].tolist()


def test_regression_signature_and_predictions(regression: lgb.Booster) -> None:
    model = LightGBMModel.load(_text(regression).encode())
    expected = (TensorSpec(name="predictions", datatype="FP32", shape=(-1,)),)
    assert expected == model.signature.outputs
    np.testing.assert_array_equal(
        _own(regression, X32).astype(np.float32), model.run({"input": X32})["predictions"]
    )


def test_binary_label_is_probability_above_half() -> None:
    booster = _train(X, (Y == 1).astype(np.int64), objective="binary")
    outputs = LightGBMModel.load(_text(booster).encode()).run({"input": X32})
    assert (_own(booster, X32) > 0.5).astype(np.int64).tolist() == outputs["label"].tolist()


def test_categorical_model_is_served(categorical: tuple[lgb.Booster, np.ndarray]) -> None:
    booster, data = categorical
    assert "num_cat=2" in _text(booster)  # the fixture really holds categorical splits
    model = LightGBMModel.load(_text(booster).encode())
    np.testing.assert_array_equal(
        _own(booster, data).astype(np.float32), model.run({"input": data})["predictions"]
    )


def test_linear_tree_model_is_served() -> None:
    rng = np.random.default_rng(1)
    data = rng.normal(size=(400, 3)).astype(np.float32)
    target = 3 * data[:, 0] + np.where(data[:, 1] > 0, 2 * data[:, 2], -data[:, 2])
    booster = _train(data, target, objective="regression", linear_tree=True, min_data_in_leaf=20)
    model = LightGBMModel.load(_text(booster).encode())
    np.testing.assert_array_equal(
        _own(booster, data).astype(np.float32), model.run({"input": data})["predictions"]
    )


def test_output_names_and_empty_batch(multiclass: lgb.Booster) -> None:
    model = LightGBMModel.load(_text(multiclass).encode())
    assert list(model.run({"input": X32[:2]}, ["predictions"])) == ["predictions"]
    empty = model.run({"input": np.zeros((0, 4), dtype=np.float32)})
    assert {k: v.shape for k, v in empty.items()} == {"predictions": (0, 3), "label": (0,)}
    with pytest.raises(InvalidInput, match="unknown output"):
        model.run({"input": X32[:2]}, ["probabilities"])


def test_concurrent_runs_return_the_same_as_one_run(multiclass: lgb.Booster) -> None:
    model = LightGBMModel.load(_text(multiclass).encode())
    expected = model.run({"input": X32})["predictions"]

    def one(_: int) -> Any:
        return model.run({"input": X32})["predictions"]

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(one, range(32)))
    assert all(np.array_equal(expected, result) for result in results)


# --- what is refused ---------------------------------------------------------------------------


def test_edit_helper_rebuilds_an_untouched_model_byte_for_byte(regression: lgb.Booster) -> None:
    text = _text(regression)
    assert text.encode() == _edit_tree(text, 0, lambda block: block)


@pytest.mark.parametrize(
    "data", [b"", b"garbage", b"tree\n"], ids=["empty", "garbage", "header-only"]
)
def test_bad_bytes_are_refused(data: bytes) -> None:
    assert "LightGBM" in _refusal(data)


def test_json_dump_is_refused_as_not_text(regression: lgb.Booster) -> None:
    assert "not a LightGBM text model" in _refusal(json.dumps(regression.dump_model()).encode())


def test_truncated_file_is_refused(multiclass: lgb.Booster) -> None:
    text = _text(multiclass)
    assert "truncated" in _refusal(text[: text.index("Tree=4")].encode())


def test_crlf_file_is_refused(regression: lgb.Booster) -> None:
    assert "CR line ends" in _refusal(_text(regression).replace("\n", "\r\n").encode())


def test_tree_sizes_off_by_one_is_refused(regression: lgb.Booster) -> None:
    text = _text(regression)
    found = re.search(r"^tree_sizes=(\d+)", text, re.M)
    assert found is not None
    shifted = text.replace(found.group(0), f"tree_sizes={int(found.group(1)) + 1}", 1)
    assert "not where tree_sizes says" in _refusal(shifted.encode())


def test_header_objective_must_agree_on_num_class(multiclass: lgb.Booster) -> None:
    text = _text(multiclass).replace(
        "objective=multiclass num_class:3", "objective=multiclass num_class:5"
    )
    assert "num_class disagrees" in _refusal(text.encode())


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (_field("left_child", lambda t: ["999", *t[1:]]), "does not exist"),
        (_field("left_child", lambda t: ["0", *t[1:]]), "does not exist"),  # cycle to root
        (_field("right_child", lambda t: [t[0], t[0], *t[2:]]), "two parents"),
        (_field("split_feature", lambda t: ["4", *t[1:]]), "feature the model does not have"),
        (_field("split_feature", lambda t: ["-1", *t[1:]]), "feature the model does not have"),
        (_field("threshold", lambda t: t[1:]), "values instead of"),
        (_field("left_child", lambda t: ["1\t2", *t[1:]]), "other than numbers"),
        (lambda block: block.replace("num_cat=0", "num_cat0"), "not key=value"),
        (lambda block: block.rstrip("\n") + "\n", "blank line"),
    ],
    ids=[
        "child-out-of-range",
        "child-is-root",
        "shared-child",
        "feature-4",
        "negative-feature",
        "short-threshold",
        "tab-in-number",
        "line-without-equals",
        "no-blank-line",
    ],
)
def test_malformed_trees_are_refused(
    regression: lgb.Booster, edit: Callable[[str], str], expected: str
) -> None:
    message = _refusal(_edit_tree(_text(regression), 0, edit))
    assert "malformed" in message
    assert expected in message


def test_categorical_split_needs_its_category_set(
    categorical: tuple[lgb.Booster, np.ndarray],
) -> None:
    booster, _ = categorical
    edit = _field("threshold", lambda t: ["5", *t[1:]])  # node 0 splits on category set 5 of 2
    assert "without its category set" in _refusal(_edit_tree(_text(booster), 0, edit))


def test_negative_thread_count_is_a_config_error(regression: lgb.Booster) -> None:
    with pytest.raises(ConfigError):
        LightGBMModel.load(_text(regression).encode(), threads=-1)
