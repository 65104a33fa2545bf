"""The day-one tour over real HTTPS: init, push, keys, inference with real V2 clients, refusals."""

from __future__ import annotations

import json
import os
import ssl
import stat
import subprocess
import sys
import time
import warnings
from pathlib import Path

import httpx
import numpy as np
import pytest
from harness import Server, create_key, init_server, publisher_key, push, run_cli

from modelkeep.testing import build_iris_onnx, iris_rows

pytestmark = pytest.mark.integration


def v2_body(rows: list[list[float]], **extra: object) -> dict[str, object]:
    return {
        "inputs": [
            {"name": "input", "shape": [len(rows), 4], "datatype": "FP32", "data": rows},
        ],
        **extra,
    }


@pytest.fixture(scope="module")
def iris_server(server: Server, iris_onnx: bytes) -> Server:
    r = push(server, "iris", iris_onnx)
    assert r.status_code == 201, r.text
    return server


def test_init_makes_a_private_data_dir(tmp_path: Path) -> None:
    srv = init_server(tmp_path)
    mode = stat.S_IMODE(os.stat(srv.data_dir).st_mode)
    assert mode == 0o700
    assert stat.S_IMODE(os.stat(srv.data_dir / "kek.key").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(srv.data_dir / "tls" / "server-key.pem").st_mode) == 0o600
    assert srv.ca_cert == srv.data_dir / "tls" / "ca.pem"
    assert srv.admin_key.startswith("mk_")
    # The key is stored only as a hash: its secret appears in no file.
    secret = srv.admin_key.split("_", 2)[2].encode()
    for path in srv.data_dir.rglob("*"):
        if path.is_file():
            assert secret not in path.read_bytes(), path.name


def test_init_refuses_an_existing_data_dir(tmp_path: Path) -> None:
    srv = init_server(tmp_path)
    before = sorted(p.name for p in srv.data_dir.iterdir())
    proc = run_cli("init", "--data-dir", str(srv.data_dir), check=False)
    assert proc.returncode != 0
    assert "already exists" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in srv.data_dir.iterdir()) == before


def test_health_is_public_and_everything_else_needs_a_key(iris_server: Server) -> None:
    with iris_server.client() as anon:
        assert anon.get("/v2/health/live").json() == {"live": True}
        assert anon.get("/v2/health/ready").status_code == 200
        for path in ("/v2", "/v2/models/iris", "/api/v1/models", "/api/v1/openapi.json", "/nope"):
            r = anon.get(path)
            assert (r.status_code, r.json()) == (401, {"error": "missing credentials"}), path


def test_tls_1_1_is_refused(iris_server: Server) -> None:
    ctx = ssl.create_default_context(cafile=str(iris_server.ca_cert))
    with warnings.catch_warnings():  # the client must be allowed to offer TLS 1.1 at all
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{iris_server.url}/v2/health/live", verify=ctx)
    # Control: the same client allowed TLS 1.2 connects, so the version was the reason.
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    assert httpx.get(f"{iris_server.url}/v2/health/live", verify=ctx).status_code == 200


def local_labels(model: bytes, rows: list[list[float]]) -> list[int]:
    """What ONNX Runtime itself answers for these rows, to compare the server against."""
    from modelkeep.runtime.onnx import OnnxModel

    out = OnnxModel.load(model).run({"input": np.asarray(rows, dtype=np.float32)})
    return [int(x) for x in out["label"]]


def test_infer_with_the_default_version(iris_server: Server, iris_onnx: bytes) -> None:
    consumer = create_key(iris_server, "consumer", ["iris"])
    rows = iris_rows(3)
    with iris_server.client(str(consumer["key"])) as c:
        r = c.post("/v2/models/iris/infer", json=v2_body(rows, id="req-1"))
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["model_name"], body["model_version"], body["id"]) == ("iris", "1", "req-1")
    outputs = {o["name"]: o for o in body["outputs"]}
    assert outputs["label"]["shape"] == [3]
    assert outputs["label"]["datatype"] == "INT64"
    assert outputs["label"]["data"] == local_labels(iris_onnx, rows)
    assert len(set(local_labels(iris_onnx, iris_rows(6)))) == 3  # the rows span all classes
    assert outputs["probabilities"]["shape"] == [3, 3]


