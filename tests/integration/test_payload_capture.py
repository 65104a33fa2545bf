"""Payload capture on a real server: opt-in per model, sealed at rest, read only by auditors."""

from __future__ import annotations

import base64
import json
import sqlite3
import time
from typing import Any

import httpx
import pytest
from harness import Server, create_key, push

from modelkeep.testing import build_iris_onnx

pytestmark = pytest.mark.integration

MARKER = "6.13579024"


def infer_body(marker: str = MARKER) -> bytes:
    """A V2 request whose text holds ``marker`` (written out by hand so the bytes are known)."""
    return (
        '{"inputs":[{"name":"input","shape":[1,4],"datatype":"FP32",'
        f'"data":[{marker},{marker},{marker},{marker}]}}]}}'
    ).encode()


def list_captures(client: httpx.Client, model: str) -> httpx.Response:
    return client.get(f"/api/v1/models/{model}/captures")


def wait_for_captures(client: httpx.Client, model: str, count: int) -> list[dict[str, Any]]:
    """The writer stores captures in the background: poll (bounded) until ``count`` are there."""
    deadline = time.monotonic() + 20
    while True:
        r = list_captures(client, model)
        assert r.status_code == 200, r.text
        found: list[dict[str, Any]] = r.json()["captures"]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def test_captured_inference_is_sealed_and_only_auditors_read_it(server: Server) -> None:
    for model in ("captured", "uncaptured"):
        assert push(server, model, build_iris_onnx()).status_code == 201
    with server.client(server.admin_key) as admin:
        r = admin.put(
            "/api/v1/models/captured/policy", json={"capture": {"sample": 1.0, "days": 7}}
        )
        assert r.status_code == 200, r.text
        assert r.json()["capture"] == {"sample": 1.0, "days": 7}
        assert admin.get("/api/v1/models/uncaptured/policy").json()["capture"] is None
    consumer = create_key(server, "consumer", ["captured", "uncaptured"])
    auditor = create_key(server, "auditor")
    body = infer_body()
    headers = {"Content-Type": "application/json"}
    with server.client(str(consumer["key"])) as c:
        # Capture is off by default: this one must never be stored. It goes first, and the
        # writer is one queue, so once the later capture is listed this one would be too.
        off = c.post("/v2/models/uncaptured/infer", content=infer_body("5.5"), headers=headers)
        assert off.status_code == 200, off.text
        answer = c.post("/v2/models/captured/infer", content=body, headers=headers)
        assert answer.status_code == 200, answer.text

    with server.client(str(auditor["key"])) as a:
        listed = wait_for_captures(a, "captured", 1)
        assert list_captures(a, "uncaptured").json()["captures"] == []
        assert len(listed) == 1
        meta = listed[0]
        assert (consumer["id"], 1, len(body), len(answer.content)) == (
            meta["principal"],
            meta["version"],
            meta["input_size"],
            meta["output_size"],
        )
        assert "record" not in meta
        read = a.get(f"/api/v1/models/captured/captures/{meta['id']}")
    assert read.status_code == 200, read.text
    record = read.json()["record"]
    assert body == base64.b64decode(record["input"])
    assert answer.content == base64.b64decode(record["output"])
    assert (consumer["id"], "captured", 1) == (
        record["principal"],
        record["model"],
        record["version"],
    )
    assert answer.headers["x-request-id"] == record["request_id"]

    # Consumers may neither list nor read captures, even of a model they may run.
    with server.client(str(consumer["key"])) as c:
        assert list_captures(c, "captured").status_code == 403
        assert c.get(f"/api/v1/models/captured/captures/{meta['id']}").status_code == 403
    with server.client(server.admin_key) as admin:
        assert admin.get(f"/api/v1/models/captured/captures/{meta['id']}").status_code == 200
        assert admin.get("/api/v1/models/captured/captures/" + "0" * 32).status_code == 404
        reads = admin.get(
            "/api/v1/audit/entries", params={"action": "capture.read", "limit": "100"}
        ).json()["entries"]

    # Every read, allowed or refused, is in the audit log, oldest last.
    seen = [(e["actor"], e["outcome"], e["details"]["id"]) for e in reversed(reads)]
    admin_id = server.admin_key.split("_")[1]
    assert [
        (auditor["id"], "success", meta["id"]),
        (consumer["id"], "denied", meta["id"]),
        (admin_id, "success", meta["id"]),
        (admin_id, "failure", "0" * 32),
    ] == seen
    assert all(e["target"] == "model:captured" for e in reads)

    # Nothing under the data dir, nor the server's log, holds the payload in the clear.
    encoded = base64.b64encode(body)
    for path in server.data_dir.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert MARKER.encode() not in data, path.name
            assert encoded not in data, path.name
    assert MARKER not in server.log()
    with sqlite3.connect(server.data_dir / "modelkeep.db") as db:
        rows = db.execute("SELECT model_id FROM payload_captures").fetchall()
    assert len(rows) == 1


def test_policy_refuses_an_invalid_capture_setting(server: Server) -> None:
    assert push(server, "badcapture", build_iris_onnx()).status_code == 201
    with server.client(server.admin_key) as admin:
        for bad in ({"sample": 2, "days": 7}, {"sample": 0.5, "days": 0}, "yes"):
            r = admin.put("/api/v1/models/badcapture/policy", json={"capture": bad})
            assert r.status_code == 400, r.text
            assert "capture" in json.dumps(r.json())
