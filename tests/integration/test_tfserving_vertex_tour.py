"""The tour for TensorFlow Serving REST and Vertex AI over real HTTPS: a protocol is a way in,
never around. Same answer as V2, same authentication, authorization, limits and hardening."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import numpy as np
import pytest
import requests
from harness import Server, create_key, init_server, push

from modelkeep.testing import build_iris_onnx, iris_rows

pytestmark = pytest.mark.integration

MODEL = "iris"
VERTEX_PREDICT = "/v1/endpoints/123/deployedModels/456:predict"
VERTEX_HEALTH = "/v1/endpoints/123/deployedModels/456"


def v2_body(rows: list[list[float]]) -> dict[str, object]:
    return {
        "inputs": [{"name": "input", "shape": [len(rows), 4], "datatype": "FP32", "data": rows}]
    }


@dataclass
class World:
    server: Server
    admin: httpx.Client
    consumer_key: str

    def policy(self, model: str, **policy: object) -> None:
        r = self.admin.put(f"/api/v1/models/{model}/policy", json=policy)
        assert r.status_code == 200, r.text

    def consumer(self, model: str) -> httpx.Client:
        return self.server.client(str(create_key(self.server, "consumer", [model])["key"]))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server that is also a Vertex AI container serving model ``iris``."""
    srv = init_server(tmp_path_factory.mktemp("srv"))
    srv.extra_env = {
        "AIP_PREDICT_ROUTE": VERTEX_PREDICT,
        "AIP_HEALTH_ROUTE": VERTEX_HEALTH,
        "MODELKEEP_VERTEX_MODEL": MODEL,
        # Small limits, so that hostile bodies can pass them cheaply.
        "MODELKEEP_MAX_TENSOR_ELEMENTS": "100000",
        "MODELKEEP_MAX_REQUEST_BYTES": str(4 * 1024 * 1024),
    }
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def world(server: Server) -> Iterator[World]:
    iris = build_iris_onnx()
    for name in (MODEL, "other", "rated", "hardened"):
        assert push(server, name, iris).status_code == 201
    with server.client(server.admin_key) as admin:
        # Pinned, so later pushes do not change what answers.
        r = admin.put(f"/api/v1/models/{MODEL}/labels/production", json={"version": 1})
        assert r.status_code == 200, r.text
        world = World(server, admin, "")
        for name in (MODEL, "other", "hardened"):
            world.policy(name, limits={"rate": "1000/second"})
        world.consumer_key = str(create_key(server, "consumer", [MODEL])["key"])
        yield world


def v2_outputs(client: httpx.Client, rows: list[list[float]]) -> dict[str, list[object]]:
    r = client.post(f"/v2/models/{MODEL}/infer", json=v2_body(rows))
    assert r.status_code == 200, r.text
    return {o["name"]: o["data"] for o in r.json()["outputs"]}


def test_tf_serving_predict_answers_as_v2_in_both_forms(world: World) -> None:
    rows = iris_rows(5)
    with world.server.client(world.consumer_key) as client:
        expected = v2_outputs(client, rows)
        r = client.post(f"/v1/models/{MODEL}:predict", json={"instances": rows})
        assert r.status_code == 200, r.text
        predictions = r.json()["predictions"]
        assert expected["label"] == [p["label"] for p in predictions]
        assert np.allclose(
            np.asarray(expected["probabilities"]).reshape(5, 3),
            [p["probabilities"] for p in predictions],
        )
        r = client.post(f"/v1/models/{MODEL}/labels/production:predict", json={"inputs": rows})
        assert r.status_code == 200, r.text
        assert expected["label"] == r.json()["outputs"]["label"]
        r = client.post(
            f"/v1/models/{MODEL}/versions/1:classify",
            json={"examples": [{"input": row} for row in rows]},
        )
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        assert [str(label) for label in expected["label"]] == [
            max(pairs, key=lambda pair: pair[1])[0] for pairs in results
        ]


