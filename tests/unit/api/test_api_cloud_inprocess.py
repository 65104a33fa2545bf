"""SageMaker and Azure ML routes in process (modelkeep.testing.app_client): no socket, no TLS.

What the integration tests cannot see cheaply: refusals audited before the answer, the access
log and metrics naming the route, statuses for media types, the plaintext listener's guard.
"""

from __future__ import annotations

import asyncio
import functools
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from modelkeep.api.app import create_app
from modelkeep.service import Service
from modelkeep.testing import app_client, build_iris_onnx, iris_rows, open_service

ROWS = iris_rows(2)
iris_onnx = functools.cache(build_iris_onnx)


@dataclass
class World:
    service: Service
    app: Any
    admin: str
    consumer: str
    stranger: str

    def call(self, key: str | None, method: str, path: str, **kw: Any) -> httpx.Response:
        async def main() -> httpx.Response:
            async with app_client(self.app, key) as client:
                return await client.request(method, path, **kw)

        return asyncio.run(main())


def open_world(tmp_path: Path, **settings: Any) -> World:
    service, admin_key = open_service(tmp_path / "data", **settings)
    admin = service.authenticate(f"Bearer {admin_key}")
    for name in ("iris", "other"):
        service.put_model(admin, name, require_signature=False)
        service.push(admin, name, iris_onnx(), file_name="iris.onnx")
        service.set_policy(admin, name, {"limits": {}, "output": "full", "detect": []})
    consumer = service.create_key(admin, role="consumer", models=["iris"], expires_at=None)
    stranger = service.create_key(admin, role="consumer", models=["other"], expires_at=None)
    app = create_app(service, manage_lifecycle=False)
    return World(service, app, admin_key, consumer.token, stranger.token)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = open_world(tmp_path, sagemaker_model="iris", azureml_model="iris")
    try:
        yield w
    finally:
        w.service.stop()


def test_refused_keys_are_audited_before_the_401(world: World) -> None:
    for path, body in (("/invocations", ROWS), ("/score", {"data": ROWS})):
        r = world.call(None, "POST", path, json=body)
        assert r.status_code == 401
        assert r.headers["www-authenticate"] == 'Bearer realm="modelkeep"'
    r = world.call(
        None,
        "POST",
        "/invocations",
        json=ROWS,
        headers={"X-Amzn-SageMaker-Custom-Attributes": "modelkeep-key=mk_nope_nope"},
    )
    assert r.status_code == 401
    admin = world.service.authenticate(f"Bearer {world.admin}")
    assert len(world.service.audit_entries(admin, action="auth.failure")) == 3


def test_metrics_name_the_new_routes(world: World) -> None:
    assert world.call(world.consumer, "POST", "/invocations", json=ROWS).status_code == 200
    assert world.call(world.consumer, "POST", "/score", json={"data": ROWS}).status_code == 200
    assert world.call(None, "GET", "/ping").status_code == 200
    metrics = world.call(world.admin, "GET", "/metrics").text
    for route in ("/invocations", "/score", "/ping"):
        assert f'route="{route}"' in metrics, route


def test_media_types_the_contract_does_not_speak_are_415_and_406(world: World) -> None:
    r = world.call(
        world.consumer,
        "POST",
        "/invocations",
        content=b"x",
        headers={"Content-Type": "application/x-protobuf"},
    )
    assert (r.status_code, set(r.json())) == (415, {"error"})
    r = world.call(
        world.consumer, "POST", "/invocations", json=ROWS, headers={"Accept": "image/png"}
    )
    assert r.status_code == 406
    # Two outputs do not fit one .npy array: 406 with the way out.
    r = world.call(
        world.consumer, "POST", "/invocations", json=ROWS, headers={"Accept": "application/x-npy"}
    )
    assert r.status_code == 406
    assert "application/json" in r.json()["error"]


