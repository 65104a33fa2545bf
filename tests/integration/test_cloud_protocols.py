"""SageMaker and Azure ML contracts over real HTTPS: a way in, never a way around.

Each test compares a protocol's answer with V2's for the same model and rows, or shows that the
same refusals apply: no key 401, another model's key 403 (saying nothing about the model),
hostile bodies 4xx, the rate limit 429, ``label_only`` hardening, and an authorization matrix
over every new route. The SageMaker contract is exercised as SageMaker's local mode does it
(``sagemaker.local.LocalSagemakerRuntimeClient``: urllib3, ``/ping``, ``/invocations`` with
``Content-type``, ``Accept`` and ``X-Amzn-SageMaker-Custom-Attributes``), on a plaintext
SageMaker listener.
"""

from __future__ import annotations

import io
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
import urllib3
from harness import MODELKEEP, Server, create_key, free_port, init_server, push
from openapi_spec_validator import validate
from openapi_spec_validator.validation import OpenAPIV2SpecValidator

from modelkeep.testing import build_iris_onnx, iris_rows

pytestmark = pytest.mark.integration

ROWS = iris_rows(6)
# No limits, every output, no detectors: the answers compared below are the model's own.
OPEN_POLICY = {"limits": {}, "output": "full", "detect": []}
CSV = "".join(",".join(str(x) for x in row) + "\n" for row in ROWS).encode()


def npy(array: np.ndarray) -> bytes:
    stream = io.BytesIO()
    np.save(stream, array, allow_pickle=False)
    return stream.getvalue()