def test_vertex_predict_answers_as_v2(world: World) -> None:
    rows = iris_rows(4)
    with world.server.client(world.consumer_key) as client:
        expected = v2_outputs(client, rows)
        r = client.post(VERTEX_PREDICT, json={"instances": rows, "parameters": {}})
        assert r.status_code == 200, r.text
        assert expected["label"] == [p["label"] for p in r.json()["predictions"]]
    # The health route is public, as /v2/health/* is.
    anonymous = httpx.get(world.server.url + VERTEX_HEALTH, verify=world.server.tls())
    assert (anonymous.status_code, anonymous.json()) == (200, {})


def test_tf_serving_client_code_as_the_docs_write_it(world: World) -> None:
    """requests, as TF Serving's REST tutorial calls it, plus the key and the CA."""
    server = world.server
    data = json.dumps({"signature_name": "serving_default", "instances": iris_rows(3)})
    headers = {"content-type": "application/json", "Authorization": f"Bearer {world.consumer_key}"}
    json_response = requests.post(
        f"{server.url}/v1/models/{MODEL}:predict",
        data=data,
        headers=headers,
        verify=str(server.ca_cert),
        timeout=30,
    )
    predictions = json.loads(json_response.text)["predictions"]
    assert len(predictions) == 3
    status = requests.get(
        f"{server.url}/v1/models/{MODEL}", headers=headers, verify=str(server.ca_cert), timeout=30
    )
    assert status.json()["model_version_status"][0]["state"] == "AVAILABLE"
    metadata = requests.get(
        f"{server.url}/v1/models/{MODEL}/metadata",
        headers=headers,
        verify=str(server.ca_cert),
        timeout=30,
    ).json()
    signature = metadata["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert signature["inputs"]["input"]["dtype"] == "DT_FLOAT"
    assert metadata["model_spec"]["version"] == "1"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", f"/v1/models/{MODEL}:predict"),
        ("POST", f"/v1/models/{MODEL}:classify"),
        ("GET", f"/v1/models/{MODEL}"),
        ("GET", f"/v1/models/{MODEL}/metadata"),
        ("POST", VERTEX_PREDICT),
    ],
)
def test_no_key_is_401_and_another_models_key_is_403_revealing_nothing(
    world: World, method: str, path: str
) -> None:
    server = world.server
    body = {"instances": iris_rows(1)}
    with httpx.Client(base_url=server.url, verify=server.tls()) as anonymous:
        r = anonymous.request(method, path, json=body if method == "POST" else None)
    assert (r.status_code, r.json()) == (401, {"error": "missing credentials"})
    assert r.headers["WWW-Authenticate"].startswith("Bearer")
    if path == VERTEX_PREDICT:
        return  # the Vertex route names no model: nothing to compare with
    with world.consumer("other") as stranger:
        existing = stranger.request(method, path, json=body if method == "POST" else None)
        missing = stranger.request(
            method, path.replace(MODEL, "no-such-model"), json=body if method == "POST" else None
        )
    assert existing.status_code == 403
    assert (existing.status_code, existing.json()) == (missing.status_code, missing.json())


HOSTILE = [
    b"",
    b"garbage",
    b"[1, 2, 3]",
    b'{"instances": ' + b"[" * 200_000 + b"]" * 200_000 + b"}",
    # More elements than the limit (413 before any tensor), and more bytes than the body limit.
    b'{"instances": [' + b"[1.0, 2.0, 3.0, 4.0]," * 30_000 + b"[1.0, 2.0, 3.0, 4.0]]}",
    b'{"instances": [' + b"[1.0, 2.0, 3.0, 4.0]," * 250_000 + b"[1.0, 2.0, 3.0, 4.0]]}",
    b'{"instances": [["a", "b", "c", "d"]]}',
    b'{"instances": [[1, 2, 3, 4]], "inputs": [[1, 2, 3, 4]]}',
    b'{"instances": [{"b64": "!!!"}]}',
    b'{"inputs": {"input": [[{"b64": "AAAA"}, 2, 3, 4]]}}',
    b'{"instances": [[1e999, 2, 3, 4]]}',
    b'{"signature_name": "predict_images", "instances": [[1, 2, 3, 4]]}',
    b'{"examples": [{"input": [1, 2, 3, 4]}], "context": 7}',
]


