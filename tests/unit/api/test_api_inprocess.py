"""The HTTP layer in process (modelkeep.testing.app_client): routes, error mapping, fast path.

No socket, no TLS, SQLite in a temp dir: these run in the unit suite.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from modelkeep.api._errors import STATUS_BY_CODE, modelkeep_error_response
from modelkeep.api.app import create_app
from modelkeep.errors import (
    Conflict,
    Forbidden,
    InvalidInput,
    ModelkeepError,
    NotFound,
    RateLimited,
    TooLarge,
    Unauthenticated,
    Unavailable,
)
from modelkeep.service import Service
from modelkeep.testing import app_client, build_iris_onnx, iris_rows, open_service

T = TypeVar("T")
BODY = json.dumps(
    {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": iris_rows(1)}]}
).encode()
JSON = {"Content-Type": "application/json"}


@dataclass
class World:
    service: Service
    app: Any
    admin: str
    consumer: str
    stranger: str

    def run(self, key: str | None, call: Callable[[httpx.AsyncClient], Awaitable[T]]) -> T:
        async def main() -> T:
            async with app_client(self.app, key) as client:
                return await call(client)

        return asyncio.run(main())

    def post(self, key: str | None, path: str, body: bytes = BODY) -> httpx.Response:
        return self.run(key, lambda c: c.post(path, content=body, headers=JSON))

    def get(self, key: str | None, path: str) -> httpx.Response:
        return self.run(key, lambda c: c.get(path))


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    service, admin_key = open_service(tmp_path / "data", max_request_bytes=64 * 1024)
    try:
        admin = service.authenticate(f"Bearer {admin_key}")
        for name in ("iris", "other"):
            service.put_model(admin, name, require_signature=False)
            service.push(admin, name, build_iris_onnx(), file_name="iris.onnx")
        consumer = service.create_key(admin, role="consumer", models=["iris"], expires_at=None)
        stranger = service.create_key(admin, role="consumer", models=["other"], expires_at=None)
        app = create_app(service, manage_lifecycle=False)
        yield World(service, app, admin_key, consumer.token, stranger.token)
    finally:
        service.stop()


def test_the_fast_path_answers_an_authorized_call_with_outputs_and_budget(world: World) -> None:
    r = world.post(world.consumer, "/v2/models/iris/infer")
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["model_name"], body["model_version"]) == ("iris", "1")
    assert [o["name"] for o in body["outputs"]] == ["label", "probabilities"]
    assert r.headers["x-budget-limit"] == "100000"
    assert r.headers["x-budget-remaining"] == "99999"
    assert len(r.headers["x-request-id"]) >= 16
    versioned = world.post(world.consumer, "/v2/models/iris/versions/1/infer")
    assert versioned.status_code == 200


def test_no_key_is_401_and_audited_before_the_answer(world: World) -> None:
    r = world.post(None, "/v2/models/iris/infer")
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == 'Bearer realm="modelkeep"'
    assert set(r.json()) == {"error"}
    admin = world.service.authenticate(f"Bearer {world.admin}")
    failures = world.service.audit_entries(admin, action="auth.failure")
    assert len(failures) == 1
    assert failures[0].details["source"] == "127.0.0.1"
    # The routes behind the middleware go through the same function.
    assert world.get("Bearer-less", "/api/v1/models").status_code == 401
    assert len(world.service.audit_entries(admin, action="auth.failure")) == 2


def test_a_key_for_another_model_is_403_and_learns_nothing(world: World) -> None:
    known = world.post(world.stranger, "/v2/models/iris/infer")
    unknown = world.post(world.stranger, "/v2/models/no-such-model/infer")
    assert (known.status_code, unknown.status_code) == (403, 403)
    assert known.json().keys() == unknown.json().keys() == {"error"}
    assert "iris" not in unknown.text


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"{not json", 400),
        (b'{"inputs": []}', 400),
        (
            json.dumps(
                {
                    "inputs": [
                        {"name": "input", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}
                    ]
                }
            ).encode(),
            400,
        ),
        (
            json.dumps(
                {
                    "inputs": [
                        {"name": "input", "shape": [10**9, 4], "datatype": "FP32", "data": [0]}
                    ]
                }
            ).encode(),
            413,
        ),
        (b"x" * (64 * 1024 + 1), 413),
    ],
)
def test_hostile_bodies_are_4xx_with_a_short_error(world: World, body: bytes, status: int) -> None:
    r = world.post(world.consumer, "/v2/models/iris/infer", body)
    assert r.status_code == status, r.text
    assert set(r.json()) == {"error"}
    assert "Traceback" not in r.text
    assert "/" not in r.json()["error"]  # no internal path


def test_unknown_version_and_bad_version_are_404(world: World) -> None:
    for path in ("/v2/models/iris/versions/9/infer", "/v2/models/iris/versions/x/infer"):
        assert world.post(world.consumer, path).status_code == 404


def test_an_overloaded_worker_sheds_with_503_and_retry_after(world: World) -> None:
    runner = world.service.dataplane.runner
    runner.in_flight = runner.max_queue
    try:
        r = world.post(world.consumer, "/v2/models/iris/infer")
    finally:
        runner.in_flight = 0
    assert r.status_code == 503
    assert r.headers["retry-after"] == "1"


def test_metadata_and_readiness_routes(world: World) -> None:
    meta = world.get(world.consumer, "/v2/models/iris")
    assert meta.status_code == 200
    assert set(meta.json()) == {"name", "versions", "platform", "inputs", "outputs"}
    assert world.get(world.consumer, "/v2/models/iris/versions/1").json()["name"] == "iris"
    assert world.get(world.consumer, "/v2/models/iris/ready").json() == {
        "name": "iris",
        "ready": True,
    }
    assert world.get(world.stranger, "/v2/models/iris").status_code == 403
    assert world.get(None, "/v2/health/live").json() == {"live": True}


def test_the_openapi_document_describes_the_infer_routes(world: World) -> None:
    doc = world.get(world.admin, "/api/v1/openapi.json").json()
    for path in ("/v2/models/{model}/infer", "/v2/models/{model}/versions/{version}/infer"):
        operation = doc["paths"][path]["post"]
        assert {"200", "400", "401", "403", "404", "413", "429", "503"} <= set(
            operation["responses"]
        )
    assert "/api/v1/models" in doc["paths"]


def test_a_management_route_through_the_app(world: World) -> None:
    r = world.get(world.admin, "/api/v1/models")
    assert r.status_code == 200
    assert world.get(world.consumer, "/api/v1/keys").status_code == 403


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (InvalidInput("x"), 400),
        (Unauthenticated("x"), 401),
        (Forbidden("x"), 403),
        (NotFound("x"), 404),
        (Conflict("x"), 409),
        (TooLarge("x"), 413),
        (RateLimited("x", retry_after=2.5), 429),
        (Unavailable("x", retry_after=1), 503),
        (ModelkeepError("secret detail"), 500),
    ],
)
def test_each_error_maps_to_its_status_and_a_safe_body(error: ModelkeepError, status: int) -> None:
    response = modelkeep_error_response(error)
    assert response.status_code == status == STATUS_BY_CODE.get(error.code, 500)
    body = json.loads(bytes(response.body))
    if status == 500:
        assert body == {"error": "internal error"}
    else:
        assert body["error"] == "x"
    if error.retry_after is not None:
        assert response.headers["retry-after"] == str(int(-(-error.retry_after // 1)))
