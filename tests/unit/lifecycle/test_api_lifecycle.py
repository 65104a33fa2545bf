"""The lifecycle routes over HTTP: every status documented, errors as {"error": ...}, hostile
input refused with a clear 4xx and never a trace or a path."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import numpy as np

from conftest import Env
from modelkeep.api.app import create_app
from modelkeep.testing import build_iris_onnx

Call = Callable[[httpx.AsyncClient], Awaitable[Any]]


def run(env: Env, call: Call) -> Any:
    app = create_app(env.service, manage_lifecycle=False)

    async def go() -> Any:
        transport = httpx.ASGITransport(app)
        async with httpx.AsyncClient(transport=transport, base_url="http://mk.test") as client:
            return await call(client)

    return asyncio.run(go())


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def admin_token(env: Env) -> str:
    return env.service.create_key(env.admin, role="admin", models=None, expires_at=None).token


def lineage_header(document: object) -> str:
    return base64.b64encode(json.dumps(document).encode()).decode()


def assert_error(response: httpx.Response, status: int) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert list(body) == ["error"]
    assert isinstance(body["error"], str)
    assert "Traceback" not in body["error"]
    assert "/src/" not in body["error"]


def test_push_with_lineage_then_bom_delete_and_metadata(env: Env) -> None:
    token = admin_token(env)
    lineage = {"code_revision": "abc123", "frameworks": {"onnx": "1.16"}, "metrics": {"f1": 0.9}}

    async def call(c: httpx.AsyncClient) -> list[httpx.Response]:
        headers = {**auth(token), "Content-Type": "application/octet-stream"}
        pushed = await c.post(
            "/api/v1/models/iris/versions?filename=iris.onnx",
            content=build_iris_onnx(),
            headers={**headers, "Modelkeep-Lineage": lineage_header(lineage)},
        )
        await c.post(
            "/api/v1/models/iris/versions?filename=iris.onnx",
            content=build_iris_onnx(seed=1),
            headers=headers,
        )
        bom = await c.get("/api/v1/models/iris/versions/1/bom", headers=auth(token))
        deleted = await c.delete("/api/v1/models/iris/versions/1", headers=auth(token))
        again = await c.delete("/api/v1/models/iris/versions/1", headers=auth(token))
        shown = await c.get("/api/v1/models/iris/versions/1", headers=auth(token))
        listed = await c.get("/api/v1/models/iris/versions", headers=auth(token))
        infer = await c.post(
            "/v2/models/iris/versions/1/infer",
            json={
                "inputs": [
                    {
                        "name": "input",
                        "shape": [1, 4],
                        "datatype": "FP32",
                        "data": [5.1, 3.5, 1.4, 0.2],
                    }
                ]
            },
            headers=auth(token),
        )
        bom_deleted = await c.get("/api/v1/models/iris/versions/1/bom", headers=auth(token))
        return [pushed, bom, deleted, again, shown, listed, infer, bom_deleted]

    pushed, bom, deleted, again, shown, listed, infer, bom_deleted = run(env, call)
    assert pushed.status_code == 201, pushed.text
    assert pushed.json()["lineage"] == lineage
    assert bom.status_code == 200
    assert bom.headers["content-type"] == "application/vnd.cyclonedx+json; version=1.6"
    assert bom.json()["metadata"]["component"]["hashes"][0]["content"] == pushed.json()["sha256"]
    assert deleted.status_code == 200
    assert deleted.json()["deleted_at"] is not None
    assert_error(again, 409)
    assert shown.json()["deleted_by"] == deleted.json()["deleted_by"]
    assert [(v["version"], v["deleted_at"] is None) for v in listed.json()["versions"]] == [
        (1, False),
        (2, True),
    ]
    assert_error(infer, 404)
    assert bom_deleted.status_code == 200
    props = {p["name"] for p in bom_deleted.json()["metadata"]["component"]["properties"]}
    assert "modelkeep:deleted_at" in props


def test_hostile_input_gets_clear_4xx(env: Env) -> None:
    token = admin_token(env)
    env.service.push(env.admin, "iris", build_iris_onnx(), file_name="iris.onnx")

    async def call(c: httpx.AsyncClient) -> dict[str, httpx.Response]:
        octet = {**auth(token), "Content-Type": "application/octet-stream"}
        push = "/api/v1/models/iris/versions?filename=iris.onnx"
        big = {"code_revision": "x" * 256, "tags": {f"k{i}": "v" * 200 for i in range(60)}}
        out = {
            "lineage_not_base64": await c.post(
                push, content=b"x", headers={**octet, "Modelkeep-Lineage": "%%%"}
            ),
            "lineage_oversized": await c.post(
                push, content=b"x", headers={**octet, "Modelkeep-Lineage": lineage_header(big)}
            ),
            "lineage_malformed": await c.post(
                push,
                content=b"x",
                headers={**octet, "Modelkeep-Lineage": base64.b64encode(b"{nope").decode()},
            ),
            "lineage_unknown_parent": await c.post(
                push,
                content=build_iris_onnx(seed=5),
                headers={**octet, "Modelkeep-Lineage": lineage_header({"parent_version": 99})},
            ),
            "retention_negative": await c.put(
                "/api/v1/models/iris/retention", json={"keep_versions": -3}, headers=auth(token)
            ),
            "retention_string": await c.put(
                "/api/v1/models/iris/retention", json={"capture_days": "ten"}, headers=auth(token)
            ),
            "retention_extra": await c.put(
                "/api/v1/models/iris/retention", json={"keep": 1}, headers=auth(token)
            ),
            "retention_not_json": await c.put(
                "/api/v1/models/iris/retention", content=b"{", headers=auth(token)
            ),
            "delete_missing_version": await c.delete(
                "/api/v1/models/iris/versions/42", headers=auth(token)
            ),
            "delete_weird_version": await c.delete(
                "/api/v1/models/iris/versions/..%2F1", headers=auth(token)
            ),
            "delete_missing_model": await c.delete("/api/v1/models/nosuch", headers=auth(token)),
            "bom_missing": await c.get("/api/v1/models/iris/versions/7/bom", headers=auth(token)),
            "drift_bad_rows": await c.put(
                "/api/v1/models/iris/drift", json={"rows": [[1, "a"]]}, headers=auth(token)
            ),
            "unauthenticated": await c.delete("/api/v1/models/iris/versions/1"),
        }
        return out

    got = run(env, call)
    expected = {
        "lineage_not_base64": 400,
        "lineage_oversized": 400,
        "lineage_malformed": 400,
        "lineage_unknown_parent": 400,
        "retention_negative": 400,
        "retention_string": 400,
        "retention_extra": 400,
        "retention_not_json": 400,
        "delete_missing_version": 404,
        "delete_weird_version": 404,
        "delete_missing_model": 404,
        "bom_missing": 404,
        "drift_bad_rows": 400,
        "unauthenticated": 401,
    }
    assert {k: r.status_code for k, r in got.items()} == expected
    for response in got.values():
        assert_error(response, response.status_code)
    assert sorted(env.service.snapshot.models["iris"].versions) == [1]


def test_consumers_cannot_delete_or_set_rules_and_every_status_is_documented(env: Env) -> None:
    env.service.push(env.admin, "iris", build_iris_onnx(), file_name="iris.onnx")
    _, consumer = env.key("consumer")

    async def call(c: httpx.AsyncClient) -> list[httpx.Response]:
        return [
            await c.delete("/api/v1/models/iris/versions/1", headers=auth(consumer)),
            await c.delete("/api/v1/models/iris", headers=auth(consumer)),
            await c.put(
                "/api/v1/models/iris/retention", json={"keep_versions": 1}, headers=auth(consumer)
            ),
            await c.get("/api/v1/openapi.json", headers=auth(admin_token(env))),
        ]

    *refused, spec = run(env, call)
    for response in refused:
        assert_error(response, 403)
    paths = spec.json()["paths"]
    documented = {
        ("/api/v1/models/{model}/versions/{version}", "delete"): {
            "200",
            "401",
            "403",
            "404",
            "409",
            "503",
        },
        ("/api/v1/models/{model}/versions/{version}/bom", "get"): {"200", "401", "403", "404"},
        ("/api/v1/models/{model}", "delete"): {"200", "401", "403", "404", "503"},
        ("/api/v1/models/{model}/retention", "put"): {"200", "400", "401", "403", "404", "503"},
        ("/api/v1/models/{model}/drift", "put"): {"200", "400", "401", "403", "404", "503"},
    }
    for (path, method), statuses in documented.items():
        responses = paths[path][method]["responses"]
        assert statuses <= set(responses), (path, method, sorted(responses))
        for status in statuses - {"200"}:
            schema = responses[status]["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/ErrorOut"}


def test_retention_and_drift_round_trip(env: Env) -> None:
    env.service.push(env.admin, "iris", build_iris_onnx(), file_name="iris.onnx")
    token = admin_token(env)
    reference = np.random.default_rng(0).normal(size=(100, 4)).tolist()

    async def call(c: httpx.AsyncClient) -> list[httpx.Response]:
        return [
            await c.put(
                "/api/v1/models/iris/retention",
                json={"keep_versions": 3, "capture_days": 30},
                headers=auth(token),
            ),
            await c.get("/api/v1/models/iris/retention", headers=auth(token)),
            await c.put(
                "/api/v1/models/iris/drift",
                json={"rows": reference, "window": 300, "psi_threshold": 0.2},
                headers=auth(token),
            ),
            await c.get("/api/v1/models/iris/drift", headers=auth(token)),
        ]

    put_rule, rule, put_drift, drift = run(env, call)
    assert put_rule.status_code == 200, put_rule.text
    assert rule.json() == {"model": "iris", "keep_versions": 3, "capture_days": 30}
    assert put_drift.status_code == 200, put_drift.text
    assert drift.json()["settings"]["window"] == 300
    assert drift.json()["settings"]["psi_threshold"] == 0.2
    assert drift.json()["latest"] is None


# Who may call each lifecycle route on model `iris` (version 1 exists; the delete routes name a
# version and a model that do not exist, so an allowed caller gets 404 and nothing is lost).
# Columns: admin, publisher of iris, consumer of iris, auditor, publisher of another model.
AUTHZ = """
GET    /api/v1/models/iris/versions/1/bom    200 200 200 200 403
DELETE /api/v1/models/iris/versions/99       404 403 403 403 403
DELETE /api/v1/models/nosuch                 404 403 403 403 403
GET    /api/v1/models/iris/retention         200 200 200 200 403
PUT    /api/v1/models/iris/retention         200 403 403 403 403
GET    /api/v1/models/iris/drift             200 200 403 200 403
PUT    /api/v1/models/iris/drift             400 403 403 403 403
"""


def test_every_lifecycle_route_answers_each_role_as_the_matrix_states(env: Env) -> None:
    env.service.put_model(env.admin, "other")
    env.service.push(env.admin, "iris", build_iris_onnx(), file_name="iris.onnx")
    tokens = [
        admin_token(env),
        env.key("publisher", ["iris"])[1],
        env.key("consumer", ["iris"])[1],
        env.key("auditor")[1],
        env.key("publisher", ["other"])[1],
    ]
    cells = []
    for line in AUTHZ.strip().splitlines():
        method, path, *statuses = line.split()
        cells += [(method, path, token, int(s)) for token, s in zip(tokens, statuses, strict=True)]

    async def call(c: httpx.AsyncClient) -> list[int]:
        got = []
        for method, path, token, _ in cells:
            body = {"keep_versions": 5} if path.endswith("retention") else {"window": 100}
            kwargs = {"json": body} if method == "PUT" else {}
            r = await c.request(method, path, headers=auth(token), **kwargs)
            got.append(r.status_code)
        return got

    got = run(env, call)
    assert [(m, p, s) for (m, p, _, s) in cells] == [
        (m, p, g) for (m, p, _, _), g in zip(cells, got, strict=True)
    ]
    assert sorted(env.service.snapshot.models["iris"].versions) == [1]