@pytest.mark.parametrize("raw", HOSTILE, ids=range(len(HOSTILE)))
@pytest.mark.parametrize(
    "path",
    [f"/v1/models/{MODEL}:predict", f"/v1/models/{MODEL}:classify", VERTEX_PREDICT],
)
def test_hostile_bodies_are_4xx_never_5xx(world: World, raw: bytes, path: str) -> None:
    with world.server.client(world.server.admin_key) as client:
        r = client.post(path, content=raw, headers={"Content-Type": "application/json"})
    if raw.startswith(b'{"instances": [[1e999'):
        # An infinite input is a valid float (IEEE), so this one may be answered.
        assert r.status_code < 500, r.text[:300]
        return
    assert 400 <= r.status_code < 500, r.text[:300]
    assert list(r.json()) == ["error"]
    assert "Traceback" not in r.text


def test_an_over_rate_caller_gets_429(world: World) -> None:
    world.policy("rated", limits={"rate": "3/minute"})
    with world.consumer("rated") as client:
        statuses = [
            client.post("/v1/models/rated:predict", json={"instances": iris_rows(1)}).status_code
            for _ in range(5)
        ]
        r = client.post("/v1/models/rated:predict", json={"instances": iris_rows(1)})
    assert statuses == [200, 200, 200, 429, 429]
    assert r.status_code == 429
    assert list(r.json()) == ["error"]
    assert int(r.headers["Retry-After"]) >= 1


def test_label_only_strips_probabilities_in_every_answer(world: World) -> None:
    world.policy("hardened", output="label_only", limits={"rate": "1000/second"})
    rows = iris_rows(2)
    with world.consumer("hardened") as client:
        r = client.post("/v1/models/hardened:predict", json={"instances": rows})
        assert r.json()["predictions"] == [
            {"label": label} for label in v2_outputs_of(client, "hardened", rows)["label"]
        ]
        r = client.post("/v1/models/hardened:predict", json={"inputs": rows})
        assert list(r.json()["outputs"]) == ["label"]
        r = client.post(
            "/v1/models/hardened:classify", json={"examples": [{"input": row} for row in rows]}
        )
        assert all(len(pairs) == 1 and pairs[0][1] == 0.0 for pairs in r.json()["results"])


def v2_outputs_of(client: httpx.Client, model: str, rows: list[list[float]]) -> dict[str, object]:
    r = client.post(f"/v2/models/{model}/infer", json=v2_body(rows))
    assert r.status_code == 200, r.text
    return {o["name"]: o["data"] for o in r.json()["outputs"]}


def test_the_access_log_names_the_protocols_routes(world: World) -> None:
    with world.server.client(world.consumer_key) as client:
        r = client.post(f"/v1/models/{MODEL}:predict", json={"instances": iris_rows(2)})
        assert r.status_code == 200
        request_id = r.headers["X-Request-Id"]
    access: list[dict[str, object]] = []
    deadline = time.monotonic() + 10
    while not access and time.monotonic() < deadline:
        time.sleep(0.1)  # access lines are written in batches, within 50 ms
        access = [
            json.loads(line)
            for line in world.server.log().splitlines()
            if line.startswith("{") and request_id in line and '"route"' in line
        ]
    assert access, "no access log line for the request"
    assert access[0]["route"] == "/v1/models/{model}:predict"
    assert (access[0]["model"], access[0]["rows"], access[0]["status"]) == (MODEL, 2, 200)


def test_vertex_answers_are_hardened_and_rate_limited_too(world: World) -> None:
    """The Vertex route serves one model; its policy applies there as on every route."""
    world.policy(MODEL, output="label_only", limits={"rate": "3/minute"})
    try:
        with world.consumer(MODEL) as client:
            answers = [
                client.post(VERTEX_PREDICT, json={"instances": iris_rows(2)}) for _ in range(4)
            ]
        assert [r.status_code for r in answers] == [200, 200, 200, 429]
        assert all(set(p) == {"label"} for p in answers[0].json()["predictions"])
        assert list(answers[3].json()) == ["error"]
        assert int(answers[3].headers["Retry-After"]) >= 1
    finally:
        world.policy(MODEL, output="confidence=1", limits={"rate": "1000/second"})
