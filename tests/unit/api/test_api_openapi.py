"""The served OpenAPI description tells the truth, and the bugs the fuzzer found stay fixed.

The whole description is checked against a live server by schemathesis in
tests/integration/test_openapi_conformance.py; these are the fast, in-process checks of what it
must hold and of each server bug that run found.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from modelkeep.api.app import create_app
from modelkeep.api.management import MAX_BUNDLE_HEADER, bundle_header_limit
from modelkeep.bootstrap import init_data_dir
from modelkeep.service import Service
from modelkeep.settings import Settings
from modelkeep.testing import build_iris_onnx

ERROR_REF = {"$ref": "#/components/schemas/ErrorOut"}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, dict[str, str]]]:
    data = tmp_path_factory.mktemp("openapi") / "data"
    init = init_data_dir(data)
    service = Service.open(Settings(data_dir=data))
    admin = service.authenticate(f"Bearer {init.admin_key}")
    service.put_model(admin, "iris", require_signature=False)
    service.push(admin, "iris", build_iris_onnx(), file_name="iris.onnx")
    try:
        yield (
            create_app(service, manage_lifecycle=False),
            {"Authorization": f"Bearer {init.admin_key}"},
        )
    finally:
        service.stop()


def call(app: Any, method: str, path: str, **kw: Any) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app)
        async with httpx.AsyncClient(transport=transport, base_url="http://mk.test") as client:
            return await client.request(method, path, **kw)

    return asyncio.run(go())


@pytest.fixture(scope="module")
def schema(served: tuple[Any, dict[str, str]]) -> dict[str, Any]:
    app, admin = served
    answer = call(app, "GET", "/api/v1/openapi.json", headers=admin)
    assert answer.status_code == 200
    found: dict[str, Any] = answer.json()
    return found


def operations(schema: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, methods in schema["paths"].items():
        for method, operation in methods.items():
            yield path, method, operation


def test_every_error_status_has_the_one_error_schema(schema: dict[str, Any]) -> None:
    assert {"error"} == set(schema["components"]["schemas"]["ErrorOut"]["required"])
    for path, method, operation in operations(schema):
        for status, response in operation["responses"].items():
            if int(status) >= 400:
                assert response["content"]["application/json"]["schema"] == ERROR_REF, (
                    f"{method} {path} {status}"
                )


def test_every_route_but_health_documents_the_401_of_the_auth_middleware(
    schema: dict[str, Any],
) -> None:
    for path, method, operation in operations(schema):
        public = path.startswith("/v2/health/")
        assert ("401" in operation["responses"]) is not public, f"{method} {path}"
        assert "431" in operation["responses"]
        assert "503" in operation["responses"]


def test_fastapis_422_is_gone_and_validation_failures_are_documented_as_the_400_they_are(
    served: tuple[Any, dict[str, str]], schema: dict[str, Any]
) -> None:
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    refused = [
        (path, method)
        for path, method, operation in operations(schema)
        if "422" in operation["responses"]
    ]
    # 422 is a refused model: only a push can get one.
    assert refused == [("/api/v1/models/{model}/versions", "post")]
    app, admin = served
    answer = call(app, "GET", "/api/v1/audit/entries?limit=0", headers=admin)
    assert answer.status_code == 400
    assert "400" in schema["paths"]["/api/v1/audit/entries"]["get"]["responses"]


def test_request_bodies_are_described_as_validated(schema: dict[str, Any]) -> None:
    put_policy = schema["paths"]["/api/v1/models/{model}/policy"]["put"]
    ref = put_policy["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    policy = schema["components"]["schemas"][ref.rsplit("/", 1)[1]]
    assert policy["additionalProperties"] is False
    assert policy["properties"]["on_alarm"]["enum"] == ["log", "alert", "throttle", "block"]
    key_in = schema["components"]["schemas"]["KeyIn"]
    assert key_in["properties"]["role"]["enum"] == [
        "admin",
        "publisher",
        "approver",
        "consumer",
        "auditor",
    ]
    model_param = schema["paths"]["/api/v1/models/{model}"]["put"]["parameters"][0]
    assert model_param["schema"]["pattern"].startswith("^[a-z0-9]")


def test_a_405_names_every_method_of_the_path(served: tuple[Any, dict[str, str]]) -> None:
    app, admin = served
    answer = call(app, "PATCH", "/api/v1/keys", headers=admin)
    assert answer.status_code == 405
    assert {"GET", "POST"} <= set(answer.headers["allow"].split(", "))
    assert answer.json() == {"error": "method not allowed"}


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("TRACE", "/v2/models/iris/infer", {"POST"}),
        ("GET", "/v2/models/iris/versions/1/infer", {"POST"}),
        ("TRACE", "/v1/models/iris:predict", {"POST"}),
        ("PUT", "/v1/models/iris/labels/canary/metadata", {"GET", "HEAD"}),
    ],
)
def test_a_protocol_route_asked_with_another_method_is_405_not_404(
    served: tuple[Any, dict[str, str]], method: str, path: str, allowed: set[str]
) -> None:
    # The protocols' routes are answered before routing; the rest fell through to a 404.
    app, admin = served
    answer = call(app, method, path, headers=admin)
    assert answer.status_code == 405
    assert set(answer.headers["allow"].split(", ")) == allowed
    assert answer.json() == {"error": "method not allowed"}
    # An undescribed path is still not found.
    assert call(app, method, "/v2/models/iris/nothing", headers=admin).status_code == 404


@pytest.mark.parametrize(
    "path", ["/api/v1/models/iris/versions/%C2%B2", "/v2/models/iris/versions/%C2%B2/ready"]
)
def test_a_version_in_non_ascii_digits_is_not_found_not_a_500(
    served: tuple[Any, dict[str, str]], path: str
) -> None:
    app, admin = served
    answer = call(app, "GET", path, headers=admin)
    assert answer.status_code == 404


def test_a_rewrap_cursor_past_64_bits_is_refused_not_a_500(
    served: tuple[Any, dict[str, str]],
) -> None:
    app, admin = served
    answer = call(app, "POST", "/api/v1/kek/rewrap", json={"after": 2**80}, headers=admin)
    assert answer.status_code == 400


@pytest.mark.parametrize(
    ("path", "query"),
    [("/api/v1/audit/entries", "until=0.5"), ("/api/v1/models/iris/captures", "since=1700000000")],
)
def test_times_are_rfc3339_text_not_numbers(
    served: tuple[Any, dict[str, str]], path: str, query: str
) -> None:
    app, admin = served
    answer = call(app, "GET", f"{path}?{query}", headers=admin)
    assert answer.status_code == 400
    assert "RFC 3339" in answer.json()["error"]


@pytest.mark.parametrize("body", [{"new_key": "yes"}, {"new_key": 1}])
def test_a_boolean_field_takes_only_a_boolean(
    served: tuple[Any, dict[str, str]], body: dict[str, Any]
) -> None:
    app, admin = served
    answer = call(app, "POST", "/api/v1/kek/rotate", json=body, headers=admin)
    assert answer.status_code == 400


def test_a_label_version_may_be_written_as_a_whole_float_but_not_as_a_bool(
    served: tuple[Any, dict[str, str]],
) -> None:
    app, admin = served
    moved = call(
        app, "PUT", "/api/v1/models/iris/labels/staging", json={"version": 1.0}, headers=admin
    )
    refused = call(
        app, "PUT", "/api/v1/models/iris/labels/staging", json={"version": True}, headers=admin
    )
    assert (moved.status_code, moved.json()["version"]) == (200, 1)
    assert refused.status_code == 400


def test_the_signature_header_limit_leaves_room_in_the_request_head() -> None:
    assert bundle_header_limit(16 * 1024) == 16 * 1024 - 2048
    assert bundle_header_limit(1024 * 1024) == MAX_BUNDLE_HEADER


def test_the_served_signature_header_limit_is_the_servers(schema: dict[str, Any]) -> None:
    push = schema["paths"]["/api/v1/models/{model}/versions"]["post"]
    (header,) = [p for p in push["parameters"] if p["name"] == "modelkeep-signature"]
    assert (
        bundle_header_limit(Settings(data_dir=Path("x")).max_header_bytes)
        == header["schema"]["maxLength"]
    )


def test_the_api_key_is_the_security_scheme_of_every_path_but_health(
    schema: dict[str, Any],
) -> None:
    assert schema["components"]["securitySchemes"]["apiKey"]["scheme"] == "bearer"
    assert schema["security"] == [{"apiKey": []}]
    for path, _method, operation in operations(schema):
        assert (operation.get("security") == []) is path.startswith("/v2/health/")


@pytest.mark.parametrize("value", ["²", "١٢", b"\xc2\xb2"])
def test_a_length_header_in_non_ascii_digits_is_invalid_input_not_a_500(
    value: str | bytes,
) -> None:
    from modelkeep.api._body import check_declared_length, header_length
    from modelkeep.errors import InvalidInput

    with pytest.raises(InvalidInput):
        header_length(value)
    with pytest.raises(InvalidInput):
        check_declared_length(value, 1000)
