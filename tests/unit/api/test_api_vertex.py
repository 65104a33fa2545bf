"""Vertex AI's custom-container contract: the body codec and the AIP_* settings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import orjson
import pytest
from pydantic import ValidationError

from modelkeep.api.vertex._codec import decode_vertex, encode_vertex
from modelkeep.errors import InvalidInput, TooLarge
from modelkeep.runtime.signature import ModelSignature, TensorSpec
from modelkeep.settings import Settings

IRIS = ModelSignature(
    inputs=(TensorSpec("input", "FP32", (-1, 4)),),
    outputs=(
        TensorSpec("label", "INT64", (-1,)),
        TensorSpec("probabilities", "FP32", (-1, 3)),
    ),
)


def body(document: object) -> bytes:
    return json.dumps(document).encode()


def test_instances_and_parameters_decode_as_rows() -> None:
    request = decode_vertex(
        body({"instances": [[1, 2, 3, 4], [5, 6, 7, 8]], "parameters": {"x": 1}}), IRIS, 100
    )
    np.testing.assert_array_equal(request.inputs["input"], [[1, 2, 3, 4], [5, 6, 7, 8]])
    assert request.output_names() is None


def test_predictions_are_one_object_per_instance() -> None:
    request = decode_vertex(body({"instances": [[1, 2, 3, 4]]}), IRIS, 100)
    outputs = {
        "label": np.array([2]),
        "probabilities": np.array([[0.1, 0.2, 0.7]], dtype=np.float32),
    }
    assert orjson.loads(encode_vertex(request, outputs)) == {
        "predictions": [{"label": 2, "probabilities": [0.1, 0.2, 0.7]}]
    }


@pytest.mark.parametrize(
    "document",
    [
        {},
        {"instances": []},
        {"instances": [[1, 2, 3, 4]], "parameters": [1]},
        {"instances": [[1, 2, 3, 4]], "inputs": [[1, 2, 3, 4]]},
        {"instances": "x"},
        [1],
    ],
)
def test_bodies_outside_the_contract_are_refused(document: object) -> None:
    with pytest.raises(InvalidInput):
        decode_vertex(body(document), IRIS, 100)


def test_the_element_limit_applies_before_any_tensor() -> None:
    with pytest.raises(TooLarge):
        decode_vertex(body({"instances": [[1, 2, 3, 4]] * 3}), IRIS, 11)


def test_aip_variables_set_the_routes_and_the_port(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AIP_HTTP_PORT", "8080")
    monkeypatch.setenv("MODELKEEP_PORT", "9443")
    monkeypatch.setenv("AIP_PREDICT_ROUTE", "/v1/endpoints/1/deployedModels/2:predict")
    monkeypatch.setenv("AIP_HEALTH_ROUTE", "/v1/endpoints/1/deployedModels/2")
    monkeypatch.setenv("MODELKEEP_VERTEX_MODEL", "iris")
    settings = Settings(data_dir=tmp_path)
    assert (settings.port, settings.vertex_model) == (8080, "iris")
    assert settings.vertex_predict_route == "/v1/endpoints/1/deployedModels/2:predict"
    assert settings.vertex_health_route == "/v1/endpoints/1/deployedModels/2"
    # An explicit --port still wins over the environment.
    assert Settings(data_dir=tmp_path, port=7000).port == 7000


def test_without_aip_variables_nothing_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("AIP_HTTP_PORT", "AIP_PREDICT_ROUTE", "AIP_HEALTH_ROUTE", "MODELKEEP_PORT"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings(data_dir=tmp_path)
    assert (settings.port, settings.vertex_predict_route, settings.vertex_health_route) == (
        8443,
        None,
        None,
    )


@pytest.mark.parametrize(
    ("routes", "model"),
    [
        ({"vertex_predict_route": "/predict"}, None),
        ({"vertex_predict_route": "/api/v1/keys"}, "iris"),
        ({"vertex_health_route": "/v2/health/ready"}, None),
        ({"vertex_predict_route": "no-slash"}, "iris"),
    ],
)
def test_vertex_routes_need_a_model_and_must_not_hide_modelkeeps(
    tmp_path: Path, routes: dict[str, str], model: str | None
) -> None:
    with pytest.raises(ValidationError):
        Settings(data_dir=tmp_path, vertex_model=model, **routes)
