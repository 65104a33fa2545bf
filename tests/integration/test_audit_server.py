"""The audit log as the server writes it: what is recorded, verification, crash durability."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import pytest
from harness import Server, create_key, init_server, push, run_cli

from modelkeep.testing import build_iris_onnx

pytestmark = pytest.mark.integration


def entries(server: Server, **params: str) -> list[dict[str, object]]:
    with server.client(server.admin_key) as c:
        r = c.get("/api/v1/audit/entries", params={"limit": "1000", **params})
    assert r.status_code == 200, r.text
    found: list[dict[str, object]] = r.json()["entries"]
    return found


def test_security_events_are_recorded_and_the_chain_verifies(server: Server) -> None:
    assert push(server, "audited", build_iris_onnx()).status_code == 201
    key = create_key(server, "auditor")
    with server.client("mk_aaaaaaaaaaaa_" + "B" * 43) as bad:
        assert bad.get("/v2").status_code == 401
    with server.client(server.admin_key) as c:
        assert c.delete(f"/api/v1/keys/{key['id']}").status_code == 200
    actions = {(e["action"], e["outcome"]) for e in entries(server)}
    started = entries(server, action="server.start")[-1]["details"]
    assert len(started["settings_sha256"]) == 64  # type: ignore[index,arg-type]
    for expected in [
        ("server.start", "success"),
        ("model.configure", "success"),
        ("publisher.add", "success"),
        ("model.push", "success"),
        ("key.create", "success"),
        ("key.revoke", "success"),
        ("auth.failure", "denied"),
    ]:
        assert expected in actions
    pushed = next(e for e in entries(server, action="model.push") if e["target"] == "model:audited")
    details = pushed["details"]
    assert isinstance(details, dict)
    assert (details["scan"], details["format"], details["version"]) == ("safe", "onnx", 1)
    assert str(details["signer"]).startswith("sha256:")
    # No secret anywhere in the log.
    dump = json.dumps(entries(server))
    assert server.admin_key.split("_", 2)[2] not in dump
    assert str(key["key"]).split("_", 2)[2] not in dump
    with server.client(server.admin_key) as c:
        verdict = c.get("/api/v1/audit/verify").json()
    assert verdict["ok"] is True


def test_a_refused_push_is_recorded_with_its_scan_verdict(server: Server) -> None:
    import pickle

    r = push(server, "refusals", pickle.dumps({"w": [1.0]}))
    assert r.status_code == 422
    refused = [e for e in entries(server, action="model.push") if e["target"] == "model:refusals"]
    assert [(e["outcome"], e["details"]["scan"]) for e in refused] == [  # type: ignore[index]
        ("failure", "unsafe-format")
    ]


def test_an_acknowledged_admin_action_survives_sigkill_and_tampering_is_detected(
    tmp_path: Path,
) -> None:
    srv = init_server(tmp_path)
    srv.start()
    try:
        key = create_key(srv, "consumer", None, description="made just before the crash")
    finally:
        srv.kill()
    srv.start()
    try:
        with srv.client(str(key["key"])) as c:
            assert c.get("/api/v1/whoami").status_code == 200
        created = entries(srv, action="key.create")
        assert [e["details"]["key"] for e in created] == [key["id"]]  # type: ignore[index]
        # The first run stopped by SIGKILL wrote no stop event; this one will, on a clean stop.
        assert entries(srv, action="server.stop") == []
    finally:
        srv.stop()
    stops = [
        json.loads(line)
        for line in run_cli(
            "audit", "export", "--data-dir", str(srv.data_dir), "--action", "server.stop"
        ).stdout.splitlines()
    ]
    assert [len(s["details"]["settings_sha256"]) for s in stops] == [64]
    ok = run_cli("audit", "verify", "--data-dir", str(srv.data_dir), "--json", check=False)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    with sqlite3.connect(srv.data_dir / "modelkeep.db") as db:
        db.execute("UPDATE audit_log SET actor = 'someone-else' WHERE action = 'key.create'")
        bad_seq = db.execute("SELECT seq FROM audit_log WHERE action = 'key.create'").fetchone()[0]
    broken = run_cli("audit", "verify", "--data-dir", str(srv.data_dir), "--json", check=False)
    assert broken.returncode == 1, broken.stdout + broken.stderr
    assert json.loads(broken.stdout)["first_bad_seq"] == bad_seq


def test_metrics_are_for_auditors_and_the_access_log_holds_no_secret(server: Server) -> None:
    assert push(server, "observed", build_iris_onnx()).status_code == 201
    consumer = create_key(server, "consumer", ["observed"])
    auditor = create_key(server, "auditor")
    marker = 4.123456789
    body = {
        "inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [marker] * 4}]
    }
    with server.client(str(consumer["key"])) as c:
        assert c.post("/v2/models/observed/infer", json=body).status_code == 200
        assert c.get("/metrics").status_code == 403
    with server.client(str(auditor["key"])) as c:
        r = c.get("/metrics")
    assert r.status_code == 200, r.text
    text = r.text
    for name in (
        "modelkeep_requests_total",
        "modelkeep_request_duration_seconds",
        "modelkeep_inference_duration_seconds",
        "modelkeep_auth_failures_total",
        "modelkeep_models_loaded",
    ):
        assert name in text
    assert 'route="/v2/models/{model}/infer"' in text
    # Access lines go out in batches, at most 50 ms after their request.
    deadline = time.monotonic() + 5
    while '"route":"/v2/models/{model}/infer"' not in server.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    log = server.log()
    access = [line for line in log.splitlines() if '"event":"access"' in line]
    assert any('"route":"/v2/models/{model}/infer"' in line for line in access)
    assert any('"rows":1' in line for line in access)
    for secret in (server.admin_key, str(consumer["key"]), str(auditor["key"])):
        assert secret.split("_", 2)[2] not in log
    assert str(marker) not in log
