"""The model builders shipped in modelkeep.testing."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import onnx
from onnx import TensorProto
from sklearn.datasets import load_iris

from modelkeep.testing import (
    build_custom_domain_onnx,
    build_external_data_onnx,
    build_iris_onnx,
    build_slow_onnx,
    iris_rows,
)

_DIGEST = (
    "import hashlib, sys\n"
    "from modelkeep.testing import build_iris_onnx\n"
    "sys.stdout.write(hashlib.sha256(build_iris_onnx(seed=3)).hexdigest())\n"
)


def test_iris_bytes_are_identical_across_processes_and_hash_seeds() -> None:
    digests = set()
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        result = subprocess.run(
            [sys.executable, "-c", _DIGEST], env=env, capture_output=True, check=True, text=True
        )
        digests.add(result.stdout)
    digests.add(hashlib.sha256(build_iris_onnx(seed=3)).hexdigest())
    assert len(digests) == 1


def test_different_seeds_give_different_models() -> None:
    assert build_iris_onnx(seed=0) != build_iris_onnx(seed=1)


def test_iris_model_has_no_zipmap_and_renamed_outputs() -> None:
    model = onnx.load_model_from_string(build_iris_onnx())
    assert [value.name for value in model.graph.input] == ["input"]
    assert [value.name for value in model.graph.output] == ["label", "probabilities"]
    assert "ZipMap" not in {node.op_type for node in model.graph.node}


def test_the_first_150_iris_rows_are_the_whole_dataset_once() -> None:
    expected = sorted(load_iris().data.tolist())
    assert expected == sorted(iris_rows(150))


def test_iris_rows_from_four_cover_every_species() -> None:
    iris = load_iris()
    data = iris.data.tolist()
    species = {int(iris.target[data.index(row)]) for row in iris_rows(4)}
    assert {0, 1, 2} == species


def test_iris_rows_wrap_around_past_the_dataset() -> None:
    assert iris_rows(151)[150] == iris_rows(1)[0]


def test_custom_domain_model_uses_com_example() -> None:
    model = onnx.load_model_from_string(build_custom_domain_onnx())
    assert {"com.example"} == {node.domain for node in model.graph.node}


def test_external_data_model_claims_an_external_initializer() -> None:
    model = onnx.load_model_from_string(build_external_data_onnx())
    (weight,) = model.graph.initializer
    assert weight.data_location == TensorProto.EXTERNAL
    assert {entry.key: entry.value for entry in weight.external_data}["location"] == "weights.bin"


def test_slow_model_runs_a_batch_and_its_bytes_are_fixed() -> None:
    import numpy as np

    from modelkeep.runtime.onnx import OnnxModel

    assert build_slow_onnx(64) == build_slow_onnx(64)
    model = OnnxModel.load(build_slow_onnx(64))
    (scores,) = model.run({"input": np.ones((5, 4), dtype=np.float32)}).values()
    assert scores.shape == (5, 3)
    assert scores.dtype == np.float32
