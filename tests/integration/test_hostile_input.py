"""Hostile input over real HTTPS: every bad request gets a 4xx that gives nothing away.

One server per module, started with small body limits so the size checks can be reached cheaply.
Every response is checked by ``clean``: never a 5xx, and no body holds a filesystem path, a
traceback, the admin key or its secret. The module ends by checking that the server, after all of
it, still answers a normal inference.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import pickle
import random
import threading
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from harness import Server, create_key, ensure_model, init_server, push, sign_bytes

from modelkeep.testing import (
    build_custom_domain_onnx,
    build_external_data_onnx,
    build_iris_onnx,
    iris_rows,
)

pytestmark = pytest.mark.integration

MAX_REQUEST = 32 * 1024
MAX_UPLOAD = 16 * 1024
MODEL = "iris"
FORBIDDEN_IN_BODIES = ("/tmp", "/work", ".py", "Traceback")
OCTETS = {"Content-Type": "application/octet-stream"}


@dataclass
class World:
    server: Server
    iris: bytes
    admin: httpx.Client
    consumer: httpx.Client

    def clean(self, r: httpx.Response) -> httpx.Response:
        """Fail on a 5xx or on a body that leaks a path, a traceback or the admin key."""
        assert r.status_code < 500, r.text
        admin_secret = self.server.admin_key.split("_", 2)[2]
        for needle in (*FORBIDDEN_IN_BODIES, self.server.admin_key, admin_secret):
            assert needle not in r.text, f"response body holds {needle!r}"
        assert str(self.server.data_dir) not in r.text
        return r

    def labels(self) -> dict[str, int]:
        r = self.clean(self.admin.get(f"/api/v1/models/{MODEL}"))
        assert r.status_code == 200, r.text
        labels: dict[str, int] = r.json()["labels"]
        return labels

    def model_names(self) -> list[str]:
        r = self.clean(self.admin.get("/api/v1/models"))
        assert r.status_code == 200, r.text
        return [m["name"] for m in r.json()["models"]]


def signed_push(world: World, name: str, data: bytes, *, streamed: bool = False) -> httpx.Response:
    """A push of ``data`` to model ``name`` (created first), signed by the trusted publisher, so
    that the status reflects what the server thinks of the bytes themselves."""
    ensure_model(world.server, name)
    headers = {**OCTETS}
    if data:
        headers["Modelkeep-Signature"] = base64.b64encode(sign_bytes(data)).decode()
    return world.admin.post(
        f"/api/v1/models/{name}/versions",
        params={"filename": "model.onnx"},
        content=chunks(data, 100) if streamed else data,
        headers=headers,
    )


def versions_of(world: World, name: str) -> list[int]:
    r = world.admin.get(f"/api/v1/models/{name}/versions")
    assert r.status_code == 200, r.text
    return [v["version"] for v in r.json()["versions"]]


def error_of(r: httpx.Response) -> str:
    body = r.json()
    # A refused push may carry the scanner's report beside the message; nothing else.
    assert set(body) in ({"error"}, {"error", "report"}), r.text
    assert isinstance(body["error"], str)
    assert body["error"]
    return body["error"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    srv = init_server(tmp_path_factory.mktemp("hostile"))
    srv.extra_env = {
        "MODELKEEP_MAX_REQUEST_BYTES": str(MAX_REQUEST),
        "MODELKEEP_MAX_UPLOAD_BYTES": str(MAX_UPLOAD),
    }
    srv.start()
    admin = srv.client(srv.admin_key)
    consumer: httpx.Client | None = None
    try:
        iris = build_iris_onnx()
        assert len(iris) < MAX_UPLOAD
        r = push(srv, MODEL, iris)
        assert r.status_code == 201, r.text
        consumer = srv.client(str(create_key(srv, "consumer", [MODEL])["key"]))
        yield World(server=srv, iris=iris, admin=admin, consumer=consumer)
    finally:
        admin.close()
        if consumer is not None:
            consumer.close()
        srv.stop()


def tensor(**overrides: Any) -> dict[str, Any]:
    rows = iris_rows(2)
    entry: dict[str, Any] = {"name": "input", "shape": [2, 4], "datatype": "FP32", "data": rows}
    entry.update(overrides)
    return entry


def raw(value: Any) -> bytes:
    return json.dumps(value).encode()


def nested(depth: int, leaf: str = "1.0") -> bytes:
    return b"[" * depth + leaf.encode() + b"]" * depth


# --- V2 inference bodies -------------------------------------------------------------------------

INFER_CASES: list[tuple[str, bytes, int]] = [
    # Not JSON, or JSON that is not an object.
    ("malformed-json", b'{"inputs": [', 400),
    ("trailing-garbage", b'{"inputs": []} trailing', 400),
    ("not-utf8", b"\xff\xfe\x00{", 400),
    ("empty-body", b"", 400),
    ("json-array", b"[]", 400),
    ("json-string", b'"inputs"', 400),
    ("json-number", b"42", 400),
    ("json-null", b"null", 400),
    # Wrong structure.
    ("no-inputs", raw({}), 400),
    ("inputs-object", raw({"inputs": {"input": [1, 2, 3, 4]}}), 400),
    ("inputs-empty", raw({"inputs": []}), 400),
    ("input-not-object", raw({"inputs": ["input"]}), 400),
    ("input-name-number", raw({"inputs": [tensor(name=7)]}), 400),
    ("unknown-input", raw({"inputs": [tensor(name="nope")]}), 400),
    ("duplicate-input", raw({"inputs": [tensor(), tensor()]}), 400),
    ("id-not-string", raw({"id": 5, "inputs": [tensor()]}), 400),
    ("parameters-list", raw({"parameters": [], "inputs": [tensor()]}), 400),
    (
        "classification",
        raw(
            {
                "inputs": [tensor()],
                "outputs": [{"name": "label", "parameters": {"classification": 2}}],
            }
        ),
        400,
    ),
    ("outputs-not-list", raw({"inputs": [tensor()], "outputs": "label"}), 400),
    ("unknown-output", raw({"inputs": [tensor()], "outputs": [{"name": "secret"}]}), 400),
    # Wrong datatypes.
    ("datatype-int64", raw({"inputs": [tensor(datatype="INT64")]}), 400),
    ("datatype-unknown", raw({"inputs": [tensor(datatype="FP128")]}), 400),
    ("datatype-number", raw({"inputs": [tensor(datatype=32)]}), 400),
    (
        "datatype-missing",
        raw({"inputs": [{"name": "input", "shape": [1, 4], "data": [1] * 4}]}),
        400,
    ),
    # Wrong shapes.
    ("shape-wrong-width", raw({"inputs": [tensor(shape=[2, 5])]}), 400),
    ("shape-wrong-rank", raw({"inputs": [tensor(shape=[2, 4, 1])]}), 400),
    ("shape-negative", raw({"inputs": [tensor(shape=[-2, 4])]}), 400),
    ("shape-float", raw({"inputs": [tensor(shape=[2.0, 4])]}), 400),
    ("shape-bool", raw({"inputs": [tensor(shape=[True, 4])]}), 400),
    ("shape-string", raw({"inputs": [tensor(shape="2,4")]}), 400),
    (
        "shape-missing",
        raw({"inputs": [{"name": "input", "datatype": "FP32", "data": [1] * 4}]}),
        400,
    ),
    ("shape-rank-100", raw({"inputs": [tensor(shape=[1] * 100)]}), 400),
    # Element counts that do not match the shape.
    ("too-few-rows", raw({"inputs": [tensor(shape=[3, 4])]}), 400),
    ("too-many-rows", raw({"inputs": [tensor(shape=[1, 4])]}), 400),
    ("flat-too-short", raw({"inputs": [tensor(shape=[1, 4], data=[1.0, 2.0, 3.0])]}), 400),
    ("flat-too-long", raw({"inputs": [tensor(shape=[1, 4], data=[1.0] * 5)]}), 400),
    ("ragged", raw({"inputs": [tensor(data=[[1.0, 2.0, 3.0, 4.0], [1.0, 2.0]])]}), 400),
    (
        "nested-too-deep",
        raw({"inputs": [tensor(shape=[1, 4], data=[[[1.0, 2.0, 3.0, 4.0]]])]}),
        400,
    ),
    # Wrong data types.
    ("data-strings", raw({"inputs": [tensor(shape=[1, 4], data=["a", "b", "c", "d"])]}), 400),
    ("data-nulls", raw({"inputs": [tensor(shape=[1, 4], data=[None] * 4)]}), 400),
    ("data-bools", raw({"inputs": [tensor(shape=[1, 4], data=[True] * 4)]}), 400),
    ("data-mixed", raw({"inputs": [tensor(shape=[1, 4], data=[1.0, "2", 3.0, 4.0])]}), 400),
    ("data-object", raw({"inputs": [tensor(shape=[1, 4], data={"a": 1})]}), 400),
    ("data-string", raw({"inputs": [tensor(shape=[1, 4], data="1,2,3,4")]}), 400),
    (
        "data-missing",
        raw({"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32"}]}),
        400,
    ),
    # Huge declared shapes are refused from the shape alone, before any data is read.
    ("shape-2^40-x-2^40", raw({"inputs": [tensor(shape=[2**40, 2**40])]}), 400),
    ("shape-2^40-rows", raw({"inputs": [tensor(shape=[2**40, 4])]}), 413),
    # Past 64 bits the JSON parser yields a float, which is no valid dimension.
    ("shape-2^100-rows", raw({"inputs": [tensor(shape=[2**100, 4])]}), 400),
    # Deep nesting: of the data, of the whole document, of the parameters.
    (
        "deep-data-5000",
        b'{"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": '
        + nested(5000)
        + b"}]}",
        400,
    ),
    (
        "deep-data-500",
        b'{"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": '
        + nested(500)
        + b"}]}",
        400,
    ),
    ("deep-document", nested(10000), 400),
    (
        "deep-parameters",
        b'{"parameters": ' + b'{"a": ' * 3000 + b"1" + b"}" * 3000 + b', "inputs": []}',
        400,
    ),
]


@pytest.mark.parametrize(
    ("body", "expected"), [pytest.param(b, s, id=i) for i, b, s in INFER_CASES]
)
def test_bad_infer_body_is_refused(world: World, body: bytes, expected: int) -> None:
    r = world.clean(
        world.consumer.post(
            f"/v2/models/{MODEL}/infer", content=body, headers={"Content-Type": "application/json"}
        )
    )
    assert expected == r.status_code, r.text
    error_of(r)


def test_a_batch_of_zero_rows_is_not_a_server_error(world: World) -> None:
    body = {"inputs": [tensor(shape=[0, 4], data=[])]}
    r = world.clean(world.consumer.post(f"/v2/models/{MODEL}/infer", json=body))
    assert r.status_code in (200, 400), r.text


@pytest.mark.parametrize("version", ["999", "0", "-1", "abc", "1" * 50, "1.0"])
def test_infer_on_a_missing_version_is_404(world: World, version: str) -> None:
    r = world.clean(
        world.consumer.post(
            f"/v2/models/{MODEL}/versions/{version}/infer", json={"inputs": [tensor()]}
        )
    )
    assert r.status_code == 404, r.text
    error_of(r)


# --- Size limits ---------------------------------------------------------------------------------


def padded_infer_body(size: int) -> bytes:
    """A valid-looking V2 body of about ``size`` bytes (the padding is in the request id)."""
    base = {"id": "", "inputs": [tensor()]}
    overhead = len(raw(base))
    return raw({**base, "id": "x" * max(0, size - overhead)})


def chunks(data: bytes, size: int = 4096) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


def assert_healthy(world: World) -> None:
    assert world.clean(world.admin.get("/v2/health/ready")).status_code == 200
    r = world.clean(world.consumer.post(f"/v2/models/{MODEL}/infer", json={"inputs": [tensor()]}))
    assert r.status_code == 200, r.text
    assert next(o["shape"] for o in r.json()["outputs"] if o["name"] == "label") == [2]


def test_a_body_just_under_the_limit_is_served(world: World) -> None:
    body = padded_infer_body(MAX_REQUEST - 100)
    r = world.clean(world.consumer.post(f"/v2/models/{MODEL}/infer", content=body))
    assert r.status_code == 200, r.text


def test_an_oversized_infer_body_is_413(world: World) -> None:
    body = padded_infer_body(2 * MAX_REQUEST)
    r = world.clean(world.consumer.post(f"/v2/models/{MODEL}/infer", content=body))
    assert r.status_code == 413, r.text
    assert str(MAX_REQUEST) in error_of(r)
    assert_healthy(world)


def test_an_oversized_infer_body_without_content_length_is_413(world: World) -> None:
    body = padded_infer_body(2 * MAX_REQUEST)
    r = world.clean(world.consumer.post(f"/v2/models/{MODEL}/infer", content=chunks(body)))
    assert "content-length" not in r.request.headers
    assert r.status_code == 413, r.text
    assert_healthy(world)


def test_an_oversized_management_body_is_413(world: World) -> None:
    # Settings.max_request_bytes covers management bodies too. The padding is JSON whitespace,
    # so the body is a valid key request in every way but its size.
    body = b'{"role": "consumer", "models": null' + b" " * (2 * MAX_REQUEST) + b"}"
    before = world.clean(world.admin.get("/api/v1/keys")).json()["keys"]
    r = world.clean(
        world.admin.post("/api/v1/keys", content=body, headers={"Content-Type": "application/json"})
    )
    assert r.status_code == 413, r.text
    assert before == world.clean(world.admin.get("/api/v1/keys")).json()["keys"]


def test_an_oversized_push_is_413(world: World) -> None:
    body = random.Random(1).randbytes(4 * MAX_UPLOAD)
    r = world.clean(world.admin.post("/api/v1/models/big/versions", content=body, headers=OCTETS))
    assert r.status_code == 413, r.text
    assert str(MAX_UPLOAD) in error_of(r)
    assert "big" not in world.model_names()
    assert_healthy(world)


def test_an_oversized_push_streamed_without_content_length_is_413(world: World) -> None:
    body = random.Random(2).randbytes(4 * MAX_UPLOAD)
    r = world.clean(
        world.admin.post("/api/v1/models/big-stream/versions", content=chunks(body), headers=OCTETS)
    )
    assert "content-length" not in r.request.headers
    assert r.status_code == 413, r.text
    assert "big-stream" not in world.model_names()
    assert_healthy(world)


def test_a_streamed_push_under_the_limit_is_accepted(world: World) -> None:
    # Control for the streamed 413: chunked transfer itself is fine.
    r = world.clean(signed_push(world, "streamed", world.iris, streamed=True))
    assert (r.status_code, r.json().get("version")) == (201, 1), r.text


# --- Binary extension and its header -------------------------------------------------------------


def binary_request(rows: int = 1, declared: int | None = None) -> tuple[bytes, bytes]:
    """The JSON header and the FP32 data section of a binary-extension request."""
    data = b"\x00\x00\x80\x3f" * (4 * rows)  # 1.0 as little-endian FP32
    size = len(data) if declared is None else declared
    header = raw(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": [rows, 4],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": size},
                }
            ]
        }
    )
    return header, data


def test_a_binary_request_is_served(world: World) -> None:
    # Control for the refusals below: the same request, well formed, is answered.
    header, data = binary_request()
    r = world.clean(
        world.consumer.post(
            f"/v2/models/{MODEL}/infer",
            content=header + data,
            headers={**OCTETS, "Inference-Header-Content-Length": str(len(header))},
        )
    )
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("value", ["abc", "-1", "0", "1.5", "0x10", "9" * 20, "", "١٢"], ids=repr)
def test_an_invalid_inference_header_length_is_400(world: World, value: str) -> None:
    header, data = binary_request()
    r = world.clean(
        world.consumer.post(
            f"/v2/models/{MODEL}/infer",
            content=header + data,
            # As bytes: httpx would refuse to encode the non-ASCII digits itself.
            headers={
                b"Content-Type": b"application/octet-stream",
                b"Inference-Header-Content-Length": value.encode("utf-8"),
            },
        )
    )
    assert r.status_code == 400, r.text
    error_of(r)


@pytest.mark.parametrize(
    ("case", "make"),
    [
        ("header-length-past-the-body", lambda h, d: (h + d, len(h) + len(d) + 100)),
        ("header-length-cuts-the-json", lambda h, d: (h + d, len(h) // 2)),
        ("binary-size-past-the-body", lambda h, d: (h + d[:8], len(h))),
        ("binary-data-after-json-only-request", lambda h, d: (h + d + b"extra", len(h))),
    ],
)
def test_a_binary_body_that_lies_about_its_lengths_is_400(
    world: World, case: str, make: Any
) -> None:
    header, data = binary_request()
    body, length = make(header, data)
    r = world.clean(
        world.consumer.post(
            f"/v2/models/{MODEL}/infer",
            content=body,
            headers={**OCTETS, "Inference-Header-Content-Length": str(length)},
        )
    )
    assert r.status_code == 400, f"{case}: {r.text}"
    error_of(r)


@pytest.mark.parametrize("declared", [0, 8, 17, 64, -16, 2**40])
def test_a_binary_size_not_matching_the_shape_is_400(world: World, declared: int) -> None:
    header, data = binary_request(declared=declared)
    r = world.clean(
        world.consumer.post(
            f"/v2/models/{MODEL}/infer",
            content=header + data,
            headers={**OCTETS, "Inference-Header-Content-Length": str(len(header))},
        )
    )
    assert r.status_code == 400, r.text
    error_of(r)


# --- Uploads that are not acceptable models ------------------------------------------------------


def zip_of(name: str, data: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr(name, data)
    return buf.getvalue()


def truncated_iris() -> bytes:
    data = build_iris_onnx()
    return data[: len(data) // 2]


NOT_A_MODEL = [
    ("random-bytes", lambda: random.Random(0).randbytes(4096), "cannot identify the format"),
    ("text-file", lambda: b"this is a README, not a model\n" * 20, "text file, not a model"),
    ("zip-of-onnx", lambda: zip_of("model.onnx", build_iris_onnx()), "exactly one servable file"),
    ("pickle", lambda: pickle.dumps({"weights": [1.0, 2.0]}), "pickle"),
    ("empty", lambda: b"", "empty"),
]


@pytest.mark.parametrize(("make", "hint"), [pytest.param(m, h, id=i) for i, m, h in NOT_A_MODEL])
def test_an_upload_that_is_not_onnx_is_refused_with_a_clear_message(
    world: World, request: pytest.FixtureRequest, make: Any, hint: str
) -> None:
    name = f"junk-{request.node.callspec.id}"
    data = make()
    r = world.clean(signed_push(world, name, data))
    assert 400 <= r.status_code < 500, r.text
    assert hint in error_of(r).lower()
    assert versions_of(world, name) == []


@pytest.mark.parametrize(
    ("make", "hint"),
    [
        pytest.param(truncated_iris, "not a valid ONNX model", id="truncated-onnx"),
        pytest.param(build_custom_domain_onnx, "com.example", id="custom-domain-operator"),
        pytest.param(build_external_data_onnx, "separate file", id="external-data"),
    ],
)
def test_a_refused_onnx_model_is_422_naming_the_problem(
    world: World, request: pytest.FixtureRequest, make: Any, hint: str
) -> None:
    name = f"refused-{request.node.callspec.id}"
    r = world.clean(signed_push(world, name, make()))
    assert r.status_code == 422, r.text
    assert hint in error_of(r)
    assert r.json()["report"]["verdict"] in ("error", "malicious")
    assert versions_of(world, name) == []


# --- Names, labels, keys -------------------------------------------------------------------------

# As they go into the URL path; the server sees them percent-decoded.
BAD_NAMES = {
    "uppercase": "Iris",
    "dot-dot-slash": "..%2Fx",
    "dot-dot": "%2E%2E",
    "200-chars": "a" * 200,
    "unicode": "ïris",
    "leading-dash": "-iris",
    "space": "ir%20is",
    "nul-byte": "ir%00is",
}


@pytest.mark.parametrize("name", BAD_NAMES.values(), ids=BAD_NAMES.keys())
def test_an_invalid_model_name_is_refused(world: World, name: str) -> None:
    before = world.model_names()
    r = world.clean(
        world.admin.post(f"/api/v1/models/{name}/versions", content=world.iris, headers=OCTETS)
    )
    assert 400 <= r.status_code < 500, r.text
    error_of(r)
    assert before == world.model_names()


@pytest.mark.parametrize("method", ["PUT", "DELETE"])
@pytest.mark.parametrize("label", BAD_NAMES.values(), ids=BAD_NAMES.keys())
def test_an_invalid_label_name_is_refused(world: World, method: str, label: str) -> None:
    before = world.labels()
    kwargs: dict[str, Any] = {"json": {"version": 1}} if method == "PUT" else {}
    r = world.clean(world.admin.request(method, f"/api/v1/models/{MODEL}/labels/{label}", **kwargs))
    assert 400 <= r.status_code < 500, r.text
    error_of(r)
    assert before == world.labels()


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("PUT", f"/api/v1/models/{MODEL}/labels/staging", {"version": 99}),
        ("PUT", "/api/v1/models/no-such-model/labels/staging", {"version": 1}),
        ("DELETE", f"/api/v1/models/{MODEL}/labels/never-set", None),
        ("DELETE", "/api/v1/keys/aaaaaaaaaaaa", None),
        ("DELETE", "/api/v1/keys/..%2F..%2Fetc", None),
    ],
    ids=[
        "label-missing-version",
        "label-missing-model",
        "delete-missing-label",
        "revoke-missing-key",
        "revoke-path-trick",
    ],
)
def test_a_reference_to_something_missing_is_404(
    world: World, method: str, path: str, body: Any
) -> None:
    kwargs: dict[str, Any] = {} if body is None else {"json": body}
    r = world.clean(world.admin.request(method, path, **kwargs))
    assert r.status_code == 404, r.text
    error_of(r)


LABEL_BODIES: dict[str, bytes] = {
    "version-word": raw({"version": "one"}),
    "version-numeric-string": raw({"version": "1"}),
    "version-bool": raw({"version": True}),
    "version-fraction": raw({"version": 1.5}),
    "version-null": raw({"version": None}),
    "version-list": raw({"version": [1]}),
    "version-zero": raw({"version": 0}),
    "version-negative": raw({"version": -1}),
    "version-2^64": raw({"version": 2**64}),
    "missing-version": raw({}),
    "extra-field": raw({"version": 1, "force": True}),
    "not-json": b"version=1",
    "json-list": raw([1]),
    "empty": b"",
    "deep": nested(5000),
}


@pytest.mark.parametrize("body", LABEL_BODIES.values(), ids=LABEL_BODIES.keys())
def test_a_bad_label_body_is_400(world: World, request: pytest.FixtureRequest, body: bytes) -> None:
    label = f"bad-{request.node.callspec.id}"  # one per case: an accepted body cannot cascade
    r = world.clean(
        world.admin.put(
            f"/api/v1/models/{MODEL}/labels/{label}",
            content=body,
            headers={"Content-Type": "application/json"},
        )
    )
    assert r.status_code == 400, r.text
    error_of(r)
    assert label not in world.labels()


def _past() -> str:
    return (datetime.now(UTC) - timedelta(minutes=1)).isoformat()


KEY_BODIES: dict[str, Any] = {
    "role-root": lambda: raw({"role": "root", "models": None}),
    "role-number": lambda: raw({"role": 1, "models": None}),
    "role-missing": lambda: raw({"models": None}),
    "role-uppercase": lambda: raw({"role": "ADMIN", "models": None}),
    "models-string": lambda: raw({"role": "consumer", "models": MODEL}),
    "models-numbers": lambda: raw({"role": "consumer", "models": [1]}),
    "models-empty": lambda: raw({"role": "consumer", "models": []}),
    "models-bad-name": lambda: raw({"role": "consumer", "models": ["../x"]}),
    "admin-with-models": lambda: raw({"role": "admin", "models": [MODEL]}),
    "expires-in-the-past": lambda: raw({"role": "consumer", "models": None, "expires_at": _past()}),
    "expires-not-a-date": lambda: raw({"role": "consumer", "models": None, "expires_at": "soon"}),
    "expires-without-zone": lambda: raw(
        {"role": "consumer", "models": None, "expires_at": "2099-01-01T00:00:00"}
    ),
    "description-number": lambda: raw({"role": "consumer", "models": None, "description": 5}),
    "description-too-long": lambda: raw(
        {"role": "consumer", "models": None, "description": "d" * 1001}
    ),
    "extra-field": lambda: raw({"role": "consumer", "models": None, "admin": True}),
    "not-json": lambda: b"role=admin",
    "json-list": lambda: raw([{"role": "consumer"}]),
    "empty": lambda: b"",
    "deep": lambda: nested(5000),
}


@pytest.mark.parametrize("make", KEY_BODIES.values(), ids=KEY_BODIES.keys())
def test_a_bad_key_body_is_400(world: World, make: Any) -> None:
    before = world.clean(world.admin.get("/api/v1/keys")).json()["keys"]
    r = world.clean(
        world.admin.post(
            "/api/v1/keys", content=make(), headers={"Content-Type": "application/json"}
        )
    )
    assert r.status_code == 400, r.text
    error_of(r)
    assert before == world.clean(world.admin.get("/api/v1/keys")).json()["keys"]


# --- Concurrency ---------------------------------------------------------------------------------


def test_sixteen_concurrent_pushes_get_versions_one_to_sixteen(world: World) -> None:
    n = 16
    barrier = threading.Barrier(n)

    def one(_: int) -> httpx.Response:
        with world.server.client(world.server.admin_key) as c:
            # Connect and finish the TLS handshake first, so the pushes themselves overlap.
            assert c.get("/v2/health/live").status_code == 200
            barrier.wait(timeout=30)
            return c.post(
                "/api/v1/models/concurrent/versions",
                params={"filename": "model.onnx"},
                content=world.iris,
                headers={**OCTETS, "Modelkeep-Signature": signature},
            )

    ensure_model(world.server, "concurrent")
    signature = base64.b64encode(sign_bytes(world.iris)).decode()
    with ThreadPoolExecutor(max_workers=n) as pool:
        responses = [world.clean(r) for r in pool.map(one, range(n))]
    assert [201] * n == [r.status_code for r in responses], [r.text for r in responses]
    assert list(range(1, n + 1)) == sorted(r.json()["version"] for r in responses)

    listed = world.clean(world.admin.get("/api/v1/models/concurrent/versions")).json()["versions"]
    assert list(range(1, n + 1)) == [v["version"] for v in listed]
    digest = hashlib.sha256(world.iris).hexdigest()
    for version in range(1, n + 1):
        meta = world.clean(world.admin.get(f"/api/v1/models/concurrent/versions/{version}"))
        assert (200, digest) == (meta.status_code, meta.json()["sha256"]), meta.text
        v2_meta = world.clean(world.admin.get(f"/v2/models/concurrent/versions/{version}"))
        assert v2_meta.status_code == 200, v2_meta.text
        r = world.clean(
            world.admin.post(
                f"/v2/models/concurrent/versions/{version}/infer", json={"inputs": [tensor()]}
            )
        )
        assert (200, str(version)) == (r.status_code, r.json().get("model_version")), r.text


# --- Afterwards ----------------------------------------------------------------------------------


def test_after_all_of_it_the_server_is_healthy_and_serves(world: World) -> None:
    assert world.server.proc is not None
    assert world.server.proc.poll() is None
    assert_healthy(world)
    assert "Traceback" not in world.server.log()
