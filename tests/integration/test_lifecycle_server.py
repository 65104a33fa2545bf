"""The lifecycle on a real server with two workers: a deleted version is 404 on every worker,
its BOM still exports, and retention rules run on the servers' own schedule, audited."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator
from harness import init_server, push, run_cli

from modelkeep.testing import build_iris_onnx

pytestmark = pytest.mark.integration

INFER = {
    "inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}]
}


def test_delete_is_404_on_every_worker_and_retention_runs_on_schedule(tmp_path: Path) -> None:
    server = init_server(tmp_path, workers=2)
    server.extra_env["MODELKEEP_RETENTION_INTERVAL_S"] = "10"
    server.start()
    try:
        for seed in range(2):
            assert push(server, "iris", build_iris_onnx(seed=seed)).status_code == 201
        # Fresh connections spread over both workers' sockets: both load version 1.
        for _ in range(12):
            with server.client(server.admin_key) as c:
                assert c.post("/v2/models/iris/versions/1/infer", json=INFER).status_code == 200
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
        assert JsonStrictValidator(SchemaVersion.V1_4).validate_str(bom.text) is None
        props = {p["name"]: p["value"] for p in bom.json()["metadata"]["component"]["properties"]}
        assert props["modelkeep:signature:signed"] == "True"
        assert len(props["modelkeep:signature:identity"]) > 16

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