def v2_body(rows: list[list[float]]) -> dict[str, Any]:
    return {
        "inputs": [{"name": "input", "shape": [len(rows), 4], "datatype": "FP32", "data": rows}]
    }


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A server whose /invocations and /score default to `iris` (versions 1 and 2, label `blue`
    on 1), with `beta` beside it, and keys for each."""
    srv = init_server(tmp_path_factory.mktemp("cloud"))
    srv.extra_env = {"MODELKEEP_SAGEMAKER_MODEL": "iris", "MODELKEEP_AZUREML_MODEL": "iris"}
    srv.start()
    try:
        assert push(srv, "iris", build_iris_onnx(seed=0)).status_code == 201
        assert push(srv, "iris", build_iris_onnx(seed=1)).status_code == 201
        assert push(srv, "beta", build_iris_onnx(seed=2)).status_code == 201
        with srv.client(srv.admin_key) as admin:
            assert admin.put("/api/v1/models/iris/labels/blue", json={"version": 1}).is_success
            for model in ("iris", "beta"):
                r = admin.put(f"/api/v1/models/{model}/policy", json=OPEN_POLICY)
                assert r.status_code == 200, r.text
        keys = {
            "con": str(create_key(srv, "consumer", ["iris"])["key"]),
            "cbo": str(create_key(srv, "consumer", ["beta"])["key"]),
        }
        yield {"server": srv, "keys": keys}
    finally:
        srv.stop()


def v2_answer(srv: Server, key: str, version: str | None = None) -> dict[str, Any]:
    path = (
        "/v2/models/iris/infer" if version is None else f"/v2/models/iris/versions/{version}/infer"
    )
    with srv.client(key) as c:
        r = c.post(path, json=v2_body(ROWS))
    assert r.status_code == 200, r.text
    return {o["name"]: np.asarray(o["data"]).reshape(o["shape"]) for o in r.json()["outputs"]}


def from_rows(predictions: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    return {
        "label": np.asarray([p["label"] for p in predictions]),
        "probabilities": np.float32([p["probabilities"] for p in predictions]),
    }


def same(expected: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> None:
    assert expected.keys() == got.keys()
    np.testing.assert_array_equal(expected["label"], got["label"])
    np.testing.assert_array_equal(
        np.float32(expected["probabilities"]), np.float32(got["probabilities"])
    )


# -- same answers as V2 ------------------------------------------------------------------------


def test_sagemaker_answers_as_v2_in_every_form(cloud: dict[str, Any]) -> None:
    srv, key = cloud["server"], cloud["keys"]["con"]
    expected = v2_answer(srv, key)
    with srv.client(key) as c:
        r = c.post("/invocations", json={"instances": ROWS})
        assert r.status_code == 200, r.text
        same(expected, from_rows(r.json()["predictions"]))
        r = c.post("/invocations", json=ROWS)
        same(expected, from_rows(r.json()["predictions"]))
        r = c.post("/invocations", json=v2_body(ROWS))
        assert r.json()["model_version"] == "2"
        same(
            expected,
            {o["name"]: np.asarray(o["data"]).reshape(o["shape"]) for o in r.json()["outputs"]},
        )
        r = c.post(
            "/invocations",
            content=CSV,
            headers={"Content-Type": "text/csv", "Accept": "text/csv"},
        )
        assert (r.status_code, r.headers["content-type"]) == (200, "text/csv"), r.text
        table = np.loadtxt(io.StringIO(r.text), delimiter=",", ndmin=2)
        same(
            expected,
            {"label": table[:, 0].astype(np.int64), "probabilities": np.float32(table[:, 1:])},
        )
        r = c.post(
            "/invocations",
            content=npy(np.asarray(ROWS)),
            headers={"Content-Type": "application/x-npy"},
        )
        assert r.status_code == 200, r.text
        same(expected, from_rows(r.json()["predictions"]))


def test_sagemaker_target_model_picks_the_model(cloud: dict[str, Any]) -> None:
    srv = cloud["server"]
    with srv.client(cloud["keys"]["cbo"]) as c:
        r = c.post(
            "/invocations", json=ROWS, headers={"X-Amzn-SageMaker-Target-Model": "beta.tar.gz"}
        )
        assert r.status_code == 200, r.text
        # Without the header the default model (iris) is asked for, which this key may not use.
        assert c.post("/invocations", json=ROWS).status_code == 403


def test_azureml_answers_as_v2_and_the_deployment_header_picks_a_label(
    cloud: dict[str, Any],
) -> None:
    srv, key = cloud["server"], cloud["keys"]["con"]
    latest, blue = v2_answer(srv, key), v2_answer(srv, key, "1")
    assert not np.array_equal(
        np.float32(latest["probabilities"]), np.float32(blue["probabilities"])
    )
    split = {"columns": ["a", "b", "c", "d"], "index": list(range(len(ROWS))), "data": ROWS}
    with srv.client(key) as c:
        for body in ({"data": ROWS}, {"input_data": ROWS}, {"input_data": split}):
            r = c.post("/score", json=body)
            assert r.status_code == 200, r.text
            same(latest, from_rows(r.json()))
        r = c.post("/score", json={"data": ROWS}, headers={"azureml-model-deployment": "blue"})
        same(blue, from_rows(r.json()))
        r = c.post("/score", json={"data": ROWS}, headers={"azureml-model-deployment": "green"})
        assert r.status_code == 404


def test_azureml_liveness_and_swagger(cloud: dict[str, Any]) -> None:
    srv = cloud["server"]
    with srv.client() as anon:
        r = anon.get("/")
        assert (r.status_code, r.text) == (200, "Healthy")
        assert anon.get("/swagger.json").status_code == 401
    with srv.client(cloud["keys"]["con"]) as c:
        r = c.get("/swagger.json")
    assert r.status_code == 200, r.text
    document = r.json()
    validate(document, cls=OpenAPIV2SpecValidator)
    assert document["info"]["version"] == "2"
    assert "/score" in document["paths"]


# -- the same refusals -------------------------------------------------------------------------


def test_no_key_is_401_and_another_model_s_key_is_403_revealing_nothing(
    cloud: dict[str, Any],
) -> None:
    srv = cloud["server"]
    with srv.client() as anon:
        for path, body in (("/invocations", ROWS), ("/score", {"data": ROWS})):
            r = anon.post(path, json=body)
            assert (r.status_code, r.json()) == (401, {"error": "missing credentials"}), path
    with srv.client(cloud["keys"]["cbo"]) as c:
        refusals = [
            c.post("/invocations", json=ROWS, headers={"X-Amzn-SageMaker-Target-Model": m})
            for m in ("iris", "no-such-model")
        ]
        refusals.append(c.post("/score", json={"data": ROWS}))
    assert [r.status_code for r in refusals] == [403, 403, 403]
    # An existing model and a missing one are refused alike.
    assert refusals[0].json() == refusals[1].json()
    assert "versions" not in refusals[2].text


@pytest.mark.parametrize(
    ("path", "content_type", "body"),
    [
        ("/invocations", "application/json", b"{garbage"),
        ("/invocations", "application/json", b'{"instances": [["a", "b", "c", "d"]]}'),
        ("/invocations", "application/json", b'{"instances": [[1, 2]]}'),
        ("/invocations", "application/json", b'{"instances": [[[[[[[[1]]]]]]]]}'),
        ("/invocations", "application/json", b"[" * 100_000 + b"]" * 100_000),
        ("/invocations", "text/csv", b"1,2,3,4\n1,2\n"),
        ("/invocations", "text/csv", b"=cmd|' /C calc'!A0,1,2,3\n"),
        ("/invocations", "text/csv", b"1,2,3,4\n" * 5_000_000),
        ("/invocations", "application/x-npy", b"\x80\x04\x95garbage pickle"),
        ("/invocations", "application/x-npy", b"object dtype"),  # made below
        ("/invocations", "application/x-npy", b""),
        ("/invocations", "application/x-npy", b"huge shape"),  # made below
        ("/invocations", "image/png", b"\x89PNG"),
        ("/score", "application/json", b"{garbage"),
        ("/score", "application/json", b'{"data": "nope"}'),
        ("/score", "application/json", b'{"input_data": {"columns": ["a"], "data": [[1, 2]]}}'),
        ("/score", "application/json", b'{"input_data": {"input": [[null, 1, 2, 3]]}}'),
    ],
)
def test_hostile_bodies_are_4xx_never_5xx(
    cloud: dict[str, Any], path: str, content_type: str, body: bytes
) -> None:
    if body == b"object dtype":
        # A pickle inside an .npy file: unpickling it would run code.
        stream = io.BytesIO()
        np.save(stream, np.array([[{"x": 1}, 2, 3, 4]], dtype=object), allow_pickle=True)
        body = stream.getvalue()
    elif body == b"huge shape":
        stream = io.BytesIO()
        header = {"descr": "<f4", "fortran_order": False, "shape": (2**40, 4)}
        np.lib.format.write_array_header_1_0(stream, header)
        body = stream.getvalue() + b"\0" * 64
    srv = cloud["server"]
    with srv.client(cloud["keys"]["con"]) as c:
        r = c.post(path, content=body, headers={"Content-Type": content_type})
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    assert "error" in r.json()
    assert "Traceback" not in r.text
    assert "/src/" not in r.text


def test_over_rate_callers_get_429_and_label_only_strips_scores(cloud: dict[str, Any]) -> None:
    srv = cloud["server"]
    with srv.client(srv.admin_key) as admin:
        try:
            policy = {"limits": {"rate": "2/minute"}, "output": "label_only", "detect": []}
            assert admin.put("/api/v1/models/iris/policy", json=policy).status_code == 200
            time.sleep(0.5)  # the snapshot refresh
            for path, body in (("/invocations", ROWS), ("/score", {"data": ROWS})):
                key = str(create_key(srv, "consumer", ["iris"])["key"])
                with srv.client(key) as c:
                    first = c.post(path, json=body)
                    assert first.status_code == 200, first.text
                    # label_only: a label per row, no probabilities.
                    answer = first.json()
                    labels = answer["predictions"] if path == "/invocations" else answer
                    assert labels == [int(x) for x in labels]
                    assert len(labels) == len(ROWS)
                    assert "probabilities" not in first.text
                    if path == "/invocations":
                        r = c.post(
                            path,
                            content=CSV,
                            headers={"Content-Type": "text/csv", "Accept": "text/csv"},
                        )
                        assert r.text.splitlines()[0].count(",") == 0
                    else:
                        assert c.post(path, json=body).status_code == 200
                    r = c.post(path, json=body)
                    assert r.status_code == 429, r.text
                    assert int(r.headers["Retry-After"]) >= 1
        finally:
            assert admin.put("/api/v1/models/iris/policy", json=OPEN_POLICY).status_code == 200


# -- authorization matrix over every new route -------------------------------------------------

MATRIX = """
method route           none unk adm pub con aud cbo
GET    /ping           200  200 200 200 200 200 200
GET    /               200  200 200 200 200 200 200
POST   /invocations    401  401 200 403 200 403 403
POST   /score          401  401 200 403 200 403 403
GET    /swagger.json   401  401 200 200 200 200 403
"""
COLUMNS = MATRIX.split()[2:9]
CASES = [
    (line.split()[0], line.split()[1], column, int(status))
    for line in MATRIX.strip().splitlines()[1:]
    for column, status in zip(COLUMNS, line.split()[2:], strict=True)
]


@pytest.fixture(scope="module")
def matrix_keys(cloud: dict[str, Any]) -> dict[str, str | None]:
    srv = cloud["server"]
    return {
        "none": None,
        "unk": "mk_AAAAAAAAAAAAAAAA_" + "B" * 43,
        "adm": srv.admin_key,
        "pub": str(create_key(srv, "publisher", ["iris"])["key"]),
        "con": cloud["keys"]["con"],
        "aud": str(create_key(srv, "auditor")["key"]),
        "cbo": cloud["keys"]["cbo"],
    }


@pytest.mark.parametrize(("method", "route", "column", "status"), CASES)
def test_authorization_matrix(
    cloud: dict[str, Any],
    matrix_keys: dict[str, str | None],
    method: str,
    route: str,
    column: str,
    status: int,
) -> None:
    srv = cloud["server"]
    body = {"data": ROWS} if route == "/score" else ROWS
    with srv.client(matrix_keys[column]) as c:
        r = c.request(method, route, json=body if method == "POST" else None)
    assert r.status_code == status, r.text


# -- SageMaker as its local mode drives a container ------------------------------------------


@pytest.fixture(scope="module")
def sagemaker(cloud: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The same data, served as a SageMaker container: plaintext, SAGEMAKER_BIND_TO_PORT."""
    srv: Server = cloud["server"]
    port = free_port()
    env = {
        **os.environ,
        "MODELKEEP_DATA_DIR": str(srv.data_dir),
        "MODELKEEP_SAGEMAKER": "true",
        "MODELKEEP_SAGEMAKER_UNSAFE_PLAINTEXT": "true",
        "MODELKEEP_SAGEMAKER_MODEL": "iris",
        "SAGEMAKER_BIND_TO_PORT": str(port),
    }
    log_path = Path(tmp_path_factory.mktemp("sm")) / "server.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [*MODELKEEP, "serve"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log_path.read_text()
            try:
                if httpx.get(f"{url}/ping", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        assert "PLAIN HTTP" in log_path.read_text()
        yield url
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


def invoke_endpoint(url: str, body: bytes, **headers: str) -> urllib3.BaseHTTPResponse:
    """What ``LocalSagemakerRuntimeClient.invoke_endpoint`` sends (sagemaker/local)."""
    names = {
        "ContentType": "Content-type",
        "Accept": "Accept",
        "CustomAttributes": "X-Amzn-SageMaker-Custom-Attributes",
        "TargetModel": "X-Amzn-SageMaker-Target-Model",
    }
    sent = {names[k]: v for k, v in headers.items()}
    return urllib3.PoolManager().request("POST", f"{url}/invocations", body=body, headers=sent)


def test_sagemaker_local_mode_contract(cloud: dict[str, Any], sagemaker: str) -> None:
    key = cloud["keys"]["con"]
    expected = v2_answer(cloud["server"], key)
    assert urllib3.PoolManager().request("GET", f"{sagemaker}/ping").status == 200
    r = invoke_endpoint(
        sagemaker,
        CSV,
        ContentType="text/csv",
        Accept="text/csv",
        CustomAttributes=f"trace-id=abc,modelkeep-key={key}",
    )
    assert r.status == 200, r.data
    assert r.headers["X-Amzn-SageMaker-Custom-Attributes"] == "trace-id=abc"
    assert key not in str(dict(r.headers))
    assert key.encode() not in r.data
    table = np.loadtxt(io.StringIO(r.data.decode()), delimiter=",", ndmin=2)
    np.testing.assert_array_equal(expected["label"], table[:, 0])
    r = invoke_endpoint(
        sagemaker,
        orjson.dumps({"instances": ROWS}),
        ContentType="application/json",
        Accept="application/json",
        CustomAttributes=f"modelkeep-key={key}",
        TargetModel="iris.tar.gz",
    )
    assert r.status == 200, r.data
    assert "X-Amzn-SageMaker-Custom-Attributes" not in r.headers
    same(expected, from_rows(orjson.loads(r.data)["predictions"]))
    # Without a key: 401; the key in both places: 400.
    assert invoke_endpoint(sagemaker, CSV, ContentType="text/csv").status == 401
    both = urllib3.PoolManager().request(
        "POST",
        f"{sagemaker}/invocations",
        body=CSV,
        headers={
            "Content-type": "text/csv",
            "Authorization": f"Bearer {key}",
            "X-Amzn-SageMaker-Custom-Attributes": f"modelkeep-key={key}",
        },
    )
    assert both.status == 400


def test_the_plaintext_listener_serves_sagemaker_only(
    cloud: dict[str, Any], sagemaker: str
) -> None:
    admin = cloud["server"].admin_key
    for method, path in (
        ("GET", "/api/v1/models"),
        ("POST", "/api/v1/keys"),
        ("POST", "/v2/models/iris/infer"),
        ("GET", "/metrics"),
        ("POST", "/score"),
    ):
        r = httpx.request(
            method, f"{sagemaker}{path}", headers={"Authorization": f"Bearer {admin}"}
        )
        assert r.status_code == 404, (path, r.text)