def test_outputs_filter_and_flat_data(iris_server: Server) -> None:
    consumer = create_key(iris_server, "consumer", ["iris"])
    rows = iris_rows(2)
    flat = [x for row in rows for x in row]
    body = v2_body(rows, outputs=[{"name": "label"}])
    body["inputs"][0]["data"] = flat  # type: ignore[index]
    with iris_server.client(str(consumer["key"])) as c:
        r = c.post("/v2/models/iris/versions/1/infer", json=body)
    assert r.status_code == 200, r.text
    assert [o["name"] for o in r.json()["outputs"]] == ["label"]
    assert "id" not in r.json()


def test_production_label_chooses_the_default_version(
    iris_server: Server, iris_onnx: bytes
) -> None:
    r = push(iris_server, "labelled", iris_onnx)
    assert (r.status_code, r.json()["version"]) == (201, 1)
    r = push(iris_server, "labelled", build_iris_onnx(seed=1))
    assert (r.status_code, r.json()["version"]) == (201, 2)
    with iris_server.client(iris_server.admin_key) as c:
        assert c.get("/v2/models/labelled").json()["versions"] == ["1", "2"]
        infer = c.post("/v2/models/labelled/infer", json=v2_body(iris_rows(1)))
        assert infer.json()["model_version"] == "2"
        r = c.put("/api/v1/models/labelled/labels/production", json={"version": 1})
        assert r.json() == {"model": "labelled", "label": "production", "version": 1}
        infer = c.post("/v2/models/labelled/infer", json=v2_body(iris_rows(1)))
        assert infer.json()["model_version"] == "1"
        assert c.get("/api/v1/models/labelled").json()["labels"] == {"production": 1}
        assert c.delete("/api/v1/models/labelled/labels/production").status_code == 204
        infer = c.post("/v2/models/labelled/infer", json=v2_body(iris_rows(1)))
        assert infer.json()["model_version"] == "2"


def test_metadata_describes_the_signature(iris_server: Server) -> None:
    with iris_server.client(iris_server.admin_key) as c:
        meta = c.get("/v2/models/iris/versions/1").json()
        server_meta = c.get("/v2").json()
        version = c.get("/api/v1/models/iris/versions/1").json()
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}]
    assert [o["name"] for o in meta["outputs"]] == ["label", "probabilities"]
    assert server_meta["name"] == "modelkeep"
    assert version["signature"]["inputs"] == meta["inputs"]
    assert version["format"] == "onnx"


def test_tritonclient_http_works_unchanged(iris_server: Server) -> None:
    import tritonclient.http as httpclient

    consumer = create_key(iris_server, "consumer", ["iris"])
    headers = {"Authorization": f"Bearer {consumer['key']}"}
    client = httpclient.InferenceServerClient(
        url=iris_server.url.removeprefix("https://"),
        ssl=True,
        ssl_context_factory=lambda: ssl.create_default_context(cafile=str(iris_server.ca_cert)),
    )
    try:
        assert client.is_server_live()
        assert client.is_model_ready("iris", headers=headers)
        meta = client.get_model_metadata("iris", headers=headers)
        assert meta["inputs"][0]["name"] == "input"
        rows = np.asarray(iris_rows(4), dtype=np.float32)
        for binary in (False, True):
            inp = httpclient.InferInput("input", list(rows.shape), "FP32")
            inp.set_data_from_numpy(rows, binary_data=binary)
            out = httpclient.InferRequestedOutput("probabilities", binary_data=binary)
            result = client.infer("iris", [inp], outputs=[out], headers=headers)
            probs = result.as_numpy("probabilities")
            assert probs.shape == (4, 3)
            np.testing.assert_allclose(probs.sum(axis=1), np.ones(4), rtol=1e-5)
    finally:
        client.close()