def test_npy_in_and_npy_out_for_one_requested_output(world: World) -> None:
    stream = io.BytesIO()
    np.save(stream, np.asarray(ROWS, dtype=np.float64), allow_pickle=False)
    r = world.call(
        world.consumer,
        "POST",
        "/invocations",
        content=stream.getvalue(),
        headers={"Content-Type": "application/x-npy"},
    )
    assert r.status_code == 200, r.text
    assert len(r.json()["predictions"]) == 2
    # A V2 request that asks for one output can have it as an .npy array.
    body = json.dumps(
        {
            "inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 4], "data": ROWS}],
            "outputs": [{"name": "label"}],
        }
    )
    r = world.call(
        world.consumer,
        "POST",
        "/invocations",
        content=body,
        headers={"Accept": "application/x-npy", "Content-Type": "application/json"},
    )
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/x-npy"
    labels = np.load(io.BytesIO(r.content), allow_pickle=False)
    assert labels.tolist() == [
        p["label"]
        for p in world.call(world.consumer, "POST", "/invocations", json=ROWS).json()["predictions"]
    ]


def test_the_key_is_cut_from_the_echoed_attributes(world: World) -> None:
    r = world.call(
        None,
        "POST",
        "/invocations",
        json=ROWS,
        headers={"X-Amzn-SageMaker-Custom-Attributes": f"a=1;modelkeep-key={world.consumer};b=2"},
    )
    assert r.status_code == 200, r.text
    assert r.headers["x-amzn-sagemaker-custom-attributes"] == "a=1;b=2"
    assert world.consumer not in str(r.headers)


def test_ping_is_503_while_draining(world: World) -> None:
    world.service.drain()
    r = world.call(None, "GET", "/ping")
    assert (r.status_code, r.headers["retry-after"]) == (503, "1")


def test_score_needs_its_model_setting(tmp_path: Path) -> None:
    world = open_world(tmp_path)
    try:
        r = world.call(world.consumer, "POST", "/score", json={"data": ROWS})
        assert r.status_code == 404
        assert "MODELKEEP_AZUREML_MODEL" in r.json()["error"]
        r = world.call(world.consumer, "POST", "/invocations", json=ROWS)
        assert r.status_code == 400
        assert "MODELKEEP_SAGEMAKER_MODEL" in r.json()["error"]
    finally:
        world.service.stop()


def test_the_plaintext_listener_serves_only_sagemaker(tmp_path: Path) -> None:
    world = open_world(
        tmp_path, sagemaker=True, sagemaker_unsafe_plaintext=True, sagemaker_model="iris"
    )
    try:
        assert world.call(world.consumer, "POST", "/invocations", json=ROWS).status_code == 200
        assert world.call(None, "GET", "/ping").status_code == 200
        for method, path in (
            ("GET", "/api/v1/models"),
            ("POST", "/api/v1/keys"),
            ("POST", "/v2/models/iris/infer"),
            ("GET", "/v2/health/live"),
            ("GET", "/metrics"),
            ("POST", "/score"),
            ("GET", "/"),
        ):
            r = world.call(world.admin, method, path)
            assert r.status_code == 404, (method, path)
            assert "x-request-id" in r.headers
        # The refusals are counted like any request (an unmatched route).
        metrics = world.service.metrics_exposition(
            world.service.authenticate(f"Bearer {world.admin}")
        )[0].decode()
        assert 'status="404"' in metrics
    finally:
        world.service.stop()


def test_swagger_follows_the_deployment_label(world: World) -> None:
    admin = world.service.authenticate(f"Bearer {world.admin}")
    world.service.push(admin, "iris", iris_onnx(seed=1), file_name="iris.onnx")
    world.service.set_label(admin, "iris", "blue", 1)
    latest = world.call(world.consumer, "GET", "/swagger.json").json()
    blue = world.call(
        world.consumer, "GET", "/swagger.json", headers={"azureml-model-deployment": "blue"}
    ).json()
    assert (latest["info"]["version"], blue["info"]["version"]) == ("2", "1")
    other = world.call(world.stranger, "GET", "/swagger.json")
    assert other.status_code == 403
