"""The lifecycle on a real server and the installed `modelkeep` command: a protected label moves
only with a second person's approval, gates block a bad version, every step is audited and
`modelkeep audit verify` still passes; a deleted version is 404 on every worker, its BOM still
exports, and retention rules run on the servers' own schedule, audited."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
import pytest
from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator
from harness import Server, create_key, init_server, push, run_cli

from modelkeep.testing import build_iris_onnx

pytestmark = pytest.mark.integration

MODEL = "lifecycle"


def iris_evalset(path: Path) -> Path:
    from sklearn.datasets import load_iris

    iris = load_iris()
    buffer = io.BytesIO()
    np.savez(buffer, inputs=iris.data.astype(np.float32), expected=iris.target.astype(np.int64))
    path.write_bytes(buffer.getvalue())
    return path


def wait_evaluated(server: Server, version: int) -> dict[str, object]:
    deadline = time.monotonic() + 60
    with server.client(server.admin_key) as c:
        while True:
            r = c.get(f"/api/v1/models/{MODEL}/eval", params={"version": version})
            found: dict[str, object] = r.json()["versions"][0]
            if found["status"] != "pending" or time.monotonic() > deadline:
                return found
            time.sleep(0.2)


def test_a_protected_label_moves_only_with_a_second_persons_approval(
    server: Server, tmp_path: Path
) -> None:
    publisher = create_key(server, "publisher", [MODEL])
    approver = create_key(server, "approver", [MODEL])
    data = iris_evalset(tmp_path / "eval.npz")
    admin_env = server.cli_env()
    publisher_env = server.cli_env(str(publisher["key"]))
    approver_env = server.cli_env(str(approver["key"]))

    assert push(server, MODEL, build_iris_onnx(), token=str(publisher["key"])).status_code == 201
    run_cli("eval", "set", MODEL, "--data", str(data), "--gate", "accuracy>=0.9", env=admin_env)
    run_cli("label", "protect", MODEL, "production", "--approvals", "1", env=admin_env)
    assert wait_evaluated(server, 1)["status"] == "passed"

    opened = json.loads(
        run_cli("label", "set", MODEL, "production", "1", "--json", env=publisher_env).stdout
    )
    assert (opened["status"], opened["approvals_needed"]) == ("pending", 1)
    own = run_cli("changes", "approve", opened["id"], env=publisher_env, check=False)
    assert (own.returncode, own.stderr) == (
        4,
        "error: not allowed to change.approve on this model\n",
    )
    # The admin made the publisher's key: its approval would be the same person's.
    maker = run_cli("changes", "approve", opened["id"], env=admin_env, check=False)
    assert maker.returncode != 0
    assert "created one from the other" in maker.stderr
    with server.client(server.admin_key) as c:
        assert "production" not in c.get(f"/api/v1/models/{MODEL}").json()["labels"]

    done = json.loads(
        run_cli("changes", "approve", opened["id"], "--json", env=approver_env).stdout
    )
    assert done["status"] == "applied"
    with server.client(server.admin_key) as c:
        assert c.get(f"/api/v1/models/{MODEL}").json()["labels"]["production"] == 1

    listed = run_cli("versions", "ls", MODEL, env={**publisher_env, "COLUMNS": "150"}).stdout
    assert listed.splitlines()[1].split()[-1] == "passed"
    shown = run_cli("eval", "show", MODEL, "1", env=publisher_env).stdout
    assert "version 1: passed (accuracy 0.9" in shown
    verify = run_cli("audit", "verify", "--data-dir", str(server.data_dir), env=admin_env)
    assert verify.returncode == 0
    with server.client(server.admin_key) as c:
        actions = [e["action"] for e in c.get("/api/v1/audit/entries?limit=1000").json()["entries"]]
    for action in ("eval.set", "evalset.read", "change.request", "change.approve", "change.apply"):
        assert action in actions


INFER = {
    "inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}]
}


def _infer_once_known(server: Server) -> int:
    """The status of an infer call to version 1 on a fresh connection, asked again (for at most
    5 s) while the worker it reached has not seen the push yet (404)."""
    deadline = time.monotonic() + 5
    while True:
        with server.client(server.admin_key) as c:
            status = c.post("/v2/models/iris/versions/1/infer", json=INFER).status_code
        if status != 404 or time.monotonic() > deadline:
            return status
        time.sleep(0.1)


def test_delete_is_404_on_every_worker_and_retention_runs_on_schedule(tmp_path: Path) -> None:
    server = init_server(tmp_path, workers=2)
    server.extra_env["MODELKEEP_RETENTION_INTERVAL_S"] = "10"
    server.start()
    try:
        for seed in range(2):
            assert push(server, "iris", build_iris_onnx(seed=seed)).status_code == 201
        # Fresh connections spread over both workers' sockets: both load version 1, the worker
        # that did not take the push once it has seen it (at its next poll of the store).
        for _ in range(12):
            assert _infer_once_known(server) == 200
        with server.client(server.admin_key) as c:
            deleted = c.delete("/api/v1/models/iris/versions/1")
            assert deleted.status_code == 200, deleted.text
            bom = c.get("/api/v1/models/iris/versions/2/bom")
        # Every worker answers 404 from now on (each refreshes before its next write anyway;
        # the read path sees the change within the poll interval).
        time.sleep(1)
        for _ in range(12):
            with server.client(server.admin_key) as c:
                r = c.post("/v2/models/iris/versions/1/infer", json=INFER)
                assert r.status_code == 404, r.text
        assert JsonStrictValidator(SchemaVersion.V1_6).validate_str(bom.text) is None
        props = {p["name"]: p["value"] for p in bom.json()["metadata"]["component"]["properties"]}
        assert props["modelkeep:signature:signed"] == "True"
        assert len(props["modelkeep:signature:identity"]) > 16
        card = bom.json()["metadata"]["component"]["modelCard"]
        card_props = {p["name"]: p["value"] for p in card["properties"]}
        assert card_props["modelkeep:signature:identity"] == props["modelkeep:signature:identity"]

        assert push(server, "iris", build_iris_onnx(seed=2)).status_code == 201
        with server.client(server.admin_key) as c:
            r = c.put("/api/v1/models/iris/retention", json={"keep_versions": 1})
            assert r.status_code == 200, r.text
            deadline = time.monotonic() + 40
            while time.monotonic() < deadline:
                versions = c.get("/api/v1/models/iris/versions").json()["versions"]
                if versions[1]["deleted_at"] is not None:
                    break
                time.sleep(0.5)
            assert [v["deleted_at"] is not None for v in versions] == [True, True, False]
            assert versions[1]["deleted_by"] == "retention"
            assert c.post("/v2/models/iris/infer", json=INFER).json()["model_version"] == "3"
    finally:
        server.stop()
    verified = run_cli("audit", "verify", "--data-dir", str(server.data_dir), "--json")
    assert json.loads(verified.stdout)["ok"] is True