# The KServe SDK's REST client, run in a process of its own: importing kserve registers its
# generated protobuf messages in the default pool, where tritonclient.grpc (tests/integration/
# test_grpc.py, same pytest process) registers the same names, and the second import fails.
KSERVE_REST_CLIENT = """
import asyncio, json, sys

import numpy as np
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

url, ca, key, rows = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])


async def call():
    client = InferenceRESTClient(config=RESTConfig(protocol="v2", verify=ca))
    try:
        inp = InferInput(name="input", shape=[len(rows), len(rows[0])], datatype="FP32")
        inp.set_data_from_numpy(np.asarray(rows, dtype=np.float32), binary_data=False)
        request = InferRequest(model_name="iris", infer_inputs=[inp])
        return await client.infer(
            url, request, model_name="iris", headers={"Authorization": f"Bearer {key}"}
        )
    finally:
        await client.close()


response = asyncio.run(call())
print(json.dumps({o.name: list(map(int, o.data)) for o in response.outputs if o.name == "label"}))
"""


def test_kserve_sdk_works_unchanged(iris_server: Server) -> None:
    consumer = create_key(iris_server, "consumer", ["iris"])
    rows = iris_rows(2)
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            KSERVE_REST_CLIENT,
            iris_server.url,
            str(iris_server.ca_cert),
            consumer["key"],
            json.dumps(np.asarray(rows, dtype=np.float32).tolist()),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    answer = json.loads(proc.stdout.strip().splitlines()[-1])
    assert answer["label"] == local_labels(build_iris_onnx(), rows)


def test_no_file_in_the_data_dir_holds_model_plaintext(
    iris_server: Server, iris_onnx: bytes
) -> None:
    # A distinctive slice from the middle of the model: the weights.
    middle = len(iris_onnx) // 2
    needle = iris_onnx[middle : middle + 48]
    assert len(needle) == 48
    for path in iris_server.data_dir.rglob("*"):
        if path.is_file():
            assert needle not in path.read_bytes(), path.name


def test_revoked_key_is_refused_within_a_second(iris_server: Server) -> None:
    consumer = create_key(iris_server, "consumer", ["iris"])
    with iris_server.client(str(consumer["key"])) as c:
        assert c.get("/api/v1/whoami").status_code == 200
        with iris_server.client(iris_server.admin_key) as admin:
            assert admin.delete(f"/api/v1/keys/{consumer['id']}").status_code == 200
        time.sleep(1.0)
        r = c.get("/api/v1/whoami")
        assert (r.status_code, r.json()) == (401, {"error": "API key revoked"})


def test_cli_tour(iris_server: Server, iris_onnx: bytes, tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(iris_onnx)
    env = iris_server.cli_env()
    key_file, _ = publisher_key()
    run_cli("models", "create", "clitour", "--description", "tour", env=env)
    run_cli("publishers", "add", "clitour", str(key_file.with_suffix(".pub")), env=env)
    pushed = json.loads(
        run_cli(
            "push", "clitour", str(model), "--sign-key", str(key_file), "--json", env=env
        ).stdout
    )
    assert pushed["signer"].startswith("sha256:")
    assert (pushed["model"], pushed["version"]) == ("clitour", 1)
    run_cli("label", "set", "clitour", "production", "1", env=env)
    models = json.loads(run_cli("models", "ls", "--json", env=env).stdout)
    assert "clitour" in [m["name"] for m in models]
    versions = json.loads(run_cli("versions", "ls", "clitour", "--json", env=env).stdout)
    assert [v["version"] for v in versions] == [1]
    key = json.loads(
        run_cli(
            "keys", "create", "--role", "consumer", "--model", "clitour", "--json", env=env
        ).stdout
    )
    who = json.loads(run_cli("whoami", "--json", env=iris_server.cli_env(key["key"])).stdout)
    assert (who["id"], who["role"], who["models"]) == (key["id"], "consumer", ["clitour"])
    denied = run_cli(
        "models", "ls", env=iris_server.cli_env("mk_aaaaaaaaaaaa_" + "A" * 43), check=False
    )
    assert denied.returncode != 0
    assert denied.stderr.strip() == "error: invalid API key"
    listed = json.loads(run_cli("keys", "ls", "--json", env=env).stdout)
    assert key["id"] in [k["id"] for k in listed]
    run_cli("keys", "revoke", str(key["id"]), env=env)
