"""TF Serving and Vertex AI routes in process (httpx's ASGI transport, no sockets): routing,
status and metadata shapes, labels, and error mapping to ``{"error": ...}``."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from modelkeep.api.app import create_app
from modelkeep.service import Service
from modelkeep.testing import build_iris_onnx, iris_rows, open_service


@dataclass
class App:
    service: Service
    admin_key: str
    consumer_key: str
    settings: dict[str, Any]

    def call(self, method: str, path: str, key: str | None = None, **kwargs: Any) -> httpx.Response:
        app = create_app(self.service, manage_lifecycle=False)
        headers = {} if key is None else {"Authorization": f"Bearer {key}"}

        async def go() -> httpx.Response:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                return await client.request(method, path, headers=headers, **kwargs)

        return asyncio.run(go())


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[App]:
    settings = {
        "vertex_predict_route": "/predict",
        "vertex_health_route": "/health",
        "vertex_model": "iris",
    }
    data = tmp_path_factory.mktemp("data") / "data"
    service, admin_key = open_service(data, access_log=False, **settings)
    try:
        admin = service.authenticate(f"Bearer {admin_key}")
        service.put_model(admin, "iris", require_signature=False)
        service.push(admin, "iris", build_iris_onnx(seed=0), file_name="iris.onnx")
        service.push(admin, "iris", build_iris_onnx(seed=1), file_name="iris.onnx")
        service.set_label(admin, "iris", "canary", 2)
        service.set_policy(admin, "iris", {"limits": {"rate": "100000/second"}})
        consumer = service.create_key(admin, role="consumer", models=["iris"], expires_at=None)
        yield App(service, admin_key, consumer.token, settings)
    finally:
        service.stop()


def test_status_lists_every_version_or_the_one_named(app: App) -> None:
    every = app.call("GET", "/v1/models/iris", app.consumer_key)
    assert [s["version"] for s in every.json()["model_version_status"]] == ["1", "2"]
    one = app.call("GET", "/v1/models/iris/labels/canary", app.consumer_key)
    assert one.json()["model_version_status"] == [
        {"version": "2", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}
    ]


def test_metadata_names_the_version_a_label_points_at(app: App) -> None:
    r = app.call("GET", "/v1/models/iris/labels/canary/metadata", app.consumer_key)
    assert r.json()["model_spec"] == {"name": "iris", "signature_name": "", "version": "2"}
    r = app.call("GET", "/v1/models/iris/versions/1/metadata", app.consumer_key)
    assert r.json()["model_spec"]["version"] == "1"


def test_a_label_selects_the_version_that_answers(app: App) -> None:
    rows = {"instances": iris_rows(2)}
    by_label = app.call("POST", "/v1/models/iris/labels/canary:predict", app.admin_key, json=rows)
    by_version = app.call("POST", "/v1/models/iris/versions/2:predict", app.admin_key, json=rows)
    assert by_label.status_code == 200, by_label.text
    assert by_label.json() == by_version.json()


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("POST", "/v1/models/iris/labels/nope:predict", 404),
        ("POST", "/v1/models/iris/versions/9:predict", 404),
        ("POST", "/v1/models/iris/versions/x:predict", 404),
        ("POST", "/v1/models/nope:predict", 404),
        ("GET", "/v1/models/iris/labels/nope", 404),
        ("GET", "/v1/models/iris/versions/9/metadata", 404),
        ("POST", "/v1/models/iris:regress", 400),
    ],
)
def test_errors_are_a_single_error_field_with_tf_servings_status(
    app: App, method: str, path: str, status: int
) -> None:
    body = {"instances": iris_rows(1)} if path.endswith("predict") else None
    if path.endswith("regress"):
        body = {"examples": [{"input": row} for row in iris_rows(1)]}
    r = app.call(method, path, app.admin_key, json=body)
    assert (status, list(r.json())) == (r.status_code, ["error"])


def test_no_key_is_401_with_a_bearer_challenge(app: App) -> None:
    r = app.call("POST", "/v1/models/iris:predict", json={"instances": iris_rows(1)})
    assert (r.status_code, r.json()) == (401, {"error": "missing credentials"})
    assert r.headers["www-authenticate"] == 'Bearer realm="modelkeep"'
    assert r.headers["x-request-id"]


def test_vertex_routes_serve_the_configured_model(app: App) -> None:
    r = app.call("POST", "/predict", app.consumer_key, json={"instances": iris_rows(3)})
    assert r.status_code == 200, r.text
    assert len(r.json()["predictions"]) == 3
    assert app.call("POST", "/predict", json={"instances": iris_rows(1)}).status_code == 401
    assert app.call("GET", "/health").status_code == 200  # public: Vertex sends no key


def test_without_vertex_settings_its_routes_do_not_exist(tmp_path: Path) -> None:
    service, admin_key = open_service(tmp_path / "data", access_log=False)
    try:
        bare = App(service, admin_key, "", {})
        assert bare.call("GET", "/health", admin_key).status_code == 404
    finally:
        service.stop()


def test_openapi_lists_every_protocol_route_with_its_statuses(app: App) -> None:
    paths = app.call("GET", "/api/v1/openapi.json", app.admin_key).json()["paths"]
    predict = paths["/v1/models/{model}/labels/{label}:predict"]["post"]
    # 431: the connection layer refuses an oversized request head on every route.
    assert set(predict["responses"]) == {
        "200",
        "400",
        "401",
        "403",
        "404",
        "413",
        "429",
        "431",
        "503",
    }
    assert set(paths["/v1/models/{model}/versions/{version}/metadata"]["get"]["responses"]) == {
        "200",
        "401",
        "403",
        "404",
        "431",
        "503",
    }
    tf_paths = [path for path in paths if path.startswith("/v1/models/")]
    assert len(tf_paths) == 15
    assert "post" in paths["/predict"]
    assert "get" in paths["/health"]
